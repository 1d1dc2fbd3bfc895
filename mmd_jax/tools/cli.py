"""The --mode=print_sharding and --mode=aot entry points of mmd_jax.main."""
from __future__ import annotations

import math
import os

import jax
from etils import epath

from mmd_jax import io_utils, runs
from mmd_jax.parallel import mesh as mesh_lib
from mmd_jax.parallel import sharding as sharding_lib
from mmd_jax.tools import aot as aot_lib
from mmd_jax.tools import report


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
  """Decision trees {'params': ..., every other part of the run's state, and its frozen inputs
  as '<name> (arg)'} for the config's run (shapes only)."""
  run = runs.build(config, kind=runs.kind_of(config), mesh=None, need_data=False)
  decide = lambda tree: sharding_lib.decide_tree(tree, axis_sizes=axis_sizes, **run.options)
  state = decide(run.abstract_state)
  groups = {name: getattr(state, name) for name in run.state_part_names()}
  groups.update({f"{name} (arg)": decide(tree) for name, tree in run.abstract_frozen().items()})
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
    io_utils.write_text_atomic(path, aot_lib.to_json(row))
    print(f"wrote {path}", flush=True)
  return row
