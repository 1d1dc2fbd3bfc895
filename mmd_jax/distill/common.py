"""What every distillation variant shares: the state, the optimizers, the x-predictor, the
random draws of a step (times, z_t, the student's x_tilde, z_s) and the (guided) teacher.

The variants themselves are modules of their own (mmd_jax/distill/alternating.py,
parameter_space.py, and the baselines progressive.py and consistency.py), registered in
mmd_jax/distill/steps.py.

passed, so denoise functions without one, e.g. the exact mixture denoiser, still work).

Randomness: key = fold_in(rng, step); key_A, key_B = fold_in(key, 0), fold_in(key, 1). The
alternating step draws its whole batch with key_B; the parameter-space step draws half A with key_A
and half B with key_B. So an alternating step on batch B and a parameter-space step on [A; B] with
the same rng and step counter see the same z_t, x_tilde and z_s on B (the tests rely on this).
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from mmd_jax.diffusion import conditioning, process
from mmd_jax.diffusion.schedules import Schedule
from mmd_jax.distill import moment_matching as mm
from mmd_jax.training import optim

Denoise = Callable[..., jax.Array]


@flax.struct.dataclass
class DistillState:
  """Everything a distillation run updates; plain arrays and pytrees (Orbax StandardSave).

  aux_params / aux_opt_state are {} for the parameter-space variant; nu_ema is {} unless
  distill.nu_ema > 0 (then a teacher-params-shaped tree). nonfinite_step: the first step
  (1-based) whose metrics or update were not finite, -1 if none (steps.guard_nonfinite);
  checkpoints written before it existed restore with -1 (runs.common.ADDED_FIELDS).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  aux_params: Any
  aux_opt_state: Any
  nu_ema: Any
  nonfinite_step: jax.Array



def make_optimizers(config, *, schedule_steps: int | None = None):
  """(student_tx, aux_tx) from config.optim over config.num_steps training steps; the
  auxiliary's learning rate is scaled by config.aux_lr_scale. aux_tx is None for the
  parameter-space variant.

  The learning-rate schedule is a function of the TRAINING step, the same for every variant
  and update schedule: optim.warmup_steps training steps of linear warmup, then the decay, which
  ends at config.num_steps. Under update_schedule='alternate' the auxiliary updates on the even
  training steps (0, 2, 4, ...: ceil(num_steps / 2) updates) and the student on the odd ones
  (floor(num_steps / 2) updates), in the lax.cond program (step % 2 == 0: auxiliary) and in
  the host-dispatched phase programs alike ('aux' on even steps, 'student' on odd ones). Optax
  counts only an optimizer's own updates, so each optimizer reads the schedule at the training
  step of its update (update n of the auxiliary at step 2n, of the student at 2n + 1): each
  schedule spans exactly the updates its optimizer gets, the warmup lasts warmup_steps training
  steps (about warmup_steps / 2 updates of each network) and the update on the last training
  step uses the schedule's end value. (Over num_steps counts the cosine stopped at about half
  its course and the warmup took 2 warmup_steps training steps.) 'both' and the
  parameter-space variant update on every step: the plain schedule, unchanged.
  schedule_steps: the length of the student's schedule when it is not num_steps (progressive
  distillation restarts its optimizer every round).
  """
  num_steps = int(config.num_steps if schedule_steps is None else schedule_steps)
  alternate = config.variant == "alternating" and config.update_schedule == "alternate"
  every = 2 if alternate else 1
  student_tx = optim.make_optimizer(config.optim, total_steps=num_steps, update_every=every,
                                    first_update=1 if alternate else 0)
  if config.variant != "alternating":
    return student_tx, None
  aux_optim = config.optim.copy_and_resolve_references()
  aux_optim.learning_rate = float(config.optim.learning_rate) * float(config.aux_lr_scale)
  return student_tx, optim.make_optimizer(aux_optim, total_steps=num_steps, update_every=every,
                                          first_update=0)


def _copy(tree):
  return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree)


def make_state(*, config, init_params, student_tx: optax.GradientTransformation,
               aux_tx: optax.GradientTransformation | None = None,
               teacher_params=None, param_copy: bool | None = None) -> DistillState:
  """Student, its EMA and (alternating) the auxiliary all start as copies of `init_params`
  (normally the teacher's EMA parameters). `teacher_params` is only needed for the shape of the
  nu EMA when it differs from init_params (e.g. a mixture-parameter teacher). param_copy: whether
  aux_params holds a copy of init_params (None: for the alternating variant only; the baselines
  keep their round teacher or target network there, see steps.init_distill_state)."""
  mm.validate_config(config)
  params = _copy(init_params)
  alternating = config.variant == "alternating"
  if alternating and aux_tx is None:
    raise ValueError("The alternating variant needs aux_tx (the auxiliary's optimizer).")
  copy = alternating if param_copy is None else bool(param_copy)
  aux_params = _copy(init_params) if copy else {}
  nu_ema = {}
  if not alternating and float(config.nu_ema) > 0:
    nu_ema = jax.tree_util.tree_map(
        jnp.zeros_like, init_params if teacher_params is None else teacher_params)
  return DistillState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=student_tx.init(params),
      ema_params=_copy(init_params), aux_params=aux_params,
      aux_opt_state=aux_tx.init(aux_params) if alternating else {}, nu_ema=nu_ema,
      nonfinite_step=jnp.full((), -1, jnp.int32))


