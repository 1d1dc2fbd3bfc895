"""The parameter-space variant (Algorithm 3 of the paper): the student's gradient is the JVP of
the teacher along nu = -Lambda g_A, with g_A the teacher's gradient on the student's samples of
one half-batch (A) and the JVP taken on the other (B). Lambda is a preconditioner (see
preconditioners.py), a frozen input of the step like the teacher.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmd_jax.diffusion import conditioning
from mmd_jax.diffusion.schedules import Schedule
from mmd_jax.distill import common
from mmd_jax.distill import moment_matching as mm

NAME = "parameter_space"
USES_AUX = False


def phases(config) -> tuple[None]:
  del config
  return (None,)


def teacher_grad_on_samples(*, teacher_denoise: common.Denoise, teacher_params, d, config,
                            null_label=None):
  """g_A = grad_theta mean_A w(s) |sg(x_tilde) - g_theta(z_s)|^2 / D (teacher backward, params
  only). Returns (g_A, loss value)."""
  def loss(theta):
    teacher = common.teacher_fn(teacher_denoise, theta, guidance=config.guidance,
                                null_label=null_label, text=d.get("text"))
    g = teacher(d["z_s"], d["logsnr_s"], d["label"])
    return jnp.mean(mm.teacher_loss_on_samples(x_tilde=d["x_tilde"], g_teacher=g, w=d["w"]))

  value, grads = jax.value_and_grad(loss)(teacher_params)
  return grads, value


def make_step(*, config, denoise: common.Denoise, schedule: Schedule,
                student_tx: optax.GradientTransformation,
                teacher_denoise: common.Denoise | None = None, data_key: str = "x",
                null_label: int | None = None, use_text: bool = False,
                clip_x: float | None = None):
  """step(state, teacher_params, batch, rng, precond=None) -> (state, metrics).

  The batch is split into independent halves A (first half) and B (second half); precond is
  Lambda, a teacher-params-shaped tree (None = identity), see distill.preconditioners.
  use_text: all networks are conditioned on batch['text'] (see the module docstring).
  """
  mm.validate_config(config)
  common.check_guidance(config, null_label, use_text)
  teacher_denoise = denoise if teacher_denoise is None else teacher_denoise
  ema_decay = float(config.ema_decay)
  nu_decay = float(config.nu_ema)

  def step(state: common.DistillState, teacher_params, batch, rng, precond=None):
    x, label = common.split_batch(batch, data_key)
    n = x.shape[0]
    if n % 2 or n < 2:
      raise ValueError(f"The parameter-space step splits the batch in two halves; got batch {n}.")
    half = n // 2
    label_a = None if label is None else label[:half]
    label_b = None if label is None else label[half:]
    text = conditioning.batch_text(batch, use_text=use_text)
    text_a = None if text is None else text[:half]
    text_b = None if text is None else text[half:]
    key_a, key_b = common.step_keys(rng, state.step)
    k_draw_b = jax.random.split(key_b)[0]
    k_draw_a = jax.random.split(key_a)[0]
    d_a, _ = common.draw(k_draw_a, config=config, schedule=schedule, denoise=denoise,
                         params=state.params, x=x[:half], label=label_a, text=text_a,
                         clip=clip_x)
    d_a = jax.tree_util.tree_map(jax.lax.stop_gradient, d_a)
    d_b, vjp_fn = common.draw(k_draw_b, config=config, schedule=schedule, denoise=denoise,
                              params=state.params, x=x[half:], label=label_b, text=text_b,
                              clip=clip_x)

    g_a, teacher_l = teacher_grad_on_samples(teacher_denoise=teacher_denoise,
                                             teacher_params=teacher_params, d=d_a,
                                             config=config, null_label=null_label)
    if precond is None:
      nu = jax.tree_util.tree_map(jnp.negative, g_a)
    else:
      nu = jax.tree_util.tree_map(lambda lam, g: -lam * g, precond, g_a)
    new_nu_ema = state.nu_ema
    if nu_decay > 0:
      new_nu_ema = jax.tree_util.tree_map(lambda e, v: nu_decay * e + (1 - nu_decay) * v,
                                          state.nu_ema, nu)
      correction = 1.0 - nu_decay ** (state.step.astype(jnp.float32) + 1.0)
      nu = jax.tree_util.tree_map(lambda e: e / correction, new_nu_ema)

    def teacher_at_b(theta):
      teacher = common.teacher_fn(teacher_denoise, theta, guidance=config.guidance,
                                  null_label=null_label, text=text_b)
      return teacher(d_b["z_s"], d_b["logsnr_s"], label_b)

    _, jvp_out = jax.jvp(teacher_at_b, (teacher_params,), (nu,))

    def loss_of_x(x_tilde):
      return jnp.mean(mm.parameter_space_student_loss(x_tilde=x_tilde, jvp_out=jvp_out,
                                                      w=d_b["w"]))

    (grads,) = vjp_fn(jax.grad(loss_of_x)(d_b["x_tilde"]))
    new_state = common.apply_student(state, grads, student_tx, ema_decay)
    metrics = {
        "teacher_loss_on_samples": teacher_l.astype(jnp.float32),
        "teacher_grad_norm": common.grad_norm(g_a),
        "nu_norm": common.grad_norm(nu),
        "jvp_rms": jnp.sqrt(jnp.mean(jnp.square(jvp_out))),
        "student_grad_norm": common.grad_norm(grads),
        "x_tilde_rms": jnp.sqrt(jnp.mean(jnp.square(d_b["x_tilde"]))),
    }
    return new_state.replace(step=state.step + 1, nu_ema=new_nu_ema), metrics

  return step
