"""Regression tests for two fidelity bugs of the distillation:

1. The squared-gradient preconditioner Lambda of the parameter-space variant was estimated with
   the UNGUIDED teacher on real labels, so the null-class row of the class table (the one
   classifier-free guidance uses) got v = 0 and Lambda = 1 / eps = 1e8, while under guidance
   g_A is nonzero there: nu = -Lambda g_A was almost all null row.
2. Under update_schedule='alternate' the auxiliary (even steps) and the student (odd steps) each
   count only their own updates, but their schedules were built over num_steps counts: the
   cosine ended at about half of the run's schedule and the warmup lasted twice as long.

Tiny class-conditional mmd_jax.models.mlp denoisers; five compiles in all.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmd_jax.diffusion.schedules import Schedule
from mmd_jax.distill import moment_matching as mm
from mmd_jax.distill import preconditioners, steps
from mmd_jax.models import mlp
from mmd_jax.training import optim

SCHEDULE = Schedule()
D = 4
NUM_CLASSES = 3
# Lambda = 1 / (sqrt(v + damping * median(v)) + eps) with damping = 1e-2 (the default of
# distill.precond_damping): Lambda is decreasing and convex in v, so max Lambda / median Lambda
# <= sqrt((1 + damping) / damping) = 10.05.
MAX_LAMBDA_OVER_MEDIAN = math.sqrt(1.01 / 0.01) * (1 + 1e-4)


def _model_and_params(seed, hidden=8):
  """A small class-conditional MLPDenoiser and numpy-initialised parameters (random everywhere,
  also where the model's own init has zeros; shapes from eval_shape, so no init compile)."""
  model = mlp.MLPDenoiser(hidden=hidden, depth=1, mlp_mult=1, num_classes=NUM_CLASSES)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, D)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32),
      train=False)["params"]))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = rng.standard_normal(leaf.shape)
    if len(leaf.shape) == 2:
      return jnp.asarray(noise / np.sqrt(leaf.shape[0]), jnp.float32)
    base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
    return jnp.asarray(base + 0.3 * noise, jnp.float32)

  return model, jax.tree_util.tree_map_with_path(fill, shapes)


def _perturb(params, seed, scale=0.1):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: p + jnp.asarray(scale * rng.standard_normal(p.shape), jnp.float32), params)


def _config(**overrides):
  c = mm.default_config()
  c.num_student_steps = 4
  c.update(overrides)
  return c


def _real_batch(seed, n):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.standard_normal((n, D)), jnp.float32),
          # real labels: never the null class NUM_CLASSES
          "label": jnp.asarray(rng.integers(0, NUM_CLASSES, n), jnp.int32)}


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree_util.tree_leaves(tree)])


def _assert_lambda_bounded(lam):
  flat = _flat(lam)
  assert np.all(np.isfinite(flat)) and np.all(flat > 0), flat
  ratio = float(flat.max() / np.median(flat))
  assert ratio <= MAX_LAMBDA_OVER_MEDIAN, (
      f"max Lambda / median Lambda = {ratio:.4g} > {MAX_LAMBDA_OVER_MEDIAN:.4g} "
      f"(max {flat.max():.4g}, median {np.median(flat):.4g})")


def _null_row(tree):
  return tree["cond_embed"]["class_embed"]["embedding"][NUM_CLASSES]


def test_guided_squared_grad_preconditioner_is_bounded_and_nu_is_not_the_null_row():
  """guidance 2, parameter-space variant: Lambda (estimated as the distillation loop must call
  it: guided teacher, null label, condition dropout) is finite and at most 10.05x its median
  everywhere, and no row of the class table (the null-class row in particular) carries 25% of
  ||nu||^2 for nu = -Lambda g_A with g_A the guided teacher's gradient on student samples (the
  null row carried 100% with the old Lambda = 1e8 there, 88% with the damping floor alone and
  the unguided estimate, 0.06% now)."""
  model, theta = _model_and_params(0)
  denoise = steps.make_x_predictor(model, "v")
  config = _config(variant="parameter_space", guidance=2.0, precond_batches=2)
  lam = jax.jit(lambda p, b, r: preconditioners.squared_grad_preconditioner(
      denoise=denoise, teacher_params=p, batch=b, rng=r, config=config, schedule=SCHEDULE,
      null_label=NUM_CLASSES, cond_drop_prob=0.1))(theta, _real_batch(1, 64),
                                                   jax.random.PRNGKey(2))
  _assert_lambda_bounded(lam)

  # g_A as the parameter-space step computes it: half A drawn from a student near the teacher.
  half = _real_batch(3, 32)

  @jax.jit
  def grad_a(eta, theta):
    d, _ = steps.draw(jax.random.PRNGKey(4), config=config, schedule=SCHEDULE, denoise=denoise,
                      params=eta, x=half["x"], label=half["label"])
    d = jax.tree_util.tree_map(jax.lax.stop_gradient, d)
    return steps.teacher_grad_on_samples(teacher_denoise=denoise, teacher_params=theta, d=d,
                                         config=config, null_label=NUM_CLASSES)[0]

  g_a = grad_a(_perturb(theta, 5), theta)
  assert float(jnp.linalg.norm(_null_row(g_a))) > 0  # the premise: guidance reaches the null row
  nu = jax.tree_util.tree_map(lambda l, g: -l * g, lam, g_a)
  total = float(np.sum(np.square(_flat(nu))))
  null_share = float(jnp.sum(jnp.square(_null_row(nu)))) / total
  assert null_share < 0.25, f"the null-class row carries {null_share:.3%} of ||nu||^2"
  row_shares = np.sum(np.square(np.asarray(nu["cond_embed"]["class_embed"]["embedding"])),
                      axis=1) / total
  assert row_shares.max() < 0.25, f"class-table rows' shares of ||nu||^2: {row_shares}"

  # Guidance without a null class is refused (it would silently estimate the unguided teacher).
  with pytest.raises(ValueError, match="null_label"):
    preconditioners.squared_grad_preconditioner(
        denoise=denoise, teacher_params=theta, batch=_real_batch(1, 64),
        rng=jax.random.PRNGKey(2), config=config, schedule=SCHEDULE)


