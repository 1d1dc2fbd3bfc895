"""Moment-matching distillation on a Gaussian mixture with an exact teacher.

Commands (2 shared CPU cores; run one at a time, in the background for full runs):
  python experiments/gmm_benchmark.py --spec=experiments/gmm_specs/circle8_2d.json \
      --out=/tmp/gmm_circle8.json                    # full: 10k samples, 5000 steps per student
  python experiments/gmm_benchmark.py --spec=experiments/gmm_specs/unequal5_16d.json \
      --out=/tmp/gmm_16d.json --quick                # quick: 2k samples, 300 steps
  ... --rows=alt,uncond --extra="alt:k=1:time_sampling=continuous" --seeds=1

Setting (the issue's protocol):
- The mixture {weights, means, stds} comes from a JSON spec (mmd_jax.data.sources.GaussianMixture).
- Teacher: the exact denoiser E[x | z_t] (mmd_jax.models.gmm). Its ancestral and DDIM samplers
  at 1, 2, 4, 8, 32, 256 steps are the baselines; "floor" is fresh true samples vs the reference.
- Students: MLPs (v-prediction) initialised by regression onto the exact denoiser ("mlp_teacher",
  a short pretraining; its own 256-step ancestral row shows how good the regression is).
  alt        alternating variant (Algorithm 2), teacher = exact denoiser, k = 1, 2, 4, 8
  alt_mlp    alternating variant with the regressed MLP as teacher (like ps), k = 8
  ps         parameter-space variant (Algorithm 3), teacher = the regressed MLP, k = 1, 2, 4, 8
  ps_mixture parameter-space variant with the mixture's own parameters (logits, means,
             log-stds) as the teacher parameters, k = 8
  progressive  k = 1 students of alt and ps initialised from their k = 2 students (instead of
             the regressed MLP, whose t = 1 output is the data mean for every z_1)
  pd         progressive distillation (Salimans & Ho 2022; distill/progressive.py), round 0's
             teacher = exact denoiser, teacher_steps (64) DDIM steps halved down to k; the
             rounds share --steps; sampled with k DDIM steps. k = 1, 2, 4, 8
  mcd        multistep consistency distillation (Heek et al. 2024; distill/consistency.py),
             teacher = exact denoiser, 64 teacher DDIM steps over [0, 1], stop-gradient target;
             sampled with k DDIM steps. k = 1, 2, 4, 8
  uncond     the alternating k = 8 student with z_s ~ q(z_s | x_tilde) (ablation)
  timing     wall time per step of alt, alt_mlp, ps, pd, mcd at k = 8 in interleaved rounds (the
             per-row ms/step of the training runs depend on the machine's load at the time)
  The k = 8 rows of alt, ps, pd, mcd and uncond are repeated over --seeds seeds (distillation
  randomness; the regressed MLP is the same). The distillation weighting is the config default
  'auto' (constant for k <= 2, snr_plus_one above).
- Metrics (mmd_jax.evaluation.sample_metrics) on --num_samples generated samples against as many
  fresh true samples: unbiased energy distance (primary), sliced W2 (512 projections), mean
  log-likelihood under the true mixture, mode-weight error. Students are evaluated with their
  EMA parameters, on one sample draw whose key depends on the seed (--eval_draws=n adds n - 1
  further draws of the same student, to tell sampling noise from distillation seed spread).
- Cost: wall time per step (after compilation, on this machine, shared) and XLA's FLOP estimate
  of one compiled step (`jax.jit(step).lower(...).compile().cost_analysis()`).

Output: a table on stdout; --out writes JSON {"rows": {"<method>/k=<k>[/seed=<s>]": {metric:
value, ...}}, "summary": {...mean/std over seeds...}, "settings": {...}}; for a 2-D spec also a
scatter plot next to it (<out>.png).

Row overrides (--extra, ';'-separated): "<alt|alt_mlp|ps|ps_mixture|pd|mcd>:k=<k>[:field=value...]" with
fields of the distill config (moment_matching.default_config(); a nested one by its dotted name,
e.g. optim.learning_rate=5e-5), init_from=<an earlier row>
(initialise student and auxiliary from that row's trained student) or seeds=<n> (repeat the row
over distillation seeds 0..n-1), e.g. "alt:k=1:time_sampling=continuous:seeds=3;ps:k=8:nu_ema=0.0".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmd_jax.diffusion import process, samplers  # pylint: disable=wrong-import-position
from mmd_jax.diffusion.schedules import Schedule  # pylint: disable=wrong-import-position
from mmd_jax.distill import moment_matching as mm  # pylint: disable=wrong-import-position
from mmd_jax.distill import preconditioners, steps  # pylint: disable=wrong-import-position
from mmd_jax.evaluation import sample_metrics  # pylint: disable=wrong-import-position
from mmd_jax.models import gmm, mlp  # pylint: disable=wrong-import-position

TEACHER_STEPS = (1, 2, 4, 8, 32, 256)
STUDENT_KS = (1, 2, 4, 8)
ROW_GROUPS = ("floor", "teacher", "mlp_teacher", "alt", "ps", "pd", "mcd", "progressive",
              "ps_mixture", "alt_mlp", "uncond", "timing")
VARIANT_OF = {"alt": "alternating", "alt_mlp": "alternating", "ps": "parameter_space",
              "ps_mixture": "parameter_space", "pd": "progressive", "mcd": "consistency"}
KINDS = tuple(VARIANT_OF)
METRICS = ("energy", "sliced_w2", "loglik", "mode_weight_error")
CHUNK = 100  # distillation steps per compiled lax.scan


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

def build_model(*, dim: int, hidden: int, depth: int):
  """The project's MLP denoiser (mmd_jax.models.mlp), unconditional."""
  cfg = ml_collections.ConfigDict(dict(kind="mlp", hidden=hidden, depth=depth, prediction="v"))
  return mlp.build_mlp(cfg, dim=dim, num_classes=0)


