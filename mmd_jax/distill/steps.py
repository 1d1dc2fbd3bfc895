"""Jit-able moment-matching distillation steps and the distillation state.

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

from mmd_jax.diffusion import conditioning, process, samplers
from mmd_jax.diffusion.schedules import Schedule
from mmd_jax.distill import moment_matching as mm
from mmd_jax.training import optim

Denoise = Callable[..., jax.Array]


@flax.struct.dataclass
class DistillState:
  """Everything a distillation run updates; plain arrays and pytrees (Orbax StandardSave).

  aux_params / aux_opt_state are {} for the parameter-space variant; nu_ema is {} unless
  distill.nu_ema > 0 (then a teacher-params-shaped tree).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  aux_params: Any
  aux_opt_state: Any
  nu_ema: Any



PHASES = ("aux", "student")  # the two programs of update_schedule='alternate' on host dispatch


def step_phases(config) -> tuple[str | None, ...]:
  """The programs the loop compiles: ('aux', 'student') for the alternating variant's
  'alternate' schedule with alternate_dispatch='host' (program i runs on steps with
  step % 2 == i), else (None,), the single program."""
  if (config.variant == "alternating" and config.update_schedule == "alternate"
      and config.get("alternate_dispatch", "host") == "host"):
    return PHASES
  return (None,)

def make_optimizers(config):
  """(student_tx, aux_tx) from config.optim over config.num_steps; the auxiliary's learning rate
  is scaled by config.aux_lr_scale. aux_tx is None for the parameter-space variant."""
  student_tx = optim.make_optimizer(config.optim, total_steps=int(config.num_steps))
  if config.variant != "alternating":
    return student_tx, None
  aux_optim = config.optim.copy_and_resolve_references()
  aux_optim.learning_rate = float(config.optim.learning_rate) * float(config.aux_lr_scale)
  return student_tx, optim.make_optimizer(aux_optim, total_steps=int(config.num_steps))


def _copy(tree):
  return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree)


def init_distill_state(*, config, init_params, student_tx: optax.GradientTransformation,
                       aux_tx: optax.GradientTransformation | None = None,
                       teacher_params=None) -> DistillState:
  """Student, its EMA and (alternating) the auxiliary all start as copies of `init_params`
  (normally the teacher's EMA parameters). `teacher_params` is only needed for the shape of the
  nu EMA when it differs from init_params (e.g. a mixture-parameter teacher)."""
  mm.validate_config(config)
  params = _copy(init_params)
  alternating = config.variant == "alternating"
  if alternating and aux_tx is None:
    raise ValueError("The alternating variant needs aux_tx (the auxiliary's optimizer).")
  aux_params = _copy(init_params) if alternating else {}
  nu_ema = {}
  if not alternating and float(config.nu_ema) > 0:
    nu_ema = jax.tree_util.tree_map(
        jnp.zeros_like, init_params if teacher_params is None else teacher_params)
  return DistillState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=student_tx.init(params),
      ema_params=_copy(init_params), aux_params=aux_params,
      aux_opt_state=aux_tx.init(aux_params) if alternating else {}, nu_ema=nu_ema)


def make_x_predictor(model, prediction: str) -> Denoise:
  """denoise(params, z, logsnr, label, *, train=False, rng=None, text=None) -> x_hat for a flax
  Module with the project's call signature, converting its `prediction` output with
  process.to_x. text (f32[B, L, D]) is passed to the model only when given."""
  if prediction not in process.PREDICTIONS:
    raise ValueError(f"Unknown prediction {prediction!r}; choose one of {process.PREDICTIONS}.")

  def denoise(params, z, logsnr, label, *, train=False, rng=None, text=None):
    rngs = {"dropout": rng} if rng is not None else {}
    kw = {} if text is None else {"text": text}
    out = model.apply({"params": params}, z, logsnr, label, train=train, rngs=rngs, **kw)
    return process.to_x(prediction=prediction, output=out, z=z, logsnr=logsnr)

  return denoise


def _call(denoise: Denoise, params, z, logsnr, label, *, train, rng, text=None):
  """denoise(...) with text=... only when there is text."""
  if text is None:
    return denoise(params, z, logsnr, label, train=train, rng=rng)
  return denoise(params, z, logsnr, label, train=train, rng=rng, text=text)


