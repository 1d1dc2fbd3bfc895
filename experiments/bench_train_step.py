"""Benchmark of the training step, the distillation steps and the samplers on CPU.

Command (from the repository root, system python with JAX):

    python experiments/bench_train_step.py --out=/tmp/bench.json \
        --torch_python=/opt/venv-bench/bin/python        # full run
    python experiments/bench_train_step.py --quick       # fewer timed steps
    python experiments/bench_train_step.py --raw_env     # without the CPU defaults
    python experiments/bench_train_step.py --env_sweep   # + XLA/glibc variants of the 32x32 step

Settings: like `python -m mmd_jax.main`, it applies mmd_jax/cpu_defaults.py when the backend is
the CPU (XLA's own convolution kernels in XLA_FLAGS, GLIBC_TUNABLES=glibc.malloc.hugetlb=1 by
starting the script again; your own settings of either win, MMD_JAX_CPU_DEFAULTS=0 or --raw_env
turn both off), so that with no environment set it measures what the command line runs. The
report's first lines say which settings are in effect. The peer inherits this process's
environment, so it runs under the same GLIBC_TUNABLES (malloc is the same glibc's in both
processes; giving the setting to one side only would compare allocators, not the steps).

What it measures, for (a) configs/digits.py (its model and batch) and (b) a 32x32x3 UNet
(channels 64,128, two residual blocks per level, attention at 16x16 + the middle block, 10
classes, batch 32, eps-prediction with eps-MSE, about 4.1M parameters):

- teacher: our real step (mmd_jax.training.steps.make_teacher_step, jitted with the loop's
  shardings and state donation): compile time, step time (median of the timed steps after the
  warm-up), CPU-seconds per step (time.process_time over each step: all threads of the
  process), FLOPs from compiled.cost_analysis(), GFLOP/s, and the same for a jitted float32
  2048x2048 matmul (2 n^3 flops) as the machine's practical peak in the same run;
- peer: diffusers' UNet2DModel of the nearest configuration at each shape, trained the same way
  (bench_peer_torch.py, its docstring lists the differences; in the interpreter of
  --torch_python, e.g. a venv with the `bench` extra), with one `ours/peer (SHAPE, batch N)` line
  per shape (wall, best-step wall, CPU, FLOP and parameter ratios); skipped with a printed reason
  when torch/diffusers are not importable;
- distill: each moment-matching step (alternating with update_schedule both / alternate,
  parameter-space) next to the teacher step: time, CPU, FLOPs, and time ratio vs FLOP ratio;
- sampling (digits): images/s of the k=8 student sampler vs the teacher's 256-step ancestral
  sampler at batch 500;
- profile (32x32): per-HLO-op thread time of two teacher steps from a jax.profiler trace,
  grouped into conv forward / input-gradient / weight-gradient, dots, elementwise fusions, etc.

The machine is shared (2 cores, load averages of 4-8 are common), so wall times are inflated
by other processes; the CPU-seconds and the load average are printed next to every wall time.
XLA_FLAGS and GLIBC_TUNABLES must be set before JAX starts, hence the late `import jax` and the
re-exec for the CPU defaults and --hugetlb.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from mmd_jax import cpu_defaults  # noqa: E402  (imports no JAX)

PEER_SCRIPT = os.path.join(REPO, "experiments", "bench_peer_torch.py")
HUGETLB = cpu_defaults.GLIBC_SETTING
# XLA:CPU sends convolutions to YNNPACK by default; its weight-gradient convolution (a
# convolution whose window is the whole image) is ~3x slower than XLA's own (Eigen) kernel.
NO_YNN_CONV = cpu_defaults.XLA_SETTING
# Names the settings the CPU defaults added, for the restarted interpreter (which pops it).
_ADDED = "MMD_JAX_BENCH_CPU_DEFAULTS_ADDED"
# XLA:CPU leaves convolutions inside lax.cond branches in their raw layout (e.g. a weight
# gradient as dim_labels=f01b_i01o->01bf) and runs them with its naive loop emitter, 15-35x slower
# than the same convolution outside a conditional.
COND_NOTE = ("its convolutions run inside a lax.cond, which XLA:CPU executes with a naive "
             "kernel (~15x slower, several minutes per 32x32 step); --time_cond_32 times it")
CONFIG_NAMES = ("digits", "cifar32")
SHAPE_LABELS = {"digits": "digits 8x8x1", "cifar32": "32x32"}
PARTS = ("teacher", "peer", "distill", "sampling", "profile")


def parse_args(argv):
  p = argparse.ArgumentParser(description="Train-step / distillation / sampling benchmark.")
  p.add_argument("--quick", action="store_true", help="fewer timed steps")
  p.add_argument("--out", default="", help="write every number to this JSON file")
  p.add_argument("--torch_python", default="",
                 help="interpreter with torch+diffusers for the peer; default: this one if it "
                      "can import both, else the peer is skipped")
  p.add_argument("--configs", default=",".join(CONFIG_NAMES))
  p.add_argument("--parts", default=",".join(PARTS))
  p.add_argument("--steps", type=int, default=0,
                 help="timed teacher (and peer) steps per shape (0: digits 20, 32x32 6; --quick: "
                      "5 and 3)")
  p.add_argument("--raw_env", action="store_true",
                 help="do not apply mmd_jax.cpu_defaults (measure the environment as it is)")
  p.add_argument("--hugetlb", action="store_true",
                 help=f"re-exec with GLIBC_TUNABLES={HUGETLB} (transparent huge pages for malloc; "
                      "one of the CPU defaults, so only needed with --raw_env)")
  p.add_argument("--no_ynn_conv", action="store_true",
                 help=f"add {NO_YNN_CONV} to XLA_FLAGS (XLA's own conv kernels; one of the CPU "
                      "defaults, so only needed with --raw_env)")
  p.add_argument("--threefry_unpartitionable", action="store_true",
                 help="JAX_THREEFRY_PARTITIONABLE=0: the cheaper single-device threefry for "
                      "dropout masks and noise (changes the random streams)")
  p.add_argument("--tuned", action="store_true",
                 help="= --hugetlb --no_ynn_conv --threefry_unpartitionable")
  p.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS")
  p.add_argument("--peer_omp_wait", default="passive", choices=("passive", "default"),
                 help="OMP_WAIT_POLICY of the peer: 'passive' (default) stops its OpenMP "
                      "threads spin-waiting, which on a loaded machine doubles its CPU time "
                      "and wall time; 'default' leaves the environment as it is")
  p.add_argument("--env_sweep", action="store_true",
                 help="also time the 32x32 teacher step in subprocesses under env variants")
  p.add_argument("--sample_batch", type=int, default=500)
  p.add_argument("--time_cond_32", action="store_true",
                 help="also time the shipped alternate schedule (lax.cond) at 32x32 (slow)")
  args = p.parse_args(argv)
  if args.tuned:
    args.hugetlb = args.no_ynn_conv = args.threefry_unpartitionable = True
  for name in args.configs.split(","):
    if name not in CONFIG_NAMES:
      raise SystemExit(f"--configs: unknown {name!r}; choose from {CONFIG_NAMES}")
  for name in args.parts.split(","):
    if name not in PARTS:
      raise SystemExit(f"--parts: unknown {name!r}; choose from {PARTS}")
  return args


def apply_cpu_defaults(args, *, command_line: bool) -> list[str]:
  """Applies mmd_jax.cpu_defaults as the command line does, unless --raw_env: for a command line
  both settings (which may start this script again), else the XLA flag only (apply_in_process).
  Returns the names of the variables it added to."""
  if not args.raw_env:
    if _ADDED not in os.environ:  # not yet restarted
      os.environ[_ADDED] = ",".join(cpu_defaults.changes(os.environ, glibc=command_line))
    if command_line:
      cpu_defaults.apply_for_command_line(sys.argv, module=None)
    else:
      cpu_defaults.apply_in_process()
  return [k for k in os.environ.pop(_ADDED, "").split(",") if k]


def settings_in_effect(args, added) -> dict:
  """Which of the CPU defaults' two settings are in effect, and who set them."""
  state = {"raw_env": bool(args.raw_env), "opted_out": cpu_defaults.opted_out(),
           "backend_is_cpu": cpu_defaults.backend_is_cpu()}
  for key, name in (("XLA_FLAGS", cpu_defaults.YNN_FLAG),
                    ("GLIBC_TUNABLES", cpu_defaults.HUGETLB_TUNABLE)):
    if name not in os.environ.get(key, ""):
      state[key] = "not set"
    else:
      state[key] = "added by the CPU defaults" if key in added else "set by you or an option"
  return state


