"""Moment-matching losses and steps: gradients against direct computations, the two variants'
agreement, the k-step sampler, and a short distillation on a Gaussian mixture (tiny
mmd_jax.models.mlp denoisers)."""
import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmd_jax.diffusion import process
from mmd_jax.diffusion.schedules import Schedule
from mmd_jax.distill import moment_matching as mm
from mmd_jax.distill import steps
from mmd_jax.evaluation import sample_metrics
from mmd_jax.models import gmm, mlp

SCHEDULE = Schedule()
D = 2
NUM_CLASSES = 3
GUIDANCE = 1.5
LABELS = jnp.array([0, 1, 2, 3, 1, 0, 2, 1], jnp.int32)  # includes the null label 3


def _model_and_params(seed, hidden=16, num_classes=NUM_CLASSES):
  """A small MLPDenoiser and numpy-initialised parameters (random everywhere, also where the
  model's own init has zeros; shapes from eval_shape, so no init compile)."""
  model = mlp.MLPDenoiser(hidden=hidden, depth=1, mlp_mult=1, num_classes=num_classes)
  label = jnp.zeros((1,), jnp.int32) if num_classes else None
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, D)), jnp.zeros((1,)), label, train=False)["params"]))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = rng.standard_normal(leaf.shape)
    if len(leaf.shape) == 2:
      return jnp.asarray(noise / np.sqrt(leaf.shape[0]), jnp.float32)
    base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
    return jnp.asarray(base + 0.3 * noise, jnp.float32)

  return model, jax.tree_util.tree_map_with_path(fill, shapes)


def _perturb(params, seed, scale=0.05):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: p + jnp.asarray(scale * rng.standard_normal(p.shape), jnp.float32), params)


def _config(**overrides):
  c = mm.default_config()
  c.num_student_steps = 4
  c.update(overrides)
  return c


@functools.lru_cache(maxsize=None)
def _sgd_alternating_step(guidance):
  """The jitted alternating step ('both') of the 'v'-predicting class-conditional MLP with
  SGD(1): its update is exactly -grad."""
  model, _ = _model_and_params(0)
  sgd = optax.sgd(1.0)
  config = _config(update_schedule="both", guidance=guidance)
  step = jax.jit(steps.make_alternating_step(config=config, denoise=steps.make_x_predictor(
      model, "v"), schedule=SCHEDULE, student_tx=sgd, aux_tx=sgd, null_label=NUM_CLASSES))
  return step, config, sgd


def _delta(old, new):
  return jax.tree_util.tree_map(lambda a, b: a - b, old, new)