def step_keys(rng, step):
  """(key_A, key_B) of a step; see the module docstring."""
  key = jax.random.fold_in(rng, step)
  return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def _teacher_fn(teacher_denoise, teacher_params, *, guidance, null_label, text=None):
  """fn(z, logsnr, label) -> the (guided) teacher's x_hat; with text, conditioned on it and guided
  against the zero text (conditioning.guided)."""
  if text is None:
    def fn(z, logsnr, label):
      return teacher_denoise(teacher_params, z, logsnr, label, train=False, rng=None)
    return samplers.guided(fn, guidance=float(guidance), null_label=null_label)

  def text_fn(z, logsnr, label, t):
    return teacher_denoise(teacher_params, z, logsnr, label, train=False, rng=None, text=t)
  return conditioning.bind_text(
      conditioning.guided(text_fn, guidance=float(guidance), null_label=null_label), text)


def draw(key, *, config, schedule: Schedule, denoise: Denoise, params, x, label, text=None):
  """Times, z_t, the student's x_tilde = g_eta(z_t) with its VJP, z_s and w(s) for one (half)
  batch (text: its text embeddings, or None). Returns (dict of arrays, vjp_fn of x_tilde w.r.t.
  params)."""
  k_time, k_eps, k_zs, k_drop = jax.random.split(key, 4)
  u_t, u_s = mm.sample_times(rng=k_time, batch=x.shape[0],
                             num_student_steps=int(config.num_student_steps),
                             time_sampling=config.time_sampling)
  logsnr_t = mm.logsnr_of_u(u_t, schedule=schedule, spacing=config.spacing)
  logsnr_s = mm.logsnr_of_u(u_s, schedule=schedule, spacing=config.spacing)
  z_t, _ = process.sample_z_t(rng=k_eps, x=x, logsnr=logsnr_t)
  x_tilde, vjp_fn = jax.vjp(
      lambda p: _call(denoise, p, z_t, logsnr_t, label, train=True, rng=k_drop, text=text), params)
  z_s = mm.sample_z_s(rng=k_zs, z_t=z_t, x_tilde=x_tilde, logsnr_s=logsnr_s, logsnr_t=logsnr_t,
                      eta=float(config.eta), unconditional=bool(config.unconditional_zs))
  w = mm.config_weight(config, logsnr_s)
  out = dict(x=x, label=label, text=text, z_t=z_t, logsnr_t=logsnr_t, logsnr_s=logsnr_s,
             x_tilde=x_tilde, z_s=z_s, w=w)
  return out, vjp_fn


def _grad_norm(tree):
  return optax.tree.norm(tree).astype(jnp.float32)


def _split_batch(batch, data_key):
  if data_key not in batch:
    raise ValueError(f"Batch has keys {sorted(batch)}; expected the data under {data_key!r}.")
  return batch[data_key], batch.get("label")


def _check_guidance(config, null_label, use_text=False):
  if float(config.guidance) != 0.0 and null_label is None and not use_text:
    raise ValueError("distill.guidance != 0 needs a condition: null_label (the model's "
                     "num_classes) or text (use_text=True).")


def _apply_student(state, grads, student_tx, ema_decay):
  updates, opt_state = student_tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = optim.ema_update(state.ema_params, params, decay=ema_decay)
  return state.replace(params=params, opt_state=opt_state, ema_params=ema)


# ----------------------------------------------------------------------------------------------
# Alternating variant (Algorithm 2)
# ----------------------------------------------------------------------------------------------

