"""Drawing class-balanced samples for evaluation in batches, with a sampler from
mmd_jax.diffusion.samplers.make_sample_fn."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np



def class_labels(num: int, num_classes: int, *, offset: int = 0) -> np.ndarray:
  """Balanced labels 0, 1, ..., K-1, 0, 1, ... (zeros for unconditional models)."""
  if num_classes == 0:
    return np.zeros((num,), np.int32)
  return ((np.arange(num) + offset) % num_classes).astype(np.int32)


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