def init_params(model, key, dim):
  return nn.meta.unbox(model.init(key, jnp.zeros((1, dim)), jnp.zeros((1,)), None,
                                  train=False)["params"])


def load_mixture(path):
  from mmd_jax.data.sources import GaussianMixture  # pylint: disable=g-import-not-at-top
  return GaussianMixture.from_json(path)


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------

def sample_data(mixture, key, n):
  return mixture.sample_jax(key, n)["x"]


def regress_mlp(*, model, denoise, mixture, schedule, steps_, batch, lr, seed, log):
  """The 'teacher MLP': an MLP regressed onto the exact denoiser E[x | z_t] (t ~ U(0, 1),
  x-space error weighted by 1 + SNR capped at e^5, i.e. the snr_plus_one weighting).
  Returns (params, optimizer state)."""
  exact = gmm.make_denoiser()
  teacher_params = gmm.gmm_params(mixture)
  dim = mixture.dim
  params = jax.jit(lambda k: init_params(model, k, dim))(jax.random.PRNGKey(seed))
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps_ // 10), steps_),
                  b2=0.99)

  def one(carry, key):
    params, opt_state = carry
    k_x, k_t, k_z = jax.random.split(key, 3)
    x = sample_data(mixture, k_x, batch)
    logsnr = schedule.logsnr(jax.random.uniform(k_t, (batch,)))
    z, _ = process.sample_z_t(rng=k_z, x=x, logsnr=logsnr)
    target = exact(teacher_params, z, logsnr)
    w = mm.weight(weighting="snr_plus_one", logsnr=logsnr)

    def loss_fn(p):
      return jnp.mean(w * jnp.mean(jnp.square(denoise(p, z, logsnr, None) - target), -1))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return (optax.apply_updates(params, updates), opt_state), loss

  @jax.jit
  def chunk(carry, key, start):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(start + jnp.arange(CHUNK))
    return jax.lax.scan(one, carry, keys)

  carry = (params, tx.init(params))
  key = jax.random.PRNGKey(seed + 1000)
  t0 = time.time()
  for start in range(0, steps_, CHUNK):
    carry, losses = chunk(carry, key, start)
  log(f"  regression: {steps_} steps, final loss {float(losses[-1]):.4g}, "
      f"{time.time() - t0:.0f}s")
  return carry  # (params, Adam state): the state gives the 'adam' preconditioner


def save_params(path, params):
  flat = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  np.savez(path, **flat)


def load_params(path, template):
  """Params saved by save_params, or None if the file is missing or does not fit template."""
  if not os.path.exists(path):
    return None
  with np.load(path, allow_pickle=False) as data:
    leaves = []
    for key, leaf in jax.tree_util.tree_flatten_with_path(template)[0]:
      name = jax.tree_util.keystr(key)
      if name not in data or data[name].shape != leaf.shape:
        return None
      leaves.append(jnp.asarray(data[name]))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)


def eval_samples(samples, reference, mixture):
  return sample_metrics.all_metrics(np.asarray(samples), reference, mixture)


def teacher_sampler(denoise, schedule, *, num_steps, eta, n, dim):
  return jax.jit(lambda params, key: samplers.sample(
      denoise_fn=lambda z, l, c: denoise(params, z, l, c, train=False, rng=None), rng=key,
      shape=(n, dim), num_steps=num_steps, schedule=schedule, eta=eta))


