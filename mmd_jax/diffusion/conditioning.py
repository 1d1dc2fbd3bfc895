"""Conditioning of a denoiser on class labels and text embeddings: null values, condition dropout
and classifier-free guidance (Ho & Salimans 2022).

Conditions:
  label  i32[B], classes 0..K-1 of a class-conditional model (num_classes = K > 0); the null
         class is the integer K (the last row of the class table).
  text   f32[B, L, D], text-encoder embeddings (e.g. a frozen T5's outputs) of a model built with
         model.text_dim = D; the null text is the all-zero embedding f32[B, L, D] (so data sets
         must not hold all-zero captions).

Condition dropout (teacher training): one Bernoulli(cond_drop_prob) per example drops ALL of its
conditions at once: the label becomes the null class and the text becomes zeros. The model thus
learns exactly one unconditional branch, the one guidance evaluates. For a class-only model the
draw is the same as before text existed (one bernoulli of shape [B] from the same key), so
class-only training is unchanged bit for bit.

Guidance: g^w(z, c) = g(z, c) + w (g(z, c) - g(z, null)) in x-space, with null = (null class,
zero text); both passes run as one batch of twice the size. A model without classes keeps its
(ignored) labels in both halves; w = 0 returns the unguided function itself.

Denoise functions here take the text as a fourth argument: fn(z, logsnr, label, text) -> x_hat,
with label and/or text None when the model has no such input. `bind_text` turns one into the
three-argument form of mmd_jax.diffusion.samplers (fn(z, logsnr, label)) for a fixed text batch.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

TextDenoiseFn = Callable[..., jax.Array]


def batch_text(batch, *, use_text: bool):
  """batch['text'] (f32[B, L, D]) for a text-conditioned model, else None."""
  if not use_text:
    return None
  if "text" not in batch:
    raise ValueError(f"The model is text-conditioned but the batch has keys {sorted(batch)}; "
                     "use a data set with a 'text' feature (e.g. data.name=digits_text).")
  return batch["text"]


def null_text_like(text):
  """The null (unconditional) text: zeros of text's shape and dtype."""
  return jnp.zeros_like(text)


def drop(*, rng, label, text, num_classes: int, prob: float):
  """(label, text) with each example's conditions replaced by the null ones with probability
  `prob` (one draw per example, shared by label and text). label is used only when
  num_classes > 0; either may be None."""
  use_label = label is not None and num_classes > 0
  if prob <= 0.0 or (not use_label and text is None):
    return label, text
  batch = label.shape[0] if use_label else text.shape[0]
  drop_mask = jax.random.bernoulli(rng, prob, (batch,))
  if use_label:
    label = jnp.where(drop_mask, num_classes, label)
  if text is not None:
    text = jnp.where(drop_mask[:, None, None], jnp.zeros((), text.dtype), text)
  return label, text


def guided(denoise_fn: TextDenoiseFn, *, guidance: float, null_label: int | None
           ) -> TextDenoiseFn:
  """Classifier-free guidance of fn(z, logsnr, label, text) with the null class `null_label`
  (None: the model has no classes; its labels pass through unchanged) and the zero text."""
  if guidance == 0.0:
    return denoise_fn

  def fn(z, logsnr, label, text):
    if text is None and (label is None or null_label is None):
      raise ValueError("Guidance needs a condition: class labels with null_label, or text.")
    def twice(a, null):
      return None if a is None else jnp.concatenate([a, null])
    null_lab = None if label is None else (
        label if null_label is None else jnp.full_like(label, null_label))
    both = denoise_fn(twice(z, z), twice(logsnr, logsnr), twice(label, null_lab),
                      twice(text, None if text is None else null_text_like(text)))
    cond, uncond = jnp.split(both, 2)
    return cond + guidance * (cond - uncond)

  return fn


def bind_text(denoise_fn: TextDenoiseFn, text):
  """fn(z, logsnr, label) for samplers.sample: denoise_fn with its text fixed to `text`."""
  return lambda z, logsnr, label: denoise_fn(z, logsnr, label, text)


def model_text_shape(model_config) -> tuple[int, int] | None:
  """(model.text_len, model.text_dim) of a config's model section, None when text_dim is 0."""
  get = model_config.get if hasattr(model_config, "get") else (
      lambda k, d=None: getattr(model_config, k, d))
  dim = int(get("text_dim", 0) or 0)
  return (int(get("text_len", 0) or 0), dim) if dim else None


def text_shape_error(*, want, have, want_what: str, have_what: str) -> str | None:
  """A message naming both text shapes when they differ (None = no text), else None."""
  if want == have:
    return None
  fmt = lambda s: "no text" if s is None else f"text f32[B, {s[0]}, {s[1]}]"
  return f"{want_what} takes {fmt(want)} but {have_what} has {fmt(have)}"


def conditioned(denoise, params, *, guidance: float, null_label: int | None, text=None,
                train: bool = False, rng=None):
  """fn(z, logsnr, label) -> x_hat of an x-predictor denoise(params, z, logsnr, label, *, train,
  rng[, text]), conditioned on `text` when given (no text= argument otherwise, so denoisers
  without one, e.g. the exact mixture denoiser, work) and guided against the null class and/or
  the zero text when guidance != 0. Eval mode by default; train=True with `rng` applies dropout
  (distill.dropout='shared')."""
  def fn(z, logsnr, label, t):
    kw = {} if t is None else {"text": t}
    return denoise(params, z, logsnr, label, train=train, rng=rng, **kw)
  return bind_text(guided(fn, guidance=float(guidance), null_label=null_label), text)
