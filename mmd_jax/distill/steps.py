"""The distillation variants' registry and the public API of a distillation step.

Use (config = the `distill` ConfigDict of moment_matching.default_config()):

    denoise = make_x_predictor(model, prediction)       # or models.gmm.make_denoiser()
    student_tx, aux_tx = make_optimizers(config)
    state = init_distill_state(config=config, init_params=teacher_ema_params,
                               student_tx=student_tx, aux_tx=aux_tx)
    step = jax.jit(make_distill_step(config=config, denoise=denoise, schedule=schedule,
                                     student_tx=student_tx, aux_tx=aux_tx, data_key="image",
                                     null_label=num_classes))
    precond = preconditioners.squared_grad_preconditioner(...)   # parameter_space only
    state, metrics = step(state, teacher_params, batch, rng)            # alternating
    state, metrics = step(state, teacher_params, batch, rng, precond)   # parameter_space
    sampler = make_student_sampler(config=config, denoise=denoise, schedule=schedule)
    x = jax.jit(sampler, static_argnames="shape")(state.ema_params, rng, shape=(n, ...), label=c)

A variant is a module with NAME, USES_AUX (whether it trains an auxiliary network),
phases(config) (the programs the loop runs: (None,) for one, or one per step parity) and
make_step(*, config, denoise, schedule, student_tx, [aux_tx,] teacher_denoise, data_key,
null_label, use_text[, phase]) -> step(state, teacher_params, batch, rng[, precond]). Optional:
validate(config) (ValueError), program_index(config, step) (default: step parity),
SAMPLER (the student's own registered sampler, default 'student'), keeps_param_copy(config)
(aux_params holds a copy of the student's parameters), make_optimizers(config). A new variant is
its own module plus one entry in VARIANTS below. Registered: alternating and parameter_space
(moment matching), progressive and consistency (the baselines).

One-step students (k = 1): initialise them from a distilled k = 2 student (init_params = its
ema_params) rather than from the teacher, whose t = 1 output is the data mean for every z_1; on
the GMM benchmark teacher-initialised k = 1 students collapse onto one mode (see
experiments/gmm_benchmark.py, row group 'progressive').

Every step function is pure: step(state, teacher_params, batch, rng[, precond]) -> (state,
metrics) with metrics a dict of f32 scalars. The frozen teacher is an argument (never closed over)
and is not part of the state. `rng` may be the same key every step: it is folded with state.step.
The model is an x-predictor `denoise(params, z, logsnr, label, *, train, rng) -> x_hat`; the
teacher may be a different function (`teacher_denoise`, e.g. the exact mixture denoiser), in which
case the student and auxiliary are initialised from `init_params` of the student's architecture.
Student and auxiliary run with train=True (dropout, if the model has it); the teacher with
train=False.

Text conditioning (use_text=True): the batch carries text-encoder embeddings batch['text']
f32[B, L, D] and every network (student, auxiliary, teacher) is called with text=... of the
examples (denoise(..., text=t)). With distill.guidance = w != 0 only the teacher is guided:
g^w = g(c) + w (g(c) - g(null)), null = the zero text (and the null class for a model with
classes); see mmd_jax.diffusion.conditioning. Without text nothing changes (no text= argument is
passed, so denoise functions without one, e.g. the exact mixture denoiser, still work).
"""
from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmd_jax.diffusion import samplers
from mmd_jax.diffusion.schedules import Schedule
from mmd_jax.distill import alternating, common, consistency, parameter_space, progressive
from mmd_jax.distill import moment_matching as mm

VARIANTS: dict[str, types.ModuleType] = {
    m.NAME: m for m in (alternating, parameter_space, progressive, consistency)}

# The shared pieces, under the names the rest of the package and the tests use.
Denoise = common.Denoise
DistillState = common.DistillState
draw = common.draw
make_x_predictor = common.make_x_predictor
step_keys = common.step_keys
PHASES = alternating.PHASES
make_alternating_step = alternating.make_step
make_parameter_space_step = parameter_space.make_step
teacher_grad_on_samples = parameter_space.teacher_grad_on_samples


def variant(name: str) -> types.ModuleType:
  """The registered variant module called `name`; a ValueError listing the names otherwise."""
  if name not in VARIANTS:
    raise ValueError(f"distill.variant={name!r} is not one of {tuple(VARIANTS)}.")
  return VARIANTS[name]


def validate_config(config) -> None:
  """moment_matching.validate_config plus a registered variant name and the variant's own
  checks (ValueError otherwise)."""
  v = variant(config.get("variant"))
  mm.validate_config(config)
  if hasattr(v, "validate"):
    v.validate(config)


def step_phases(config) -> tuple[str | None, ...]:
  """The programs the loop runs for config.variant: (None,) for one program, or several, picked
  by program_index."""
  return variant(config.variant).phases(config)


def program_index(config, step: int) -> int:
  """Which of step_phases(config) runs at training step `step` (0-based): the variant's
  program_index (progressive distillation: by round), else by step parity."""
  v = variant(config.variant)
  if hasattr(v, "program_index"):
    return int(v.program_index(config, step))
  return step % len(v.phases(config))


def sampler_name(config) -> str:
  """The registered sampler of the student's own k-step sampler ('student': ancestral with the
  trained eta and spacing; the baselines: 'ddim')."""
  return getattr(variant(config.variant), "SAMPLER", "student")