def parse_extra(spec: str):
  """'alt:k=1:time_sampling=continuous:seeds=3;ps:k=8:nu_ema=0' ->
  [(kind, k, {field: value}, seeds)]."""
  out = []
  defaults = mm.default_config()
  for item in filter(None, (s.strip() for s in spec.split(";"))):
    parts = item.split(":")
    kind = parts[0]
    if kind not in KINDS:
      raise ValueError(f"--extra row {item!r}: kind must be one of {KINDS}.")
    k, seeds, overrides = None, 1, {}
    for p in parts[1:]:
      name, _, value = p.partition("=")
      if name == "k":
        k = int(value)
        continue
      if name == "seeds":
        seeds = int(value)
        continue
      if name == "init_from":
        overrides[name] = value
        continue
      head, _, sub = name.partition(".")  # a nested field: optim.learning_rate
      if head not in defaults or bool(sub) != isinstance(defaults[head], ml_collections.ConfigDict) \
          or (sub and sub not in defaults[head]):
        raise ValueError(f"--extra row {item!r}: unknown distill field {name!r}.")
      default = defaults[head][sub] if sub else defaults[head]
      if isinstance(default, bool):
        overrides[name] = value.lower() in ("1", "true", "yes")
      elif isinstance(default, (int, float)) and not isinstance(default, bool):
        overrides[name] = type(default)(float(value)) if isinstance(default, int) else float(value)
      else:
        overrides[name] = value
    if k is None:
      raise ValueError(f"--extra row {item!r} needs k=<steps>.")
    if seeds < 1:
      raise ValueError(f"--extra row {item!r}: seeds must be >= 1.")
    out.append((kind, k, overrides, seeds))
  return out


# ----------------------------------------------------------------------------------------------
# Distillation of one student
# ----------------------------------------------------------------------------------------------