def describe_settings(state) -> str:
  if state["raw_env"]:
    why = "off (--raw_env)"
  elif state["opted_out"]:
    why = f"off ({cpu_defaults.OPT_OUT}=0)"
  elif not state["backend_is_cpu"]:
    why = "off (the backend is not the CPU)"
  else:
    why = "on (--raw_env turns them off)"
  return (f"CPU defaults (mmd_jax/cpu_defaults.py): {why}; in effect: "
          f"{NO_YNN_CONV}: {state['XLA_FLAGS']}, GLIBC_TUNABLES {HUGETLB}: "
          f"{state['GLIBC_TUNABLES']}")


def setup_env(args):
  """Sets GLIBC_TUNABLES (by re-exec: glibc reads it at start-up) and XLA_FLAGS (before JAX)."""
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if args.hugetlb and HUGETLB not in tunables:
    env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (tunables, HUGETLB) if t))
    os.execve(sys.executable, [sys.executable] + sys.argv, env)
  if args.threefry_unpartitionable:
    os.environ["JAX_THREEFRY_PARTITIONABLE"] = "0"
  flags = os.environ.get("XLA_FLAGS", "").split()
  if args.no_ynn_conv and cpu_defaults.YNN_FLAG not in " ".join(flags):
    flags.append(NO_YNN_CONV)
  flags += args.xla_flags.split()
  if flags:
    os.environ["XLA_FLAGS"] = " ".join(flags)


def load():
  return list(os.getloadavg())


def median(xs):
  return float(statistics.median(xs)) if xs else float("nan")


