"""Samplers: teacher ancestral (DDPM) and DDIM and the k-step student sampler, by name.

Every sampler here walks a time grid 1 = t_0 > t_1 > ... > t_N = 0 and calls an x-predictor
`denoise_fn(z, logsnr, label) -> x_hat`:
    z ~ N(0, I)
    for i in 0..N-1:
        x_hat = denoise_fn(z, logsnr(t_i), label)
        if i == N-1: return x_hat
        z = step(z, x_hat, t_i -> t_{i+1})
The step is ancestral, a sample of q(z_s | z_t, x_hat) (eta = 1), or deterministic DDIM (eta = 0).
Samplers are registered by name (SAMPLERS, below); teacher and student runs resolve specs there.
The moment-matching student's k-step sampler is the ancestral one with the student as
denoise_fn (design note, "The student's sampler"); with k = 1 it returns g_eta(z_1).
The loop is a lax.scan, so the compile time does not grow with the number of steps.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmd_jax.diffusion import conditioning, process
from mmd_jax.diffusion.schedules import Schedule

SPACINGS = ("uniform_t", "uniform_logsnr")

DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


def logsnr_grid(*, num_steps: int, schedule: Schedule, spacing: str = "uniform_t") -> np.ndarray:
  """logSNR at t_0 = 1, ..., t_N = 0 (length num_steps + 1), as a float32 numpy array."""
  if int(num_steps) < 1:
    raise ValueError(f"num_steps must be a positive integer, got {num_steps}.")
  if spacing == "uniform_t":
    t = np.linspace(1.0, 0.0, num_steps + 1)
    return np.asarray(schedule.logsnr(t), np.float32)
  if spacing == "uniform_logsnr":
    hi, lo = (float(schedule.logsnr(0.0)), float(schedule.logsnr(1.0)))
    return np.linspace(lo, hi, num_steps + 1).astype(np.float32)
  raise ValueError(f"Unknown grid spacing {spacing!r}; choose one of {SPACINGS}.")


def sample(*, denoise_fn: DenoiseFn, rng, shape, num_steps: int, schedule: Schedule,
           eta: float = 1.0, spacing: str = "uniform_t", label=None, clip: float | None = None):
  """Draws samples of the given shape ([B, ...]) with `num_steps` network evaluations."""
  grid = jnp.asarray(logsnr_grid(num_steps=num_steps, schedule=schedule, spacing=spacing))
  batch = shape[0]
  init_rng, step_rng = jax.random.split(rng)
  z = jax.random.normal(init_rng, shape, jnp.float32)

  def body(carry, inputs):
    z, _ = carry
    logsnr_t, logsnr_s, key = inputs
    x_hat = denoise_fn(z, jnp.full((batch,), logsnr_t), label)
    if clip is not None:
      x_hat = jnp.clip(x_hat, -clip, clip)
    noise = jax.random.normal(key, shape, jnp.float32)
    z = process.sample_step(z_t=z, x=x_hat, logsnr_s=jnp.full((batch,), logsnr_s),
                            logsnr_t=jnp.full((batch,), logsnr_t), noise=noise, eta=eta)
    return (z, x_hat), None

  keys = jax.random.split(step_rng, num_steps)
  (_, x_hat), _ = jax.lax.scan(body, (z, jnp.zeros(shape, jnp.float32)),
                               (grid[:-1], grid[1:], keys))
  return x_hat


# ----------------------------------------------------------------------------------------------
# The registry: one name, one function. Every place that accepts a sampler spec
# (SAMPLER:STEPS[:GUIDANCE]) resolves the name here. A sampler is
#   fn(*, denoise_fn, rng, shape, num_steps, schedule, label, clip, settings) -> x
# where settings is None for a teacher run and student_settings(distill config) for a student.
# ----------------------------------------------------------------------------------------------

SAMPLERS: dict[str, Callable] = {}
STUDENT_ONLY: set[str] = set()  # samplers that need a student's settings


def register(name: str, *, student_only: bool = False):
  def add(fn):
    SAMPLERS[name] = fn
    if student_only:
      STUDENT_ONLY.add(name)
    return fn
  return add


def get(name: str) -> Callable:
  if name not in SAMPLERS:
    raise ValueError(f"Unknown sampler {name!r}; choose one of {tuple(SAMPLERS)}.")
  return SAMPLERS[name]


def student_settings(distill_config) -> dict:
  """What a student's own sampler takes from its distillation config: the eta and the grid
  spacing it was trained with."""
  return {"eta": float(distill_config.eta), "spacing": str(distill_config.spacing)}


def names(*, student: bool) -> tuple[str, ...]:
  """The samplers a run can use: all of them for a student, those without settings for a
  teacher."""
  return tuple(n for n in SAMPLERS if student or n not in STUDENT_ONLY)


@register("ancestral")
def ancestral(*, settings=None, **kwargs):
  """The ancestral (DDPM) sampler: each step samples q(z_s | z_t, x_hat), on a grid uniform in t."""
  del settings
  return sample(eta=1.0, spacing="uniform_t", **kwargs)


@register("ddim")
def ddim(*, settings=None, **kwargs):
  """The deterministic DDIM sampler (Song et al. 2021), on a grid uniform in t."""
  del settings
  return sample(eta=0.0, spacing="uniform_t", **kwargs)


@register("student", student_only=True)
def student(*, settings, **kwargs):
  """A moment-matching student's k-step sampler: ancestral with the eta and grid spacing it was
  trained with (design note, "The student's sampler")."""
  if settings is None:
    raise ValueError("The 'student' sampler needs a distilled student's settings.")
  return sample(eta=settings["eta"], spacing=settings["spacing"], **kwargs)


def make_sample_fn(*, denoise, schedule: Schedule, num_classes: int, data_shape,
                   clip: float | None, settings: dict | None = None):
  """Returns sample(params, rng, labels, text=None, *, sampler, num_steps, guidance) -> x
  (jitted) for an x-predictor `denoise` (process.x_predictor). sampler: a registered name
  (SAMPLERS); settings: a student's (student_settings), None for a teacher.
  labels reach the model only when it has classes (num_classes > 0). text: f32[B, L, D]
  embeddings for a text-conditioned model; guidance then uses the zero text (and the null class
  if the model has classes) as the unconditional branch."""
  null_label = num_classes if num_classes > 0 else None

  @functools.partial(jax.jit, static_argnames=("sampler", "num_steps", "guidance"))
  def sample(params, rng, labels, text=None, *, sampler: str, num_steps: int,
             guidance: float = 0.0):
    fn = conditioning.conditioned(denoise, params, guidance=guidance, null_label=null_label,
                                  text=text)
    return get(sampler)(
        denoise_fn=fn, rng=rng, shape=(labels.shape[0],) + tuple(data_shape),
        num_steps=num_steps, schedule=schedule, label=labels if num_classes > 0 else None,
        clip=clip, settings=settings)

  return sample
