"""Accelerator benchmark of the paper-scale 64x64 programs: the teacher step, both distillation
steps and the samplers, in bfloat16, with FLOPs and MFU.

    pip install -e ".[gpu]"
    python experiments/bench_gpu.py --platform=gpu --out=/tmp/bench_gpu.json
    python experiments/bench_gpu.py --platform=cpu --quick     # every code path in ~1 min (tests)

What runs: configs/imagenet64_distill.py (the 388M-parameter UNet of configs/imagenet64.py,
bfloat16 compute, float32 parameters, remat per block) on one device, batch --batch per step.
Each step is the run's own program (runs.build(...).programs(): what the loop executes and
--mode=aot compiles), on random parameters and a synthetic batch; a fixed-shape program's time
does not depend on the values. Parts:
  teacher          the denoising step (training.steps.make_teacher_step)
  alternating      the moment-matching step, Algorithm 2 (student + auxiliary, update 'both')
  parameter_space  Algorithm 3 (teacher gradient + JVP, preconditioned; Lambda = 1 here)
  sampling         images/s of the k-step student sampler against the teacher's 256-step
                   ancestral sampler, at batch --sample_batch
For each step: compile seconds, step seconds (median of --steps timed calls after two warm-up
calls), FLOPs per step (the lowered program's cost analysis, remat recomputation included; the
compiled program's count is printed too, but on a GPU it misses the cuDNN/cuBLAS calls), TFLOP/s and MFU
against the device's dense bf16 peak (mmd_jax.training.throughput.PEAKS, looked up by device
name; the one used is printed). On a CPU the peak is a float32 matmul measured at start-up.
All programs are lowered first and compiled concurrently (XLA releases the GIL), then timed one
by one. Results are printed as they come and written to --out after every part.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("teacher", "alternating", "parameter_space", "sampling")


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--platform", default="gpu", choices=("gpu", "cpu", "tpu"))
  p.add_argument("--quick", action="store_true",
                 help="the config's 'runlocal' version (8x8, tiny UNet, float32), 2 timed steps")
  p.add_argument("--parts", default=",".join(PARTS))
  p.add_argument("--batch", type=int, default=0,
                 help="examples per step, teacher and distillation (0: 128; quick 8)")
  p.add_argument("--sample_batch", type=int, default=0, help="0: 64; quick 8")
  p.add_argument("--teacher_sample_steps", type=int, default=0, help="0: 256; quick 8")
  p.add_argument("--steps", type=int, default=0, help="timed calls per step (0: 10; quick 2)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. --set model.num_res_blocks=2 (repeatable)")
  p.add_argument("--compile_threads", type=int, default=4)
  p.add_argument("--out", default="", help="JSON file of every number")
  return p.parse_args(argv)


def setup_env(args):
  """The backend is chosen before JAX starts."""
  # the CPU backend too: it counts the FLOPs of GPU/TPU programs (throughput.flops_of)
  os.environ["JAX_PLATFORMS"] = {"gpu": "cuda,cpu", "cpu": "cpu", "tpu": "tpu,cpu"}[args.platform]
  os.environ.setdefault("MMD_JAX_CPU_DEFAULTS", "0")
  if REPO not in sys.path:
    sys.path.insert(0, REPO)


def make_config(args):
  from mmd_jax import config_lib
  module = config_lib.load_module(os.path.join(REPO, "configs", "imagenet64_distill.py"))
  c = module.get_config("runlocal" if args.quick else "")
  batch = args.batch or (8 if args.quick else 128)
  c.training.batch_size = batch
  c.distill.batch_size = batch
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  for item in args.set:
    key, _, value = item.partition("=")
    node = c
    *path, leaf = key.split(".")
    for name in path:
      node = node[name]
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[leaf] = value
  return c


def median(xs):
  return statistics.median(xs) if xs else float("nan")


class Bench:
  """Builds every part's program on one device, compiles them together, times them."""

  def __init__(self, args):
    import jax
    self.jax = jax
    self.args = args
    self.config = make_config(args)
    self.device = jax.devices()[0]
    self.results = {"env": self.env(), "parts": {}}
    self.steps = args.steps or (2 if args.quick else 10)

  def env(self) -> dict:
    import flax
    import jax
    import jaxlib
    from mmd_jax.training import throughput
    peak, source = throughput.device_peak(jax.devices()[0])
    d = jax.devices()[0]
    env = dict(device_kind=str(d.device_kind), platform=d.platform, device_count=jax.device_count(),
               jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__,
               python=platform.python_version(), peak_flops=peak, peak_source=source,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               xla_flags=os.environ.get("XLA_FLAGS", ""))
    print("env: " + json.dumps(env), flush=True)
    return env

  def save(self):
    if self.args.out:
      os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
      tmp = self.args.out + ".tmp"
      with open(tmp, "w") as f:
        json.dump(self.results, f, indent=1, default=float)
      os.replace(tmp, self.args.out)

  # ----- building -----
  def _mesh(self):
    from mmd_jax.parallel import mesh as mesh_lib
    return mesh_lib.make_mesh(self.config.mesh, [self.device])

  def _batch(self, run, seed):
    import numpy as np
    rng = np.random.default_rng(seed)
    b = run.batch_size
    local = {run.spec.data_key: rng.uniform(-1, 1, (b,) + tuple(run.spec.data_shape))
             .astype(np.float32)}
    if run.spec.num_classes > 0:
      local["label"] = rng.integers(0, run.spec.num_classes, (b,)).astype(np.int32)
    return run.global_batch(local)

  def build_teacher(self):
    from mmd_jax import runs
    import jax.numpy as jnp
    run = runs.build(self.config, kind="teacher", mesh=self._mesh(), need_data=False)
    state = run.init_state()
    # the students' frozen teacher: a copy (the teacher's step donates its state)
    self.teacher_params = self.jax.tree_util.tree_map(jnp.copy, state.ema_params)
    self.teacher_run = run
    return run, (state, {}, self._batch(run, 0), run.base_rng)

  def build_student(self, variant):
    import copy
    from mmd_jax import runs
    import jax.numpy as jnp
    c = copy.deepcopy(self.config)
    c.distill.variant = variant
    run = runs.build(c, kind="student", mesh=self._mesh(), need_data=False)
    frozen = {"teacher": self.teacher_params}
    if "precond" in run.abstract_frozen():
      frozen["precond"] = self.jax.tree_util.tree_map(jnp.ones_like, self.teacher_params)
    state = run.init_state(frozen)
    if variant == "alternating":
      self.student_run = run
    return run, (state, frozen, self._batch(run, 1), run.base_rng)

  # ----- the step parts -----
  def step_parts(self, names):
    """Lower every step program, compile them concurrently, then time each."""
    built = []
    for name in names:
      t0 = time.time()
      run, args = self.build_teacher() if name == "teacher" else self.build_student(name)
      with run.mesh:
        lowered = [(p.name, p.lower(*args)) for p in run.programs()]
      print(f"[{name}] {run.num_params() / 1e6:.1f}M parameters per network, batch "
            f"{run.batch_size}: built and lowered in {time.time() - t0:.1f} s", flush=True)
      built.append((name, run, args, lowered))

    def compile_one(item):
      t0 = time.time()
      return item[1].compile(), time.time() - t0

    jobs = [lw for _, _, _, lowered in built for lw in lowered]
    with concurrent.futures.ThreadPoolExecutor(max(1, self.args.compile_threads)) as pool:
      compiled = list(pool.map(compile_one, jobs))
    compiled = dict(zip([name for name, _ in jobs], compiled))

    from mmd_jax.training import throughput
    peak = self.results["env"]["peak_flops"]
    for name, run, args, lowered in built:
      state, frozen, batch, rng = args
      programs = [compiled[pname][0] for pname, _ in lowered]
      compile_s = sum(compiled[pname][1] for pname, _ in lowered)
      times = []
      calls = self.steps + 2
      for i in range(calls):
        t0 = time.perf_counter()
        state, metrics = programs[i % len(programs)](state, frozen, batch, rng)
        self.jax.block_until_ready((state, metrics))
        if i >= 2:
          times.append(time.perf_counter() - t0)
      flops = statistics.fmean(throughput.flops_of(lw) for _, lw in lowered)
      compiled_flops = statistics.fmean(throughput.compiled_flops(p) for p in programs)
      step_s = median(times)
      row = dict(program=" + ".join(pname for pname, _ in lowered), batch=run.batch_size,
                 num_params=run.num_params(), compile_s=round(compile_s, 1), step_s=step_s,
                 step_s_min=min(times), step_s_max=max(times), timed_steps=len(times),
                 flops_per_step=flops, compiled_flops_per_step=compiled_flops,
                 tflops_per_s=flops / step_s / 1e12,
                 mfu=flops / step_s / peak if peak == peak else float("nan"),
                 examples_per_s=run.batch_size / step_s,
                 finite=bool(all(float(v) == float(v) for v in
                                 self.jax.device_get(metrics).values())))
      self.results["parts"][name] = row
      self.save()
      print(f"[{name}] {json.dumps(row, default=float)}", flush=True)
      del state, frozen, batch

  # ----- sampling -----
  def sampling(self):
    import jax.numpy as jnp
    import numpy as np
    if not hasattr(self, "teacher_run"):
      self.build_teacher()
    if not hasattr(self, "student_run"):
      self.build_student("alternating")
    n = self.args.sample_batch or (8 if self.args.quick else 64)
    teacher_steps = self.args.teacher_sample_steps or (8 if self.args.quick else 256)
    k = int(self.config.distill.num_student_steps)
    labels = jnp.asarray(np.arange(n) % max(1, self.teacher_run.spec.num_classes), jnp.int32)
    rng = self.jax.random.PRNGKey(0)
    cases = [("teacher", self.teacher_run, "ancestral", teacher_steps),
             ("student", self.student_run, "student", k)]
    jobs = []
    for who, run, sampler, steps in cases:
      fn = run.sample_fn()
      jobs.append((who, sampler, steps, fn.lower(self.teacher_params, rng, labels,
                                                 sampler=sampler, num_steps=steps)))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      compiled = list(pool.map(lambda j: (j[3].compile(), time.time()), jobs))
    out = {}
    for (who, sampler, steps, _), (c, _) in zip(jobs, compiled):
      self.jax.block_until_ready(c(self.teacher_params, rng, labels))
      times = []
      for i in range(3 if not self.args.quick else 1):
        t0 = time.perf_counter()
        x = c(self.teacher_params, self.jax.random.fold_in(rng, i), labels)
        self.jax.block_until_ready(x)
        times.append(time.perf_counter() - t0)
      s = median(times)
      out[who] = dict(sampler=f"{sampler}:{steps}", batch=n, seconds=s, images_per_s=n / s,
                      finite=bool(np.all(np.isfinite(np.asarray(x, np.float32)))))
      print(f"[sampling] {who}: {json.dumps(out[who], default=float)}", flush=True)
    out["student_over_teacher_images_per_s"] = (out["student"]["images_per_s"]
                                               / out["teacher"]["images_per_s"])
    self.results["parts"]["sampling"] = out
    self.save()


