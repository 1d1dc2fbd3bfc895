"""Ahead-of-time compilation of a config's real train step for a TPU slice, on a CPU machine.

    python -m mmd_jax.main --config=configs/imagenet64_distill.py --workdir=/tmp/aot \\
        --mode=aot --topology=v5p:4x4x4

needs libtpu (`pip install "jax[tpu]==0.10.2"`, which pins libtpu 0.0.42.*); no TPU is used:
jax.experimental.topologies.get_topology_desc describes the slice, the step is lowered on
ShapeDtypeStructs with the run's shardings (nothing is allocated), and XLA's TPU compiler reports
per-device memory (compiled.memory_analysis()) and cost (compiled.cost_analysis()).

The step is the one the run would jit: the teacher's step (training.steps) for a teacher config,
or the distillation step of config.distill.variant (distill.steps) with the frozen teacher (and,
parameter-space, the preconditioner) as sharded arguments. Multislice configs
(config.mesh.dcn_* > 1) compile for num_slices copies of the topology.

Reported: per-device argument / output / temporary bytes, peak = argument + output - aliased
(donated) + temporary, the chip's HBM and whether the peak fits with 10% headroom, FLOPs per step
per device, the compiler's step-time estimate ('optimal_seconds' of cost_analysis, a roofline
estimate that ignores most overheads) and the FLOP utilisation it implies against the chip's peak
bf16 FLOP/s. The FLOPs are the compiled program's, remat recomputation included. Also the wall
and CPU seconds of lowering and compiling: a 388M-parameter UNet step takes ~25-45 CPU minutes
of XLA's TPU backend (code generation for ~5000 kernels; HLO passes take ~3 minutes) and ~12-20
GB of host memory.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmd_jax.parallel import layout
from mmd_jax.parallel import mesh as mesh_lib
from mmd_jax.parallel.mesh import MeshError

# Per chip: HBM (GiB) and peak dense bf16 FLOP/s (public Cloud TPU figures).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
PEAK_BF16 = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}
HBM_BYTES_PER_S = {"v4": 1228e9, "v5e": 819e9, "v5p": 2765e9, "v6e": 1640e9}
HEADROOM = 0.9
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v5": "v5p"}


class AotError(MeshError):
  """The AOT compile cannot run (no libtpu, unknown topology, unusable config)."""


def chip_kind(topology: str) -> str:
  kind = topology.split(":")[0].lower().split("-")[0]
  kind = _ALIASES.get(kind, kind)
  if kind not in HBM_GIB:
    raise AotError(f"Unknown TPU generation in --topology={topology!r}; use one of "
                   f"{sorted(HBM_GIB)}, e.g. v5p:4x4x4 or v5e:16x16.")
  return kind


def num_chips(topology: str) -> int:
  m = re.fullmatch(r"[^:]+:(\d+(?:x\d+)*)", topology)
  if not m:
    raise AotError(f"--topology={topology!r} is not GEN:AxB[xC], e.g. v5p:4x4x4.")
  return math.prod(int(d) for d in m.group(1).split("x"))


def topology_devices(topology: str, *, num_slices: int = 1):
  """The devices of a TPU slice (or num_slices slices) described without hardware."""
  chip_kind(topology)
  num_chips(topology)
  # libtpu takes a machine-wide lock file unless told otherwise; describing a topology uses no
  # TPU, so several processes (another AOT compile, any jax process that loaded libtpu) may share.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    topo = topologies.get_topology_desc(topology, platform="tpu", **kwargs)
  except Exception as e:  # noqa: BLE001 -- re-raised with the fix
    raise AotError(f"Cannot describe TPU topology {topology!r} ({type(e).__name__}: "
                   f"{str(e)[:300]}). AOT needs libtpu: pip install \"jax[tpu]==0.10.2\".") from e
  return list(topo.devices)


def shapes_from_config(config):
  """(data_shape, num_classes, data_key): config.data.image_shape / num_classes when given
  (pod configs: no data set needed to compile), else read from the prepared data set.
  num_classes is the model's: 0 with model.class_conditional=False (as in the training loop)."""
  data = config.data
  if data.get("image_shape"):
    shape, classes, key = tuple(int(s) for s in data.image_shape), int(
        data.get("num_classes", 0)), "image"
  else:
    from mmd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    info = pipeline.dataset_info(data)
    key = "image" if info["image_shape"] is not None else "x"
    shape, classes = tuple(info["data_shape"]), int(info["num_classes"])
  if not config.model.get("class_conditional", True):
    classes = 0
  return shape, classes, key


@dataclasses.dataclass
class Program:
  name: str
  jitted: Any
  args: tuple
  mesh: Any
  num_params: int
  batch_size: int


def _abstract(tree, shardings):
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _num_params(boxed_params) -> int:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(boxed_params))))


