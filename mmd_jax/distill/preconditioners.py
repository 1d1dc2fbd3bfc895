"""Diagonal preconditioners Lambda for parameter-space moment matching (nu = -Lambda g_A).

- identity: Lambda = 1 (pass precond=None to the step).
- adam: Lambda = 1 / (sqrt(v) + eps) with v the teacher's Adam second moments, read from the
  teacher's optimizer state (training.optim.adam_second_moments).
- squared_grads: a fresh diagonal estimate for teachers without an optimizer state:
  v = mean over microbatches of the squared minibatch gradient of the teacher's denoising loss on
  real data, w(s) |x - g_theta(z_s)|^2 / D with s drawn like the distillation's s (so that v has
  the scale of the g_A it preconditions), then Lambda = 1 / (sqrt(v) + eps). This is what Adam's v
  estimates at a teacher at the end of its training.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mmd_jax.diffusion import process
from mmd_jax.diffusion.schedules import Schedule
from mmd_jax.distill import moment_matching as mm
from mmd_jax.training import optim


def from_second_moments(second_moments, *, eps: float):
  """Lambda = 1 / (sqrt(v) + eps), leafwise."""
  return jax.tree_util.tree_map(lambda v: 1.0 / (jnp.sqrt(v) + eps), second_moments)


def adam_preconditioner(teacher_opt_state, *, eps: float = 1e-8):
  """Lambda from the teacher's Adam second moments (as stored: after a long teacher run the
  bias correction 1 - b2^n is 1)."""
  return from_second_moments(optim.adam_second_moments(teacher_opt_state), eps=eps)


def squared_grad_preconditioner(*, denoise: Callable, teacher_params, batch, rng, config,
                                schedule: Schedule, data_key: str = "x", use_text: bool = False):
  """Lambda from squared teacher gradients on real data (see module docstring).

  batch[data_key] holds N real examples, split into config.precond_batches microbatches
  (N must be divisible by it); with use_text the teacher is also given batch['text'] (its
  text-encoder embeddings, f32[N, L, D]). Jit this function with `denoise`, `config`,
  `schedule` and `data_key` closed over, or call it eagerly once before training (it compiles
  once).
  """
  x = batch[data_key]
  label = batch.get("label")
  if use_text and "text" not in batch:
    raise ValueError(f"use_text=True but the batch has keys {sorted(batch)} (no 'text').")
  text = batch["text"] if use_text else None
  n_micro = int(config.precond_batches)
  if n_micro < 1 or x.shape[0] % n_micro:
    raise ValueError(f"squared_grad_preconditioner: {x.shape[0]} examples do not split into "
                     f"distill.precond_batches={n_micro} equal microbatches.")
  micro = lambda a: None if a is None else a.reshape((n_micro, -1) + a.shape[1:])
  keys = jax.random.split(rng, n_micro)
  text_kw = lambda tb: {} if tb is None else {"text": tb}

  def sq_grad(args):
    xb, lb, tb, key = args
    k_time, k_eps = jax.random.split(key)
    _, u_s = mm.sample_times(rng=k_time, batch=xb.shape[0],
                             num_student_steps=int(config.num_student_steps),
                             time_sampling=config.time_sampling)
    logsnr_s = mm.logsnr_of_u(u_s, schedule=schedule, spacing=config.spacing)
    z_s, _ = process.sample_z_t(rng=k_eps, x=xb, logsnr=logsnr_s)
    w = mm.config_weight(config, logsnr_s)

    def loss(theta):
      g = denoise(theta, z_s, logsnr_s, lb, train=False, rng=None, **text_kw(tb))
      return jnp.mean(mm.teacher_loss_on_samples(x_tilde=xb, g_teacher=g, w=w))

    return jax.tree_util.tree_map(jnp.square, jax.grad(loss)(teacher_params))

  # None leaves (no labels / no text) pass through lax.map as empty pytrees.
  sq = jax.lax.map(sq_grad, (micro(x), micro(label), micro(text), keys))
  v = jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), sq)
  return from_second_moments(v, eps=float(config.precond_eps))
