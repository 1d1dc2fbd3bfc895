"""Progressive distillation (Salimans & Ho, ICLR 2022), a baseline on the same framework.

Round r (0 <= r < R) distils a teacher sampled with 2 N_r DDIM steps into a student with N_r
steps, N_r = teacher_steps / 2^(r+1), down to N_{R-1} = k: R = log2(teacher_steps / k) rounds.
Per step (the paper's Algorithm 2): t = i / N_r with i ~ U{1..N_r} on the student's grid, z_t
from real data, the x-target whose one DDIM step t -> t - 1/N_r lands where two DDIM steps of the
round's teacher (t -> t - 1/(2 N_r) -> t - 1/N_r) land (ddim_targets.two_step_target), and the
loss w(t) |g_eta(z_t) - x_tilde|^2 with the paper's truncated-SNR weighting max(SNR_t, 1)
(distill.weighting='auto'). The student is sampled with k deterministic DDIM steps (the 'ddim'
sampler).

Rounds as one run. The rounds share distill.num_steps: round r runs the training steps
[start_r, start_{r+1}) with start_r = ceil(r * num_steps / R), fixed by the config, so a resumed
run is in the same round at the same step. Round 0's teacher is the real teacher (a frozen input
of the step, guided by distill.guidance). A later round's teacher is the state's aux_params: at
the first step of round r >= 1, the student's EMA becomes that round's teacher and the student's
starting point, and the optimizer starts afresh (its learning-rate schedule spans one round). The
student's EMA restarts with the round: its decay is min(ema_decay, (1 + n) / (10 + n)) at step n
of the round, so the EMA evaluated (and handed on) is that of the round's student only. Later
rounds are not guided: their teacher is the previous (guided) student.

Two programs, picked on the host by the step's round (program_index): 'first_round' (the real
teacher) and 'later_rounds' (the state's round teacher; the number of student steps N_r is
computed from the step, so one program serves every later round).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmd_jax.diffusion import conditioning, process
from mmd_jax.diffusion.schedules import Schedule
from mmd_jax.distill import common, ddim_targets
from mmd_jax.distill import moment_matching as mm

NAME = "progressive"
USES_AUX = False
SAMPLER = "ddim"
PHASES = ("first_round", "later_rounds")


def num_rounds(config) -> int:
  """R = log2(teacher_steps / k); a ValueError naming the fields unless that is an int >= 1."""
  k, n_t = int(config.num_student_steps), int(config.get("teacher_steps", 0))
  ratio = n_t // k if k > 0 and n_t % k == 0 else 0
  if ratio < 2 or ratio & (ratio - 1):
    raise ValueError(f"distill.teacher_steps={n_t} must be k * 2^R with R >= 1 rounds for "
                     f"progressive distillation to k={k} steps (e.g. {k * 8}).")
  return ratio.bit_length() - 1


def validate(config) -> None:
  num_rounds(config)
  if config.spacing != "uniform_t":
    raise ValueError("distill.variant='progressive' samples with DDIM on a grid uniform in t: "
                     "set distill.spacing='uniform_t'.")


def round_start(config, r):
  """The first training step of round r (int or traced int): ceil(r * num_steps / R)."""
  n, rounds = int(config.num_steps), num_rounds(config)
  return (r * n + rounds - 1) // rounds


def round_of(config, step):
  """The round of training step `step` (0-based; int or traced int)."""
  n, rounds = int(config.num_steps), num_rounds(config)
  r = (step * rounds) // n
  return jnp.minimum(r, rounds - 1) if isinstance(r, jax.Array) else min(r, rounds - 1)


def round_length(config) -> int:
  """The longest round, in training steps (the optimizer's schedule length)."""
  return -(-int(config.num_steps) // num_rounds(config))


def phases(config) -> tuple[str, ...]:
  return PHASES if num_rounds(config) > 1 else PHASES[:1]


def program_index(config, step: int) -> int:
  return 0 if round_of(config, step) == 0 else 1


def keeps_param_copy(config) -> bool:
  """aux_params holds the round's teacher when there is more than one round."""
  return num_rounds(config) > 1


def make_optimizers(config):
  return common.make_optimizers(config, schedule_steps=round_length(config))


def make_step(*, config, denoise: common.Denoise, schedule: Schedule,
              student_tx: optax.GradientTransformation,
              teacher_denoise: common.Denoise | None = None, data_key: str = "x",
              null_label: int | None = None, use_text: bool = False,
              clip_x: float | None = None, phase: str | None = None):
  """step(state, teacher_params, batch, rng) -> (state, metrics) of program `phase`
  ('first_round' or 'later_rounds'; None with a single round). clip_x: the teacher's x_hat is
  clipped to +-clip_x in its DDIM steps (None: not)."""
  mm.validate_config(config)
  validate(config)
  common.check_guidance(config, null_label, use_text)
  rounds = num_rounds(config)
  if phase is None and rounds == 1:
    phase = PHASES[0]
  if phase not in phases(config):
    raise ValueError(f"phase={phase!r}: progressive distillation with {rounds} round(s) runs the "
                     f"programs {phases(config)}.")
  teacher_denoise = denoise if teacher_denoise is None else teacher_denoise
  first_steps = int(config.teacher_steps) // 2   # the student's steps in round 0
  ema_decay = float(config.ema_decay)
  weighting = "truncated_snr" if config.weighting == "auto" else config.weighting
  train = common.dropout_mode(config) != "off"

  def new_round(state):
    p = state.ema_params
    return state.replace(params=p, aux_params=p, opt_state=student_tx.init(p))

  def step(state: common.DistillState, teacher_params, batch, rng):
    x, label = common.split_batch(batch, data_key)
    text = conditioning.batch_text(batch, use_text=use_text)
    _, key = common.step_keys(rng, state.step)
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    r = round_of(config, state.step)
    start = round_start(config, r)
    if phase == "first_round":
      teacher = common.teacher_fn(teacher_denoise, teacher_params, guidance=config.guidance,
                                  null_label=null_label, text=text)
    else:
      state = jax.lax.cond(state.step == start, new_round, lambda s: s, state)
      teacher = common.teacher_fn(denoise, state.aux_params, guidance=0.0,
                                  null_label=null_label, text=text)
    n_r = jnp.right_shift(jnp.int32(first_steps), r.astype(jnp.int32))
    i = jax.random.randint(k_t, x.shape[:1], 1, n_r + 1).astype(jnp.float32)
    n_f = n_r.astype(jnp.float32)
    logsnr = [mm.logsnr_of_u(u, schedule=schedule, spacing=config.spacing)
              for u in (i / n_f, (i - 0.5) / n_f, (i - 1.0) / n_f)]
    z_t, _ = process.sample_z_t(rng=k_eps, x=x, logsnr=logsnr[0])
    x_tilde = ddim_targets.two_step_target(teacher=teacher, z_t=z_t, label=label,
                                           logsnr_t=logsnr[0], logsnr_mid=logsnr[1],
                                           logsnr_s=logsnr[2], clip=clip_x)
    w = mm.weight(weighting=weighting, logsnr=logsnr[0], bias=float(config.weighting_bias),
                  teacher_weighting=config.teacher_weighting)
    n_in_round = (state.step - start).astype(jnp.float32)
    decay = jnp.minimum(ema_decay, (1.0 + n_in_round) / (10.0 + n_in_round))
    new_state, loss, gn, x_hat = common.regression_update(
        state, denoise=denoise, student_tx=student_tx, ema_decay=decay, z_t=z_t,
        logsnr_t=logsnr[0], label=label, text=text, x_tilde=x_tilde, w=w, train=train,
        rng=k_drop)
    metrics = {"distill_loss": loss.astype(jnp.float32), "student_grad_norm": gn,
               "round": r.astype(jnp.float32), "student_steps": n_f,
               "x_tilde_rms": jnp.sqrt(jnp.mean(jnp.square(x_tilde))),
               "x_hat_rms": jnp.sqrt(jnp.mean(jnp.square(x_hat)))}
    return new_state.replace(step=state.step + 1), metrics

  return step