def test_student_gradient_is_weighted_jacobian_transpose_of_the_moment_gap():
  model, theta = _model_and_params(0)
  denoise = steps.make_x_predictor(model, "v")
  eta, phi = _perturb(theta, 1), _perturb(theta, 2)
  step, config, sgd = _sgd_alternating_step(GUIDANCE)
  state = steps.init_distill_state(config=config, init_params=eta, student_tx=sgd, aux_tx=sgd)
  state = state.replace(aux_params=phi)
  x = jax.random.normal(jax.random.PRNGKey(3), (8, D))
  rng = jax.random.PRNGKey(4)
  new_state, metrics = step(state, theta, {"x": x, "label": LABELS}, rng)
  got = _delta(eta, new_state.params)

  # Direct: the step's draws rebuilt from raw jax.random calls (never steps.draw), then
  # w(s) (d x_tilde / d eta)^T (g_phi - g_theta^w) / (B D) with the guided teacher
  # g^w = g(c) + w (g(c) - g(null)). Keys (steps.py module docstring and draw()):
  # key_B = fold_in(fold_in(rng, step=0), 1); k_draw = split(key_B)[0];
  # k_time, k_eps, k_zs, k_drop = split(k_draw, 4); r1, r2 = split(k_time) ('grid' times, k = 4):
  # u_t = randint(r1, 1..k) / k, u_s = max(u_t - (1 - U(r2)) / k, 0); 'uniform_t' spacing on
  # the cosine schedule; z_t = alpha_t x + sigma_t N(k_eps); z_s = posterior mean + std N(k_zs)
  # (eta = 1, design-note form); w = 'auto' at k = 4 = snr_plus_one at logsnr_s.
  k = int(config.num_student_steps)
  assert (mm.resolve_time_sampling(config), config.spacing, config.eta, config.weighting) == (
      "grid", "uniform_t", 1.0, "auto") and k == 4

  def logsnr_of_t(t):  # cosine schedule on [-15, 15], written out
    b = np.arctan(np.exp(-0.5 * 15.0))
    a = np.arctan(np.exp(0.5 * 15.0)) - b
    return -2.0 * jnp.log(jnp.tan(a * t + b))

  def alpha_sigma(logsnr):
    return (jnp.sqrt(jax.nn.sigmoid(logsnr))[:, None], jnp.sqrt(jax.nn.sigmoid(-logsnr))[:, None])

  @jax.jit
  def direct(eta, phi, theta):
    key_b = jax.random.fold_in(jax.random.fold_in(rng, 0), 1)
    k_draw = jax.random.split(key_b)[0]
    k_time, k_eps, k_zs, k_drop = jax.random.split(k_draw, 4)
    r1, r2 = jax.random.split(k_time)
    u_t = jax.random.randint(r1, (8,), 1, k + 1).astype(jnp.float32) / k
    u_s = jnp.maximum(u_t - (1.0 - jax.random.uniform(r2, (8,))) / k, 0.0)
    logsnr_t, logsnr_s = logsnr_of_t(u_t), logsnr_of_t(u_s)
    a_t, s_t = alpha_sigma(logsnr_t)
    a_s, s_s = alpha_sigma(logsnr_s)
    z_t = a_t * x + s_t * jax.random.normal(k_eps, x.shape)
    student = lambda p: denoise(p, z_t, logsnr_t, LABELS, train=True, rng=k_drop)
    x_tilde = student(eta)
    a_ts, s_ts2 = a_t / a_s, s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2
    var = 1.0 / (1.0 / s_s ** 2 + a_ts ** 2 / s_ts2)
    mean = var * (a_ts / s_ts2 * z_t + a_s / s_s ** 2 * x_tilde)
    z_s = mean + jnp.sqrt(var) * jax.random.normal(k_zs, x.shape)
    w = 1.0 + 1.0 / (jnp.exp(-logsnr_s) + np.exp(-5.0))
    jac = jax.jacobian(student)(eta)
    cond = denoise(theta, z_s, logsnr_s, LABELS)
    null = denoise(theta, z_s, logsnr_s, jnp.full_like(LABELS, NUM_CLASSES))
    gap = denoise(phi, z_s, logsnr_s, LABELS) - (cond + GUIDANCE * (cond - null))
    coef = w[:, None] * gap / (8 * D)
    return jax.tree_util.tree_map(lambda j: jnp.tensordot(coef, j, axes=2), jac)

  want = direct(eta, phi, theta)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-7)
  assert float(jnp.abs(jax.tree_util.tree_leaves(want)[0]).max()) > 1e-6
  assert set(metrics) >= {"moment_gap", "aux_loss", "student_grad_norm"}
  assert not np.allclose(jax.tree_util.tree_leaves(new_state.aux_params)[0],
                         jax.tree_util.tree_leaves(phi)[0])


def test_alternate_schedule_host_phases_match_the_device_cond():
  """update_schedule='alternate': the auxiliary moves on even steps, the student on odd ones;
  the two host-dispatched programs (distill.alternate_dispatch='host') give the lax.cond
  program's updates."""
  model, theta = _model_and_params(0)
  denoise = steps.make_x_predictor(model, "v")
  sgd = optax.sgd(1.0)
  config = _config(update_schedule="alternate")
  assert steps.step_phases(config) == ("aux", "student")
  assert steps.step_phases(_config(update_schedule="alternate", alternate_dispatch="device")) == (
      None,)
  make = lambda phase: jax.jit(steps.make_alternating_step(
      config=config, denoise=denoise, schedule=SCHEDULE, student_tx=sgd, aux_tx=sgd,
      null_label=NUM_CLASSES, phase=phase))
  cond, host = make(None), [make("aux"), make("student")]
  state = steps.init_distill_state(config=config, init_params=_perturb(theta, 1), student_tx=sgd,
                                   aux_tx=sgd)
  batch = {"x": jax.random.normal(jax.random.PRNGKey(3), (8, D)), "label": LABELS}
  rng = jax.random.PRNGKey(4)
  a, b = state, state
  leaf = lambda tree: np.asarray(jax.tree_util.tree_leaves(tree)[0])
  for i in range(2):
    before = a
    a, ma = cond(a, theta, batch, rng)
    b, mb = host[i % 2](b, theta, batch, rng)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    assert float(ma["student_updated"]) == float(mb["student_updated"]) == float(i % 2)
    moved, kept = ("aux_params", "params") if i % 2 == 0 else ("params", "aux_params")
    assert not np.allclose(leaf(getattr(a, moved)), leaf(getattr(before, moved)))
    np.testing.assert_array_equal(leaf(getattr(a, kept)), leaf(getattr(before, kept)))
  with pytest.raises(ValueError, match="update_schedule='alternate' only"):
    steps.make_alternating_step(config=_config(), denoise=denoise, schedule=SCHEDULE,
                                student_tx=sgd, aux_tx=sgd, phase="aux")


