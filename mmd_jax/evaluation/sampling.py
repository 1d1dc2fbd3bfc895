"""Sampling a trained denoiser for evaluation: jitted samplers with the parameters as argument."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmd_jax.diffusion import conditioning, process, samplers
from mmd_jax.diffusion.schedules import Schedule


def x_predictor(model, *, prediction: str):
  """(params, z, logsnr, label, text=None) -> x_hat for a flax denoiser in eval mode (text, the
  f32[B, L, D] embeddings of a text-conditioned model, is passed only when given)."""

  def fn(params, z, logsnr, label, text=None):
    kw = {} if text is None else {"text": text}
    out = model.apply({"params": params}, z, logsnr, label, train=False, **kw)
    return process.to_x(prediction=prediction, output=out, z=z, logsnr=logsnr)

  return fn


def class_labels(num: int, num_classes: int, *, offset: int = 0) -> np.ndarray:
  """Balanced labels 0, 1, ..., K-1, 0, 1, ... (zeros for unconditional models)."""
  if num_classes == 0:
    return np.zeros((num,), np.int32)
  return ((np.arange(num) + offset) % num_classes).astype(np.int32)


def make_sample_fn(model, *, prediction: str, schedule: Schedule, num_classes: int,
                   data_shape, clip: float | None, spacing: str = "uniform_t"):
  """Returns sample(params, rng, labels, text=None, *, sampler, num_steps, guidance) -> x
  (jitted). text: f32[B, L, D] embeddings for a text-conditioned model; guidance then uses the
  zero text (and the null class if the model has classes) as the unconditional branch."""
  predict = x_predictor(model, prediction=prediction)

  @functools.partial(jax.jit, static_argnames=("sampler", "num_steps", "guidance"))
  def sample(params, rng, labels, text=None, *, sampler: str, num_steps: int,
             guidance: float = 0.0):
    def denoise(z, logsnr, label):
      return predict(params, z, logsnr, label if num_classes > 0 else None)

    if text is not None:
      def text_denoise(z, logsnr, label, t):
        return predict(params, z, logsnr, label, text=t)
      fn = conditioning.bind_text(conditioning.guided(
          text_denoise, guidance=guidance, null_label=num_classes if num_classes > 0 else None),
          text)
      labels_in = labels if num_classes > 0 else None
      return samplers.sample(denoise_fn=fn, rng=rng,
                             shape=(labels.shape[0],) + tuple(data_shape), num_steps=num_steps,
                             schedule=schedule, eta=samplers.eta_of(sampler), spacing=spacing,
                             label=labels_in, clip=clip)
    fn = samplers.guided(denoise, guidance=guidance, null_label=num_classes) if (
        guidance and num_classes > 0) else denoise
    return samplers.sample(denoise_fn=fn, rng=rng, shape=(labels.shape[0],) + tuple(data_shape),
                           num_steps=num_steps, schedule=schedule,
                           eta=samplers.eta_of(sampler), spacing=spacing, label=labels,
                           clip=clip)

  return sample


def generate(sample_fn, params, *, rng, num: int, batch_size: int, num_classes: int,
             sampler: str, num_steps: int, guidance: float = 0.0, text_fn=None):
  """Draws `num` samples with balanced class labels in batches; returns numpy (x, labels).
  text_fn(labels, offset) -> f32[B, L, D], for a text-conditioned model: the text each sample of
  a batch is conditioned on (e.g. real captions of its class)."""
  xs, ls = [], []
  for i, start in enumerate(range(0, num, batch_size)):
    # Always a full batch (one compiled shape); the surplus of the last one is dropped.
    labels = class_labels(batch_size, num_classes, offset=start)
    kw = {} if text_fn is None else {"text": jnp.asarray(text_fn(labels, start))}
    x = sample_fn(params, jax.random.fold_in(rng, i), jnp.asarray(labels), sampler=sampler,
                  num_steps=num_steps, guidance=guidance, **kw)
    xs.append(np.asarray(x))
    ls.append(labels)
  return np.concatenate(xs)[:num], np.concatenate(ls)[:num]