def make_alternating_step(*, config, denoise: Denoise, schedule: Schedule,
                          student_tx: optax.GradientTransformation,
                          aux_tx: optax.GradientTransformation,
                          teacher_denoise: Denoise | None = None, data_key: str = "x",
                          null_label: int | None = None, use_text: bool = False,
                          phase: str | None = None):
  """step(state, teacher_params, batch, rng) -> (state, metrics) for the alternating variant.
  use_text: all networks are conditioned on batch['text'] (see the module docstring).

  phase (update_schedule='alternate' only): None = one program that picks the auxiliary update
  (even state.step) or the student update (odd) with lax.cond on the device; 'aux' or 'student'
  = the program of that update alone, for a caller that picks by step parity on the host
  (distill.alternate_dispatch='host'). Both give the same updates."""
  mm.validate_config(config)
  _check_guidance(config, null_label, use_text)
  if phase not in (None,) + PHASES:
    raise ValueError(f"phase={phase!r} is not one of {(None,) + PHASES}.")
  if phase is not None and config.update_schedule != "alternate":
    raise ValueError("phase applies to update_schedule='alternate' only.")
  teacher_denoise = denoise if teacher_denoise is None else teacher_denoise
  terms = mm.parse_aux_terms(config.aux_terms)
  schedule_kind = config.update_schedule
  ema_decay = float(config.ema_decay)

  def aux_value_and_grad(aux_params, d, g_teacher, key):
    k_drop, k_data = jax.random.split(key)

    def loss_fn(phi):
      g_aux = _call(denoise, phi, d["z_s"], d["logsnr_s"], d["label"], train=True, rng=k_drop,
                    text=d["text"])
      extra = {}
      if "data" in terms:
        w_t = mm.config_weight(config, d["logsnr_t"])
        extra = dict(x_data=d["x"], w_data=w_t,
                     g_aux_data=_call(denoise, phi, d["z_t"], d["logsnr_t"], d["label"],
                                      train=True, rng=k_data, text=d["text"]))
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

  def step(state: DistillState, teacher_params, batch, rng):
    x, label = _split_batch(batch, data_key)
    text = conditioning.batch_text(batch, use_text=use_text)
    _, key = step_keys(rng, state.step)
    k_draw, k_aux = jax.random.split(key)
    teacher = _teacher_fn(teacher_denoise, teacher_params, guidance=config.guidance,
                          null_label=null_label, text=text)
    d, vjp_fn = draw(k_draw, config=config, schedule=schedule, denoise=denoise,
                     params=state.params, x=x, label=label, text=text)
    g_teacher = jax.lax.stop_gradient(teacher(d["z_s"], d["logsnr_s"], label))

    def update_aux(state):
      (aux_l, g_aux), grads = aux_value_and_grad(state.aux_params, d, g_teacher, k_aux)
      updates, aux_opt = aux_tx.update(grads, state.aux_opt_state, state.aux_params)
      state = state.replace(aux_params=optax.apply_updates(state.aux_params, updates),
                            aux_opt_state=aux_opt)
      return state, aux_l, g_aux, _grad_norm(grads)

    def update_student(state, g_aux):
      grads = student_grads(d, vjp_fn, g_aux, g_teacher)
      return _apply_student(state, grads, student_tx, ema_decay), _grad_norm(grads)

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
        g_aux = _call(denoise, state.aux_params, d["z_s"], d["logsnr_s"], label, train=True,
                      rng=jax.random.fold_in(k_aux, 7), text=text)
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


# ----------------------------------------------------------------------------------------------
# Parameter-space variant (Algorithm 3)
# ----------------------------------------------------------------------------------------------

def teacher_grad_on_samples(*, teacher_denoise: Denoise, teacher_params, d, config,
                            null_label=None):
  """g_A = grad_theta mean_A w(s) |sg(x_tilde) - g_theta(z_s)|^2 / D (teacher backward, params
  only). Returns (g_A, loss value)."""
  def loss(theta):
    teacher = _teacher_fn(teacher_denoise, theta, guidance=config.guidance,
                          null_label=null_label, text=d.get("text"))
    g = teacher(d["z_s"], d["logsnr_s"], d["label"])
    return jnp.mean(mm.teacher_loss_on_samples(x_tilde=d["x_tilde"], g_teacher=g, w=d["w"]))

  value, grads = jax.value_and_grad(loss)(teacher_params)
  return grads, value