def setup_run(*, kind, k, seed, overrides, args, mixture, schedule, denoise, mlp_params,
              init_params=None, mlp_opt_state=None):
  """Config, initial state, the jitted CHUNK-step training function and one step's FLOPs of a
  student of `kind` (see the module docstring)."""
  init_params = mlp_params if init_params is None else init_params
  config = mm.default_config()
  config.num_student_steps = k
  config.num_steps = args.steps
  config.batch_size = args.batch
  config.ema_decay = args.ema
  config.variant = VARIANT_OF[kind]
  if config.variant == "parameter_space" and args.nu_ema is not None:
    config.nu_ema = args.nu_ema
  for name, value in overrides.items():  # dotted names set a nested field (optim.learning_rate)
    head, _, sub = name.partition(".")
    if sub:
      config[head][sub] = value
    else:
      config[head] = value
  steps.validate_config(config)
  tx, aux_tx = steps.make_optimizers(config)
  exact = gmm.make_denoiser()
  precond = None
  if kind in ("pd", "mcd"):
    teacher_denoise, teacher_params = exact, gmm.gmm_params(mixture)
    step = baseline_step(config=config, denoise=denoise, schedule=schedule, tx=tx,
                         teacher_denoise=teacher_denoise)
  elif kind in ("alt", "alt_mlp"):
    if kind == "alt":
      teacher_denoise, teacher_params = exact, gmm.gmm_params(mixture)
    else:
      teacher_denoise, teacher_params = denoise, mlp_params
    step = steps.make_alternating_step(config=config, denoise=denoise, schedule=schedule,
                                       student_tx=tx, aux_tx=aux_tx,
                                       teacher_denoise=teacher_denoise)
  else:
    if kind == "ps":
      teacher_denoise, teacher_params = denoise, mlp_params
    else:  # ps_mixture
      teacher_denoise, teacher_params = exact, gmm.gmm_params(mixture)
    step = steps.make_parameter_space_step(config=config, denoise=denoise, schedule=schedule,
                                           student_tx=tx, teacher_denoise=teacher_denoise)
    if config.preconditioner == "squared_grads":
      n_pre = config.precond_batches * (config.batch_size // 2)
      real = {"x": sample_data(mixture, jax.random.PRNGKey(seed + 5000), n_pre)}
      precond = jax.jit(lambda tp, b, r: preconditioners.squared_grad_preconditioner(
          denoise=teacher_denoise, teacher_params=tp, batch=b, rng=r, config=config,
          schedule=schedule))(teacher_params, real, jax.random.PRNGKey(seed + 6000))
    elif config.preconditioner == "adam":
      if kind != "ps" or mlp_opt_state is None:
        raise ValueError("Only the regressed MLP teacher has an Adam state (ps rows, and not "
                         "with an MLP loaded from --mlp_cache).")
      precond = preconditioners.adam_preconditioner(mlp_opt_state,
                                                    eps=float(config.precond_eps))
  state = steps.init_distill_state(config=config, init_params=init_params, student_tx=tx,
                                   aux_tx=aux_tx, teacher_params=teacher_params)
  batch_size = config.batch_size

  def call(state, key, teacher_params, precond, step=step):
    batch = {"x": sample_data(mixture, jax.random.fold_in(key, 1), batch_size)}
    if config.variant == "parameter_space":
      return step(state, teacher_params, batch, jax.random.fold_in(key, 2), precond)
    return step(state, teacher_params, batch, jax.random.fold_in(key, 2))

  # Cost of one step, from XLA (compiled separately from the scanned training loop; for
  # progressive distillation the round-0 program, whose teacher is the same as alt's).
  one = getattr(step, "first", step)
  compiled = jax.jit(lambda *a: call(*a, step=one)).lower(
      state, jax.random.PRNGKey(0), teacher_params, precond).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

  @jax.jit
  def chunk(state, key, teacher_params, precond):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(state.step + jnp.arange(CHUNK))
    return jax.lax.scan(lambda s, k: call(s, k, teacher_params, precond), state, keys)

  return dict(config=config, state=state, chunk=chunk, flops=flops,
              teacher_denoise=teacher_denoise, teacher_params=teacher_params, precond=precond)


def baseline_step(*, config, denoise, schedule, tx, teacher_denoise):
  """The step of a pd or mcd row. Progressive distillation's two programs (round 0, later
  rounds) are picked inside the scanned loop by lax.cond on the round (the loop of the package
  picks them on the host); `.first` is the round-0 program."""
  phases = steps.step_phases(config)
  programs = [steps.make_distill_step(config=config, denoise=denoise, schedule=schedule,
                                      student_tx=tx, teacher_denoise=teacher_denoise,
                                      phase=phase) for phase in phases]
  if len(programs) == 1:
    return programs[0]
  later_from = steps.VARIANTS["progressive"].round_start(config, 1)

  def step(state, teacher_params, batch, rng):
    return jax.lax.cond(state.step < later_from, programs[0], programs[1], state,
                        teacher_params, batch, rng)

  step.first = programs[0]
  return step


def distill_one(*, kind, k, seed, overrides, args, mixture, schedule, denoise, mlp_params,
                log, init_params=None, mlp_opt_state=None):
  """Trains one student (and auxiliary) initialised from init_params (default: the regressed
  MLP); returns (EMA params, info dict with timing and FLOPs)."""
  run = setup_run(kind=kind, k=k, seed=seed, overrides=overrides, args=args, mixture=mixture,
                  schedule=schedule, denoise=denoise, mlp_params=mlp_params,
                  init_params=init_params, mlp_opt_state=mlp_opt_state)
  config, state, chunk, flops = run["config"], run["state"], run["chunk"], run["flops"]
  teacher_denoise, teacher_params, precond = (run["teacher_denoise"], run["teacher_params"],
                                              run["precond"])

  key = jax.random.PRNGKey(10_000 + seed)
  t0 = time.time()
  times = []
  done = 0
  while done < config.num_steps:
    t = time.time()
    state, metrics = chunk(state, key, teacher_params, precond)
    jax.block_until_ready(state.params)
    times.append(time.time() - t)
    done += CHUNK
    last = {m: float(v[-1]) for m, v in metrics.items()}
    if not all(np.isfinite(v) for v in last.values()):
      raise FloatingPointError(f"Non-finite metrics at step {done}: {last}")
  warm = times[1:] if len(times) > 1 else times
  info = {"time_per_step_ms": 1000 * float(np.mean(warm)) / CHUNK,
          "flops_per_step": flops, "train_seconds": time.time() - t0, "steps": done,
          "final_metrics": last}
  log(f"  {kind} k={k} seed={seed} {overrides or ''}: {done} steps in {info['train_seconds']:.0f}s"
      f" ({info['time_per_step_ms']:.1f} ms/step, {flops / 1e6:.1f} MFLOP/step); "
      + ", ".join(f"{m}={v:.3g}" for m, v in last.items()))
  if config.variant == "parameter_space":
    info.update(teacher_gradient_check(
        config=config, schedule=schedule, denoise=denoise, student_params=state.ema_params,
        teacher_denoise=teacher_denoise, teacher_params=teacher_params, mixture=mixture,
        seed=seed))
    log(f"    teacher gradient norm on student samples {info['teacher_grad_norm_student']:.4g}"
        f" vs on real data {info['teacher_grad_norm_real']:.4g} (same batch size and times)")
  return state.ema_params, info


def time_variants(*, args, mixture, schedule, denoise, mlp_params, log, rounds=5):
  """Wall time per step of alt, alt_mlp, ps, pd and mcd at k = 8, measured in interleaved
  rounds (one CHUNK-step call of each per round, after compilation and a warm-up call) so that
  all of them see the same machine load. Returns {kind: {"median_ms", "min_ms", "mflop"}}."""
  runs = {}
  for kind in ("alt", "alt_mlp", "ps", "pd", "mcd"):
    runs[kind] = setup_run(kind=kind, k=8, seed=0, overrides={}, args=args, mixture=mixture,
                           schedule=schedule, denoise=denoise, mlp_params=mlp_params)
  key = jax.random.PRNGKey(0)
  states = {}
  for kind, run in runs.items():  # warm-up (and compile) call
    states[kind], _ = run["chunk"](run["state"], key, run["teacher_params"], run["precond"])
    jax.block_until_ready(states[kind].params)
  times = {kind: [] for kind in runs}
  for _ in range(rounds):
    for kind, run in runs.items():
      t = time.time()
      states[kind], _ = run["chunk"](states[kind], key, run["teacher_params"], run["precond"])
      jax.block_until_ready(states[kind].params)
      times[kind].append(1000 * (time.time() - t) / CHUNK)
  out = {kind: {"median_ms": float(np.median(v)), "min_ms": float(np.min(v)),
                "mflop": runs[kind]["flops"] / 1e6} for kind, v in times.items()}
  log("interleaved timing (k=8, batch %d): " % args.batch + "; ".join(
      f"{kind} {v['median_ms']:.1f} ms/step (min {v['min_ms']:.1f}), {v['mflop']:.0f} MFLOP"
      for kind, v in out.items()))
  return out


def teacher_gradient_check(*, config, schedule, denoise, student_params, teacher_denoise,
                           teacher_params, mixture, seed, batches=8):
  """The parameter-space variant's moment conditions after training: the norm of the teacher's
  loss gradient (the g_A of a half batch) on the student's samples vs on real data, averaged
  over a few batches with the same times. Near-equal norms mean the teacher's parameter
  gradients no longer tell the student from the data, whatever the sample metrics say."""
  half = config.batch_size // 2

  @jax.jit
  def norms(key):
    k_x, k_draw, k_zs = jax.random.split(key, 3)
    x = sample_data(mixture, k_x, half)
    d, _ = steps.draw(k_draw, config=config, schedule=schedule, denoise=denoise,
                      params=student_params, x=x, label=None)
    z_s_real = mm.sample_z_s(rng=k_zs, z_t=d["z_t"], x_tilde=x, logsnr_s=d["logsnr_s"],
                             logsnr_t=d["logsnr_t"])
    d_real = dict(d, x_tilde=x, z_s=z_s_real)
    out = []
    for dd in (d, d_real):
      g, _ = steps.teacher_grad_on_samples(teacher_denoise=teacher_denoise,
                                           teacher_params=teacher_params, d=dd, config=config)
      out.append(optax.tree.norm(g))
    return jnp.stack(out)

  vals = np.mean([np.asarray(norms(jax.random.PRNGKey(20_000 + 100 * seed + i)))
                  for i in range(batches)], axis=0)
  return {"teacher_grad_norm_student": float(vals[0]), "teacher_grad_norm_real": float(vals[1])}


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--spec", required=True, help="mixture JSON {weights, means, stds}")
  p.add_argument("--out", default="", help="results JSON path (a .png is written next to it "
                 "for 2-D specs)")
  p.add_argument("--seeds", type=int, default=3, help="seeds of the k=8 rows of alt and ps")
  p.add_argument("--steps", type=int, default=None, help="distillation steps per student "
                 "(default 5000; --quick 300)")
  p.add_argument("--quick", action="store_true", help="development settings: 300 steps, 2k "
                 "samples, short regression, EMA 0.99")
  p.add_argument("--num_samples", type=int, default=None, help="samples per metric (10000)")
  p.add_argument("--rows", default=",".join(ROW_GROUPS), help=f"row groups of {ROW_GROUPS}")
  p.add_argument("--ks", default="1,2,4,8", help="student step counts of alt and ps")
  p.add_argument("--extra", default="", help="extra rows with config overrides (see docstring)")
  p.add_argument("--batch", type=int, default=512)
  p.add_argument("--ema", type=float, default=None, help="student EMA (0.998; --quick 0.99)")
  p.add_argument("--nu_ema", type=float, default=None, help="nu EMA of the ps rows (default: "
                 "the distill config's)")
  p.add_argument("--hidden", type=int, default=128)
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--eval_draws", type=int, default=1, help="sample each student this many "
                 "times (keys 777 + seed + 1000 j); a row's metrics are draw 0's, all draws are "
                 "in its 'draws' list")
  p.add_argument("--mlp_cache", default="", help=".npz of the regressed MLP: loaded if it "
                 "exists and fits the model, else written after the regression (development)")
  p.add_argument("--regress_steps", type=int, default=None, help="MLP regression steps (4000; "
                 "--quick 1000)")
  args = p.parse_args(argv)
  args.steps = args.steps or (300 if args.quick else 5000)
  args.num_samples = args.num_samples or (2000 if args.quick else 10000)
  args.ema = args.ema if args.ema is not None else (0.99 if args.quick else 0.998)
  args.regress_steps = args.regress_steps or (1000 if args.quick else 4000)
  for n, v in (("steps", args.steps), ("regress_steps", args.regress_steps)):
    if v % CHUNK:
      p.error(f"--{n} must be a multiple of {CHUNK}, got {v}.")
  bad = set(filter(None, args.rows.split(","))) - set(ROW_GROUPS)
  if bad:
    p.error(f"--rows: unknown groups {sorted(bad)}; choose from {ROW_GROUPS}.")
  args.extra_rows = parse_extra(args.extra)
  return args


