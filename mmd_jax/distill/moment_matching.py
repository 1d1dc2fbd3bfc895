"""Moment matching distillation (Salimans, Mensink, Heek, Hoogeboom, NeurIPS 2024): pure pieces.

Design note: /work/shared/design/moment_matching.md. Everything here is a pure function of arrays;
the jitted steps that put them together are in mmd_jax.distill.steps.

Notation: teacher g_theta, student g_eta, auxiliary g_phi, all x-predictors. Per example, with
data dimensions averaged (`mean over dims`, as in process.denoising_loss) and the batch averaged:
  student loss  L(eta) = w(s) <x_tilde, sg(g_phi(z_s) - g_theta(z_s))> / D
      whose gradient is w(s) (d x_tilde / d eta)^T (g_phi - g_theta) / D;
  aux loss      L(phi) = w(s) (|sg(x_tilde) - g_phi(z_s)|^2 + |sg(g_theta(z_s)) - g_phi(z_s)|^2) / D
      (terms selectable, see AUX_TERMS);
  parameter-space student loss  L(eta) = w(s) <x_tilde_B, sg(d)> / D with
      d = JVP of theta -> g_theta(z_s^B) along nu = -Lambda g_A.

Time sampling, in the coordinate u in [0, 1] of the student's sampler grid (u = t for the
'uniform_t' spacing, u linear in logSNR for 'uniform_logsnr'; see `logsnr_of_u`):
  'continuous': s ~ U(0, 1), t = min(1, s + U(0, 1/k))            (design note, [agreed])
  'grid':       t = i/k with i ~ U{1..k}, s ~ U[t - 1/k, t)           (the student's own grid)
  'mixed':      even batch rows 'grid', odd rows 'continuous'

Weightings w(s) (`WEIGHTINGS`):
  'auto'          'constant' for k <= 2 student steps, 'snr_plus_one' for k > 2 (see below)
  'constant'      1
  'sigmoid'       sigmoid(logsnr_s - bias)
  'snr_plus_one'  1 + 1 / (exp(-logsnr_s) + exp(-5))   (v-style 1 + SNR with SNR capped at e^5)
  'teacher'       the teacher's training weighting on |x - x_hat|^2 (process.log_x_weight with
                  distill.teacher_weighting, e.g. 'v' = 1 + SNR, 'eps' = SNR)
  'truncated_snr' max(SNR, 1) (Salimans & Ho 2022, progressive distillation's x-space
                  weighting; 'auto' for the baselines progressive and consistency)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from mmd_jax.diffusion import process
from mmd_jax.diffusion.samplers import SPACINGS
from mmd_jax.diffusion.schedules import Schedule

UPDATE_SCHEDULES = ("both", "alternate")
DROPOUTS = ("independent", "shared", "off")
CLIPPINGS = ("neither", "both", "sampler")
ALTERNATE_DISPATCHES = ("host", "device")
TIME_SAMPLINGS = ("grid", "continuous", "mixed")  # and 'auto' (resolve_time_sampling)
WEIGHTINGS = ("auto", "snr_plus_one", "constant", "sigmoid", "teacher", "truncated_snr")
TARGET_NETWORKS = ("stop_gradient", "ema")
PRECONDITIONERS = ("squared_grads", "adam", "identity")
AUX_TERMS = ("student", "teacher", "data")


def default_config() -> ml_collections.ConfigDict:
  """The `distill` section of an experiment config, with documented defaults.

  variant            a name registered in distill/steps.py VARIANTS (checked there):
                     'alternating' (Algorithm 2: student + auxiliary phi) or 'parameter_space'
                     (Algorithm 3: no auxiliary; teacher gradient on half A, JVP on half B);
                     the baselines 'progressive' (progressive distillation, distill/progressive.py)
                     and 'consistency' (multistep consistency distillation, consistency.py).
  num_student_steps  k, the number of steps of the student's sampler (1, 2, 4, 8, ...).
  update_schedule    alternating only: 'both' = phi and eta updated on every step from one batch
                     (default; the student uses phi before its update), 'alternate' = phi on even
                     steps, eta on odd steps (the re-implementations' choice).
  alternate_dispatch 'alternate' schedule only: 'host' (default) = two compiled programs, one
                     per update, picked by step parity on the host; 'device' = one program whose
                     lax.cond picks the update. Same updates; on XLA:CPU convolutions inside a
                     conditional run on a slow generic kernel (a digits step was 8x slower).
  time_sampling      'auto' (default: 'continuous' for k = 1, else 'grid'), 'grid',
                     'continuous' or 'mixed'; see the module docstring. 16-D GMM, 3000 steps
                     (README): k = 8 grid -0.0007 vs continuous 0.0046 energy; k = 1 from the
                     regressed teacher grid collapses (6.15 over 3 seeds), mixed on 1 of 3
                     seeds (2.26), continuous on none (0.031). Continuous costs quality where
                     grid does not collapse (2-D GMM, digits: README "Fidelity"), but is the
                     only safe choice, so k = 1 defaults to it.
  weighting          w(s): 'auto' (default: 'constant' for k <= 2, else 'snr_plus_one'; for the
                     baselines 'truncated_snr' of the student's time t),
                     'snr_plus_one', 'constant', 'sigmoid', 'teacher', 'truncated_snr'. On the
                     GMM benchmark (2000 steps) snr_plus_one made teacher-initialised k = 1
                     students collapse onto one mode on both mixtures (its weight, up to e^5 at low noise,
                     dominates the single step's range; 'constant' avoided it on the 2-D mixture
                     only: also initialise k = 1 from a k = 2 student, see steps.py) and was
                     3.9x worse at k = 2 (energy 0.066 vs 0.017, 16-D; but at 3000 steps it was
                     0.0018 vs 0.0089 on seed 0, but over 3 seeds 0.025 vs 0.020 mean, README);
                     at k = 4, 8 both reach
                     the noise floor in energy and snr_plus_one keeps the within-mode spread
                     (mean log-likelihood -1.0 vs 0.57 at k = 4, data -1.9) closer to the data.
  weighting_bias     b of the 'sigmoid' weighting and of a 'sigmoid' teacher weighting.
  teacher_weighting  the teacher's own weighting for weighting='teacher' ('v', 'eps', 'x',
                     'sigmoid'); set it from the teacher's training config.
  spacing            the student sampler's grid: 'uniform_t' (default) or 'uniform_logsnr'
                     (samplers.logsnr_grid); training times are drawn on the same coordinate.
  eta                ancestral noise of the student's sampler (1 = ancestral, default), used both
                     in sampling and for z_s in training (process.sample_step).
  guidance           classifier-free guidance weight w of the distilled teacher
                     g^w = g(c) + w (g(c) - g(null)); 0 disables. The student (and the
                     auxiliary) are plain conditional networks evaluated at c; only the teacher
                     is guided (also inside the parameter-space gradient and JVP).
  unconditional_zs   ablation: z_s ~ q(z_s | x_tilde) (diffuse x_tilde directly), ignoring z_t.
  aux_terms          comma-separated terms of the auxiliary loss: 'student' (regress
                     sg(x_tilde) at z_s), 'teacher' (regress sg(g_theta(z_s))), 'data' (denoising
                     loss on the real batch). Default 'student,teacher' (design note).
  preconditioner     parameter_space only: 'squared_grads' (default; diagonal from squared
                     teacher gradients on real data, `steps.squared_grad_preconditioner`),
                     'adam' (the teacher's Adam second moments), 'identity'.
  precond_eps        eps of Lambda = 1 / (sqrt(v + precond_damping * median(v)) + eps)
                     ('adam': 1 / (sqrt(v) + eps)).
  precond_damping    'squared_grads' only: damping floor of Lambda relative to the median of the
                     squared-gradient estimate v (>= 0; 0 = none). Default 1e-2 bounds every
                     entry of Lambda by sqrt(1.01 / 0.01) = 10.05x the median Lambda, so that
                     parameters the real-data estimate under-samples cannot dominate
                     nu = -Lambda g_A (the null-class row got Lambda = 1e8 without it); see
                     preconditioners.py.
  precond_batches    number of real-data microbatches whose squared gradients are averaged.
  nu_ema             parameter_space only: EMA decay of the direction nu over steps (bias
                     corrected); default 0.99. Not the paper's estimator (that is 0 = off, an
                     independent half-batch A each step); on the 16-D GMM benchmark (k = 8,
                     2000 steps) 0.99 reached the noise floor (energy -0.0012) where 0 gave
                     0.0107.
  ema_decay          EMA of the student's parameters (used for sampling/evaluation).
  optim              optimizer of student and auxiliary (fields of training.optim.make_optimizer);
                     steps.make_optimizers(config) builds both.
  aux_lr_scale       the auxiliary's learning rate is optim.learning_rate * aux_lr_scale.
  batch_size, num_steps  the training run (the parameter-space step splits the batch in halves).
  init_from          '' (default: student, EMA and auxiliary start from the teacher's EMA
                     parameters) or the work directory (or WORKDIR/checkpoints/STEP) of a student
                     of the same teacher, whose EMA parameters they start from instead:
                     progressive initialisation, e.g. k = 1 from the trained k = 2 student. On
                     the 16-D GMM benchmark the teacher-initialised k = 1 student collapsed onto
                     one mode (energy 6.16 vs the teacher's 6.90) and the one started from its
                     k = 2 student did not (0.047); see the README.
    dropout            'independent' (default; the student and the auxiliary run their dropout with
                     their own masks, the teacher runs without), 'shared' (alternating only: the
                     teacher is evaluated with the auxiliary's dropout mask, so their difference
                     is exactly 0 at initialisation, as in one public reimplementation) or 'off'
                     (every network in eval mode). Measured on the digits: README "Fidelity".
  clipping           where x_hat / x_tilde is clipped to +-diffusion.clip_x: 'neither' (default:
                     the training draw of z_s and the student's sampler both use the unclipped
                     x_tilde, so sampling follows the trajectories the student trained on),
                     'both' (the draw and the sampler clip) or 'sampler' (only the sampler clips:
                     the behaviour before this option). Measured on the digits: README
                     "Fidelity". Configs saved before it carry clip_train_draws (True = 'both',
                     False = 'sampler') or nothing ('sampler'); see clipping().
  teacher_steps      baselines only. progressive: the number of DDIM steps of the teacher that
                     round 0 distils, k * 2^R for R >= 1 rounds (each halves the steps; the
                     rounds share num_steps equally). consistency: the teacher's ODE (DDIM)
                     steps over [0, 1], a multiple of k (teacher_steps / k per segment).
                     Default 64.
  target_network     consistency only: 'stop_gradient' (default: the target is the student
                     itself, gradient stopped) or 'ema' (an EMA of the student with decay
                     target_ema, as in Song et al. 2023's consistency distillation).
  target_ema         the decay of target_network='ema' (default 0.95).
"""
  c = ml_collections.ConfigDict()
  c.variant = "alternating"
  c.num_student_steps = 8
  c.update_schedule = "both"
  c.alternate_dispatch = "host"
  c.time_sampling = "auto"
  c.weighting = "auto"
  c.weighting_bias = 0.0
  c.teacher_weighting = "v"
  c.spacing = "uniform_t"
  c.eta = 1.0
  c.guidance = 0.0
  c.unconditional_zs = False
  c.aux_terms = "student,teacher"
  c.preconditioner = "squared_grads"
  c.precond_eps = 1e-8
  c.precond_damping = 1e-2  # Lambda <= 10.05x its median (preconditioners.DEFAULT_DAMPING)
  c.precond_batches = 16
  c.nu_ema = 0.99
  c.ema_decay = 0.998
  c.aux_lr_scale = 1.0
  c.batch_size = 512
  c.num_steps = 5000
  c.init_from = ""
  c.dropout = "independent"
  c.clipping = "neither"
  c.teacher_steps = 64
  c.target_network = "stop_gradient"
  c.target_ema = 0.95
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, warmup_steps=0, schedule="cosine", b1=0.0, b2=0.99, eps=1e-8,
      weight_decay=0.0, grad_clip=0.0))
  return c


def clipping(config) -> str:
  """config.clipping; for a config saved before that field, what its run did: clip_train_draws
  True = 'both', False or absent = 'sampler' (the sampler always clipped)."""
  if "clipping" in config:
    return config.clipping
  return "both" if config.get("clip_train_draws", False) else "sampler"


def validate_config(config) -> None:
  """Raises ValueError naming the bad field of a `distill` config section."""
  def choice(name, options):
    value = config.get(name)
    if value not in options:
      raise ValueError(f"distill.{name}={value!r} is not one of {options}.")

  choice("update_schedule", UPDATE_SCHEDULES)
  if "alternate_dispatch" in config:
    choice("alternate_dispatch", ALTERNATE_DISPATCHES)
  choice("time_sampling", ("auto",) + TIME_SAMPLINGS)
  choice("weighting", WEIGHTINGS)
  choice("spacing", SPACINGS)
  choice("preconditioner", PRECONDITIONERS)
  if config.get("dropout", "independent") not in DROPOUTS:  # absent in configs saved before it
    raise ValueError(f"distill.dropout={config.dropout!r} is not one of {DROPOUTS}.")
  if clipping(config) not in CLIPPINGS:
    raise ValueError(f"distill.clipping={config.clipping!r} is not one of {CLIPPINGS}.")
  k = config.get("num_student_steps")
  if not isinstance(k, int) or isinstance(k, bool) or k < 1:
    raise ValueError(f"distill.num_student_steps must be a positive int, got {k!r}.")
  if not isinstance(config.get("init_from", ""), str):
    raise ValueError(f"distill.init_from must be a path string ('' = start from the teacher), "
                     f"got {config.init_from!r}.")
  if not 0.0 <= float(config.get("nu_ema", 0.0)) < 1.0:
    raise ValueError(f"distill.nu_ema must be in [0, 1), got {config.nu_ema}.")
  damping = float(config.get("precond_damping", 0.0))
  if not (damping >= 0.0 and damping < float("inf")):
    raise ValueError(f"distill.precond_damping must be a finite number >= 0, got "
                     f"{config.precond_damping}.")
  if not 0.0 <= float(config.get("eta", 1.0)) <= 1.0:
    raise ValueError(f"distill.eta must be in [0, 1], got {config.eta}.")
  parse_aux_terms(config.get("aux_terms", "student,teacher"))
  if config.get("target_network", "stop_gradient") not in TARGET_NETWORKS:
    raise ValueError(f"distill.target_network={config.target_network!r} is not one of "
                     f"{TARGET_NETWORKS}.")
  if not 0.0 <= float(config.get("target_ema", 0.0)) < 1.0:
    raise ValueError(f"distill.target_ema must be in [0, 1), got {config.target_ema}.")


def parse_aux_terms(spec: str) -> tuple[str, ...]:
  terms = tuple(t.strip() for t in str(spec).split(",") if t.strip())
  bad = [t for t in terms if t not in AUX_TERMS]
  if bad or not terms:
    raise ValueError(f"distill.aux_terms={spec!r}: use a comma-separated subset of {AUX_TERMS}.")
  return terms


# ----------------------------------------------------------------------------------------------
# Times and weights
# ----------------------------------------------------------------------------------------------

def logsnr_of_u(u, *, schedule: Schedule, spacing: str):
  """logSNR at grid coordinate u in [0, 1] (u = 1 is pure noise), matching samplers.logsnr_grid."""
  u = jnp.asarray(u, jnp.float32)
  if spacing == "uniform_t":
    return schedule.logsnr(u)
  if spacing == "uniform_logsnr":
    hi, lo = float(schedule.logsnr(0.0)), float(schedule.logsnr(1.0))
    return hi + (lo - hi) * u
  raise ValueError(f"Unknown grid spacing {spacing!r}; choose one of {SPACINGS}.")


def sample_times(*, rng, batch: int, num_student_steps: int, time_sampling: str):
  """(u_t, u_s) f32[batch] each, with u_s <= u_t, in the grid coordinate."""
  k = float(num_student_steps)
  r1, r2 = jax.random.split(rng)
  if time_sampling == "continuous":
    u_s = jax.random.uniform(r1, (batch,))
    u_t = jnp.minimum(1.0, u_s + jax.random.uniform(r2, (batch,)) / k)
    return u_t, u_s
  if time_sampling == "grid":
    i = jax.random.randint(r1, (batch,), 1, num_student_steps + 1).astype(jnp.float32)
    u_t = i / k
    u_s = u_t - (1.0 - jax.random.uniform(r2, (batch,))) / k  # in [t - 1/k, t)
    return u_t, jnp.maximum(u_s, 0.0)
  if time_sampling == "mixed":
    grid_t, grid_s = sample_times(rng=rng, batch=batch, num_student_steps=num_student_steps,
                                  time_sampling="grid")
    cont_t, cont_s = sample_times(rng=rng, batch=batch, num_student_steps=num_student_steps,
                                  time_sampling="continuous")
    on_grid = jnp.arange(batch) % 2 == 0
    return jnp.where(on_grid, grid_t, cont_t), jnp.where(on_grid, grid_s, cont_s)
  raise ValueError(f"Unknown time_sampling {time_sampling!r}; choose one of {TIME_SAMPLINGS}.")


def resolve_time_sampling(config) -> str:
  """config.time_sampling with 'auto' resolved by config.num_student_steps: 'continuous' for a
  one-step student (grid times collapse it on the 16-D mixture, README), else 'grid'."""
  if config.time_sampling == "auto":
    return "continuous" if int(config.num_student_steps) == 1 else "grid"
  return config.time_sampling


def resolve_weighting(config) -> str:
  """config.weighting with 'auto' resolved by config.num_student_steps."""
  if config.weighting == "auto":
    return "constant" if int(config.num_student_steps) <= 2 else "snr_plus_one"
  return config.weighting


def config_weight(config, logsnr):
  """w(logsnr) as the distill config asks for."""
  return weight(weighting=resolve_weighting(config), logsnr=logsnr,
                bias=float(config.weighting_bias), teacher_weighting=config.teacher_weighting)


def weight(*, weighting: str, logsnr, bias: float = 0.0, teacher_weighting: str = "v"):
  """w(s) as a function of logsnr_s: f32[B]."""
  logsnr = jnp.asarray(logsnr, jnp.float32)
  if weighting == "constant":
    return jnp.ones_like(logsnr)
  if weighting == "sigmoid":
    return jax.nn.sigmoid(logsnr - bias)
  if weighting == "snr_plus_one":
    return 1.0 + 1.0 / (jnp.exp(-logsnr) + jnp.exp(-5.0))
  if weighting == "truncated_snr":
    return jnp.maximum(jnp.exp(logsnr), 1.0)
  if weighting == "teacher":
    return jnp.exp(process.log_x_weight(weighting=teacher_weighting, logsnr=logsnr, bias=bias))
  raise ValueError(f"Unknown weighting {weighting!r}; choose one of {WEIGHTINGS}.")


# ----------------------------------------------------------------------------------------------
# z_s and the losses
# ----------------------------------------------------------------------------------------------

def _mean_dims(a):
  return jnp.mean(a.reshape(a.shape[0], -1), axis=-1)


def sample_z_s(*, rng, z_t, x_tilde, logsnr_s, logsnr_t, eta: float = 1.0,
               unconditional: bool = False):
  """z_s ~ q(z_s | z_t, x_tilde) (eta = 1; process.sample_step for eta < 1), or with
  `unconditional` the ablation z_s ~ q(z_s | x_tilde). Gradients are stopped."""
  noise = jax.random.normal(rng, x_tilde.shape, jnp.float32)
  x_tilde = jax.lax.stop_gradient(x_tilde)
  if unconditional:
    return jax.lax.stop_gradient(process.diffuse(x=x_tilde, eps=noise, logsnr=logsnr_s))
  return jax.lax.stop_gradient(process.sample_step(
      z_t=z_t, x=x_tilde, logsnr_s=logsnr_s, logsnr_t=logsnr_t, noise=noise, eta=eta))


def student_loss(*, x_tilde, g_aux, g_teacher, w):
  """Per-example w <x_tilde, sg(g_aux - g_teacher)> / D: f32[B]. Differentiate w.r.t. the
  student parameters through x_tilde only."""
  direction = jax.lax.stop_gradient(g_aux - g_teacher)
  return jax.lax.stop_gradient(w) * _mean_dims(x_tilde * direction)


def moment_gap(*, g_aux, g_teacher, w):
  """Per-example w |g_aux - g_teacher|^2 / D, the quantity the student drives to zero: f32[B]."""
  return w * _mean_dims(jnp.square(g_aux - g_teacher))


def aux_loss(*, g_aux, x_tilde, g_teacher, w, terms=("student", "teacher"), x_data=None,
             g_aux_data=None, w_data=None):
  """Per-example auxiliary loss (sum of the selected terms): f32[B].

  'student': w |sg(x_tilde) - g_aux(z_s)|^2, 'teacher': w |sg(g_teacher(z_s)) - g_aux(z_s)|^2,
  'data': w_data |x - g_aux(z_t^data)|^2 on real data (needs x_data, g_aux_data, w_data).
  """
  sg = jax.lax.stop_gradient
  total = jnp.zeros(g_aux.shape[:1], jnp.float32)
  if "student" in terms:
    total += _mean_dims(jnp.square(sg(x_tilde) - g_aux))
  if "teacher" in terms:
    total += _mean_dims(jnp.square(sg(g_teacher) - g_aux))
  total = sg(w) * total
  if "data" in terms:
    if x_data is None or g_aux_data is None or w_data is None:
      raise ValueError("aux term 'data' needs x_data, g_aux_data and w_data.")
    total += sg(w_data) * _mean_dims(jnp.square(x_data - g_aux_data))
  return total


def teacher_loss_on_samples(*, x_tilde, g_teacher, w):
  """Per-example w |sg(x_tilde) - g_theta(z_s)|^2 / D: the teacher's denoising loss on student
  samples, whose parameter gradient g_A drives the parameter-space variant: f32[B]."""
  return jax.lax.stop_gradient(w) * _mean_dims(
      jnp.square(jax.lax.stop_gradient(x_tilde) - g_teacher))


def parameter_space_student_loss(*, x_tilde, jvp_out, w):
  """Per-example w <x_tilde, sg(d)> / D with d the teacher JVP along nu: f32[B]."""
  return jax.lax.stop_gradient(w) * _mean_dims(x_tilde * jax.lax.stop_gradient(jvp_out))