def _batch_args(*, batch_size, data_shape, num_classes, data_key, mesh, config):
  sh = mesh_lib.batch_sharding(mesh)
  batch = {data_key: jax.ShapeDtypeStruct((batch_size,) + tuple(data_shape), jnp.float32,
                                          sharding=sh)}
  if num_classes > 0:
    batch["label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sh)
  text_shape = _text_shape(config)
  if text_shape:
    batch["text"] = jax.ShapeDtypeStruct((batch_size,) + text_shape, jnp.float32, sharding=sh)
  return batch


def _rng_arg(mesh):
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=mesh_lib.replicated(mesh))


def build_program(config, devices) -> Program:
  """The config's train step, jitted with its shardings, and abstract arguments for `devices`."""
  from mmd_jax.diffusion.schedules import schedule_from_config  # pylint: disable=g-import-not-at-top
  from mmd_jax.models import build as model_build  # pylint: disable=g-import-not-at-top
  from mmd_jax.training import optim, steps  # pylint: disable=g-import-not-at-top
  data_shape, num_classes, data_key = shapes_from_config(config)
  model = model_build.build_model(config.model, data_shape=data_shape, num_classes=num_classes)
  text_shape = _text_shape(config)
  schedule = schedule_from_config(config.diffusion.schedule)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  processes = len({getattr(d, "process_index", 0) for d in devices})
  distill = config.get("distill")
  batch_size = int(distill.batch_size if distill is not None else config.training.batch_size)
  mesh_lib.check_batch_divisible(batch_size=batch_size, mesh=mesh, num_processes=processes,
                                 what="distill.batch_size" if distill is not None
                                 else "training.batch_size")
  batch = _batch_args(batch_size=batch_size, data_shape=data_shape, num_classes=num_classes,
                      data_key=data_key, mesh=mesh, config=config)
  rng = _rng_arg(mesh)

  if distill is None:
    tx = optim.make_optimizer(config.optim, total_steps=int(config.training.num_steps))
    abstract, sh = layout.teacher_layout(
        model=model, tx=tx, data_shape=data_shape, num_classes=num_classes, mesh=mesh,
        model_config=config.model, mesh_config=config.mesh, text_shape=text_shape)
    step_fn = steps.make_teacher_step(
        model=model, tx=tx, schedule=schedule, prediction=config.model.prediction,
        loss_weighting=config.diffusion.loss_weighting,
        sigmoid_bias=float(config.diffusion.sigmoid_bias), num_classes=num_classes,
        cond_drop_prob=float(config.diffusion.cond_drop_prob),
        ema_decay=float(config.optim.ema_decay), data_key=data_key,
        use_text=text_shape is not None)
    jitted = layout.jit_teacher_step(step_fn, state_shardings=sh, mesh=mesh)
    state = _abstract(layout.unboxed(abstract), sh)
    return Program("teacher", jitted, (state, batch, rng), mesh, _num_params(abstract.params),
                   batch_size)

  # As distill.loop.distill_and_evaluate builds and jits its step.
  from mmd_jax.distill import steps as distill_steps  # pylint: disable=g-import-not-at-top
  student_tx, aux_tx = distill_steps.make_optimizers(distill)
  denoise = distill_steps.make_x_predictor(model, config.model.prediction)
  step_fn = distill_steps.make_distill_step(
      config=distill, denoise=denoise, schedule=schedule, student_tx=student_tx, aux_tx=aux_tx,
      data_key=data_key, null_label=num_classes if num_classes > 0 else None,
      use_text=text_shape is not None)
  lay = layout.distill_layout(distill_config=distill, model=model, student_tx=student_tx,
                              aux_tx=aux_tx, data_shape=data_shape, num_classes=num_classes,
                              mesh=mesh, model_config=config.model, mesh_config=config.mesh,
                              text_shape=text_shape)
  with_precond = distill.variant == "parameter_space" and distill.preconditioner != "identity"
  jitted = layout.jit_distill_step(step_fn, layout=lay, mesh=mesh, with_precond=with_precond)
  state = _abstract(layout.unboxed(lay.abstract_state), lay.state)
  teacher = _abstract(layout.unboxed(lay.abstract_teacher), lay.teacher)
  args = (state, teacher, batch, rng) + ((teacher,) if with_precond else ())
  return Program(f"distill/{distill.variant}", jitted, args, mesh,
                 _num_params(lay.abstract_teacher), batch_size)


def _text_shape(config):
  """(model.text_len, model.text_dim) of a text-conditioned model, else None."""
  from mmd_jax.diffusion import conditioning  # pylint: disable=g-import-not-at-top
  return conditioning.model_text_shape(config.model)


# ----------------------------------------------------------------------------------------------
# Compile and report
# ----------------------------------------------------------------------------------------------

