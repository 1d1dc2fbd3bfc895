"""Multistep consistency distillation (Heek, Hoogeboom & Salimans 2024; consistency distillation
by Song et al. 2023), a baseline on the same framework.

The time axis [0, 1] is split into k segments [i/k, (i+1)/k]; the teacher's ODE is discretised
into teacher_steps DDIM steps, M = teacher_steps / k per segment. Per example: a segment i and
t = i/k + j/(k M) with j ~ U{1..M}, s = t - 1/(k M), z_t from real data; the reference is one
DDIM (ODE) step of the teacher t -> s, then the target network's DDIM jump from z_s to the
segment start i/k, or z_s itself when s is the segment start (j = 1: the boundary condition).
The student regresses the x-target whose DDIM step t -> i/k lands on that reference
(ddim_targets.consistency_target), weighted by max(SNR_t, 1) (distill.weighting='auto'). So the
student's DDIM step from any point of a segment jumps to the segment start along the teacher's
ODE, and its k-step sampler is k deterministic DDIM steps on the segment grid (the 'ddim'
sampler; the paper's multistep consistency sampler, without its aDDIM noise adjustment).

Target network (distill.target_network): 'stop_gradient' (default), the student itself with its
gradient stopped, as Heek et al. do (following Song & Dhariwal's improved consistency training);
'ema', an EMA of the student with decay distill.target_ema kept in the state's aux_params, as in
Song et al. 2023. The target network runs in eval mode (no dropout).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmd_jax.diffusion import conditioning, process
from mmd_jax.diffusion.schedules import Schedule
from mmd_jax.distill import common, ddim_targets
from mmd_jax.distill import moment_matching as mm
from mmd_jax.training import optim

NAME = "consistency"
USES_AUX = False
SAMPLER = "ddim"


def validate(config) -> None:
  k, n_t = int(config.num_student_steps), int(config.get("teacher_steps", 0))
  if n_t < k or n_t % k:
    raise ValueError(f"distill.teacher_steps={n_t} must be a positive multiple of "
                     f"k={k} (the teacher's DDIM steps per segment is teacher_steps / k).")
  if config.spacing != "uniform_t":
    raise ValueError("distill.variant='consistency' samples with DDIM on a grid uniform in t: "
                     "set distill.spacing='uniform_t'.")


def phases(config) -> tuple[None]:
  del config
  return (None,)


def keeps_param_copy(config) -> bool:
  """aux_params holds the EMA target network with target_network='ema'."""
  return config.get("target_network", "stop_gradient") == "ema"


def sample_times(*, rng, batch: int, k: int, per_segment: int):
  """(u_t, u_s, u_start, at_start), f32[batch] each except at_start (bool[batch])."""
  k_seg, k_j = jax.random.split(rng)
  seg = jax.random.randint(k_seg, (batch,), 0, k).astype(jnp.float32)
  j = jax.random.randint(k_j, (batch,), 1, per_segment + 1)
  u_start = seg / k
  u_t = u_start + j.astype(jnp.float32) / (k * per_segment)
  u_s = u_start + (j - 1).astype(jnp.float32) / (k * per_segment)
  return u_t, u_s, u_start, j == 1


def make_step(*, config, denoise: common.Denoise, schedule: Schedule,
              student_tx: optax.GradientTransformation,
              teacher_denoise: common.Denoise | None = None, data_key: str = "x",
              null_label: int | None = None, use_text: bool = False,
              clip_x: float | None = None):
  """step(state, teacher_params, batch, rng) -> (state, metrics). clip_x: the teacher's and the
  target network's x_hat are clipped to +-clip_x (None: not)."""
  mm.validate_config(config)
  validate(config)
  common.check_guidance(config, null_label, use_text)
  teacher_denoise = denoise if teacher_denoise is None else teacher_denoise
  k = int(config.num_student_steps)
  per_segment = int(config.teacher_steps) // k
  ema_target = keeps_param_copy(config)
  target_decay = float(config.target_ema)
  weighting = "truncated_snr" if config.weighting == "auto" else config.weighting
  train = common.dropout_mode(config) != "off"

  def step(state: common.DistillState, teacher_params, batch, rng):
    x, label = common.split_batch(batch, data_key)
    text = conditioning.batch_text(batch, use_text=use_text)
    _, key = common.step_keys(rng, state.step)
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    u_t, u_s, u_start, at_start = sample_times(rng=k_t, batch=x.shape[0], k=k,
                                               per_segment=per_segment)
    logsnr_t, logsnr_s, logsnr_start = (mm.logsnr_of_u(u, schedule=schedule,
                                                       spacing=config.spacing)
                                        for u in (u_t, u_s, u_start))
    z_t, _ = process.sample_z_t(rng=k_eps, x=x, logsnr=logsnr_t)
    teacher = common.teacher_fn(teacher_denoise, teacher_params, guidance=config.guidance,
                                null_label=null_label, text=text)
    target_params = jax.lax.stop_gradient(state.aux_params if ema_target else state.params)
    target_net = common.teacher_fn(denoise, target_params, guidance=0.0, null_label=null_label,
                                   text=text)
    x_tilde, _ = ddim_targets.consistency_target(
        teacher=teacher, target_net=target_net, z_t=z_t, label=label, logsnr_t=logsnr_t,
        logsnr_s=logsnr_s, logsnr_start=logsnr_start, at_start=at_start, clip=clip_x)
    w = mm.weight(weighting=weighting, logsnr=logsnr_t, bias=float(config.weighting_bias),
                  teacher_weighting=config.teacher_weighting)
    new_state, loss, gn, x_hat = common.regression_update(
        state, denoise=denoise, student_tx=student_tx, ema_decay=float(config.ema_decay),
        z_t=z_t, logsnr_t=logsnr_t, label=label, text=text, x_tilde=x_tilde, w=w, train=train,
        rng=k_drop)
    if ema_target:
      new_state = new_state.replace(aux_params=optim.ema_update(
          state.aux_params, new_state.params, decay=target_decay))
    metrics = {"distill_loss": loss.astype(jnp.float32), "student_grad_norm": gn,
               "boundary_fraction": jnp.mean(at_start.astype(jnp.float32)),
               "x_tilde_rms": jnp.sqrt(jnp.mean(jnp.square(x_tilde))),
               "x_hat_rms": jnp.sqrt(jnp.mean(jnp.square(x_hat)))}
    return new_state.replace(step=state.step + 1), metrics

  return step
