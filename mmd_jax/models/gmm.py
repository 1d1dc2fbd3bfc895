"""The exact denoiser of a diagonal Gaussian mixture, and the mixture's log-density.

For p(x) = sum_k w_k N(x; mu_k, diag(s_k^2)) and the variance-preserving forward process
z = alpha x + sigma eps, each component stays Gaussian under noise:
    p(z | k)    = N(z; alpha mu_k, diag(alpha^2 s_k^2 + sigma^2))
    E[x | z, k] = mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) * (z - alpha mu_k)
and the denoiser is the responsibility-weighted average
    E[x | z] = sum_k r_k(z) E[x | z, k],   r_k(z) = softmax_k(log w_k + log p(z | k)).
All of it is in float32 with log-sum-exp, stable from logsnr = -15 (alpha ~ 5e-4) to +15.

Parameters are a plain pytree {"logits": [K], "means": [K, D], "log_stds": [K, D]}, so the
mixture can itself serve as differentiable "teacher parameters" (parameter-space moment matching
with the mixture's own parameters). `gmm_params` builds it from anything with `weights`, `means`
and `stds` attributes (e.g. mmd_jax.data.sources.GaussianMixture).

Labels: with `conditional=True` a label k in [0, K) conditions on component k and the null label
K (classifier-free guidance convention) gives the whole mixture; otherwise labels are ignored.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmd_jax.diffusion.schedules import alpha_sigma


def gmm_params(mixture) -> dict:
  """{"logits", "means", "log_stds"} as float32 jax arrays, from weights/means/stds attributes."""
  weights = np.asarray(mixture.weights, np.float64)
  means = np.asarray(mixture.means, np.float64)
  stds = np.asarray(mixture.stds, np.float64)
  if means.ndim != 2 or stds.shape != means.shape or weights.shape != means.shape[:1]:
    raise ValueError(
        f"Mixture needs weights [K], means [K, D], stds [K, D]; got {weights.shape}, "
        f"{means.shape}, {stds.shape}.")
  if np.any(weights <= 0) or np.any(stds <= 0):
    raise ValueError("Mixture weights and stds must be > 0 (drop empty components).")
  return {"logits": jnp.asarray(np.log(weights / weights.sum()), jnp.float32),
          "means": jnp.asarray(means, jnp.float32),
          "log_stds": jnp.asarray(np.log(stds), jnp.float32)}


def _log_normal_diag(x, mean, var):
  """log N(x; mean, diag(var)) summed over the last axis; x [B, 1, D], mean/var [.., K, D]."""
  return -0.5 * jnp.sum(jnp.log(2 * jnp.pi * var) + jnp.square(x - mean) / var, axis=-1)


def _log_weights(params, label, num_components, conditional):
  log_w = jax.nn.log_softmax(params["logits"])[None, :]
  if not conditional or label is None:
    return log_w
  one_hot = jax.nn.one_hot(label, num_components)  # the null label K gives all zeros
  is_null = (label >= num_components)[:, None]
  return jnp.where(is_null, log_w, jnp.where(one_hot > 0, 0.0, -jnp.inf))


def responsibilities(params, z, logsnr, label=None, *, conditional=False):
  """log r_k(z) = log p(k | z_t): f32[B, K]."""
  alpha, sigma = alpha_sigma(logsnr)
  alpha, sigma = alpha[:, None, None], sigma[:, None, None]
  var_x = jnp.exp(2.0 * params["log_stds"])[None]
  var_z = alpha**2 * var_x + sigma**2
  log_joint = (_log_weights(params, label, params["means"].shape[0], conditional)
               + _log_normal_diag(z[:, None, :], alpha * params["means"][None], var_z))
  return jax.nn.log_softmax(log_joint, axis=-1)


def denoise(params, z, logsnr, label=None, *, conditional=False):
  """E[x | z_t] in closed form. z: f32[B, D], logsnr: f32[B] -> f32[B, D]."""
  z = jnp.asarray(z, jnp.float32)
  logsnr = jnp.broadcast_to(jnp.asarray(logsnr, jnp.float32), z.shape[:1])
  alpha, sigma = alpha_sigma(logsnr)
  alpha, sigma = alpha[:, None, None], sigma[:, None, None]
  var_x = jnp.exp(2.0 * params["log_stds"])[None]
  means = params["means"][None]
  var_z = alpha**2 * var_x + sigma**2
  log_r = responsibilities(params, z, logsnr, label, conditional=conditional)
  x_k = means + alpha * var_x / var_z * (z[:, None, :] - alpha * means)  # E[x | z, k]
  return jnp.sum(jnp.exp(log_r)[..., None] * x_k, axis=1)


def make_denoiser(*, conditional: bool = False):
  """The exact denoiser with the distillation signature denoise(params, z, logsnr, label, *,
  train, rng) -> x_hat (train and rng are ignored)."""

  def fn(params, z, logsnr, label=None, *, train=False, rng=None):
    del train, rng
    return denoise(params, z, logsnr, label, conditional=conditional)

  return fn


def component_log_probs(params, x):
  """log w_k + log N(x; mu_k, s_k^2): f32[B, K] (the joint of component and point)."""
  var_x = jnp.exp(2.0 * params["log_stds"])[None]
  return (jax.nn.log_softmax(params["logits"])[None]
          + _log_normal_diag(jnp.asarray(x, jnp.float32)[:, None, :], params["means"][None],
                             var_x))


def log_prob(params, x):
  """Mixture log-density log p(x): f32[B]."""
  return jax.scipy.special.logsumexp(component_log_probs(params, x), axis=-1)