def fmt_table(rows):
  lines = [f"{'row':44s} {'energy':>9s} {'sliced_w2':>9s} {'loglik':>8s} {'mode_err':>8s} "
           f"{'ms/step':>8s} {'MFLOP':>8s}"]
  for name, r in rows.items():
    ms = f"{r['time_per_step_ms']:.1f}" if "time_per_step_ms" in r else ""
    mf = f"{r['flops_per_step'] / 1e6:.1f}" if "flops_per_step" in r else ""
    lines.append(f"{name:44s} {r['energy']:9.5f} {r['sliced_w2']:9.4f} {r['loglik']:8.3f} "
                 f"{r['mode_weight_error']:8.4f} {ms:>8s} {mf:>8s}")
  return "\n".join(lines)


def summarise(rows):
  """mean / std / min / max of each metric over the seeds of each method and k."""
  groups = {}
  for name, r in rows.items():
    if "/seed=" in name:
      groups.setdefault(name.split("/seed=")[0], []).append(r)
  out = {}
  for g, rs in groups.items():
    out[g] = {"num_seeds": len(rs)}
    for m in METRICS:
      vals = np.array([r[m] for r in rs])
      out[g].update({f"{m}_mean": float(vals.mean()), f"{m}_std": float(vals.std()),
                     f"{m}_min": float(vals.min()), f"{m}_max": float(vals.max())})
  return out


