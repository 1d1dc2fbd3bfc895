"""Diagonal preconditioners Lambda for parameter-space moment matching (nu = -Lambda g_A).

- identity: Lambda = 1 (pass precond=None to the step).
- adam: Lambda = 1 / (sqrt(v) + eps) with v the teacher's Adam second moments, read from the
  teacher's optimizer state (training.optim.adam_second_moments).
- squared_grads: a fresh diagonal estimate for teachers without an optimizer state:
  v = mean over microbatches of the squared minibatch gradient of the loss whose gradient g_A is,
  w(s) |x - g_theta^w(z_s)|^2 / D, but on real data x (instead of student samples), with s drawn
  like the distillation's s (so that v has the scale of the g_A it preconditions), then
  Lambda = 1 / (sqrt(v + damping * median(v)) + eps). This is what Adam's v estimates at a
  teacher at the end of its training, made safe for the parameters the estimate misses:

  * g_theta^w is the teacher as the parameter-space step differentiates it: guided with
    distill.guidance (g^w = g(c) + w (g(c) - g(null))) through
    steps.teacher_grad_on_samples itself, and the real labels (and text) are replaced by the
    null ones with probability cond_drop_prob, as in the teacher's training. Estimated with the
    unguided teacher on real labels, the null-class row of the class table (the row guidance
    reads) got v = 0 and Lambda = 1 / eps = 1e8 although g_A is nonzero there under guidance:
    nu was then ~100% null row.
  * The damping floor, relative to the median of v over all entries of the tree, bounds Lambda
    by 1 / sqrt(damping * median(v)), i.e. max Lambda <= sqrt((1 + damping) / damping) times the
    median Lambda (10.05x for the default damping 1e-2), for every parameter whose squared
    gradient the finite real-data estimate under-samples (a rarely seen class, a unit that is
    dead on real data but not on student samples). Relative to the median (not an absolute eps)
    so that it is invariant to the loss scale and insensitive to the tails of v; on the bulk of
    the parameters (v >> damping * median) Lambda is the Adam-like 1 / sqrt(v) (the median
    entry's Lambda moves by a factor 1 / sqrt(1 + damping), 0.5%). The square root is kept (not
    Lambda = 1 / (v + ...)) so that 'squared_grads' and 'adam' have the same units: nu is then
    an Adam-like step whose entries are O(1) where g_A has its typical size.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mmd_jax.diffusion import conditioning, process
from mmd_jax.diffusion.schedules import Schedule
from mmd_jax.distill import moment_matching as mm
from mmd_jax.distill import parameter_space
from mmd_jax.training import optim

# Default of distill.precond_damping (see moment_matching.default_config and the module
# docstring): Lambda <= sqrt(1.01 / 0.01) = 10.05x its median.
DEFAULT_DAMPING = 1e-2
# The median of v is taken over at most this many entries (a systematic sample: every k-th entry
# of every leaf), so that a large teacher's v is never concatenated and sorted whole; exact for
# trees of up to this many entries.
MEDIAN_SAMPLES = 1 << 20


def tree_median(tree, *, max_samples: int = MEDIAN_SAMPLES):
  """Median of all entries of a pytree of arrays (of a systematic sample of every k-th entry of
  every leaf when there are more than max_samples entries)."""
  leaves = [jnp.ravel(a).astype(jnp.float32) for a in jax.tree_util.tree_leaves(tree)]
  if not leaves:
    raise ValueError("tree_median of an empty tree.")
  total = sum(int(a.size) for a in leaves)
  stride = max(1, -(-total // int(max_samples)))
  return jnp.median(jnp.concatenate([a[::stride] for a in leaves]))


def from_second_moments(second_moments, *, eps: float, damping: float = 0.0):
  """Lambda = 1 / (sqrt(v + damping * median(v)) + eps), leafwise, with median(v) over all
  entries of the tree (tree_median); damping = 0 is the plain 1 / (sqrt(v) + eps)."""
  damping = float(damping)
  if damping < 0:
    raise ValueError(f"damping must be >= 0, got {damping}.")
  floor = damping * tree_median(second_moments) if damping > 0 else 0.0
  return jax.tree_util.tree_map(lambda v: 1.0 / (jnp.sqrt(v + floor) + eps), second_moments)


def adam_preconditioner(teacher_opt_state, *, eps: float = 1e-8):
  """Lambda from the teacher's Adam second moments (as stored: after a long teacher run the
  bias correction 1 - b2^n is 1)."""
  return from_second_moments(optim.adam_second_moments(teacher_opt_state), eps=eps)


def squared_grad_preconditioner(*, denoise: Callable, teacher_params, batch, rng, config,
                                schedule: Schedule, data_key: str = "x", use_text: bool = False,
                                null_label: int | None = None, cond_drop_prob: float = 0.0,
                                damping: float | None = None):
  """Lambda from squared gradients of the guided teacher's loss on real data (see the module
  docstring).

  batch[data_key] holds N real examples, split into config.precond_batches microbatches
  (N must be divisible by it); with use_text the teacher is also given batch['text'] (its
  text-encoder embeddings, f32[N, L, D]). config is the `distill` section: its guidance is the
  teacher's guidance weight (as in the step), its precond_eps the eps and its precond_damping
  the damping (DEFAULT_DAMPING when the field is absent).

  null_label: the null class of a class-conditional teacher (its num_classes), the same value
    the distillation step gets; required when config.guidance != 0 unless use_text (then the
    null condition is the zero text, and the label passes through when null_label is None).
  cond_drop_prob: probability of replacing an example's label (and text) by the null ones
    before the gradient, like the teacher's training (config.diffusion.cond_drop_prob);
    0 = keep every real condition.
  damping: overrides config.precond_damping (>= 0; 0 = no floor, Lambda = 1 / (sqrt(v) + eps)).

  Jit this function with `denoise`, `config`, `schedule` and `data_key` closed over, or call it
  eagerly once before training (it compiles once).
  """
  x = batch[data_key]
  label = batch.get("label")
  if use_text and "text" not in batch:
    raise ValueError(f"use_text=True but the batch has keys {sorted(batch)} (no 'text').")
  text = batch["text"] if use_text else None
  if float(config.guidance) != 0.0 and null_label is None and not use_text:
    raise ValueError("squared_grad_preconditioner: distill.guidance != 0 needs the null class "
                     "(null_label=the model's num_classes) or text (use_text=True): Lambda must "
                     "be estimated with the guided teacher that g_A differentiates.")
  cond_drop_prob = float(cond_drop_prob)
  if not 0.0 <= cond_drop_prob < 1.0:
    raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}.")
  if damping is None:
    damping = float(config.get("precond_damping", DEFAULT_DAMPING))
  n_micro = int(config.precond_batches)
  if n_micro < 1 or x.shape[0] % n_micro:
    raise ValueError(f"squared_grad_preconditioner: {x.shape[0]} examples do not split into "
                     f"distill.precond_batches={n_micro} equal microbatches.")
  micro = lambda a: None if a is None else a.reshape((n_micro, -1) + a.shape[1:])
  keys = jax.random.split(rng, n_micro)

  def sq_grad(args):
    xb, lb, tb, key = args
    k_time, k_eps = jax.random.split(key)
    _, u_s = mm.sample_times(rng=k_time, batch=xb.shape[0],
                             num_student_steps=int(config.num_student_steps),
                             time_sampling=mm.resolve_time_sampling(config))
    logsnr_s = mm.logsnr_of_u(u_s, schedule=schedule, spacing=config.spacing)
    z_s, _ = process.sample_z_t(rng=k_eps, x=xb, logsnr=logsnr_s)
    lb, tb = conditioning.drop(rng=jax.random.fold_in(key, 2), label=lb, text=tb,
                               num_classes=0 if null_label is None else int(null_label),
                               prob=cond_drop_prob)
    # The real x stands in for the student's x_tilde: the same loss and guided teacher as g_A.
    d = dict(x_tilde=xb, z_s=z_s, logsnr_s=logsnr_s, label=lb, text=tb,
             w=mm.config_weight(config, logsnr_s))
    grads, _ = parameter_space.teacher_grad_on_samples(
        teacher_denoise=denoise, teacher_params=teacher_params, d=d, config=config,
        null_label=null_label)
    return jax.tree_util.tree_map(jnp.square, grads)

  # None leaves (no labels / no text) pass through lax.map as empty pytrees.
  sq = jax.lax.map(sq_grad, (micro(x), micro(label), micro(text), keys))
  v = jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), sq)
  return from_second_moments(v, eps=float(config.precond_eps), damping=damping)
