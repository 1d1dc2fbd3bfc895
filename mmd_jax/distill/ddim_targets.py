"""The regression targets of the two baselines, as pure functions of arrays.

Both baselines train an x-predicting student g_eta whose deterministic DDIM step from z_t to an
earlier time should land where a more expensive reference lands:
  progressive distillation (Salimans & Ho, ICLR 2022, Algorithm 2): the reference is two DDIM
      steps of the round's teacher, t -> t - 1/(2N) -> t - 1/N;
  multistep consistency distillation (Heek, Hoogeboom & Salimans 2024): the reference is one
      DDIM (ODE) step of the teacher t -> s = t - 1/N, then the target network's DDIM jump from
      z_s to the start of the segment; when s is the segment start, z_s itself (the boundary
      condition: the consistency function of the segment start is the identity).
A target z_ref at time s is turned into the x-target x_tilde whose DDIM step t -> s lands on
z_ref (Salimans & Ho 2022, Algorithm 2, the line computing x_tilde):
    z_ref = alpha_s x_tilde + sigma_s (z_t - alpha_t x_tilde) / sigma_t
    x_tilde = (z_ref - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t),
so an x-space loss |g_eta(z_t) - x_tilde|^2 is the z-space loss at s divided by the squared
denominator. All logsnr arguments are f32[B], broadcast over the data dimensions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmd_jax.diffusion.schedules import alpha_sigma


def _b(a, like):
  a = jnp.asarray(a, jnp.float32)
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def ddim_step(*, z_t, x, logsnr_t, logsnr_s):
  """The deterministic DDIM step t -> s with x-estimate x: alpha_s x + sigma_s eps_hat,
  eps_hat = (z_t - alpha_t x) / sigma_t (Song et al. 2021, eq. 12 with eta = 0)."""
  alpha_t, sigma_t = alpha_sigma(logsnr_t)
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  eps_hat = (z_t - _b(alpha_t, x) * x) / _b(sigma_t, x)
  return _b(alpha_s, x) * x + _b(sigma_s, x) * eps_hat


def x_target(*, z_t, z_ref, logsnr_t, logsnr_s):
  """x_tilde with ddim_step(z_t, x_tilde, t -> s) == z_ref (module docstring), s < t."""
  alpha_t, sigma_t = alpha_sigma(logsnr_t)
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  ratio = sigma_s / sigma_t
  return (z_ref - _b(ratio, z_t) * z_t) / _b(alpha_s - ratio * alpha_t, z_t)


def two_step_target(*, teacher, z_t, label, logsnr_t, logsnr_mid, logsnr_s, clip=None):
  """Progressive distillation's x-target: two DDIM steps of `teacher(z, logsnr, label) -> x_hat`
  t -> mid -> s, then x_target. clip: the teacher's x_hat is clipped to +-clip (None: not)."""
  def x_hat(z, logsnr):
    x = teacher(z, logsnr, label)
    return x if clip is None else jnp.clip(x, -clip, clip)

  z_mid = ddim_step(z_t=z_t, x=x_hat(z_t, logsnr_t), logsnr_t=logsnr_t, logsnr_s=logsnr_mid)
  z_s = ddim_step(z_t=z_mid, x=x_hat(z_mid, logsnr_mid), logsnr_t=logsnr_mid, logsnr_s=logsnr_s)
  return jax.lax.stop_gradient(x_target(z_t=z_t, z_ref=z_s, logsnr_t=logsnr_t,
                                        logsnr_s=logsnr_s))


def consistency_target(*, teacher, target_net, z_t, label, logsnr_t, logsnr_s, logsnr_start,
                       at_start, clip=None):
  """Multistep consistency distillation's x-target (module docstring): z_s = one DDIM step of the
  teacher t -> s; z_ref = z_s where `at_start` (bool[B]: s is the segment start), else the DDIM
  jump of target_net (x-predictor, gradient stopped) from z_s to the segment start; then
  x_target from z_t to the segment start. Returns (x_tilde, z_s)."""
  def clipped(x):
    return x if clip is None else jnp.clip(x, -clip, clip)

  z_s = ddim_step(z_t=z_t, x=clipped(teacher(z_t, logsnr_t, label)), logsnr_t=logsnr_t,
                  logsnr_s=logsnr_s)
  x_ref = jax.lax.stop_gradient(clipped(target_net(z_s, logsnr_s, label)))
  jumped = ddim_step(z_t=z_s, x=x_ref, logsnr_t=logsnr_s, logsnr_s=logsnr_start)
  z_ref = jnp.where(_b(at_start, z_s), z_s, jumped)
  x_tilde = x_target(z_t=z_t, z_ref=z_ref, logsnr_t=logsnr_t, logsnr_s=logsnr_start)
  return jax.lax.stop_gradient(x_tilde), z_s