def compile_program(program: Program) -> tuple[Any, dict]:
  """(compiled, timings): wall and CPU seconds (all threads of this process) of lowering and of
  XLA's compile. CPU seconds are the honest cost on a shared machine, where wall time includes
  the time the process waited for a core."""
  w0, c0 = time.time(), time.process_time()
  with program.mesh:
    lowered = program.jitted.lower(*program.args)
    w1, c1 = time.time(), time.process_time()
    compiled = lowered.compile()
  w2, c2 = time.time(), time.process_time()
  return compiled, dict(lower_seconds=round(w1 - w0, 1), lower_cpu_seconds=round(c1 - c0, 1),
                        compile_seconds=round(w2 - w1, 1),
                        compile_cpu_seconds=round(c2 - c1, 1))


def analyse(compiled, *, topology: str, devices, num_params: int, batch_size: int,
            compile_seconds: float) -> dict:
  kind = chip_kind(topology)
  chips = num_chips(topology) * max(1, len({getattr(d, "slice_index", 0) for d in devices}))
  per_chip = max(1, len(devices) // chips)
  hbm = HBM_GIB[kind] * 2**30 / per_chip
  peak = PEAK_BF16[kind] / per_chip
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
  alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
  code = int(getattr(mem, "generated_code_size_in_bytes", 0))
  peak_bytes = arg + out - alias + temp + code
  flops = float(cost.get("flops", float("nan")))
  seconds = float(cost.get("optimal_seconds", float("nan")))
  mfu = flops / (seconds * peak) if seconds and seconds > 0 and flops == flops else float("nan")
  # Our own bound when XLA gives no estimate: compute- or HBM-bound roofline, no communication.
  accessed = float(cost.get("bytes accessed", float("nan")))
  roofline = max(flops / peak, accessed / (HBM_BYTES_PER_S[kind] / per_chip))
  return dict(topology=topology, chip=kind, devices=len(devices), devices_per_chip=per_chip,
              num_params=num_params, batch_size=batch_size,
              argument_bytes=arg, output_bytes=out, alias_bytes=alias, temp_bytes=temp,
              code_bytes=code, peak_bytes=peak_bytes, hbm_bytes=int(hbm),
              fits=bool(peak_bytes <= HEADROOM * hbm), flops_per_device=flops,
              est_step_seconds=seconds, est_mfu=mfu, bytes_accessed=accessed,
              roofline_step_seconds=roofline,
              roofline_mfu=flops / (roofline * peak) if roofline > 0 else float("nan"),
              compile_seconds=round(compile_seconds, 1))


def run_aot(config, *, topology: str) -> dict:
  """Compiles the config's step for `topology`; returns the analysis row."""
  num_slices = math.prod(mesh_lib.dcn_shape(config.mesh))
  devices = topology_devices(topology, num_slices=num_slices)
  program = build_program(config, devices)
  compiled, timings = compile_program(program)
  row = analyse(compiled, topology=topology, devices=devices, num_params=program.num_params,
                batch_size=program.batch_size, compile_seconds=timings["compile_seconds"])
  row.update(timings)
  row["program"] = program.name
  row["mesh"] = dict(program.mesh.shape)
  row["remat"] = bool(config.model.get("remat", False))
  row["dtype"] = str(config.model.get("dtype", "float32"))
  return row


def format_row(row: dict) -> str:
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  lines = [
      f"AOT {row['program']} on {row['topology']} ({row['devices']} devices, "
      f"{row['devices_per_chip']} per chip), mesh {row['mesh']}, dtype {row['dtype']}, "
      f"remat {row['remat']}",
      f"  parameters {row['num_params'] / 1e6:.1f}M, global batch {row['batch_size']}, "
      f"compiled in {row['compile_seconds']} s"
      + (f" ({row['compile_cpu_seconds']} s CPU; lowering {row['lower_seconds']} s)"
         if "compile_cpu_seconds" in row else ""),
      f"  per device: arguments {gib(row['argument_bytes'])}, outputs {gib(row['output_bytes'])}"
      f" (aliased {gib(row['alias_bytes'])}), temporaries {gib(row['temp_bytes'])}",
      f"  peak {gib(row['peak_bytes'])} of {gib(row['hbm_bytes'])} HBM per device: "
      + ("fits" if row["fits"] else "DOES NOT FIT") + f" with {round((1 - HEADROOM) * 100)}% "
      "headroom",
      f"  FLOPs per step per device {row['flops_per_device']:.3e}; compiler step-time estimate "
      + (f"{row['est_step_seconds']:.3f} s, implied MFU {row['est_mfu'] * 100:.1f}%"
         if row["est_step_seconds"] > 0 else "not given by XLA")
      + f" (peak {PEAK_BF16[row['chip']] / 1e12:.0f} TFLOP/s bf16 per chip)",
      f"  roofline lower bound on step time (FLOPs / peak vs bytes accessed / HBM bandwidth, no "
      f"communication): {row.get('roofline_step_seconds', float('nan')):.3f} s, i.e. MFU <= "
      f"{row.get('roofline_mfu', float('nan')) * 100:.0f}%",
  ]
  return "\n".join(lines)


def to_json(row: dict) -> str:
  return json.dumps(row, indent=1, sort_keys=True, default=float)
