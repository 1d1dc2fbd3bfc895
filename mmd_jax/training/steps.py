"""The teacher's jitted train step: step(state, batch, rng) -> (state, metrics).

A denoising step (Ho et al. 2020) in the configured parameterisation and weighting, with condition
dropout for classifier-free guidance (Ho & Salimans 2022: each example's label becomes the null
class and, for a text-conditioned model, its text embedding batch['text'] becomes the zero null
text, both with one draw; see mmd_jax.diffusion.conditioning), AdamW, EMA, and a
non-finite guard: a step whose loss or gradient is not finite leaves the parameters unchanged and
records its number (1-based, like the step counter after it) in `state.nonfinite_step`, so the host can stop with the last good state.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmd_jax.diffusion import conditioning, process
from mmd_jax.diffusion.schedules import Schedule
from mmd_jax.training import optim
from mmd_jax.training.state import TrainState


def drop_labels(*, rng, label, num_classes: int, prob: float):
  """Replaces each label by the null class `num_classes` with probability `prob`."""
  if num_classes == 0 or prob <= 0.0:
    return label
  drop = jax.random.bernoulli(rng, prob, label.shape)
  return jnp.where(drop, num_classes, label)


def make_teacher_step(*, model, tx: optax.GradientTransformation, schedule: Schedule,
                      prediction: str, loss_weighting: str, sigmoid_bias: float = 0.0,
                      num_classes: int, cond_drop_prob: float, ema_decay: float,
                      data_key: str = "image", use_text: bool = False):
  """Returns the pure step function; jit it with shardings and donate the state.

  use_text: the model takes text embeddings (model(..., text=f32[B, L, D])), read from
  batch['text'] and dropped to zeros jointly with the label (conditioning.drop).
  """

  def loss_fn(params, batch, rng):
    x = batch[data_key]
    t_rng, eps_rng, drop_rng, dropout_rng = jax.random.split(rng, 4)
    # Stratified ("low-discrepancy") times: one uniform offset shared over an even grid.
    n = x.shape[0]
    t = jnp.mod(jax.random.uniform(t_rng, ()) + jnp.arange(n) / n, 1.0)
    logsnr = schedule.logsnr(t)
    z, eps = process.sample_z_t(rng=eps_rng, x=x, logsnr=logsnr)
    label = batch.get("label") if num_classes > 0 else None
    text = conditioning.batch_text(batch, use_text=use_text)
    if text is None:
      if label is not None:
        label = drop_labels(rng=drop_rng, label=label, num_classes=num_classes,
                            prob=cond_drop_prob)
      kw = {}
    else:
      label, text = conditioning.drop(rng=drop_rng, label=label, text=text,
                                      num_classes=num_classes, prob=cond_drop_prob)
      kw = {"text": text}
    out = model.apply({"params": params}, z, logsnr, label, train=True,
                      rngs={"dropout": dropout_rng}, **kw)
    loss = process.denoising_loss(prediction=prediction, output=out, x=x, eps=eps,
                                  logsnr=logsnr, weighting=loss_weighting, bias=sigmoid_bias)
    return jnp.mean(loss)

  def step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, rng)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optim.ema_update(state.ema_params, params, decay=ema_decay)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree_util.tree_map(
        lambda a, b: jnp.where(finite, a, b), new, old)
    nonfinite_step = jnp.where((state.nonfinite_step < 0) & ~finite, state.step + 1,
                               state.nonfinite_step)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state),
                           ema_params=keep(ema, state.ema_params), nonfinite_step=nonfinite_step)
    return new_state, {"loss": loss, "grad_norm": grad_norm}

  return step