def check_claims(rows, summary):
  """The issue's claims as booleans with the numbers they compare (None where rows are missing).

  Seeded rows use the mean over seeds and, for claim 1, also the worst seed. The noise floor's
  spread (std of the floor energy over seeds) is reported so that ratios of near-zero energies
  can be judged.
  """
  def metric(name, m, worst=False):
    if name in summary:
      return summary[name][f"{m}_max" if worst else f"{m}_mean"]
    return rows[name][m] if name in rows else None

  out = {}
  floor = summary.get("floor/true_vs_true", {})
  out["noise_floor"] = {"energy_mean": floor.get("energy_mean"),
                        "energy_std": floor.get("energy_std"),
                        "sliced_w2_mean": floor.get("sliced_w2_mean")}
  e8, sw8, me8 = (metric("alt/k=8", m) for m in ("energy", "sliced_w2", "mode_weight_error"))
  sw_t256 = metric("teacher_ancestral/k=256", "sliced_w2")
  if None not in (e8, sw8, me8, sw_t256):
    worst = {m: metric("alt/k=8", m, worst=True) for m in ("energy", "sliced_w2",
                                                           "mode_weight_error")}
    out["1_alt_k8_matches_teacher"] = {
        "energy": e8, "energy_worst_seed": worst["energy"], "energy_limit": 0.005,
        "sliced_w2": sw8, "sliced_w2_worst_seed": worst["sliced_w2"],
        "sliced_w2_limit": 1.3 * sw_t256, "mode_weight_error": me8,
        "mode_weight_error_worst_seed": worst["mode_weight_error"],
        "mode_weight_error_limit": 0.02,
        "holds_mean": bool(e8 <= 0.005 and sw8 <= 1.3 * sw_t256 and me8 <= 0.02),
        "holds_every_seed": bool(worst["energy"] <= 0.005 and worst["sliced_w2"] <= 1.3 * sw_t256
                                 and worst["mode_weight_error"] <= 0.02)}
  for k in (1, 2, 4, 8):
    teacher = [metric(f"teacher_{s}/k={k}", "energy") for s in ("ancestral", "ddim")]
    if None in teacher:
      continue
    best_teacher = min(teacher)
    for student in (f"alt/k={k}", f"ps/k={k}", f"pd/k={k}", f"mcd/k={k}",
                    f"alt_progressive/k={k}", f"ps_progressive/k={k}"):
      e = metric(student, "energy")
      if e is not None:
        out[f"2_{student}_vs_teacher_k{k}"] = {
            "student_energy": e, "best_teacher_energy": best_teacher,
            "ratio": e / best_teacher, "holds": bool(e <= best_teacher / 10)}
  eu = metric("uncond_zs/k=8", "energy")
  if eu is not None and e8 is not None:
    out["3_uncond_vs_cond_k8"] = {
        "uncond_energy": eu, "cond_energy": e8,
        "ratio": eu / e8 if e8 > 0 else None,
        "holds": bool(eu >= 3 * max(e8, 0.0)),
        "difference_in_floor_stds": ((eu - e8) / floor["energy_std"]
                                     if floor.get("energy_std") else None),
        "note": "a conditional energy at or below 0 is at the noise floor; the ratio is then "
                "undefined and the difference in floor standard deviations is the evidence"}
  cost = {}
  for name in ("alt/k=8", "alt_mlp/k=8", "ps/k=8", "ps_mixture/k=8", "pd/k=8", "mcd/k=8"):
    key = name if name in rows else f"{name}/seed=0"
    if key in rows and "time_per_step_ms" in rows[key]:
      cost[name] = {"energy": metric(name, "energy"),
                    "time_per_step_ms": rows[key]["time_per_step_ms"],
                    "mflop_per_step": rows[key]["flops_per_step"] / 1e6}
  if cost:
    out["5_cost_and_quality"] = cost
  return out