def make_parameter_space_step(*, config, denoise: Denoise, schedule: Schedule,
                              student_tx: optax.GradientTransformation,
                              teacher_denoise: Denoise | None = None, data_key: str = "x",
                              null_label: int | None = None, use_text: bool = False):
  """step(state, teacher_params, batch, rng, precond=None) -> (state, metrics).

  The batch is split into independent halves A (first half) and B (second half); precond is
  Lambda, a teacher-params-shaped tree (None = identity), see distill.preconditioners.
  use_text: all networks are conditioned on batch['text'] (see the module docstring).
  """
  mm.validate_config(config)
  _check_guidance(config, null_label, use_text)
  teacher_denoise = denoise if teacher_denoise is None else teacher_denoise
  ema_decay = float(config.ema_decay)
  nu_decay = float(config.nu_ema)

  def step(state: DistillState, teacher_params, batch, rng, precond=None):
    x, label = _split_batch(batch, data_key)
    n = x.shape[0]
    if n % 2 or n < 2:
      raise ValueError(f"The parameter-space step splits the batch in two halves; got batch {n}.")
    half = n // 2
    label_a = None if label is None else label[:half]
    label_b = None if label is None else label[half:]
    text = conditioning.batch_text(batch, use_text=use_text)
    text_a = None if text is None else text[:half]
    text_b = None if text is None else text[half:]
    key_a, key_b = step_keys(rng, state.step)
    k_draw_b = jax.random.split(key_b)[0]
    k_draw_a = jax.random.split(key_a)[0]
    d_a, _ = draw(k_draw_a, config=config, schedule=schedule, denoise=denoise,
                  params=state.params, x=x[:half], label=label_a, text=text_a)
    d_a = jax.tree_util.tree_map(jax.lax.stop_gradient, d_a)
    d_b, vjp_fn = draw(k_draw_b, config=config, schedule=schedule, denoise=denoise,
                       params=state.params, x=x[half:], label=label_b, text=text_b)

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
      teacher = _teacher_fn(teacher_denoise, theta, guidance=config.guidance,
                            null_label=null_label, text=text_b)
      return teacher(d_b["z_s"], d_b["logsnr_s"], label_b)

    _, jvp_out = jax.jvp(teacher_at_b, (teacher_params,), (nu,))

    def loss_of_x(x_tilde):
      return jnp.mean(mm.parameter_space_student_loss(x_tilde=x_tilde, jvp_out=jvp_out,
                                                      w=d_b["w"]))

    (grads,) = vjp_fn(jax.grad(loss_of_x)(d_b["x_tilde"]))
    new_state = _apply_student(state, grads, student_tx, ema_decay)
    metrics = {
        "teacher_loss_on_samples": teacher_l.astype(jnp.float32),
        "teacher_grad_norm": _grad_norm(g_a),
        "nu_norm": _grad_norm(nu),
        "jvp_rms": jnp.sqrt(jnp.mean(jnp.square(jvp_out))),
        "student_grad_norm": _grad_norm(grads),
        "x_tilde_rms": jnp.sqrt(jnp.mean(jnp.square(d_b["x_tilde"]))),
    }
    return new_state.replace(step=state.step + 1, nu_ema=new_nu_ema), metrics

  return step


def make_distill_step(*, config, denoise: Denoise, schedule: Schedule,
                      student_tx: optax.GradientTransformation,
                      aux_tx: optax.GradientTransformation | None = None,
                      teacher_denoise: Denoise | None = None, data_key: str = "x",
                      null_label: int | None = None, use_text: bool = False,
                      phase: str | None = None):
  """The step of config.variant (see make_alternating_step / make_parameter_space_step)."""
  mm.validate_config(config)
  if config.variant == "alternating":
    if aux_tx is None:
      raise ValueError("The alternating variant needs aux_tx (the auxiliary's optimizer).")
    return make_alternating_step(config=config, denoise=denoise, schedule=schedule,
                                 student_tx=student_tx, aux_tx=aux_tx,
                                 teacher_denoise=teacher_denoise, data_key=data_key,
                                 null_label=null_label, use_text=use_text, phase=phase)
  return make_parameter_space_step(config=config, denoise=denoise, schedule=schedule,
                                   student_tx=student_tx, teacher_denoise=teacher_denoise,
                                   data_key=data_key, null_label=null_label, use_text=use_text)


# ----------------------------------------------------------------------------------------------
# The student's k-step sampler
# ----------------------------------------------------------------------------------------------

def make_student_sampler(*, config, denoise: Denoise, schedule: Schedule,
                         num_steps: int | None = None, clip: float | None = None,
                         guidance: float = 0.0, null_label: int | None = None):
  """sample(params, rng, *, shape, label=None, text=None) -> x: the k-step ancestral sampler
  (samplers.sample with eta = config.eta and the config's grid spacing) with the student as
  denoise_fn, conditioned on text (f32[B, L, D]) when given. Jit it with
  static_argnames="shape". With k = 1 it returns g_eta(z_1).

  The student is distilled from the guided teacher (distill.guidance) and is normally sampled
  unguided; guidance != 0 guides the student itself against the null class `null_label` and/or
  the zero text (conditioning.guided), for ablations."""
  k = int(config.num_student_steps if num_steps is None else num_steps)

  def sample(params, rng, *, shape, label=None, text=None):
    if text is None and not guidance:
      def fn(z, logsnr, c):
        return denoise(params, z, logsnr, c, train=False, rng=None)
    else:
      def text_fn(z, logsnr, c, t):
        return _call(denoise, params, z, logsnr, c, train=False, rng=None, text=t)
      fn = conditioning.bind_text(
          conditioning.guided(text_fn, guidance=float(guidance), null_label=null_label), text)
    return samplers.sample(denoise_fn=fn, rng=rng, shape=shape, num_steps=k, schedule=schedule,
                           eta=float(config.eta), spacing=config.spacing, label=label,
                           clip=clip)

  return sample
