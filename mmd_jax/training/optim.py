"""Optimizer and EMA: optax AdamW with linear warmup, optional cosine decay and gradient clipping."""
from __future__ import annotations

import jax
import optax

LR_SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(optim_config, *, total_steps: int):
  """Linear warmup to `learning_rate`, then constant or cosine decay to 0 at `total_steps`."""
  lr = float(optim_config.learning_rate)
  warmup = int(optim_config.warmup_steps)
  kind = optim_config.get("schedule", "constant")
  if kind not in LR_SCHEDULES:
    raise ValueError(f"Unknown optim.schedule {kind!r}; choose one of {LR_SCHEDULES}.")
  if kind == "constant":
    decay = optax.constant_schedule(lr)
  else:
    decay = optax.cosine_decay_schedule(lr, decay_steps=max(1, total_steps - warmup))
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def every_nth_step(schedule, *, every: int, first: int = 0):
  """The learning rate of an optimizer that updates only on training steps first, first + every,
  first + 2 every, ...: its n-th update (optax count n) reads `schedule`, a schedule over
  training steps, at training step first + every * n."""
  every, first = int(every), int(first)
  if every < 1 or first < 0:
    raise ValueError(f"every_nth_step: every={every} must be >= 1 and first={first} >= 0.")
  if every == 1 and first == 0:
    return schedule
  return lambda count: schedule(first + every * count)


def make_optimizer(optim_config, *, total_steps: int, update_every: int = 1,
                   first_update: int = 0) -> optax.GradientTransformation:
  """optax chain: global-norm clipping, then AdamW (Loshchilov & Hutter 2019).

  Fields of optim_config: learning_rate, warmup_steps, schedule ('constant'|'cosine'), b1, b2,
  eps, weight_decay, grad_clip (0 disables clipping).

  total_steps and warmup_steps count training steps. An optimizer that updates only on every
  `update_every`-th training step, starting at training step `first_update`, reads the schedule
  at the training step of each of its updates (every_nth_step); the defaults (1, 0) are the
  plain schedule over its own update count.
  """
  parts = []
  if float(optim_config.get("grad_clip", 0.0)) > 0:
    parts.append(optax.clip_by_global_norm(float(optim_config.grad_clip)))
  parts.append(optax.adamw(
      every_nth_step(learning_rate_schedule(optim_config, total_steps=total_steps),
                     every=update_every, first=first_update),
      b1=float(optim_config.get("b1", 0.9)), b2=float(optim_config.get("b2", 0.999)),
      eps=float(optim_config.get("eps", 1e-8)),
      weight_decay=float(optim_config.get("weight_decay", 0.0))))
  return optax.chain(*parts)


def ema_update(ema_params, params, *, decay):
  """EMA of the parameters: ema <- decay * ema + (1 - decay) * params."""
  return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def adam_second_moments(opt_state):
  """The Adam second-moment estimate `nu` (a params-shaped tree) held in an optimizer state."""
  found = []

  def visit(node):
    if isinstance(node, optax.ScaleByAdamState):
      found.append(node.nu)
      return
    if isinstance(node, (tuple, list)):
      for child in node:
        visit(child)

  visit(opt_state)
  if len(found) != 1:
    raise ValueError(f"Expected one Adam state in the optimizer state, found {len(found)}.")
  return found[0]