def scatter_png(path, panels, reference):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  n = len(panels) + 1
  cols = min(4, n)
  fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.2 * cols, 3.2 * ((n + cols - 1) // cols)))
  axes = np.ravel(axes)
  lim = np.abs(reference).max() * 1.15
  for ax, (title, x) in zip(axes, [("true samples", reference)] + list(panels.items())):
    ax.scatter(x[:3000, 0], x[:3000, 1], s=1, alpha=0.4)
    ax.set_title(title, fontsize=8)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
  for ax in axes[n:]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  log = lambda s: print(s, flush=True)  # noqa: E731
  groups = set(filter(None, args.rows.split(",")))
  ks = tuple(int(k) for k in args.ks.split(","))
  mixture = load_mixture(args.spec)
  schedule = Schedule()
  n, dim = args.num_samples, mixture.dim
  reference = mixture.sample(np.random.default_rng(123_456), n)["x"].astype(np.float64)
  rows, panels = {}, {}
  t_start = time.time()
  log(f"spec {args.spec}: K={mixture.num_components}, D={dim}; {n} samples per metric; "
      f"{args.steps} distillation steps per student; batch {args.batch}")

  def add(name, samples, extra=None):
    samples = np.asarray(samples)
    rows[name] = eval_samples(samples, reference, mixture)
    rows[name].update(extra or {})
    if dim == 2:
      panels[name] = samples
    log(f"{name:44s} energy={rows[name]['energy']:.5f} sw2={rows[name]['sliced_w2']:.4f} "
        f"loglik={rows[name]['loglik']:.3f} mode_err={rows[name]['mode_weight_error']:.4f}")

  if "floor" in groups:
    for seed in range(max(1, args.seeds)):
      add(f"floor/true_vs_true/seed={seed}",
          mixture.sample(np.random.default_rng(654_321 + seed), n)["x"])
  if "teacher" in groups:
    exact, gp = gmm.make_denoiser(), gmm.gmm_params(mixture)
    for sampler, eta in (("ancestral", 1.0), ("ddim", 0.0)):
      for num in TEACHER_STEPS:
        fn = teacher_sampler(exact, schedule, num_steps=num, eta=eta, n=n, dim=dim)
        add(f"teacher_{sampler}/k={num}", fn(gp, jax.random.PRNGKey(num)))

  model = build_model(dim=dim, hidden=args.hidden, depth=args.depth)
  denoise = steps.make_x_predictor(model, "v")
  needs_mlp = groups - {"floor", "teacher"} or args.extra_rows
  mlp_params = mlp_opt_state = None
  if needs_mlp:
    log(f"model: mmd_jax.models.mlp.MLPDenoiser, hidden {args.hidden}, depth {args.depth}, "
        "v-prediction")
    template = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), dim))
    mlp_params = load_params(args.mlp_cache, template) if args.mlp_cache else None
    if mlp_params is None:
      mlp_params, mlp_opt_state = regress_mlp(
          model=model, denoise=denoise, mixture=mixture, schedule=schedule,
          steps_=args.regress_steps, batch=args.batch, lr=1e-3, seed=0, log=log)
      if args.mlp_cache:
        save_params(args.mlp_cache, mlp_params)
    else:
      log(f"  regressed MLP loaded from {args.mlp_cache}")
  if "mlp_teacher" in groups:
    for num in (1, 8, 256):
      fn = teacher_sampler(denoise, schedule, num_steps=num, eta=1.0, n=n, dim=dim)
      add(f"mlp_teacher_ancestral/k={num}", fn(mlp_params, jax.random.PRNGKey(num)))

  jobs = []  # (row name, kind, k, seed, overrides)
  for kind in ("alt", "ps", "pd", "mcd"):
    if kind in groups:
      for k in ks:
        for seed in (range(args.seeds) if k == 8 else (0,)):
          jobs.append((f"{kind}/k={k}" + (f"/seed={seed}" if k == 8 else ""), kind, k, seed, {}))
  if "ps_mixture" in groups:
    jobs.append(("ps_mixture/k=8", "ps_mixture", 8, 0, {}))
  if "alt_mlp" in groups:
    jobs.append(("alt_mlp/k=8", "alt_mlp", 8, 0, {}))
  if "progressive" in groups:
    for kind in ("alt", "ps"):
      if kind in groups and 2 in ks:
        jobs.append((f"{kind}_progressive/k=1", kind, 1, 0, {"init_from": f"{kind}/k=2"}))
  if "uncond" in groups:
    for seed in range(args.seeds):
      jobs.append((f"uncond_zs/k=8/seed={seed}", "alt", 8, seed, {"unconditional_zs": True}))
  for kind, k, overrides, seeds in args.extra_rows:
    tag = ",".join(f"{a}={str(b).replace('/', '|')}" for a, b in overrides.items())
    for seed in range(seeds):
      suffix = f"/seed={seed}" if seeds > 1 else ""
      jobs.append((f"{kind}[{tag}]/k={k}{suffix}", kind, k, seed, overrides))

  trained = {}
  for name, kind, k, seed, overrides in jobs:
    overrides = dict(overrides)
    init_from = overrides.pop("init_from", None)
    if init_from is not None and init_from not in trained:
      raise ValueError(f"Row {name}: init_from={init_from!r} is not a row trained before it "
                       f"({sorted(trained)}).")
    ema_params, info = distill_one(kind=kind, k=k, seed=seed, overrides=overrides, args=args,
                                   mixture=mixture, schedule=schedule, denoise=denoise,
                                   mlp_params=mlp_params, log=log,
                                   init_params=trained.get(init_from),
                                   mlp_opt_state=mlp_opt_state)
    trained[name] = ema_params
    cfg = mm.default_config()
    cfg.variant = VARIANT_OF[kind]
    cfg.num_student_steps = k
    cfg.update({key: v for key, v in overrides.items() if key in ("eta", "spacing")})
    sampler = jax.jit(steps.make_student_sampler(config=cfg, denoise=denoise, schedule=schedule),
                      static_argnames="shape")
    samples = sampler(ema_params, jax.random.PRNGKey(777 + seed), shape=(n, dim))
    add(name, samples, {key: v for key, v in info.items()
                        if key not in ("train_seconds", "steps")} | {"seed": seed})
    if args.eval_draws > 1:  # the same student, further sample draws (sampling noise of a row)
      rows[name]["draws"] = [{m: rows[name][m] for m in METRICS}]
      for j in range(1, args.eval_draws):
        more = np.asarray(sampler(ema_params, jax.random.PRNGKey(777 + seed + 1000 * j),
                                  shape=(n, dim)))
        rows[name]["draws"].append(eval_samples(more, reference, mixture))
      log(f"  {name} draws: " + "; ".join(
          f"energy={d['energy']:.5f} sw2={d['sliced_w2']:.4f} mode_err="
          f"{d['mode_weight_error']:.4f}" for d in rows[name]["draws"]))

  timing = None
  if "timing" in groups:
    timing = time_variants(args=args, mixture=mixture, schedule=schedule, denoise=denoise,
                           mlp_params=mlp_params, log=log)

  summary = summarise(rows)
  log("\n" + fmt_table(rows))
  for g, s in summary.items():
    log(f"{g} over {s['num_seeds']} seeds: energy {s['energy_mean']:.5f} +- {s['energy_std']:.5f}"
        f" (min {s['energy_min']:.5f}, max {s['energy_max']:.5f}); sliced_w2 "
        f"{s['sliced_w2_mean']:.4f} +- {s['sliced_w2_std']:.4f}; mode_err "
        f"{s['mode_weight_error_mean']:.4f} (max {s['mode_weight_error_max']:.4f})")
  claims = check_claims(rows, summary)
  if timing:
    claims["5_interleaved_timing"] = timing
  log("claims: " + json.dumps(claims, indent=1))
  log(f"total {time.time() - t_start:.0f}s")
  if args.out:
    settings = {k: v for k, v in vars(args).items() if k != "extra_rows"}
    settings.update(model="mmd_jax.models.mlp.MLPDenoiser (v-prediction)",
                    schedule="cosine [-15, 15]",
                    distill_defaults=mm.default_config().to_dict())
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"rows": rows, "summary": summary, "claims": claims, "settings": settings}, f,
                indent=1)
    if dim == 2 and panels:
      keep = [p for p in panels if not p.startswith("floor") and (
          not p.startswith(("teacher", "mlp_teacher")) or p.endswith(("/k=1", "/k=8", "/k=256")))
              and not p.endswith(("/seed=1", "/seed=2"))]
      scatter_png(os.path.splitext(args.out)[0] + ".png", {p: panels[p] for p in keep},
                  reference)
    log(f"wrote {args.out}")


if __name__ == "__main__":
  main()