def test_squared_grad_preconditioner_has_a_damping_floor():
  """Called as before (no guidance, no condition dropout, no new arguments): parameters the
  real-data gradient never reaches (here the null-class row) get a bounded Lambda (at most
  10.05x the median), not 1 / eps = 1e8."""
  model, theta = _model_and_params(0)
  denoise = steps.make_x_predictor(model, "v")
  config = _config(variant="parameter_space", precond_batches=2)
  lam = jax.jit(lambda p, b, r: preconditioners.squared_grad_preconditioner(
      denoise=denoise, teacher_params=p, batch=b, rng=r, config=config, schedule=SCHEDULE))(
          theta, _real_batch(1, 64), jax.random.PRNGKey(2))
  _assert_lambda_bounded(lam)


def test_alternate_update_schedule_learning_rates_follow_the_training_step():
  """update_schedule='alternate' (the host-dispatched phase programs, as the loop runs them):
  the auxiliary updates on steps 0, 2, 4, 6 and the student on steps 1, 3, 5 of a 7-step run,
  and each update uses the learning rate that the run's schedule (over num_steps training
  steps, warmup_steps training steps of warmup) has at that training step; so the update on the
  last training step uses the schedule's end value, base(num_steps - 1), and the other
  optimizer's last update base(num_steps - 2).

  The applied learning rate is read off the update: with Adam b1 = b2 = 0 and a negligible eps,
  an update is -lr * sign(g), so lr = max |delta params|."""
  num_steps, lr, aux_scale = 7, 0.1, 0.5
  model, theta = _model_and_params(0)
  denoise = steps.make_x_predictor(model, "v")
  config = _config(update_schedule="alternate", num_steps=num_steps, aux_lr_scale=aux_scale,
                   ema_decay=0.0)
  config.optim.update(learning_rate=lr, warmup_steps=3, schedule="cosine", b1=0.0, b2=0.0,
                      eps=1e-30, weight_decay=0.0, grad_clip=0.0)
  student_tx, aux_tx = steps.make_optimizers(config)
  phases = steps.step_phases(config)
  assert phases == ("aux", "student")
  programs = [jax.jit(steps.make_distill_step(
      config=config, denoise=denoise, schedule=SCHEDULE, student_tx=student_tx, aux_tx=aux_tx,
      null_label=NUM_CLASSES, phase=phase)) for phase in phases]
  state = steps.init_distill_state(config=config, init_params=_perturb(theta, 1),
                                   student_tx=student_tx, aux_tx=aux_tx)
  batch, rng = _real_batch(2, 16), jax.random.PRNGKey(3)
  base = optim.learning_rate_schedule(config.optim, total_steps=num_steps)
  got, want = [], []
  for step in range(num_steps):
    new_state, _ = programs[step % len(programs)](state, theta, batch, rng)
    moved = "aux_params" if step % 2 == 0 else "params"
    delta = _flat(getattr(new_state, moved)) - _flat(getattr(state, moved))
    got.append(float(np.abs(delta).max()))
    want.append(float(base(step)) * (aux_scale if step % 2 == 0 else 1.0))
    state = new_state
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7,
                             err_msg="applied learning rate per training step 0..6 "
                                     "(aux on even steps, student on odd)")
  # The last updates: the auxiliary's (step 6) ends the schedule, the student's is step 5.
  np.testing.assert_allclose(got[-1], aux_scale * float(base(num_steps - 1)), rtol=1e-4)
  np.testing.assert_allclose(got[-2], float(base(num_steps - 2)), rtol=1e-4)

  # 'both' (the default) is unchanged: the plain schedule over num_steps counts, per update.
  both = _config(num_steps=num_steps, aux_lr_scale=aux_scale)
  both.optim.update(config.optim.to_dict())
  student_both, aux_both = steps.make_optimizers(both)
  params = {"w": jnp.zeros((3,))}
  for tx, scale in ((student_both, 1.0), (aux_both, aux_scale)):
    opt_state = tx.init(params)
    for count in range(num_steps):
      updates, opt_state = tx.update({"w": jnp.ones((3,))}, opt_state, params)
      np.testing.assert_allclose(-np.asarray(updates["w"]), scale * float(base(count)),
                                 rtol=1e-5, atol=1e-9)
