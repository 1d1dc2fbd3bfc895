"""Ahead-of-time compilation of a config's real train step for a TPU slice, on a CPU machine.

    python -m mmd_jax.main --config=configs/imagenet64_distill.py --workdir=/tmp/aot \\
        --mode=aot --topology=v5p:4x4x4

needs libtpu (`pip install "jax[tpu]==0.10.2"`, which pins libtpu 0.0.42.*); no TPU is used:
jax.experimental.topologies.get_topology_desc describes the slice, the step is lowered on
ShapeDtypeStructs with the run's shardings (nothing is allocated), and XLA's TPU compiler reports
per-device memory (compiled.memory_analysis()) and cost (compiled.cost_analysis()).

The programs are the run's own (mmd_jax/runs: run.programs()), the ones the loop executes: the
teacher's step for a teacher config, or the distillation step(s) of config.distill.variant with
the frozen teacher (and, parameter-space, the preconditioner) as sharded arguments; a
host-dispatched 'alternate' schedule has one program per phase, each compiled and reported, and
the row's peak is the larger. Each program's hash (runs.common.program_hash of its StableHLO) is
reported; the loop logs the same hashes. Multislice configs (config.mesh.dcn_* > 1) compile for
num_slices copies of the topology.

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

from mmd_jax import config_lib, runs
from mmd_jax.parallel import mesh as mesh_lib
from mmd_jax.parallel.mesh import MeshError
from mmd_jax.runs import common as runs_common
from mmd_jax.training import throughput

# Per chip: HBM (GiB) and peak dense bf16 FLOP/s (public Cloud TPU figures).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
PEAK_BF16 = throughput.TPU_PEAK_BF16
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


@dataclasses.dataclass
class Program:
  name: str
  lowered: Any
  mesh: Any
  num_params: int
  batch_size: int


def build_run(config, devices, *, kind: str | None = None):
  """The config's run on a mesh of `devices` (shapes from config.data.image_shape when given, so
  no data set is needed). kind: 'teacher' or 'student'; default runs.kind_of(config) (config.mode
  train / distill, else a student when the config has a distill section)."""
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  config_lib.validate(config)
  run = runs.build(config, kind=kind or runs.kind_of(config), mesh=mesh, need_data=False)
  processes = len({getattr(d, "process_index", 0) for d in devices})
  mesh_lib.check_batch_divisible(batch_size=run.batch_size, mesh=mesh, num_processes=processes,
                                 what=run.batch_key)
  return run


def lower_programs(config, devices, *, kind: str | None = None) -> list[Program]:
  """Every step program the loop would run for `config` (one, or one per phase of a
  host-dispatched schedule), lowered on sharded abstract arguments: nothing is allocated."""
  run = build_run(config, devices, kind=kind)
  args = run.abstract_args()
  out = []
  with run.mesh:
    for program in run.programs():
      out.append(Program(program.name, program.lower(*args), run.mesh,
                         run.num_params(), run.batch_size))
  return out


# ----------------------------------------------------------------------------------------------
# Compile and report
# ----------------------------------------------------------------------------------------------

def compile_program(program: Program) -> tuple[Any, dict]:
  """(compiled, timings): wall and CPU seconds (all threads of this process) of XLA's compile.
  CPU seconds are the honest cost on a shared machine, where wall time includes the time the
  process waited for a core."""
  w0, c0 = time.time(), time.process_time()
  with program.mesh:
    compiled = program.lowered.compile()
  w1, c1 = time.time(), time.process_time()
  return compiled, dict(compile_seconds=round(w1 - w0, 1), compile_cpu_seconds=round(c1 - c0, 1))


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
  """Compiles every step program of the config's run for `topology`; returns the analysis row of
  the program with the largest peak memory, with one sub-row per program under 'programs'."""
  num_slices = math.prod(mesh_lib.dcn_shape(config.mesh))
  devices = topology_devices(topology, num_slices=num_slices)
  w0, c0 = time.time(), time.process_time()
  programs = lower_programs(config, devices)
  lower = dict(lower_seconds=round(time.time() - w0, 1),
               lower_cpu_seconds=round(time.process_time() - c0, 1))
  rows = []
  for program in programs:
    compiled, timings = compile_program(program)
    row = analyse(compiled, topology=topology, devices=devices, num_params=program.num_params,
                  batch_size=program.batch_size, compile_seconds=timings["compile_seconds"])
    row.update(**timings, **lower, program=program.name, mesh=dict(program.mesh.shape),
               program_hash=runs_common.program_hash(program.lowered),
               remat=bool(config.model.get("remat", False)),
               dtype=str(config.model.get("dtype", "float32")))
    rows.append(row)
  worst = dict(max(rows, key=lambda r: r["peak_bytes"]))
  if len(rows) > 1:
    worst["programs"] = rows
    worst["program"] = " + ".join(r["program"] for r in rows) + f" (peak: {worst['program']})"
    worst["compile_seconds"] = round(sum(r["compile_seconds"] for r in rows), 1)
    worst["compile_cpu_seconds"] = round(sum(r["compile_cpu_seconds"] for r in rows), 1)
  return worst


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