def report(results) -> str:
  env = results["env"]
  lines = [f"device: {env['device_kind']} ({env['platform']}), jax {env['jax']}, "
           f"{env['date']}; MFU against {env['peak_flops'] / 1e12:.4g} TFLOP/s "
           f"({env['peak_source']})", "",
           "| step | batch | compile s | step s | TFLOP/step | TFLOP/s | MFU | examples/s |",
           "|---|---|---|---|---|---|---|---|"]
  for name, r in results["parts"].items():
    if name == "sampling":
      continue
    lines.append(f"| {name} | {r['batch']} | {r['compile_s']} | {r['step_s']:.4f} | "
                 f"{r['flops_per_step'] / 1e12:.3g} | {r['tflops_per_s']:.3g} | "
                 f"{100 * r['mfu']:.1f}% | {r['examples_per_s']:.1f} |")
  s = results["parts"].get("sampling")
  if s:
    lines += ["", "| sampler | batch | seconds | images/s |", "|---|---|---|---|"]
    for who in ("teacher", "student"):
      r = s[who]
      lines.append(f"| {who} {r['sampler']} | {r['batch']} | {r['seconds']:.3f} | "
                   f"{r['images_per_s']:.1f} |")
    lines.append(f"\nstudent / teacher images/s: {s['student_over_teacher_images_per_s']:.1f}x")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  setup_env(args)
  parts = [p.strip() for p in args.parts.split(",") if p.strip()]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    print(f"unknown --parts {unknown}; choose from {PARTS}", file=sys.stderr)
    return 2
  bench = Bench(args)
  steps = [p for p in PARTS[:3] if p in parts]
  if steps:
    if "teacher" not in steps:
      bench.build_teacher()  # the students' frozen teacher
    bench.step_parts(steps)
  if "sampling" in parts:
    bench.sampling()
  print("\n" + report(bench.results), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
