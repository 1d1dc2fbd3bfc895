"""Sampling a trained denoiser for evaluation: jitted samplers with the parameters as argument."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmd_jax.diffusion import process, samplers
from mmd_jax.diffusion.schedules import Schedule


def x_predictor(model, *, prediction: str):
  """(params, z, logsnr, label) -> x_hat for a flax denoiser in eval mode."""

  def fn(params, z, logsnr, label):
    out = model.apply({"params": params}, z, logsnr, label, train=False)
    return process.to_x(prediction=prediction, output=out, z=z, logsnr=logsnr)

  return fn


def class_labels(num: int, num_classes: int, *, offset: int = 0) -> np.ndarray:
  """Balanced labels 0, 1, ..., K-1, 0, 1, ... (zeros for unconditional models)."""
  if num_classes == 0:
    return np.zeros((num,), np.int32)
  return ((np.arange(num) + offset) % num_classes).astype(np.int32)


def make_sample_fn(model, *, prediction: str, schedule: Schedule, num_classes: int,
                   data_shape, clip: float | None, spacing: str = "uniform_t"):
  """Returns sample(params, rng, labels, *, sampler, num_steps, guidance) -> x (jitted)."""
  predict = x_predictor(model, prediction=prediction)

  @functools.partial(jax.jit, static_argnames=("sampler", "num_steps", "guidance"))
  def sample(params, rng, labels, *, sampler: str, num_steps: int, guidance: float = 0.0):
    def denoise(z, logsnr, label):
      return predict(params, z, logsnr, label if num_classes > 0 else None)

    fn = samplers.guided(denoise, guidance=guidance, null_label=num_classes) if (
        guidance and num_classes > 0) else denoise
    return samplers.sample(denoise_fn=fn, rng=rng, shape=(labels.shape[0],) + tuple(data_shape),
                           num_steps=num_steps, schedule=schedule,
                           eta=samplers.eta_of(sampler), spacing=spacing, label=labels,
                           clip=clip)

  return sample


def generate(sample_fn, params, *, rng, num: int, batch_size: int, num_classes: int,
             sampler: str, num_steps: int, guidance: float = 0.0):
  """Draws `num` samples with balanced class labels in batches; returns numpy (x, labels)."""
  xs, ls = [], []
  for i, start in enumerate(range(0, num, batch_size)):
    # Always a full batch (one compiled shape); the surplus of the last one is dropped.
    labels = class_labels(batch_size, num_classes, offset=start)
    x = sample_fn(params, jax.random.fold_in(rng, i), jnp.asarray(labels), sampler=sampler,
                  num_steps=num_steps, guidance=guidance)
    xs.append(np.asarray(x))
    ls.append(labels)
  return np.concatenate(xs)[:num], np.concatenate(ls)[:num]