def measure(call, *, warmup: int, steps: int):
  """Runs call() (which must block until its result is ready) warmup + steps times."""
  for _ in range(warmup):
    call()
  walls, cpus, faults = [], [], []
  load0 = load()
  for _ in range(steps):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    c0, w0 = time.process_time(), time.perf_counter()
    call()
    walls.append(time.perf_counter() - w0)
    cpus.append(time.process_time() - c0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
  return {"wall_s": median(walls), "wall_min_s": min(walls), "cpu_s": median(cpus),
          "walls": walls, "cpus": cpus, "minor_faults": median(faults),
          "loadavg_before": load0, "loadavg_after": load()}


def flops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def temp_bytes(compiled) -> int:
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # memory_analysis is optional per backend
    return -1


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------

def make_config(name):
  """(config, data_shape, num_classes): the digits config as shipped, or the 32x32 variant."""
  from mmd_jax import config_lib
  config = config_lib.load_config_file(os.path.join(REPO, "configs", "digits.py"))
  if name == "digits":
    from mmd_jax.data import pipeline
    info = pipeline.dataset_info(config.data)
    return config, tuple(info["data_shape"]), int(info["num_classes"])
  config.model.update(base_channels=64, channel_mult=(1, 2), num_res_blocks=2,
                      attn_resolutions=(16,), head_dim=64, dropout=0.1, prediction="eps",
                      remat=False)
  config.diffusion.update(loss_weighting="eps")
  config.diffusion.schedule.update(resolution=32)
  config.training.update(batch_size=32)
  config.distill.update(batch_size=32)
  return config, (32, 32, 3), 10


def synthetic_batch(rng_seed, *, batch, data_shape, num_classes):
  import numpy as np
  r = np.random.default_rng(rng_seed)
  return {"image": r.uniform(-1, 1, (batch,) + tuple(data_shape)).astype(np.float32),
          "label": r.integers(0, num_classes, (batch,)).astype(np.int32)}


# ------------------------------------------------------------------------------------------------
# Parts
# ------------------------------------------------------------------------------------------------

def matmul_peak(*, n=2048, steps=5):
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  m = measure(lambda: f(a, b).block_until_ready(), warmup=2, steps=steps)
  flops = 2.0 * n ** 3
  return {"n": n, "flops": flops, **m, "gflops_wall": flops / m["wall_s"] / 1e9,
          "gflops_wall_best": flops / m["wall_min_s"] / 1e9,
          "gflop_per_cpu_s": flops / m["cpu_s"] / 1e9}


def teacher_bench(name, *, steps: int, warmup: int = 2):
  """Our teacher step as the teacher run builds it (runs.teacher.TeacherRun: its state
  shardings, state donation), on a synthetic batch."""
  import jax
  import numpy as np
  from mmd_jax.diffusion.schedules import schedule_from_config
  from mmd_jax.models import build as model_build
  from mmd_jax.parallel import mesh as mesh_lib
  from mmd_jax.runs import common
  from mmd_jax.training import optim, state as state_lib, steps as steps_lib

  config, data_shape, num_classes = make_config(name)
  model = model_build.build_model(config.model, data_shape=data_shape, num_classes=num_classes)
  schedule = schedule_from_config(config.diffusion.schedule)
  tx = optim.make_optimizer(config.optim, total_steps=int(config.training.num_steps))
  mesh = mesh_lib.make_mesh(config.mesh)
  abstract = state_lib.abstract_state(model, tx, data_shape=data_shape, num_classes=num_classes)
  shardings = common.shardings(abstract, mesh=mesh,
                               options=common.sharding_options(config.mesh))
  state = state_lib.create_train_state(model, tx, rng=jax.random.PRNGKey(0),
                                       data_shape=data_shape, num_classes=num_classes,
                                       shardings=shardings)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
  step_fn = steps_lib.make_teacher_step(
      model=model, tx=tx, schedule=schedule, prediction=config.model.prediction,
      loss_weighting=config.diffusion.loss_weighting,
      sigmoid_bias=float(config.diffusion.sigmoid_bias), num_classes=num_classes,
      cond_drop_prob=float(config.diffusion.cond_drop_prob),
      ema_decay=float(config.optim.ema_decay), data_key="image")
  batch_size = int(config.training.batch_size)
  batch = mesh_lib.global_batch(synthetic_batch(0, batch=batch_size, data_shape=data_shape,
                                                num_classes=num_classes), mesh=mesh)
  rng = jax.random.PRNGKey(1)
  jitted = jax.jit(step_fn, in_shardings=(shardings, mesh_lib.batch_sharding(mesh),
                                          mesh_lib.replicated(mesh)),
                   out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
  c0, t0 = time.process_time(), time.perf_counter()
  compiled = jitted.lower(state, batch, rng).compile()
  compile_s, compile_cpu_s = time.perf_counter() - t0, time.process_time() - c0
  holder = {"state": state}

  def call():
    holder["state"], metrics = compiled(holder["state"], batch, rng)
    jax.block_until_ready(metrics)

  m = measure(call, warmup=warmup, steps=steps)
  flops = flops_of(compiled)
  result = {"config": name, "batch": batch_size, "data_shape": list(data_shape),
            "params": n_params, "compile_s": compile_s, "compile_cpu_s": compile_cpu_s,
            "flops": flops, "temp_bytes": temp_bytes(compiled),
            "raw_layout_convs": raw_layout_convs(compiled.as_text()), **m,
            "gflops_wall": flops / m["wall_s"] / 1e9,
            "gflop_per_cpu_s": flops / m["cpu_s"] / 1e9}
  ctx = dict(config=config, model=model, schedule=schedule, data_shape=data_shape,
             num_classes=num_classes, mesh=mesh, compiled=compiled, call=call,
             params=holder["state"].params, holder=holder)
  return result, ctx


class _trace_time_cond:
  """While enabled, jax.lax.cond with a concrete predicate traces only the taken branch.

  The shipped alternate schedule picks its phase with lax.cond(state.step % 2 == 0, ...); with
  the step a numpy constant this emulates choosing the phase on the host (one straight-line
  program per phase). A conditional that XLA inlines later (constant predicate) is not enough:
  its convolutions keep the raw layouts of the branch.
  """

  def __init__(self, *, enabled: bool):
    self.enabled = enabled

  def __enter__(self):
    import jax
    self._orig = jax.lax.cond
    if self.enabled:
      orig = self._orig

      def cond(pred, true_fun, false_fun, *operands, **kw):
        try:
          taken = bool(pred)
        except jax.errors.ConcretizationTypeError:
          return orig(pred, true_fun, false_fun, *operands, **kw)
        return (true_fun if taken else false_fun)(*operands)

      jax.lax.cond = cond
    return self

  def __exit__(self, *exc):
    import jax
    jax.lax.cond = self._orig


def raw_layout_convs(hlo_text: str) -> int:
  """Convolutions left in a layout other than XLA:CPU's canonical NHWC/HWIO (these run on the
  naive loop emitter instead of Eigen/YNNPACK)."""
  labels = re.findall(r" convolution\([^\n]*?dim_labels=([\w>-]+)", hlo_text)
  return sum(1 for lab in labels if lab != "b01f_01io->b01f")


def distill_bench(ctx, *, variant: str, update_schedule: str, steps: int,
                  host_phase: bool = False):
  """One moment-matching step of `variant`, jitted with state donation like distill.loop.

  host_phase (alternate schedule only): instead of the shipped step, whose lax.cond picks the
  auxiliary (even step) or the student (odd step) update on the device, compile one program per
  phase with the step parity fixed at trace time, so that XLA inlines the taken branch (its
  step counter is then a constant: fine for timing, not for training). This is what choosing
  the phase on the host would cost; see the report on convolutions inside lax.cond.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mmd_jax.distill import steps as distill_steps
  from mmd_jax.parallel import mesh as mesh_lib

  config = ctx["config"]
  dcfg = config.distill.copy_and_resolve_references()
  dcfg.update(variant=variant, update_schedule=update_schedule)
  student_tx, aux_tx = distill_steps.make_optimizers(dcfg)
  teacher_params = ctx["holder"]["state"].params
  state = jax.jit(lambda p: distill_steps.init_distill_state(
      config=dcfg, init_params=p, student_tx=student_tx, aux_tx=aux_tx))(teacher_params)
  denoise = distill_steps.make_x_predictor(ctx["model"], config.model.prediction)
  step_fn = distill_steps.make_distill_step(
      config=dcfg, denoise=denoise, schedule=ctx["schedule"], student_tx=student_tx,
      aux_tx=aux_tx, data_key="image", null_label=ctx["num_classes"])
  batch_size = int(dcfg.batch_size)
  batch = mesh_lib.global_batch(
      synthetic_batch(1, batch=batch_size, data_shape=ctx["data_shape"],
                      num_classes=ctx["num_classes"]), mesh=ctx["mesh"])
  rng = jax.random.PRNGKey(2)
  extra = ()
  if variant == "parameter_space":
    # Stands in for the squared-gradient preconditioner (a teacher-shaped tree, computed once).
    extra = (jax.tree_util.tree_map(jnp.ones_like, teacher_params),)
  alternate = variant == "alternating" and update_schedule == "alternate"
  if host_phase and not alternate:
    raise ValueError("host_phase applies to the alternating variant's 'alternate' schedule.")
  phases = (0, 1) if host_phase else (None,)
  compiled, compile_s, compile_cpu_s = [], 0.0, 0.0
  for parity in phases:
    fn = step_fn if parity is None else (
        lambda st, *a, k=parity: step_fn(st.replace(step=np.int32(k)), *a))
    c0, t0 = time.process_time(), time.perf_counter()
    with _trace_time_cond(enabled=parity is not None):
      compiled.append(jax.jit(fn, donate_argnums=(0,)).lower(
          state, teacher_params, batch, rng, *extra).compile())
    compile_s += time.perf_counter() - t0
    compile_cpu_s += time.process_time() - c0
  holder = {"state": state, "i": 0}

  def call():
    prog = compiled[holder["i"] % len(compiled)]
    holder["i"] += 1
    holder["state"], metrics = prog(holder["state"], teacher_params, batch, rng, *extra)
    jax.block_until_ready(metrics)

  n = steps + (steps % 2 if alternate else 0)
  # Two warm-up steps keep the alternating schedule's timed steps starting on an even one.
  m = measure(call, warmup=2 if alternate else 1, steps=n)
  flops = [flops_of(c) for c in compiled]
  name = variant if variant != "alternating" else f"alternating/{update_schedule}"
  if alternate:
    name += " (host phase)" if host_phase else " (lax.cond)"
  r = {"name": name, "batch": batch_size, "compile_s": compile_s, "compile_cpu_s": compile_cpu_s,
       "flops": sum(flops) / len(flops), "temp_bytes": max(temp_bytes(c) for c in compiled),
       "conditionals": sum(c.as_text().count(" conditional(") for c in compiled),
       "raw_layout_convs": sum(raw_layout_convs(c.as_text()) for c in compiled), **m}
  if alternate:
    even, odd = m["walls"][0::2], m["walls"][1::2]  # even: auxiliary update, odd: student
    even_c, odd_c = m["cpus"][0::2], m["cpus"][1::2]
    r.update(aux_step_wall_s=median(even), student_step_wall_s=median(odd),
             aux_step_cpu_s=median(even_c), student_step_cpu_s=median(odd_c),
             wall_s=(median(even) + median(odd)) / 2, cpu_s=(median(even_c) + median(odd_c)) / 2)
    if host_phase:
      r.update(aux_step_flops=flops[0], student_step_flops=flops[1],
               flops_note="mean of the two phases' programs")
    else:
      r["flops_note"] = "XLA's cost of a lax.cond is its costlier branch"
  return r


def sampling_bench(ctx, *, batch: int, quick: bool):
  """images/s of the k-step student sampler and the teacher's 256-step ancestral sampler."""
  import jax
  import jax.numpy as jnp
  from mmd_jax.diffusion import samplers
  from mmd_jax.distill import steps as distill_steps
  from mmd_jax.evaluation import sampling

  config = ctx["config"]
  params = ctx["holder"]["state"].ema_params
  labels = jnp.asarray(sampling.class_labels(batch, ctx["num_classes"]))
  rng = jax.random.PRNGKey(3)
  clip = config.diffusion.get("clip_x")
  denoise = distill_steps.make_x_predictor(ctx["model"], config.model.prediction)
  k = int(config.distill.num_student_steps)
  student = jax.jit(distill_steps.make_student_sampler(
      config=config.distill, denoise=denoise, schedule=ctx["schedule"], clip=clip),
      static_argnames="shape")
  teacher = samplers.make_sample_fn(denoise=denoise, schedule=ctx["schedule"],
                                    num_classes=ctx["num_classes"],
                                    data_shape=ctx["data_shape"], clip=clip)
  shape = (batch,) + tuple(ctx["data_shape"])
  out = {"batch": batch}
  runs = [("student", k, lambda: student.lower(params, rng, shape=shape, label=labels)),
          ("teacher", 256, lambda: teacher.lower(params, rng, labels, sampler="ancestral",
                                                 num_steps=256, guidance=0.0))]
  # The 256-step sampler is a lax.scan of identical steps (about 4 CPU-minutes at batch 500):
  # time a shorter scan and scale by 256 / its steps.
  short = 8 if quick else 32
  runs[1] = ("teacher", short, lambda: teacher.lower(params, rng, labels, sampler="ancestral",
                                                     num_steps=short, guidance=0.0))
  for who, nsteps, lower in runs:
    t0 = time.perf_counter()
    compiled = lower().compile()
    compile_s = time.perf_counter() - t0
    args = (params, rng) if who == "student" else (params, rng, labels)
    kwargs = {"label": labels} if who == "student" else {}
    call = lambda: jax.block_until_ready(compiled(*args, **kwargs))
    m = measure(call, warmup=1, steps=3 if who == "student" else 1)
    scale = 256 / nsteps if who == "teacher" else 1.0
    wall, cpu = m["wall_s"] * scale, m["cpu_s"] * scale
    out[who] = {"num_steps": 256 if who == "teacher" else nsteps, "timed_num_steps": nsteps,
                "compile_s": compile_s, "wall_s": wall, "cpu_s": cpu,
                "images_per_s": batch / wall, "images_per_cpu_s": batch / cpu,
                # lax.scan: cost_analysis counts the body once
                "flops": flops_of(compiled) * nsteps * scale,
                "loadavg": m["loadavg_after"], "raw": m}
  out["speedup_wall"] = out["student"]["images_per_s"] / out["teacher"]["images_per_s"]
  out["speedup_cpu"] = out["student"]["images_per_cpu_s"] / out["teacher"]["images_per_cpu_s"]
  return out


def _hlo_categories(hlo_text: str) -> dict:
  """instruction name -> category, from the optimized HLO text of the compiled step."""
  comps, current = {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$", line)
    if head:
      current = head.group(1)
      comps[current] = []
      continue
    if current is not None and "=" in line:
      comps[current].append(line)
  op_of = lambda line: (re.search(r"=\s*\S+(?:\{[^}]*\})?\s+([\w\-]+)\(", line) or
                        re.search(r"=\s*\([^=]*\)\s+([\w\-]+)\(", line))

  def conv_kind(line):
    window = re.search(r"window=\{size=(\d+)x(\d+)", line)
    backward = "transpose(jvp" in line
    if window and int(window.group(1)) * int(window.group(2)) > 9:
      return "conv weight-grad"
    return "conv input-grad" if backward else "conv forward"

  cats = {}
  for comp, lines in comps.items():
    for line in lines:
      name = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", line)
      op = op_of(line)
      if not name or not op:
        continue
      name, op = name.group(1), op.group(1)
      cat = op
      if op == "convolution":
        cat = conv_kind(line)
      elif op == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", line)
        body = "\n".join(comps.get(called.group(1), [])) if called else ""
        if " convolution(" in body:
          conv_line = next(l for l in comps[called.group(1)] if " convolution(" in l)
          cat = conv_kind(conv_line + line)
        elif " dot(" in body:
          cat = "dot (matmul) fusion"
        elif " reduce(" in body or " reduce-window(" in body:
          cat = "reduce fusion"
        elif all((" transpose(" in l or " copy(" in l or " parameter(" in l or
                  " bitcast(" in l) for l in comps.get(called.group(1), [])) and body:
          cat = "transpose/copy"
        else:
          cat = "elementwise fusion"
      elif op in ("dot", "custom-call"):
        cat = "dot (matmul) fusion" if op == "dot" else op
      elif op in ("copy", "transpose"):
        cat = "transpose/copy"
      cats[name] = cat
  return cats


def _conv_eqns(jaxpr, out):
  """Appends every conv_general_dilated equation of `jaxpr` and its sub-jaxprs to `out`."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      out.append(eqn)
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          _conv_eqns(inner if hasattr(inner, "eqns") else inner.jaxpr, out)
  return out


def conv_breakdown(ctx, *, reps: int = 5):
  """CPU-seconds per step spent in the model's k x k convolutions, timed one by one.

  Every distinct convolution of the forward pass is jitted alone three ways: forward, input
  gradient (not needed for the first conv, whose input is z) and weight gradient; each is timed
  (median CPU of `reps` calls) and multiplied by how often it occurs. The rest of the step is
  everything else (normalisation, activations, dropout, attention, 1x1 convs, optimizer).
  """
  import jax
  import jax.numpy as jnp
  from jax import lax

  config, model, shape = ctx["config"], ctx["model"], ctx["data_shape"]
  params = ctx["holder"]["state"].params
  b = int(config.training.batch_size)
  z = jnp.zeros((b,) + tuple(shape), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda p: model.apply(
      {"params": p}, z, jnp.zeros((b,)), jnp.zeros((b,), jnp.int32), train=False))(params)
  counts = {}
  for eqn in _conv_eqns(jaxpr.jaxpr, []):
    lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    p = eqn.params
    key = (tuple(lhs), tuple(rhs), tuple(p["window_strides"]), tuple(map(tuple, p["padding"])),
           p["dimension_numbers"])
    counts[key] = counts.get(key, 0) + 1
  rows, total = [], {"fwd": 0.0, "dx": 0.0, "dw": 0.0}
  for (lhs, rhs, strides, padding, dn), n in counts.items():
    conv = lambda x, w, s=strides, pd=padding, d=dn: lax.conv_general_dilated(
        x, w, s, pd, dimension_numbers=d)
    x = jax.random.normal(jax.random.PRNGKey(0), lhs, jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(1), rhs, jnp.float32) * 0.05
    y = jax.eval_shape(conv, x, w)
    dy = jnp.ones(y.shape, jnp.float32)
    fns = {"fwd": (jax.jit(conv), (x, w)),
           "dx": (jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]),
                  (x, w, dy)),
           "dw": (jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]),
                  (x, w, dy))}
    row = {"lhs": list(lhs), "rhs": list(rhs), "count": n,
           "gflop_fwd": 2.0 * math_prod(y.shape) * math_prod(rhs[:-1]) / 1e9}
    for kind, (f, a) in fns.items():
      if kind == "dx" and lhs[-1] == shape[-1]:
        row["dx_s"] = 0.0  # the input conv: z needs no gradient
        continue
      m = measure(lambda: f(*a).block_until_ready(), warmup=1, steps=reps)
      row[f"{kind}_s"] = m["cpu_s"]
      total[kind] += n * m["cpu_s"]
    rows.append(row)
  rows.sort(key=lambda r: -r["count"] * (r["fwd_s"] + r["dx_s"] + r["dw_s"]))
  return {"rows": rows, "total_cpu_s": total, "all_cpu_s": sum(total.values()),
          "loadavg": load()}


def math_prod(xs):
  out = 1
  for v in xs:
    out *= int(v)
  return out


def profile_bench(ctx, *, steps: int = 2):
  """Per-op thread time of `steps` teacher steps, grouped by category (jax.profiler trace)."""
  import jax
  cats = _hlo_categories(ctx["compiled"].as_text())
  tmp = tempfile.mkdtemp(prefix="bench_trace_")
  try:
    ctx["call"]()
    jax.profiler.start_trace(tmp)
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
      ctx["call"]()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    jax.profiler.stop_trace()
    paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
    if not paths:
      return {"error": "no trace written"}
    data = jax.profiler.ProfileData.from_file(paths[-1])
  except Exception:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  by_op, by_cat = {}, {}
  for plane in data.planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      for ev in line.events:
        stats = dict(ev.stats)
        op = stats.get("hlo_op")
        if op is None or stats.get("hlo_module", "").find("step") < 0:
          continue
        dur = ev.duration_ns * 1e-9 / steps
        by_op[op] = by_op.get(op, 0.0) + dur
        cat = cats.get(op, "other")
        if cat == "other" and op.startswith("conv"):
          # XLA's own (Eigen) conv thunks return at once and run on the intra-op pool
          # outside the trace: this is only their launch.
          cat = "conv (Eigen, launch only)"
        by_cat[cat] = by_cat.get(cat, 0.0) + dur
  shutil.rmtree(tmp, ignore_errors=True)
  total = sum(by_cat.values())
  top = sorted(by_op.items(), key=lambda kv: -kv[1])[:40]
  return {"steps": steps, "wall_per_step_s": wall / steps, "cpu_per_step_s": cpu / steps,
          "op_thread_s_per_step": total,
          "by_category_s": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
          "top_ops": [{"op": k, "category": cats.get(k, "other"), "s": v} for k, v in top]}


def peer_bench(args, *, shape: str, steps: int):
  """Runs bench_peer_torch.py at `shape` in --torch_python (or this interpreter); never raises.
  Its environment is ours (GLIBC_TUNABLES included: see the module docstring)."""
  py = args.torch_python
  if not py:
    missing = [m for m in ("torch", "diffusers") if importlib.util.find_spec(m) is None]
    if missing:
      return {"skipped": True, "reason": f"{' and '.join(missing)} not importable in "
              f"{sys.executable} and no --torch_python given (install the peer with: python -m "
              "venv --system-site-packages /opt/venv-bench && /opt/venv-bench/bin/pip install "
              "torch==2.13.0 diffusers; then pass --torch_python=/opt/venv-bench/bin/python)"}
    py = sys.executable
  if not os.path.exists(py):
    return {"skipped": True, "reason": f"--torch_python={py} does not exist"}
  cmd = [py, PEER_SCRIPT, f"--shape={shape}", f"--steps={steps}", "--warmup=2"]
  env = dict(os.environ)
  if args.peer_omp_wait == "passive":
    env["OMP_WAIT_POLICY"] = "PASSIVE"
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
  if proc.returncode != 0:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"skipped": True, "reason": f"{' '.join(cmd)} failed (exit {proc.returncode}): "
            + " | ".join(tail)}
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result.update(skipped=False, python=py, omp_wait_policy=env.get("OMP_WAIT_POLICY", ""),
                glibc_tunables=result.get("glibc_tunables", env.get("GLIBC_TUNABLES", "")))
  return result


def env_sweep(args, *, steps: int):
  """The 32x32 teacher step in fresh processes under XLA-flag / glibc variants."""
  variants = [("baseline", []), ("hugetlb", ["--hugetlb"]), ("no_ynn_conv", ["--no_ynn_conv"]),
              ("threefry_unpartitionable", ["--threefry_unpartitionable"]),
              ("hugetlb+no_ynn_conv (= CPU defaults)", ["--hugetlb", "--no_ynn_conv"]),
              ("tuned (all three)", ["--tuned"])]
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "GLIBC_TUNABLES", "JAX_THREEFRY_PARTITIONABLE")}
  rows = []
  for name, extra in variants:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
      out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--configs=cifar32", "--parts=teacher",
           f"--steps={steps}", f"--out={out}", "--raw_env"] + extra
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
      rows.append({"variant": name, "error": proc.stderr.strip().splitlines()[-1:]})
      continue
    with open(out) as f:
      r = json.load(f)["teacher"]["cifar32"]
    os.unlink(out)
    rows.append({"variant": name, **{k: r[k] for k in (
        "compile_s", "wall_s", "wall_min_s", "cpu_s", "minor_faults", "flops",
        "loadavg_after")}})
    print(f"  env sweep {name}: wall {r['wall_s']:.2f} s, cpu {r['cpu_s']:.2f} s, "
          f"faults {r['minor_faults']:.0f}, load {r['loadavg_after'][0]:.1f}", flush=True)
  return rows


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------

def table(headers, rows):
  cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  fmt = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"
  return "\n".join([fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                   + [fmt(r) for r in cells[1:]])


def g(x, d=2):
  return "-" if x is None or x != x else f"{x:.{d}f}"


def ours_over_peer(res) -> dict:
  """Per shape where both were measured: our teacher step over the peer's step."""
  out = {}
  for name, peer in (res.get("peer") or {}).items():
    t = (res.get("teacher") or {}).get(name)
    if not t or peer.get("skipped"):
      continue
    out[name] = {
        "shape": SHAPE_LABELS.get(name, name), "batch": t["batch"], "peer_batch": peer["batch"],
        "wall": t["wall_s"] / peer["step_wall_s"],
        "best_wall": t["wall_min_s"] / min(peer["step_walls"]),
        "cpu": t["cpu_s"] / peer["step_cpu_s"], "flops": t["flops"] / peer["flops_per_step"],
        "params": t["params"] / peer["params"], "ours_wall_s": t["wall_s"],
        "peer_wall_s": peer["step_wall_s"], "ours_params": t["params"],
        "peer_params": peer["params"], "ours_flops": t["flops"],
        "peer_flops": peer["flops_per_step"]}
  return out


def ratio_line(r, peer) -> str:
  return (f"ours/peer ({r['shape']}, batch {r['batch']}): wall {r['wall']:.2f} "
          f"({r['ours_wall_s']:.3f} s / {r['peer_wall_s']:.3f} s), best-step wall "
          f"{r['best_wall']:.2f}, cpu {r['cpu']:.2f}; FLOPs {r['flops']:.2f} "
          f"({r['ours_flops'] / 1e9:.1f} / {r['peer_flops'] / 1e9:.1f} GFLOP), params "
          f"{r['params']:.2f} ({r['ours_params'] / 1e6:.2f}M / {r['peer_params'] / 1e6:.2f}M)"
          + (f" [peer batch {r['peer_batch']}!]" if r["peer_batch"] != r["batch"] else "")
          + f" (peer: torch {peer['torch']}, diffusers {peer['diffusers']}, {peer['threads']} "
          f"threads, GLIBC_TUNABLES={peer.get('glibc_tunables', '')!r}, OMP_WAIT_POLICY="
          f"{peer.get('omp_wait_policy', '')!r}; FLOPs by torch's flop counter)")


def report(res):
  lines = []
  env = res["env"]
  if "cpu_defaults" in env:
    lines.append(describe_settings(env["cpu_defaults"]))
  lines.append(f"XLA_FLAGS={env['XLA_FLAGS']!r} GLIBC_TUNABLES={env['GLIBC_TUNABLES']!r} "
               f"JAX_THREEFRY_PARTITIONABLE={env['JAX_THREEFRY_PARTITIONABLE']!r} "
               f"cores={env['cpu_count']} jax={env['jax']}")
  mm = res.get("matmul")
  if mm:
    lines.append(f"\nfloat32 matmul {mm['n']}^3 (peak): {g(mm['wall_s'] * 1e3, 1)} ms wall "
                 f"-> {g(mm['gflops_wall'], 1)} GFLOP/s (best step {g(mm['gflops_wall_best'], 1)}),"
                 f" {g(mm['gflop_per_cpu_s'], 1)} GFLOP per CPU-s; load "
                 f"{mm['loadavg_after'][0]:.1f}")
  peers = res.get("peer") or {}
  if res.get("teacher") or peers:
    rows = []
    for name, t in (res.get("teacher") or {}).items():
      rows.append([name, f"{t['params'] / 1e6:.2f}M", t["batch"], g(t["compile_s"], 1),
                   g(t["wall_s"], 3), g(t["wall_min_s"], 3), g(t["cpu_s"], 3),
                   g(t["flops"] / 1e9, 1), g(t["gflops_wall"], 1), g(t["gflop_per_cpu_s"], 1),
                   g(100 * t["gflop_per_cpu_s"] / mm["gflop_per_cpu_s"], 0) + "%" if mm else "-",
                   f"{t['minor_faults']:.0f}", f"{t['loadavg_after'][0]:.1f}"])
    for name, peer in peers.items():
      if peer.get("skipped"):
        continue
      fl = peer["flops_per_step"]
      rows.append([f"peer torch ({name})", f"{peer['params'] / 1e6:.2f}M", peer["batch"], "-",
                   g(peer["step_wall_s"], 3), g(min(peer["step_walls"]), 3),
                   g(peer["step_cpu_s"], 3), g(fl / 1e9, 1), g(fl / peer["step_wall_s"] / 1e9, 1),
                   g(fl / peer["step_cpu_s"] / 1e9, 1),
                   g(100 * fl / peer["step_cpu_s"] / 1e9 / mm["gflop_per_cpu_s"], 0) + "%"
                   if mm else "-", f"{peer['minor_faults_per_step']:.0f}",
                   f"{peer['loadavg'][0]:.1f}"])
    lines.append("\nTeacher train step (median of timed steps; cpu = process CPU-seconds/step):")
    lines.append(table(["config", "params", "batch", "compile s", "step s", "best s", "cpu s",
                        "GFLOP", "GFLOP/s", "GFLOP/cpu-s", "of matmul/cpu-s", "faults",
                        "load"], rows))
    ratios = ours_over_peer(res)
    for name, peer in peers.items():
      if peer.get("skipped"):
        lines.append(f"PEER SKIPPED ({SHAPE_LABELS.get(name, name)}): {peer['reason']}")
      elif name in ratios:
        lines.append(ratio_line(ratios[name], peer))
      else:
        lines.append(f"ours/peer ({SHAPE_LABELS.get(name, name)}): our step was not measured "
                     "(--parts without teacher)")
  if res.get("distill"):
    lines.append("\nDistillation step vs teacher step (same config and batch):")
    for name, rows_in in res["distill"].items():
      t = res["teacher"][name]
      rows = [["teacher", t["batch"], g(t["compile_s"], 1), g(t["wall_s"], 3), g(t["cpu_s"], 3),
               g(t["flops"] / 1e9, 1), "1.00", "1.00", "1.00", t["raw_layout_convs"],
               f"{t['loadavg_after'][0]:.1f}"]]
      for d in rows_in:
        if d.get("skipped"):
          rows.append([d["name"]] + ["-"] * 9 + ["not timed"])
          continue
        rows.append([d["name"], d["batch"], g(d["compile_s"], 1), g(d["wall_s"], 3),
                     g(d["cpu_s"], 3), g(d["flops"] / 1e9, 1), g(d["wall_s"] / t["wall_s"]),
                     g(d["cpu_s"] / t["cpu_s"]), g(d["flops"] / t["flops"]),
                     d["raw_layout_convs"], f"{d['loadavg_after'][0]:.1f}"])
      lines.append(f"[{name}]")
      lines.append(table(["step", "batch", "compile s", "step s", "cpu s", "GFLOP",
                          "time/teacher", "cpu/teacher", "FLOP/teacher", "raw convs", "load"],
                         rows))
      for d in rows_in:
        if d.get("skipped"):
          lines.append(f"  {d['name']}: not timed: {d['reason']}")
        elif "aux_step_wall_s" in d:
          fl = (f"; GFLOP aux {g(d['aux_step_flops'] / 1e9, 1)}, student "
                f"{g(d['student_step_flops'] / 1e9, 1)}" if "aux_step_flops" in d else
                "; its GFLOP is the costlier branch (XLA's cost of a lax.cond)")
          lines.append(f"  {d['name']}: aux-update steps {g(d['aux_step_wall_s'], 3)} s "
                       f"(cpu {g(d['aux_step_cpu_s'], 3)}), student-update steps "
                       f"{g(d['student_step_wall_s'], 3)} s (cpu {g(d['student_step_cpu_s'], 3)})"
                       + fl)
  s = res.get("sampling")
  if s:
    rows = []
    for who in ("student", "teacher"):
      r = s[who]
      rows.append([f"{who} ({'k' if who == 'student' else 'ancestral'}={r['num_steps']})",
                   s["batch"], g(r["compile_s"], 1), g(r["wall_s"], 2), g(r["cpu_s"], 2),
                   g(r["images_per_s"], 1), g(r["images_per_cpu_s"], 1), g(r["flops"] / 1e9, 0),
                   f"{r['loadavg'][0]:.1f}"])
    lines.append("\nSampling at the digits shape:")
    lines.append(table(["sampler", "batch", "compile s", "wall s", "cpu s", "img/s",
                        "img/cpu-s", "GFLOP", "load"], rows))
    n_t = s["teacher"]["timed_num_steps"]
    note = f" (teacher timed as a {n_t}-step scan, scaled x{256 // n_t})" if n_t != 256 else ""
    lines.append(f"student/teacher throughput: {g(s['speedup_wall'], 1)}x wall, "
                 f"{g(s['speedup_cpu'], 1)}x CPU{note}")
  p = res.get("profile")
  if p and "by_category_s" in p:
    tot = p["op_thread_s_per_step"]
    lines.append(f"\nWhere the 32x32 teacher step's time goes (thread-seconds per step inside "
                 f"XLA ops, from a jax.profiler trace of {p['steps']} steps; step wall "
                 f"{g(p['wall_per_step_s'], 2)} s, cpu {g(p['cpu_per_step_s'], 2)} s):")
    lines.append(table(["category", "s/step", "share"],
                       [[k, g(v, 3), f"{100 * v / tot:.0f}%"] for k, v in
                        p["by_category_s"].items()] + [["total", g(tot, 3), "100%"]]))
    lines.append("top ops: " + ", ".join(f"{o['op']} [{o['category']}] {o['s']:.3f}s"
                                         for o in p["top_ops"][:8]))
  cb = res.get("conv_breakdown")
  if cb:
    t = res["teacher"]["cifar32"]
    lines.append("\nThe 32x32 step's 3x3 convolutions timed one by one (CPU ms per call; x count "
                 "per step):")
    rows = [[f"{r['lhs'][1]}x{r['lhs'][2]} {r['rhs'][2]}->{r['rhs'][3]}", r["count"],
             g(r["gflop_fwd"], 2), g(r["fwd_s"] * 1e3, 1), g(r["dx_s"] * 1e3, 1),
             g(r["dw_s"] * 1e3, 1), g(r["gflop_fwd"] / r["fwd_s"], 0),
             g(r["gflop_fwd"] / r["dw_s"], 0)] for r in cb["rows"]]
    lines.append(table(["conv (HxW in->out)", "count", "GFLOP fwd", "fwd ms", "d input ms",
                        "d weight ms", "fwd GFLOP/cpu-s", "dw GFLOP/cpu-s"], rows))
    tot = cb["total_cpu_s"]
    lines.append(f"convs: fwd {g(tot['fwd'], 2)} + d input {g(tot['dx'], 2)} + d weight "
                 f"{g(tot['dw'], 2)} = {g(cb['all_cpu_s'], 2)} CPU-s per step, of the step's "
                 f"{g(t['cpu_s'], 2)} CPU-s ({100 * cb['all_cpu_s'] / t['cpu_s']:.0f}%); the rest "
                 f"{g(t['cpu_s'] - cb['all_cpu_s'], 2)} CPU-s; load {cb['loadavg'][0]:.1f}")
  sweep = res.get("env_sweep")
  if sweep:
    peer = peers.get("cifar32") or {}
    peer_cpu = peer.get("step_cpu_s") if not peer.get("skipped", True) else None
    rows = [[r["variant"], g(r.get("compile_s"), 1), g(r.get("wall_s"), 3),
             g(r.get("wall_min_s"), 3), g(r.get("cpu_s"), 3),
             g(r["cpu_s"] / peer_cpu) if peer_cpu and "cpu_s" in r else "-",
             f"{r.get('minor_faults', float('nan')):.0f}",
             f"{r['loadavg_after'][0]:.1f}" if "loadavg_after" in r else "-"]
            for r in sweep]
    lines.append("\n32x32 teacher step under environment variants (fresh process each, from "
                 "--raw_env; cpu/peer = its CPU-s over the 32x32 peer's CPU-s above):")
    lines.append(table(["variant", "compile s", "step s", "best s", "cpu s", "cpu/peer",
                        "faults", "load"], rows))
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  # As a command line: may start this script again (GLIBC_TUNABLES), so before any real work.
  added = apply_cpu_defaults(args, command_line=argv is None)
  setup_env(args)
  defaults = settings_in_effect(args, added)
  import jax

  configs = args.configs.split(",")
  parts = args.parts.split(",")
  steps = {"digits": args.steps or (5 if args.quick else 20),
           "cifar32": args.steps or (3 if args.quick else 6)}
  dsteps = {"digits": 2 if args.quick else 4, "cifar32": 2}
  res = {"args": vars(args), "loadavg_start": load(),
         "env": {"cpu_defaults": defaults, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                 "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
                 "JAX_THREEFRY_PARTITIONABLE": os.environ.get("JAX_THREEFRY_PARTITIONABLE", ""),
                 "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
                 "cpu_count": os.cpu_count(), "jax": jax.__version__,
                 "device": str(jax.devices()[0])}}
  t_start, c_start = time.perf_counter(), time.process_time()
  print(describe_settings(defaults), flush=True)
  print(f"load average at start: {res['loadavg_start']}", flush=True)
  res["matmul"] = matmul_peak(steps=3 if args.quick else 5)
  print(f"matmul: {res['matmul']['gflops_wall']:.1f} GFLOP/s", flush=True)
  res["teacher"], res["distill"], res["peer"] = {}, {}, {}
  for name in configs:
    ctx = None
    if {"teacher", "distill", "sampling", "profile"} & set(parts):
      r, ctx = teacher_bench(name, steps=steps[name])
      res["teacher"][name] = r
      print(f"teacher {name}: compile {r['compile_s']:.1f} s, step {r['wall_s']:.3f} s, "
            f"cpu {r['cpu_s']:.3f} s, {r['flops'] / 1e9:.1f} GFLOP", flush=True)
    if "peer" in parts:  # right after our step, under about the same load
      peer = res["peer"][name] = peer_bench(args, shape=name, steps=steps[name])
      print(f"peer {name}: " + (f"SKIPPED ({peer['reason']})" if peer["skipped"] else
                                f"{peer['step_wall_s']:.3f} s/step"), flush=True)
    if ctx is None:
      continue
    if name == "cifar32" and "profile" in parts:
      res["profile"] = profile_bench(ctx)
      res["conv_breakdown"] = conv_breakdown(ctx, reps=3 if args.quick else 5)
    if "distill" in parts:
      res["distill"][name] = []
      for variant, sched, host in (("alternating", "both", False),
                                   ("alternating", "alternate", False),
                                   ("alternating", "alternate", True),
                                   ("parameter_space", "both", False)):
        if sched == "alternate" and not host and name == "cifar32" and not args.time_cond_32:
          res["distill"][name].append({"name": "alternating/alternate (lax.cond)",
                                       "skipped": True, "reason": COND_NOTE})
          print(f"distill {name} alternating/alternate (lax.cond): not timed ({COND_NOTE})",
                flush=True)
          continue
        d = distill_bench(ctx, variant=variant, update_schedule=sched, steps=dsteps[name],
                          host_phase=host)
        res["distill"][name].append(d)
        print(f"distill {name} {d['name']}: step {d['wall_s']:.3f} s, cpu {d['cpu_s']:.3f} s",
              flush=True)
    if name == "digits" and "sampling" in parts:
      res["sampling"] = sampling_bench(ctx, batch=args.sample_batch, quick=args.quick)
    del ctx
  res["ours_over_peer"] = ours_over_peer(res)
  if args.env_sweep:
    res["env_sweep"] = env_sweep(args, steps=args.steps or (2 if args.quick else 4))
  res["total_wall_s"] = time.perf_counter() - t_start
  res["total_cpu_s"] = time.process_time() - c_start  # this process only (not subprocesses)
  res["loadavg_end"] = load()
  print()
  print(report(res))
  print(f"\ntotal: {res['total_wall_s']:.0f} s wall, {res['total_cpu_s']:.0f} CPU-s (this "
        f"process); load average start {res['loadavg_start']}, end {res['loadavg_end']}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
