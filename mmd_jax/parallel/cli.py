"""The --mode=print_sharding and --mode=aot entry points of mmd_jax.main."""
from __future__ import annotations

import math
import os

import jax
from etils import epath

from mmd_jax.diffusion import conditioning
from mmd_jax.parallel import aot as aot_lib
from mmd_jax.parallel import mesh as mesh_lib
from mmd_jax.parallel import report
from mmd_jax.parallel import sharding as sharding_lib


def _device_count(config, topology):
  if not topology:
    return jax.device_count(), f"{jax.device_count()} local {jax.devices()[0].platform} devices"
  slices = math.prod(mesh_lib.dcn_shape(config.mesh))
  try:
    n = len(aot_lib.topology_devices(topology, num_slices=slices))
  except aot_lib.AotError:  # no libtpu: one device per chip
    n = aot_lib.num_chips(topology) * slices
  return n, f"{topology} x {slices} slice(s), {n} devices"


def state_decisions(config, *, axis_sizes):
  """Decision trees {'params': ..., whole state parts ...} for the config's run, shapes only."""
  from mmd_jax.models import build as model_build  # pylint: disable=g-import-not-at-top
  from mmd_jax.training import optim, state as state_lib  # pylint: disable=g-import-not-at-top
  data_shape, num_classes, _ = aot_lib.shapes_from_config(config)
  model = model_build.build_model(config.model, data_shape=data_shape, num_classes=num_classes)
  rules = model_build.logical_rules(config.model, config.mesh)
  opts = sharding_lib.options_from_config(config.mesh, model_rules=rules)
  distill = config.get("distill")
  text_shape = conditioning.model_text_shape(config.model)
  if distill is None:
    tx = optim.make_optimizer(config.optim, total_steps=int(config.training.num_steps))
    abstract = state_lib.abstract_state(model, tx, data_shape=data_shape,
                                        num_classes=num_classes, text_shape=text_shape)
    dec = sharding_lib.decide_tree(abstract, axis_sizes=axis_sizes, **opts)
    return {"params": dec.params, "opt_state": dec.opt_state, "ema_params": dec.ema_params}
  from mmd_jax.distill import steps as distill_steps  # pylint: disable=g-import-not-at-top
  student_tx, aux_tx = distill_steps.make_optimizers(distill)
  boxed = jax.eval_shape(lambda r: state_lib.init_params(
      model, rng=r, data_shape=data_shape, num_classes=num_classes, text_shape=text_shape),
                         jax.random.PRNGKey(0))
  abstract = jax.eval_shape(lambda p: distill_steps.init_distill_state(
      config=distill, init_params=p, student_tx=student_tx, aux_tx=aux_tx), boxed)
  dec = sharding_lib.decide_tree(abstract, axis_sizes=axis_sizes, **opts)
  groups = {"params": dec.params, "opt_state": dec.opt_state, "ema_params": dec.ema_params,
            "teacher (arg)": sharding_lib.decide_tree(boxed, axis_sizes=axis_sizes, **opts)}
  if distill.variant == "alternating":
    groups.update({"aux_params": dec.aux_params, "aux_opt_state": dec.aux_opt_state})
  elif distill.preconditioner != "identity":
    groups["precond (arg)"] = groups["teacher (arg)"]
  if jax.tree_util.tree_leaves(dec.nu_ema, is_leaf=sharding_lib.is_decision):
    groups["nu_ema"] = dec.nu_ema
  return groups


def print_sharding(config, *, topology=None) -> str:
  n, where = _device_count(config, topology)
  ici, dcn = mesh_lib.hybrid_mesh_shape(config.mesh, num_devices=n)
  axis_sizes = {a: i * d for a, i, d in zip(mesh_lib.MESH_AXES, ici, dcn)}
  groups = state_decisions(config, axis_sizes=axis_sizes)
  text = report.sharding_table(groups["params"], axis_sizes=axis_sizes,
                               title=f"Parameters on mesh {axis_sizes} ({where}):")
  text += "\n\n" + report.memory_table(groups, axis_sizes=axis_sizes)
  notes = sum(len(d.notes) for d in sharding_lib.decisions_list(groups["params"]))
  text += f"\n\n{notes} notes (replicated dimensions, fsdp_fill) in the table above."
  print(text, flush=True)
  return text


def aot(config, workdir, *, topology) -> dict:
  if not topology:
    raise aot_lib.AotError("--mode=aot needs --topology, e.g. --topology=v5p:4x4x4.")
  row = aot_lib.run_aot(config, topology=topology)
  print(aot_lib.format_row(row), flush=True)
  if workdir:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    path = os.path.join(workdir, f"aot_{topology.replace(':', '_')}.json")
    epath.Path(path).write_text(aot_lib.to_json(row))
    print(f"wrote {path}", flush=True)
  return row