make_x_predictor = process.x_predictor


def call(denoise: Denoise, params, z, logsnr, label, *, train, rng, text=None):
  """denoise(...) with text=... only when there is text."""
  if text is None:
    return denoise(params, z, logsnr, label, train=train, rng=rng)
  return denoise(params, z, logsnr, label, train=train, rng=rng, text=text)


def step_keys(rng, step):
  """(key_A, key_B) of a step; see the module docstring."""
  key = jax.random.fold_in(rng, step)
  return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def teacher_fn(teacher_denoise, teacher_params, *, guidance, null_label, text=None,
               dropout_rng=None):
  """fn(z, logsnr, label) -> the (guided) teacher's x_hat (conditioning.conditioned); in eval
  mode, or with dropout drawn from `dropout_rng` when given (distill.dropout='shared')."""
  return conditioning.conditioned(teacher_denoise, teacher_params, guidance=guidance,
                                  null_label=null_label, text=text,
                                  train=dropout_rng is not None, rng=dropout_rng)


def dropout_mode(config) -> str:
  """distill.dropout: 'independent' (student and auxiliary in train mode with their own dropout
  masks, the teacher in eval mode), 'shared' (the teacher evaluated with the auxiliary's dropout
  mask, so at initialisation, auxiliary = teacher, their difference is exactly 0) or 'off' (every
  network in eval mode)."""
  return str(config.get("dropout", "independent"))


def draw(key, *, config, schedule: Schedule, denoise: Denoise, params, x, label, text=None,
         clip: float | None = None):
  """Times, z_t, the student's x_tilde = g_eta(z_t) with its VJP, z_s and w(s) for one (half)
  batch (text: its text embeddings, or None). clip: z_s is drawn from clip(x_tilde, +-clip), as
  the k-step sampler clips its x_hat (the loss still sees the unclipped x_tilde); None = no
  clipping. Returns (dict of arrays, vjp_fn of x_tilde w.r.t. params)."""
  k_time, k_eps, k_zs, k_drop = jax.random.split(key, 4)
  u_t, u_s = mm.sample_times(rng=k_time, batch=x.shape[0],
                             num_student_steps=int(config.num_student_steps),
                             time_sampling=mm.resolve_time_sampling(config))
  logsnr_t = mm.logsnr_of_u(u_t, schedule=schedule, spacing=config.spacing)
  logsnr_s = mm.logsnr_of_u(u_s, schedule=schedule, spacing=config.spacing)
  z_t, _ = process.sample_z_t(rng=k_eps, x=x, logsnr=logsnr_t)
  train = dropout_mode(config) != "off"
  x_tilde, vjp_fn = jax.vjp(
      lambda p: call(denoise, p, z_t, logsnr_t, label, train=train, rng=k_drop, text=text),
      params)
  x_for_zs = x_tilde if clip is None else jnp.clip(x_tilde, -clip, clip)
  z_s = mm.sample_z_s(rng=k_zs, z_t=z_t, x_tilde=x_for_zs, logsnr_s=logsnr_s, logsnr_t=logsnr_t,
                      eta=float(config.eta), unconditional=bool(config.unconditional_zs))
  w = mm.config_weight(config, logsnr_s)
  out = dict(x=x, label=label, text=text, z_t=z_t, logsnr_t=logsnr_t, logsnr_s=logsnr_s,
             x_tilde=x_tilde, z_s=z_s, w=w)
  return out, vjp_fn


def grad_norm(tree):
  return optax.tree.norm(tree).astype(jnp.float32)


def split_batch(batch, data_key):
  if data_key not in batch:
    raise ValueError(f"Batch has keys {sorted(batch)}; expected the data under {data_key!r}.")
  return batch[data_key], batch.get("label")


def check_guidance(config, null_label, use_text=False):
  if float(config.guidance) != 0.0 and null_label is None and not use_text:
    raise ValueError("distill.guidance != 0 needs a condition: null_label (the model's "
                     "num_classes) or text (use_text=True).")


def apply_student(state, grads, student_tx, ema_decay):
  updates, opt_state = student_tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = optim.ema_update(state.ema_params, params, decay=ema_decay)
  return state.replace(params=params, opt_state=opt_state, ema_params=ema)


def regression_update(state, *, denoise: Denoise, student_tx, ema_decay, z_t, logsnr_t, label,
                      text, x_tilde, w, train: bool, rng):
  """One student update on mean_B w |g_eta(z_t) - sg(x_tilde)|^2 / D, the loss of the
  baselines (progressive and consistency distillation). Returns (state, loss, gradient norm,
  g_eta(z_t))."""
  x_tilde = jax.lax.stop_gradient(x_tilde)
  w = jax.lax.stop_gradient(w)

  def loss_fn(p):
    x_hat = call(denoise, p, z_t, logsnr_t, label, train=train, rng=rng, text=text)
    err = jnp.square(x_hat - x_tilde).reshape(x_hat.shape[0], -1)
    return jnp.mean(w * jnp.mean(err, axis=-1)), x_hat

  (loss, x_hat), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return apply_student(state, grads, student_tx, ema_decay), loss, grad_norm(grads), x_hat
