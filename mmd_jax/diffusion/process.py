"""The variance-preserving forward process, its posterior, parameterisations and the denoising loss.

All functions are pure and keyword-only; logsnr arrays have the batch shape [B] and are broadcast
over the trailing data dimensions.

Posterior q(z_s | z_t, x) for s < t (Kingma et al. 2021, VDM, appendix A), written with
r = SNR_t / SNR_s = exp(logsnr_t - logsnr_s) in (0, 1]:
    mean = r * (alpha_s / alpha_t) * z_t + (1 - r) * alpha_s * x
    var  = (1 - r) * sigma_s^2
which equals the textbook form var = 1 / (1/sigma_s^2 + alpha_{t|s}^2 / sigma_{t|s}^2) with
sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2. Using expm1 for 1 - r and log-sigmoids for
alpha_s / alpha_t keeps it exact as s -> t (var -> 0, mean -> z_t) and near t = 1 (alpha_t -> 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmd_jax.diffusion.schedules import alpha_sigma, jax_log_sigmoid

PREDICTIONS = ("eps", "x", "v")
LOSS_WEIGHTINGS = ("eps", "x", "v", "sigmoid")


def _bcast(a, like):
  a = jnp.asarray(a, jnp.float32)
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def diffuse(*, x, eps, logsnr):
  """Forward sample z_t = alpha_t x + sigma_t eps of q(z_t | x)."""
  alpha, sigma = alpha_sigma(logsnr)
  return _bcast(alpha, x) * x + _bcast(sigma, x) * eps


def posterior(*, z_t, x, logsnr_s, logsnr_t):
  """Mean and standard deviation of q(z_s | z_t, x), for logsnr_s >= logsnr_t (s <= t)."""
  one_minus_r = -jnp.expm1(jnp.asarray(logsnr_t, jnp.float32) - logsnr_s)  # 1 - SNR_t / SNR_s
  r = 1.0 - one_minus_r
  log_ratio = 0.5 * (jax_log_sigmoid(logsnr_s) - jax_log_sigmoid(logsnr_t))  # log alpha_s/alpha_t
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  mean = (_bcast(r * jnp.exp(log_ratio), z_t) * z_t
          + _bcast(one_minus_r * alpha_s, x) * x)
  std = sigma_s * jnp.sqrt(jnp.maximum(one_minus_r, 0.0))
  return mean, _bcast(std, z_t)


def sample_step(*, z_t, x, logsnr_s, logsnr_t, noise, eta=1.0):
  """One step t -> s given an x estimate, interpolating DDIM (eta=0) and ancestral (eta=1).

  The DDIM family of Song et al. 2021 (eq. 12): z_s = alpha_s x + sqrt(sigma_s^2 - c^2) eps_hat
  + c * noise with c = eta * posterior std. With eta = 1 it is exactly a sample of the posterior
  q(z_s | z_t, x) (the ancestral step); with eta = 0 it is the deterministic DDIM step.
  """
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  alpha_t, sigma_t = alpha_sigma(logsnr_t)
  one_minus_r = -jnp.expm1(jnp.asarray(logsnr_t, jnp.float32) - logsnr_s)
  eps_hat = (z_t - _bcast(alpha_t, x) * x) / _bcast(sigma_t, x)
  c2 = (eta ** 2) * one_minus_r * sigma_s ** 2
  keep = jnp.sqrt(jnp.maximum(sigma_s ** 2 - c2, 0.0))
  return (_bcast(alpha_s, x) * x + _bcast(keep, x) * eps_hat
          + _bcast(jnp.sqrt(c2), x) * noise)


def to_x(*, prediction: str, output, z, logsnr):
  """The x-prediction implied by a network output in the given parameterisation."""
  alpha, sigma = (_bcast(a, z) for a in alpha_sigma(logsnr))
  if prediction == "x":
    return output
  if prediction == "eps":
    return (z - sigma * output) / alpha
  if prediction == "v":
    return alpha * z - sigma * output
  raise ValueError(f"Unknown prediction {prediction!r}; choose one of {PREDICTIONS}.")


def to_eps(*, prediction: str, output, z, logsnr):
  """The eps-prediction implied by a network output in the given parameterisation."""
  alpha, sigma = (_bcast(a, z) for a in alpha_sigma(logsnr))
  if prediction == "eps":
    return output
  if prediction == "x":
    return (z - alpha * output) / sigma
  if prediction == "v":
    return sigma * z + alpha * output
  raise ValueError(f"Unknown prediction {prediction!r}; choose one of {PREDICTIONS}.")


def target(*, prediction: str, x, eps, logsnr):
  """The regression target of a network in the given parameterisation (v = alpha eps - sigma x)."""
  if prediction == "eps":
    return eps
  if prediction == "x":
    return x
  if prediction == "v":
    alpha, sigma = (_bcast(a, x) for a in alpha_sigma(logsnr))
    return alpha * eps - sigma * x
  raise ValueError(f"Unknown prediction {prediction!r}; choose one of {PREDICTIONS}.")


def log_x_weight(*, weighting: str, logsnr, bias: float = 0.0):
  """log of the weight that a loss puts on |x - x_hat|^2, as a function of logSNR.

  eps-MSE = SNR |x err|^2, v-MSE = (1 + SNR) |x err|^2 (Salimans & Ho 2022), x-MSE = |x err|^2;
  'sigmoid' is the eps-MSE reweighted by sigmoid(bias - logsnr) (Kingma & Gao 2023).
  """
  logsnr = jnp.asarray(logsnr, jnp.float32)
  if weighting == "eps":
    return logsnr
  if weighting == "x":
    return jnp.zeros_like(logsnr)
  if weighting == "v":
    return jnp.logaddexp(0.0, logsnr)
  if weighting == "sigmoid":
    return logsnr + jax_log_sigmoid(bias - logsnr)
  raise ValueError(f"Unknown loss weighting {weighting!r}; choose one of {LOSS_WEIGHTINGS}.")


def log_native_factor(*, prediction: str, logsnr):
  """log of c such that |native err|^2 = c |x err|^2 at fixed z."""
  return log_x_weight(weighting={"eps": "eps", "v": "v", "x": "x"}[prediction], logsnr=logsnr)


def denoising_loss(*, prediction: str, output, x, eps, logsnr, weighting: str, bias: float = 0.0):
  """Per-example weighted denoising loss, mean over data dimensions.

  Computed in the network's own parameterisation (so no division by a tiny alpha or sigma), then
  reweighted so that the loss equals exp(log_x_weight) * mean |x - x_hat|^2.
  """
  if prediction not in PREDICTIONS:
    raise ValueError(f"Unknown prediction {prediction!r}; choose one of {PREDICTIONS}.")
  err = output - target(prediction=prediction, x=x, eps=eps, logsnr=logsnr)
  mse = jnp.mean(jnp.square(err).reshape(err.shape[0], -1), axis=-1)
  log_w = (log_x_weight(weighting=weighting, logsnr=logsnr, bias=bias)
           - log_native_factor(prediction=prediction, logsnr=logsnr))
  return jnp.exp(log_w) * mse


def sample_z_t(*, rng, x, logsnr):
  """Draws eps ~ N(0, I) and returns (z_t, eps)."""
  eps = jax.random.normal(rng, x.shape, jnp.float32)
  return diffuse(x=x, eps=eps, logsnr=logsnr), eps


def x_predictor(model, prediction: str):
  """denoise(params, z, logsnr, label, *, train=False, rng=None, text=None) -> x_hat for a flax
  Module with the project's call signature, converting its `prediction` output with to_x. rng
  feeds dropout (train=True); text (f32[B, L, D]) is passed to the model only when given."""
  if prediction not in PREDICTIONS:
    raise ValueError(f"Unknown prediction {prediction!r}; choose one of {PREDICTIONS}.")

  def denoise(params, z, logsnr, label, *, train=False, rng=None, text=None):
    rngs = {"dropout": rng} if rng is not None else {}
    kw = {} if text is None else {"text": text}
    out = model.apply({"params": params}, z, logsnr, label, train=train, rngs=rngs, **kw)
    return to_x(prediction=prediction, output=out, z=z, logsnr=logsnr)

  return denoise