def test_parameter_space_gradient_equals_alternating_gradient_with_instant_auxiliary():
  model, theta = _model_and_params(0)
  denoise = steps.make_x_predictor(model, "v")
  eta = _perturb(theta, 1, scale=0.1)
  # Unguided: with guidance the auxiliary (an unguided network) is not the instant auxiliary.
  # nu_ema = 0.99: at step 0 the bias-corrected EMA of nu is nu itself, so this also checks
  # the correction.
  config = _config(variant="parameter_space", nu_ema=0.99)
  sgd = optax.sgd(1.0)
  x = jax.random.normal(jax.random.PRNGKey(5), (16, D))
  xa, xb = x[:8], x[8:]
  labels = jnp.concatenate([LABELS[::-1], LABELS])
  rng = jax.random.PRNGKey(6)
  lam_rng = np.random.default_rng(0)
  lam = jax.tree_util.tree_map(
      lambda p: jnp.asarray(lam_rng.uniform(0.5, 2.0, p.shape), jnp.float32), theta)

  ps_step = jax.jit(steps.make_parameter_space_step(config=config, denoise=denoise,
                                                    schedule=SCHEDULE, student_tx=sgd,
                                                    null_label=NUM_CLASSES))
  state = steps.init_distill_state(config=config, init_params=eta, student_tx=sgd)
  ps_state, _ = ps_step(state, theta, {"x": x, "label": labels}, rng, lam)
  ps_grad = _delta(eta, ps_state.params)

  # The instant auxiliary phi = theta - eps Lambda g_A, with g_A from the same half-A draws.
  @jax.jit
  def grad_a(eta, theta):
    key_a, _ = steps.step_keys(rng, 0)
    d_a, _ = steps.draw(jax.random.split(key_a)[0], config=config, schedule=SCHEDULE,
                        denoise=denoise, params=eta, x=xa, label=labels[:8])
    return steps.teacher_grad_on_samples(teacher_denoise=denoise, teacher_params=theta, d=d_a,
                                         config=config, null_label=NUM_CLASSES)[0]

  g_a = grad_a(eta, theta)
  eps = 1e-2 / float(optax.tree.norm(g_a))
  phi = jax.tree_util.tree_map(lambda t, l, g: t - eps * l * g, theta, lam, g_a)
  alt_step, alt_config, _ = _sgd_alternating_step(0.0)
  alt_state = steps.init_distill_state(config=alt_config, init_params=eta, student_tx=sgd,
                                       aux_tx=sgd).replace(aux_params=phi)
  alt_state, _ = alt_step(alt_state, theta, {"x": xb, "label": labels[8:]}, rng)
  alt_grad = jax.tree_util.tree_map(lambda g: g / eps, _delta(eta, alt_state.params))

  flat_ps = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(ps_grad)])
  flat_alt = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(alt_grad)])
  assert np.linalg.norm(flat_ps) > 0
  rel = np.linalg.norm(flat_ps - flat_alt) / np.linalg.norm(flat_ps)
  assert rel < 2e-2, rel


