"""Samplers: teacher ancestral (DDPM) and DDIM, the k-step student sampler, and guidance.

Every sampler here walks a time grid 1 = t_0 > t_1 > ... > t_N = 0 and calls an x-predictor
`denoise_fn(z, logsnr, label) -> x_hat`:
    z ~ N(0, I)
    for i in 0..N-1:
        x_hat = denoise_fn(z, logsnr(t_i), label)
        if i == N-1: return x_hat
        z = step(z, x_hat, t_i -> t_{i+1})
The step is ancestral, a sample of q(z_s | z_t, x_hat) (eta = 1), or deterministic DDIM (eta = 0).
The moment-matching student's k-step sampler is the ancestral one with the student as
denoise_fn (design note, "The student's sampler"); with k = 1 it returns g_eta(z_1).
The loop is a lax.scan, so the compile time does not grow with the number of steps.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmd_jax.diffusion import process
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


def guided(denoise_fn: DenoiseFn, *, guidance: float, null_label: int) -> DenoiseFn:
  """Classifier-free guidance (Ho & Salimans 2022) in x-space:
  g^w = g(z, c) + w (g(z, c) - g(z, null)). With the same z this is the same as guiding eps.
  Both passes run as one batch of twice the size.
  """
  if guidance == 0.0:
    return denoise_fn

  def fn(z, logsnr, label):
    if label is None:
      raise ValueError("Guidance needs class labels; got label=None.")
    both = denoise_fn(jnp.concatenate([z, z]), jnp.concatenate([logsnr, logsnr]),
                      jnp.concatenate([label, jnp.full_like(label, null_label)]))
    cond, uncond = jnp.split(both, 2)
    return cond + guidance * (cond - uncond)

  return fn


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


def ancestral_sample(**kwargs):
  """The ancestral (DDPM) sampler: each step samples q(z_s | z_t, x_hat)."""
  return sample(eta=1.0, **kwargs)


def ddim_sample(**kwargs):
  """The deterministic DDIM sampler (Song et al. 2021)."""
  return sample(eta=0.0, **kwargs)


SAMPLERS = {"ancestral": 1.0, "ddim": 0.0}


def eta_of(sampler: str) -> float:
  if sampler not in SAMPLERS:
    raise ValueError(f"Unknown sampler {sampler!r}; choose one of {tuple(SAMPLERS)}.")
  return SAMPLERS[sampler]