def make_optimizers(config):
  """(student_tx, aux_tx) of config.variant (common.make_optimizers; progressive distillation's
  schedule spans one round)."""
  v = variant(config.variant)
  if hasattr(v, "make_optimizers"):
    return v.make_optimizers(config)
  return common.make_optimizers(config)


def init_distill_state(*, config, init_params, student_tx, aux_tx=None, teacher_params=None):
  """common.init_distill_state with aux_params as config.variant keeps them: the auxiliary
  (alternating), the round teacher (progressive), the EMA target (consistency, 'ema')."""
  v = variant(config.variant)
  copy = v.keeps_param_copy(config) if hasattr(v, "keeps_param_copy") else None
  return common.make_state(config=config, init_params=init_params, student_tx=student_tx,
                           aux_tx=aux_tx, teacher_params=teacher_params, param_copy=copy)


def make_distill_step(*, config, denoise: Denoise, schedule: Schedule,
                      student_tx: optax.GradientTransformation,
                      aux_tx: optax.GradientTransformation | None = None,
                      teacher_denoise: Denoise | None = None, data_key: str = "x",
                      null_label: int | None = None, use_text: bool = False,
                      phase: str | None = None, clip_x: float | None = None):
  """The step of config.variant (see the variant modules' make_step). clip_x: the clip of
  x_tilde in the draw of z_s (the run passes diffusion.clip_x when distill.clipping is
  'both'; None = unclipped)."""
  validate_config(config)
  v = variant(config.variant)
  kwargs = dict(config=config, denoise=denoise, schedule=schedule, student_tx=student_tx,
                teacher_denoise=teacher_denoise, data_key=data_key, null_label=null_label,
                use_text=use_text, clip_x=clip_x)
  if v.USES_AUX:
    if aux_tx is None:
      raise ValueError(f"The {v.NAME} variant needs aux_tx (the auxiliary's optimizer).")
    kwargs["aux_tx"] = aux_tx
  if phase is not None:
    kwargs["phase"] = phase
  return guard_nonfinite(v.make_step(**kwargs))


# A parameter beyond sqrt(float32 max) ~ 1.8e19 has a square that overflows (in float32 and
# bfloat16 alike), so the next step's norms, variances and second moments are inf: such an
# update has exploded, even where it is still finite.
EXPLODED = float(np.sqrt(np.finfo(np.float32).max))
_BOUNDED = ("params", "ema_params", "aux_params", "nu_ema")


def guard_nonfinite(step_fn):
  """step_fn (any variant's step) with the teacher step's non-finite guard
  (training/steps.py): a step whose metrics (losses, gradient norms) or updated state hold a
  NaN/inf, or whose updated parameters (student, EMA, auxiliary, nu EMA) exceed EXPLODED in
  magnitude, keeps every part of the state as it was except the step counter, and the first
  such step (1-based) is recorded in state.nonfinite_step, so the loop stops with the last good
  state and never checkpoints a bad one."""

  def step(state, *args):
    new, metrics = step_fn(state, *args)
    ok = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(metrics)]
    for f in dataclasses.fields(new):
      if f.name in ("step", "nonfinite_step"):
        continue
      for x in jax.tree_util.tree_leaves(getattr(new, f.name)):
        if jnp.issubdtype(x.dtype, jnp.inexact):  # NaN fails both tests
          ok.append(jnp.all(jnp.abs(x) <= EXPLODED) if f.name in _BOUNDED
                    else jnp.all(jnp.isfinite(x)))
    finite = jnp.all(jnp.stack(ok))
    # One conditional rather than a jnp.where per leaf: with `finite` computed from the new
    # state, per-leaf selects made XLA:CPU's compile of the digits step exhaust 8 GB.
    kept = jax.lax.cond(finite, lambda: new, lambda: state)
    nonfinite_step = jnp.where((state.nonfinite_step < 0) & ~finite, state.step + 1,
                               state.nonfinite_step)
    return kept.replace(step=new.step, nonfinite_step=nonfinite_step), metrics

  return step


def make_student_sampler(*, config, denoise: Denoise, schedule: Schedule,
                         num_steps: int | None = None, clip: float | None = None,
                         guidance: float = 0.0, null_label: int | None = None,
                         sampler: str | None = None):
  """sample(params, rng, *, shape, label=None, text=None) -> x: the registered `sampler`
  (default: the variant's own, sampler_name(config); 'student' is the k-step ancestral sampler
  with eta = config.eta on the config's grid spacing) with the student as denoiser, conditioned on text (f32[B, L, D]) when given. Jit it
  with static_argnames="shape". With k = 1 it returns g_eta(z_1).

  The student is distilled from the guided teacher (distill.guidance) and is normally sampled
  unguided; guidance != 0 guides the student itself against the null class `null_label` and/or
  the zero text (conditioning.guided), for ablations."""
  k = int(config.num_student_steps if num_steps is None else num_steps)
  fn = samplers.get(sampler_name(config) if sampler is None else sampler)
  settings = samplers.student_settings(config)

  def sample(params, rng, *, shape, label=None, text=None):
    denoise_fn = common.teacher_fn(denoise, params, guidance=guidance, null_label=null_label,
                                   text=text)
    return fn(denoise_fn=denoise_fn, rng=rng, shape=shape, num_steps=k, schedule=schedule,
              label=label, clip=clip, settings=settings)

  return sample