def test_k1_student_sampler_returns_the_student_at_pure_noise():
  model, params = _model_and_params(0)
  denoise = steps.make_x_predictor(model, "eps")
  sampler = steps.make_student_sampler(config=_config(num_student_steps=1), denoise=denoise,
                                       schedule=SCHEDULE)
  rng = jax.random.PRNGKey(7)
  got = sampler(params, rng, shape=(8, D), label=LABELS)
  z1 = jax.random.normal(jax.random.split(rng)[0], (8, D))
  want = jax.jit(denoise)(params, z1, jnp.full((8,), SCHEDULE.logsnr(1.0)), LABELS)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_time_sampling_and_weights():
  times = jax.jit(mm.sample_times, static_argnames=("batch", "num_student_steps",
                                                   "time_sampling"))
  u_t, u_s = times(rng=jax.random.PRNGKey(0), batch=4000, num_student_steps=4,
                   time_sampling="grid")
  np.testing.assert_allclose(np.unique(np.asarray(u_t)), [0.25, 0.5, 0.75, 1.0])
  assert np.all(u_s < u_t) and np.all(u_s >= u_t - 0.25 - 1e-6)
  u_t, u_s = times(rng=jax.random.PRNGKey(1), batch=4000, num_student_steps=4,
                   time_sampling="continuous")
  assert np.all(u_t >= u_s) and np.all(u_t - u_s <= 0.25 + 1e-6) and np.all(u_t <= 1.0)
  w = mm.weight(weighting="snr_plus_one", logsnr=jnp.array([-15.0, 0.0, 15.0]))
  np.testing.assert_allclose(w, [1.0, 1.0 + 1.0 / (1.0 + np.exp(-5.0)), 1.0 + np.exp(5.0)],
                             rtol=1e-3)
  with pytest.raises(ValueError, match="time_sampling"):
    mm.validate_config(_config(time_sampling="grd"))
  # The default 'auto': continuous times for a one-step student (grid times collapse it on the
  # 16-D mixture, README), the student's own grid otherwise.
  assert mm.default_config().time_sampling == "auto"
  assert [mm.resolve_time_sampling(_config(num_student_steps=k)) for k in (1, 2, 8)] == [
      "continuous", "grid", "grid"]
  assert mm.resolve_time_sampling(_config(num_student_steps=1, time_sampling="grid")) == "grid"


def test_short_distillation_on_a_mixture_reduces_sliced_w2():
  mix = types.SimpleNamespace(weights=[0.5, 0.5], means=[[-1.5, 0.0], [1.5, 0.5]],
                              stds=[[0.2, 0.3], [0.3, 0.2]])
  teacher_params = gmm.gmm_params(mix)
  teacher = gmm.make_denoiser()
  model, params = _model_and_params(0, hidden=48, num_classes=0)
  denoise = steps.make_x_predictor(model, "v")
  data_rng = np.random.default_rng(0)

  def sample_data(n):
    comp = data_rng.choice(2, size=n, p=mix.weights)
    return (np.asarray(mix.means)[comp]
            + np.asarray(mix.stds)[comp] * data_rng.standard_normal((n, D))).astype(np.float32)

  # Initialise the student by regression onto the exact denoiser (what a trained teacher is).
  reg_tx = optax.adam(3e-3)

  @jax.jit
  def regress(params, opt_state, x, key):
    k1, k2 = jax.random.split(key)
    logsnr = SCHEDULE.logsnr(jax.random.uniform(k1, (x.shape[0],)))
    z, _ = process.sample_z_t(rng=k2, x=x, logsnr=logsnr)
    target = teacher(teacher_params, z, logsnr)
    loss = lambda p: jnp.mean(jnp.square(denoise(p, z, logsnr, None) - target))
    grads = jax.grad(loss)(params)
    updates, opt_state = reg_tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = reg_tx.init(params)
  for i in range(300):
    params, opt_state = regress(params, opt_state, sample_data(256), jax.random.PRNGKey(i))

  config = _config(num_student_steps=1, ema_decay=0.0)
  tx = optax.adam(1e-3, b1=0.0, b2=0.99)
  step = jax.jit(steps.make_alternating_step(config=config, denoise=denoise, schedule=SCHEDULE,
                                             student_tx=tx, aux_tx=tx, teacher_denoise=teacher))
  sampler = jax.jit(steps.make_student_sampler(config=config, denoise=denoise, schedule=SCHEDULE),
                    static_argnames="shape")
  ref = sample_data(2000)
  before = sample_metrics.sliced_wasserstein2(
      np.asarray(sampler(params, jax.random.PRNGKey(1), shape=(2000, D))), ref)
  state = steps.init_distill_state(config=config, init_params=params, student_tx=tx, aux_tx=tx)
  rng = jax.random.PRNGKey(2)
  for _ in range(300):
    state, metrics = step(state, teacher_params, {"x": sample_data(256), "label": None}, rng)
  after = sample_metrics.sliced_wasserstein2(
      np.asarray(sampler(state.params, jax.random.PRNGKey(1), shape=(2000, D))), ref)
  assert np.isfinite(float(metrics["moment_gap"]))
  assert after < 0.5 * before, (before, after)
