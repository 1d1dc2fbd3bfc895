"""The alternating variant (Algorithm 2 of the paper): an auxiliary denoiser fitted to the
student's samples and the student's gradient from its gap to the teacher.

update_schedule='both' updates the auxiliary, then the student, every step (one program);
'alternate' updates the auxiliary on even steps and the student on odd ones, as one lax.cond
program (alternate_dispatch='device') or two programs the loop picks by step parity on the host
(alternate_dispatch='host', the default: XLA:CPU runs convolutions inside a conditional on a
naive kernel).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmd_jax.diffusion import conditioning
from mmd_jax.diffusion.schedules import Schedule
from mmd_jax.distill import common
from mmd_jax.distill import moment_matching as mm

NAME = "alternating"
USES_AUX = True

PHASES = ("aux", "student")  # the two programs of update_schedule='alternate' on host dispatch


def phases(config) -> tuple[str | None, ...]:
  """The programs the loop compiles: ('aux', 'student') for the alternating variant's
  'alternate' schedule with alternate_dispatch='host' (program i runs on steps with
  step % 2 == i), else (None,), the single program."""
  if (config.variant == "alternating" and config.update_schedule == "alternate"
      and config.get("alternate_dispatch", "host") == "host"):
    return PHASES
  return (None,)


def make_step(*, config, denoise: common.Denoise, schedule: Schedule,
                student_tx: optax.GradientTransformation,
                aux_tx: optax.GradientTransformation,
                teacher_denoise: common.Denoise | None = None, data_key: str = "x",
                null_label: int | None = None, use_text: bool = False,
                clip_x: float | None = None,
                phase: str | None = None):
  """step(state, teacher_params, batch, rng) -> (state, metrics) for the alternating variant.
  use_text: all networks are conditioned on batch['text'] (see the module docstring); clip_x:
  z_s is drawn from x_tilde clipped to +-clip_x (None: unclipped; see common.draw).

  phase (update_schedule='alternate' only): None = one program that picks the auxiliary update
  (even state.step) or the student update (odd) with lax.cond on the device; 'aux' or 'student'
  = the program of that update alone, for a caller that picks by step parity on the host
  (distill.alternate_dispatch='host'). Both give the same updates."""
  mm.validate_config(config)
  common.check_guidance(config, null_label, use_text)
  if phase not in (None,) + PHASES:
    raise ValueError(f"phase={phase!r} is not one of {(None,) + PHASES}.")
  if phase is not None and config.update_schedule != "alternate":
    raise ValueError("phase applies to update_schedule='alternate' only.")
  teacher_denoise = denoise if teacher_denoise is None else teacher_denoise
  terms = mm.parse_aux_terms(config.aux_terms)
  schedule_kind = config.update_schedule
  ema_decay = float(config.ema_decay)

  dropout = common.dropout_mode(config)
  train = dropout != "off"

  def aux_value_and_grad(aux_params, d, g_teacher, key):
    k_drop, k_data = jax.random.split(key)

    def loss_fn(phi):
      g_aux = common.call(denoise, phi, d["z_s"], d["logsnr_s"], d["label"], train=train,
                          rng=k_drop, text=d["text"])
      extra = {}
      if "data" in terms:
        w_t = mm.config_weight(config, d["logsnr_t"])
        extra = dict(x_data=d["x"], w_data=w_t,
                     g_aux_data=common.call(denoise, phi, d["z_t"], d["logsnr_t"], d["label"],
                                            train=train, rng=k_data, text=d["text"]))
      loss = mm.aux_loss(g_aux=g_aux, x_tilde=d["x_tilde"], g_teacher=g_teacher, w=d["w"],
                         terms=terms, **extra)
      return jnp.mean(loss), g_aux

    return jax.value_and_grad(loss_fn, has_aux=True)(aux_params)

  def student_grads(d, vjp_fn, g_aux, g_teacher):
    def loss_of_x(x_tilde):
      return jnp.mean(mm.student_loss(x_tilde=x_tilde, g_aux=g_aux, g_teacher=g_teacher,
                                      w=d["w"]))
    (grads,) = vjp_fn(jax.grad(loss_of_x)(d["x_tilde"]))
    return grads

  def step(state: common.DistillState, teacher_params, batch, rng):
    x, label = common.split_batch(batch, data_key)
    text = conditioning.batch_text(batch, use_text=use_text)
    _, key = common.step_keys(rng, state.step)
    k_draw, k_aux = jax.random.split(key)
    # 'shared': the teacher sees the dropout mask of the auxiliary's pass on z_s.
    k_aux_drop = jax.random.split(k_aux)[0] if dropout == "shared" else None
    teacher = common.teacher_fn(teacher_denoise, teacher_params, guidance=config.guidance,
                                null_label=null_label, text=text, dropout_rng=k_aux_drop)
    d, vjp_fn = common.draw(k_draw, config=config, schedule=schedule, denoise=denoise,
                            params=state.params, x=x, label=label, text=text,
                            clip=clip_x)
    g_teacher = jax.lax.stop_gradient(teacher(d["z_s"], d["logsnr_s"], label))

    def update_aux(state):
      (aux_l, g_aux), grads = aux_value_and_grad(state.aux_params, d, g_teacher, k_aux)
      updates, aux_opt = aux_tx.update(grads, state.aux_opt_state, state.aux_params)
      state = state.replace(aux_params=optax.apply_updates(state.aux_params, updates),
                            aux_opt_state=aux_opt)
      return state, aux_l, g_aux, common.grad_norm(grads)

    def update_student(state, g_aux):
      grads = student_grads(d, vjp_fn, g_aux, g_teacher)
      return common.apply_student(state, grads, student_tx, ema_decay), common.grad_norm(grads)

    if schedule_kind == "both":
      new_state, aux_l, g_aux, aux_gn = update_aux(state)
      g_aux = jax.lax.stop_gradient(g_aux)  # phi before its update
      new_state, student_gn = update_student(new_state, g_aux)
      student_updated = jnp.float32(1.0)
    else:
      def aux_branch(state):
        new_state, aux_l, g_aux, aux_gn = update_aux(state)
        return new_state, aux_l, g_aux, aux_gn, jnp.float32(0.0)

      def student_branch(state):
        g_aux = common.call(denoise, state.aux_params, d["z_s"], d["logsnr_s"], label,
                            train=train, rng=k_aux_drop if dropout == "shared" else
                            jax.random.fold_in(k_aux, 7), text=text)
        aux_l = jnp.mean(mm.aux_loss(g_aux=g_aux, x_tilde=d["x_tilde"], g_teacher=g_teacher,
                                     w=d["w"], terms=tuple(t for t in terms if t != "data")))
        new_state, gn = update_student(state, g_aux)
        return new_state, aux_l, g_aux, jnp.float32(0.0), gn

      if phase is None:
        new_state, aux_l, g_aux, aux_gn, student_gn = jax.lax.cond(
            state.step % 2 == 0, aux_branch, student_branch, state)
      else:
        branch = aux_branch if phase == "aux" else student_branch
        new_state, aux_l, g_aux, aux_gn, student_gn = branch(state)
      student_updated = (state.step % 2 == 1).astype(jnp.float32)

    metrics = {
        "moment_gap": jnp.mean(mm.moment_gap(g_aux=g_aux, g_teacher=g_teacher, w=d["w"])),
        "aux_loss": aux_l.astype(jnp.float32),
        "aux_grad_norm": aux_gn,
        "student_grad_norm": student_gn,
        "student_updated": student_updated,
        "x_tilde_rms": jnp.sqrt(jnp.mean(jnp.square(d["x_tilde"]))),
    }
    return new_state.replace(step=state.step + 1), metrics

  return step
