"""Paper-fidelity audit: every formula of the method against a direct computation written out here.

The reference side of each test is brute force, a hand derivative, or the formula in plain
jnp/numpy with raw jax.random draws that replicate the code's key derivation; it never calls the
function under test (design note: /work/shared/design/moment_matching.md).

Conventions written out once below:
  cosine schedule   logsnr(t) = -2 log tan(a t + b), b = atan(exp(-hi/2)), a = atan(exp(-lo/2)) - b
  alpha, sigma      alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr)
  DDIM-eta step     Song et al. 2021 eq. 12 with sigma_t(eta) of eq. 16, alpha-bar = alpha^2:
                    z_s = alpha_s x + sqrt(sigma_s^2 - c^2) (z_t - alpha_t x) / sigma_t + c noise,
                    c^2 = eta^2 (sigma_s^2 / sigma_t^2) (1 - alpha_t^2 / alpha_s^2).
                    The code's eta scales the STANDARD DEVIATION (c = eta * posterior std), as in
                    Song et al.; eta = 1 is the posterior q(z_s | z_t, x), eta = 0 DDIM.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmd_jax.diffusion import process, samplers
from mmd_jax.diffusion.schedules import Schedule
from mmd_jax.distill import moment_matching as mm
from mmd_jax.distill import preconditioners, steps
from mmd_jax.training import optim
from mmd_jax.training import steps as train_steps
from mmd_jax.training.state import TrainState

SCHEDULE = Schedule()  # cosine, logsnr in [-15, 15]
LO, HI = -15.0, 15.0
D = 3
H = 6
NUM_CLASSES = 3


# ----------------------------------------------------------------------------------------------
# Formulas written out (the reference side)
# ----------------------------------------------------------------------------------------------

def _logsnr_cosine(t):
  b = np.arctan(np.exp(-0.5 * HI))
  a = np.arctan(np.exp(-0.5 * LO)) - b
  return -2.0 * jnp.log(jnp.tan(a * jnp.asarray(t, jnp.float32) + b))


def _logsnr_cosine_np(t):
  b = np.arctan(np.exp(-0.5 * HI))
  a = np.arctan(np.exp(-0.5 * LO)) - b
  return -2.0 * np.log(np.tan(a * np.asarray(t, np.float64) + b))


def _logsnr_at(u, spacing):
  """logSNR at grid coordinate u (u = 1 pure noise): cosine(u), or linear in logSNR between the
  schedule's end points logsnr(t=0) and logsnr(t=1)."""
  if spacing == "uniform_t":
    return _logsnr_cosine(u)
  hi, lo = _logsnr_cosine(0.0), _logsnr_cosine(1.0)
  return hi + (lo - hi) * jnp.asarray(u, jnp.float32)


def _alpha_sigma(logsnr):
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def _ddim_eta_step(z_t, x, logsnr_s, logsnr_t, noise, eta, xp=jnp):
  """Song et al. 2021 eq. 12/16 in the alpha/sigma form (see the module docstring); xp=np
  computes it in float64."""
  if xp is np:
    z_t, x, noise = (np.asarray(a, np.float64) for a in (z_t, x, noise))
    sig = lambda l: 1.0 / (1.0 + np.exp(-np.asarray(l, np.float64)))
    a_s, s_s = np.sqrt(sig(logsnr_s))[:, None], np.sqrt(sig(-np.asarray(logsnr_s)))[:, None]
    a_t, s_t = np.sqrt(sig(logsnr_t))[:, None], np.sqrt(sig(-np.asarray(logsnr_t)))[:, None]
  else:
    a_s, s_s = (v[:, None] for v in _alpha_sigma(logsnr_s))
    a_t, s_t = (v[:, None] for v in _alpha_sigma(logsnr_t))
  c2 = eta ** 2 * (s_s ** 2 / s_t ** 2) * (1.0 - a_t ** 2 / a_s ** 2)
  eps_hat = (z_t - a_t * x) / s_t
  return a_s * x + xp.sqrt(s_s ** 2 - c2) * eps_hat + xp.sqrt(c2) * noise


def _snr_plus_one(logsnr):
  return 1.0 + 1.0 / (jnp.exp(-logsnr) + np.exp(-5.0))


def _tiny_params(seed):
  rng = np.random.default_rng(seed)
  f = lambda scale, *shape: jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
  return {"w1": f(0.7, D, H), "wl": f(0.3, H), "emb": f(0.5, NUM_CLASSES + 1, H),
          "b1": f(0.3, H), "w2": f(0.5, H, D), "b2": f(0.1, D)}


def _tiny_denoise(params, z, logsnr, label, *, train=False, rng=None):
  """A tiny class-conditional x-predictor with dropout (rate 0.25) when train and rng are given."""
  h = jnp.tanh(z @ params["w1"] + 0.1 * logsnr[:, None] * params["wl"] + params["emb"][label]
               + params["b1"])
  if train and rng is not None:
    h = jnp.where(jax.random.bernoulli(rng, 0.75, h.shape), h / 0.75, 0.0)
  return jnp.sqrt(jax.nn.sigmoid(logsnr))[:, None] * z + h @ params["w2"] + params["b2"]


def _perturb(tree, seed, scale=0.1):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: p + jnp.asarray(scale * rng.standard_normal(p.shape), jnp.float32), tree)


def _assert_tree_close(got, want, rtol, what=""):
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree_util.tree_leaves(want)):
    w = np.asarray(w)
    np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=rtol * np.abs(w).max() + 1e-12,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree_util.tree_leaves(tree)])


def _distill_config(**overrides):
  c = mm.default_config()
  c.num_student_steps = 4
  c.update(overrides)
  return c


# ----------------------------------------------------------------------------------------------
# 1. The auxiliary loss
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["student", "teacher", "student,teacher", " data , student ",
                                  "student,teacher,data"])
def test_aux_loss_values_and_gradients(spec):
  """aux_loss = w (|sg x~ - g_phi|^2 + |sg g_theta - g_phi|^2)/D [+ w_data |x - g_phi(z_t)|^2/D];
  gradient w.r.t. g_phi by hand, none through x~, g_theta, w (stop_gradient)."""
  terms = mm.parse_aux_terms(spec)
  assert terms == tuple(t.strip() for t in spec.split(","))
  g, xt, gt, xd, gd = np.random.default_rng(0).standard_normal((5, 4, D)).astype(np.float32)
  w, wd = np.array([0.5, 1.0, 2.0, 3.0], np.float32), np.array([1.5, 0.2, 1.0, 4.0], np.float32)

  want = np.zeros(4)
  want_grad_g, want_grad_gd = np.zeros((4, D)), np.zeros((4, D))
  if "student" in terms:
    want += w * np.mean((xt - g) ** 2, -1)
    want_grad_g += 2 * w[:, None] * (g - xt) / D
  if "teacher" in terms:
    want += w * np.mean((gt - g) ** 2, -1)
    want_grad_g += 2 * w[:, None] * (g - gt) / D
  if "data" in terms:
    want += wd * np.mean((xd - gd) ** 2, -1)
    want_grad_gd += 2 * wd[:, None] * (gd - xd) / D

  def total(g, xt, gt, w, gd):
    return jnp.sum(mm.aux_loss(g_aux=g, x_tilde=xt, g_teacher=gt, w=w, terms=terms, x_data=xd,
                               g_aux_data=gd, w_data=wd))

  got = mm.aux_loss(g_aux=g, x_tilde=xt, g_teacher=gt, w=w, terms=terms, x_data=xd,
                    g_aux_data=gd, w_data=wd)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  grads = jax.grad(total, argnums=(0, 1, 2, 3, 4))(g, xt, gt, w, gd)
  np.testing.assert_allclose(grads[0], want_grad_g, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads[4], want_grad_gd, rtol=1e-5, atol=1e-6)
  for stopped in grads[1:4]:
    np.testing.assert_array_equal(stopped, 0.0)


def test_student_teacher_and_parameter_space_losses_and_gradients():
  """student_loss = w <x~, sg(g_phi - g_theta)>/D (grad w (g_phi - g_theta)/D);
  teacher_loss_on_samples = w |sg x~ - g_theta|^2/D (grad 2 w (g_theta - x~)/D);
  parameter_space_student_loss = w <x~, sg d>/D; moment_gap = w |g_phi - g_theta|^2/D."""
  xt, ga, gt, jv = np.random.default_rng(1).standard_normal((4, 4, D)).astype(np.float32)
  w = np.array([0.5, 1.0, 2.0, 3.0], np.float32)
  v, (dx, dga, dgt) = jax.value_and_grad(
      lambda *a: jnp.sum(mm.student_loss(x_tilde=a[0], g_aux=a[1], g_teacher=a[2], w=w)),
      argnums=(0, 1, 2))(xt, ga, gt)
  np.testing.assert_allclose(v, np.sum(w * np.mean(xt * (ga - gt), -1)), rtol=1e-5)
  np.testing.assert_allclose(dx, w[:, None] * (ga - gt) / D, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(dga, 0.0)
  np.testing.assert_array_equal(dgt, 0.0)
  v, (dx, dgt) = jax.value_and_grad(
      lambda *a: jnp.sum(mm.teacher_loss_on_samples(x_tilde=a[0], g_teacher=a[1], w=w)),
      argnums=(0, 1))(xt, gt)
  np.testing.assert_allclose(v, np.sum(w * np.mean((xt - gt) ** 2, -1)), rtol=1e-5)
  np.testing.assert_allclose(dgt, 2 * w[:, None] * (gt - xt) / D, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(dx, 0.0)
  v, (dx, djv) = jax.value_and_grad(
      lambda *a: jnp.sum(mm.parameter_space_student_loss(x_tilde=a[0], jvp_out=a[1], w=w)),
      argnums=(0, 1))(xt, jv)
  np.testing.assert_allclose(v, np.sum(w * np.mean(xt * jv, -1)), rtol=1e-5)
  np.testing.assert_allclose(dx, w[:, None] * jv / D, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(djv, 0.0)
  np.testing.assert_allclose(mm.moment_gap(g_aux=ga, g_teacher=gt, w=w),
                             w * np.mean((ga - gt) ** 2, -1), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# 2. The posterior / DDIM-eta draw of z_s
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("logsnr_s,logsnr_t,eta", [(2.0, -1.0, 0.5), (-3.0, -12.0, 0.3),
                                                   (8.0, 7.5, 0.8), (1.0, -14.9, 0.5)])
def test_z_s_draw_with_eta_between_0_and_1_is_the_ddim_eta_step(logsnr_s, logsnr_t, eta):
  """sample_z_s / process.sample_step with 0 < eta < 1 against Song et al. eq. 12/16 with the
  same noise, and its mean/variance over many draws against the closed form
  N(alpha_s x + sqrt(sigma_s^2 - c^2) eps_hat, c^2), c = eta * posterior std (eta scales the std).
  Plus: eta = 1 gives the posterior q(z_s | z_t, x) of the design note (mean/var written out),
  and the unconditional ablation is alpha_s x + sigma_s noise."""
  n = 20000
  rng = np.random.default_rng(2)
  z_t1, x1 = rng.standard_normal((2, 1, D)).astype(np.float32)
  z_t, x = np.repeat(z_t1, n, 0), np.repeat(x1, n, 0)
  ls, lt = jnp.full((n,), logsnr_s), jnp.full((n,), logsnr_t)
  key = jax.random.PRNGKey(5)
  got = mm.sample_z_s(rng=key, z_t=z_t, x_tilde=x, logsnr_s=ls, logsnr_t=lt, eta=eta)
  noise = jax.random.normal(key, x.shape)
  want = _ddim_eta_step(z_t, x, np.full(n, logsnr_s), np.full(n, logsnr_t), noise, eta, xp=np)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  got_step = process.sample_step(z_t=z_t[:4], x=x[:4], logsnr_s=ls[:4], logsnr_t=lt[:4],
                                 noise=noise[:4], eta=eta)
  np.testing.assert_allclose(got_step, want[:4], rtol=1e-4, atol=1e-5)

  # Closed-form moments against the empirical ones of the code's draws.
  sig = lambda l: 1.0 / (1.0 + np.exp(-l))
  a_s, s_s = np.sqrt(sig(logsnr_s)), np.sqrt(sig(-logsnr_s))
  a_t, s_t = np.sqrt(sig(logsnr_t)), np.sqrt(sig(-logsnr_t))
  a_ts, s_ts2 = a_t / a_s, s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2
  post_var = 1.0 / (1.0 / s_s ** 2 + a_ts ** 2 / s_ts2)
  c2 = eta ** 2 * post_var
  mean = a_s * x1[0] + np.sqrt(s_s ** 2 - c2) * (z_t1[0] - a_t * x1[0]) / s_t
  emp = np.asarray(got, np.float64)
  np.testing.assert_allclose(emp.mean(0), mean, atol=5 * np.sqrt(c2 / n) + 1e-5)
  np.testing.assert_allclose(emp.var(0), np.full(D, c2), rtol=5 * np.sqrt(2 / n), atol=1e-9)

  # eta = 1: exactly the posterior of the design note (textbook form).
  post_mean = post_var * (a_ts / s_ts2 * z_t1[0] + a_s / s_s ** 2 * x1[0])
  m, sd = process.posterior(z_t=z_t1, x=x1, logsnr_s=ls[:1], logsnr_t=lt[:1])
  np.testing.assert_allclose(m[0], post_mean, rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(float(sd[0, 0]) ** 2, post_var, rtol=2e-3, atol=1e-9)
  one = mm.sample_z_s(rng=key, z_t=z_t[:4], x_tilde=x[:4], logsnr_s=ls[:4], logsnr_t=lt[:4],
                      eta=1.0)
  np.testing.assert_allclose(one, post_mean + np.sqrt(post_var) * noise[:4], rtol=2e-4,
                             atol=2e-5)
  unc = mm.sample_z_s(rng=key, z_t=z_t[:4], x_tilde=x[:4], logsnr_s=ls[:4], logsnr_t=lt[:4],
                      eta=eta, unconditional=True)
  np.testing.assert_allclose(unc, a_s * x[:4] + s_s * noise[:4], rtol=1e-5, atol=1e-6)


def test_ddim_eta_step_keeps_the_forward_marginal():
  """Song et al.'s family (any eta) has the marginals of the forward process: with z_t ~ q(z_t|x)
  and the true x, z_s = sample_step(...) ~ N(alpha_s x, sigma_s^2) (Monte Carlo, 40000 draws)."""
  n, eta = 40000, 0.6
  ls, lt = jnp.full((n,), 1.5), jnp.full((n,), -2.0)
  x = jnp.full((n, 2), 0.8)
  e1, e2 = jax.random.normal(jax.random.PRNGKey(9), (2, n, 2))
  a_t, s_t = _alpha_sigma(lt)
  z_s = process.sample_step(z_t=a_t[:, None] * x + s_t[:, None] * e1, x=x, logsnr_s=ls,
                            logsnr_t=lt, noise=e2, eta=eta)
  a_s, s_s = (float(v[0]) for v in _alpha_sigma(ls))
  emp = np.asarray(z_s, np.float64)
  np.testing.assert_allclose(emp.mean(0), a_s * 0.8, atol=5 * s_s / np.sqrt(n))
  np.testing.assert_allclose(emp.var(0), s_s ** 2, rtol=5 * np.sqrt(2 / n))


# ----------------------------------------------------------------------------------------------
# 3. Train times against the sampler's grid
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", ["uniform_t", "uniform_logsnr"])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_train_times_lie_on_the_k_step_sampler_grid(k, spacing):
  """samplers.logsnr_grid (t_j = 1 - j/k) against the formula (cosine at t_j, or linear in logSNR
  from logsnr(1) to logsnr(0)); logsnr_of_u(1 - j/k) is grid[j]; with time_sampling='grid' every
  trained t is a sampler node t_j (j < k) and s lies in [t_{j+1}, t_j), i.e. each (s, t) pair
  sits inside one step of the k-step sampler, every step covered; 'continuous' times map through
  the same formula."""
  grid = samplers.logsnr_grid(num_steps=k, schedule=SCHEDULE, spacing=spacing)
  u_nodes = 1.0 - np.arange(k + 1) / k
  if spacing == "uniform_t":
    want = _logsnr_cosine_np(u_nodes)
  else:
    want = _logsnr_cosine_np(1.0) + (_logsnr_cosine_np(0.0) - _logsnr_cosine_np(1.0)) * (
        np.arange(k + 1) / k)
  np.testing.assert_allclose(grid, want, rtol=1e-5, atol=2e-4)
  np.testing.assert_allclose(grid[[0, -1]], [LO, HI], atol=2e-3)
  np.testing.assert_allclose(mm.logsnr_of_u(u_nodes, schedule=SCHEDULE, spacing=spacing), grid,
                             rtol=1e-6, atol=1e-5)

  n = 512
  u_t, u_s = mm.sample_times(rng=jax.random.PRNGKey(k), batch=n, num_student_steps=k,
                             time_sampling="grid")
  lt = np.asarray(mm.logsnr_of_u(u_t, schedule=SCHEDULE, spacing=spacing))
  ls = np.asarray(mm.logsnr_of_u(u_s, schedule=SCHEDULE, spacing=spacing))
  j = np.argmin(np.abs(lt[:, None] - grid[None, :]), axis=1)
  np.testing.assert_allclose(lt, grid[j], rtol=1e-6, atol=1e-5)
  assert np.all(j < k) and set(j.tolist()) == set(range(k))
  assert np.all(ls >= lt - 1e-5) and np.all(ls <= grid[j + 1] + 1e-4)
  frac = (np.asarray(u_t) - np.asarray(u_s)) * k  # position of s inside its step, in (0, 1]
  assert frac.min() < 0.05 and frac.max() > 0.95 and np.all(frac > 0)
  np.testing.assert_allclose(lt, _logsnr_at(u_t, spacing), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(ls, _logsnr_at(u_s, spacing), rtol=1e-5, atol=1e-4)

  u_t, u_s = mm.sample_times(rng=jax.random.PRNGKey(k), batch=n, num_student_steps=k,
                             time_sampling="continuous")
  for u in (u_t, u_s):
    np.testing.assert_allclose(mm.logsnr_of_u(u, schedule=SCHEDULE, spacing=spacing),
                               _logsnr_at(u, spacing), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# 4. Preconditioners
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precond_batches,damping", [(8, None), (4, 0.0)])
def test_squared_grad_preconditioner_against_brute_force(precond_batches, damping):
  """Lambda = 1 / (sqrt(v + damping median(v)) + eps) (damping = distill.precond_damping when
  the config has that field, else 0: Lambda = 1 / (sqrt(v) + eps)), v = mean over microbatches m
  of (grad_theta mean_{i in m} w(s_i) |x_i - g_theta(z_s,i)|^2 / D)^2 with s drawn like the
  distillation's s; 8 microbatches of 1 = the per-example average (config's default damping),
  4 of 2 = the microbatch form (damping 0). Brute force: a Python loop over microbatches with
  raw jax.random draws (keys = split(rng, M); k_time, k_eps = split; grid times r1, r2 =
  split(k_time)). guidance = 0 and no condition dropout (only the arguments of the original
  signature are passed)."""
  k, n, eps = 4, 8, 1e-3
  config = _distill_config(variant="parameter_space", precond_batches=precond_batches,
                           precond_eps=eps)
  if damping is not None and "precond_damping" in config:
    config.precond_damping = damping
  damping = float(config.get("precond_damping", 0.0))
  theta = _tiny_params(0)
  x = jax.random.normal(jax.random.PRNGKey(20), (n, D))
  label = jnp.array([0, 1, 2, 0, 2, 1, 1, 0], jnp.int32)
  rng = jax.random.PRNGKey(21)
  got = preconditioners.squared_grad_preconditioner(
      denoise=_tiny_denoise, teacher_params=theta, batch={"x": x, "label": label}, rng=rng,
      config=config, schedule=SCHEDULE)

  mb = n // precond_batches
  sq = []
  for m, key in enumerate(jax.random.split(rng, precond_batches)):
    xb, lb = x[m * mb:(m + 1) * mb], label[m * mb:(m + 1) * mb]
    k_time, k_eps = jax.random.split(key)
    r1, r2 = jax.random.split(k_time)
    u_t = jax.random.randint(r1, (mb,), 1, k + 1).astype(jnp.float32) / k
    u_s = jnp.maximum(u_t - (1.0 - jax.random.uniform(r2, (mb,))) / k, 0.0)
    ls = _logsnr_cosine(u_s)
    a_s, s_s = _alpha_sigma(ls)
    z_s = a_s[:, None] * xb + s_s[:, None] * jax.random.normal(k_eps, xb.shape)
    w = _snr_plus_one(ls)  # 'auto' weighting at k = 4
    grad = jax.grad(lambda th: jnp.mean(w * jnp.mean(
        (xb - _tiny_denoise(th, z_s, ls, lb)) ** 2, -1)))(theta)
    sq.append(jax.tree_util.tree_map(jnp.square, grad))
  v = jax.tree_util.tree_map(lambda *a: np.mean(np.stack(a), 0), *sq)
  floor = damping * np.median(_flat(v))
  want = jax.tree_util.tree_map(lambda a: 1.0 / (np.sqrt(a + floor) + eps), v)
  _assert_tree_close(got, want, rtol=2e-4, what="squared_grads Lambda")


def test_adam_preconditioner_is_inverse_root_of_the_stored_second_moments():
  """adam_preconditioner = 1 / (sqrt(nu) + eps) with nu the stored Adam second moments (no bias
  correction, as documented), found inside make_optimizer's chain (clip + AdamW); mu is ignored."""
  params = _tiny_params(0)
  cfg = mm.default_config().optim
  cfg.grad_clip, cfg.weight_decay = 1.0, 0.01
  tx = optim.make_optimizer(cfg, total_steps=10)
  rng = np.random.default_rng(3)
  nu = jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.uniform(1e-6, 2.0, p.shape), jnp.float32), params)
  mu = jax.tree_util.tree_map(lambda p: jnp.full(p.shape, 7.0), params)
  is_adam = lambda node: isinstance(node, optax.ScaleByAdamState)
  state = jax.tree_util.tree_map(
      lambda node: node._replace(mu=mu, nu=nu, count=jnp.asarray(3, jnp.int32))
      if is_adam(node) else node, tx.init(params), is_leaf=is_adam)
  for eps in (1e-8, 0.1):
    got = preconditioners.adam_preconditioner(state, eps=eps)
    want = jax.tree_util.tree_map(lambda v: 1.0 / (np.sqrt(np.asarray(v, np.float64)) + eps), nu)
    _assert_tree_close(got, want, rtol=1e-5, what=f"adam Lambda eps={eps}")


# ----------------------------------------------------------------------------------------------
# 5 + 6. Parameter-space step: nu, its bias-corrected EMA, and guidance
# ----------------------------------------------------------------------------------------------

PS_GUIDANCE, PS_NU_DECAY, PS_ETA = 1.5, 0.9, 0.6


def _guided_teacher(theta, z, logsnr, label):
  cond = _tiny_denoise(theta, z, logsnr, label)
  null = _tiny_denoise(theta, z, logsnr, jnp.full_like(label, NUM_CLASSES))
  return cond + PS_GUIDANCE * (cond - null)


def _ps_draw(key, params, x, label, k):
  """draw() written out for the parameter-space config of the test: continuous times,
  uniform_logsnr spacing, DDIM-eta z_s with eta = PS_ETA, snr_plus_one weighting."""
  k_time, k_eps, k_zs, k_drop = jax.random.split(key, 4)
  r1, r2 = jax.random.split(k_time)
  n = x.shape[0]
  u_s = jax.random.uniform(r1, (n,))
  u_t = jnp.minimum(1.0, u_s + jax.random.uniform(r2, (n,)) / k)
  lt, ls = _logsnr_at(u_t, "uniform_logsnr"), _logsnr_at(u_s, "uniform_logsnr")
  a_t, s_t = _alpha_sigma(lt)
  z_t = a_t[:, None] * x + s_t[:, None] * jax.random.normal(k_eps, x.shape)
  student = lambda p: _tiny_denoise(p, z_t, lt, label, train=True, rng=k_drop)
  x_tilde = student(params)
  z_s = _ddim_eta_step(z_t, x_tilde, ls, lt, jax.random.normal(k_zs, x.shape), PS_ETA)
  return dict(x_tilde=x_tilde, z_s=z_s, ls=ls, w=_snr_plus_one(ls), label=label), student


@functools.partial(jax.jit, static_argnames="k")
def _ps_nu(eta_params, theta, lam, x, label, rng, step, *, k):
  """nu = -Lambda g_A, g_A = grad_theta mean_A w |x~_A - g^w_theta(z_s^A)|^2 / D (half A)."""
  key = jax.random.fold_in(rng, step)
  k_draw_a = jax.random.split(jax.random.fold_in(key, 0))[0]
  half = x.shape[0] // 2
  d, _ = _ps_draw(k_draw_a, eta_params, x[:half], label[:half], k)
  g_a = jax.grad(lambda th: jnp.mean(d["w"] * jnp.mean(
      (d["x_tilde"] - _guided_teacher(th, d["z_s"], d["ls"], d["label"])) ** 2, -1)))(theta)
  return jax.tree_util.tree_map(lambda l, g: -l * g, lam, g_a)


@functools.partial(jax.jit, static_argnames="k")
def _ps_student_grad(eta_params, theta, nu, x, label, rng, step, *, k):
  """w(s) (d x~_B / d eta)^T (J_theta g^w_theta(z_s^B) nu) / (B D) with full Jacobians."""
  key = jax.random.fold_in(rng, step)
  k_draw_b = jax.random.split(jax.random.fold_in(key, 1))[0]
  half = x.shape[0] // 2
  d, student = _ps_draw(k_draw_b, eta_params, x[half:], label[half:], k)
  jac_t = jax.jacrev(lambda th: _guided_teacher(th, d["z_s"], d["ls"], d["label"]))(theta)
  jvp = sum(jnp.tensordot(j, v, axes=v.ndim) for j, v in
            zip(jax.tree_util.tree_leaves(jac_t), jax.tree_util.tree_leaves(nu)))
  coef = d["w"][:, None] * jvp / (half * D)
  jac_s = jax.jacrev(student)(eta_params)
  return jax.tree_util.tree_map(lambda j: jnp.tensordot(coef, j, axes=2), jac_s)


def test_parameter_space_step_guided_gradient_and_bias_corrected_nu_ema():
  """Parameter space, guidance w = 1.5, nu_ema = 0.9, 0 < eta < 1, Lambda random: (a) after step
  0 nu_ema = (1 - decay) nu and the nu used is nu (bias correction 1 - decay^1); (b) the student
  gradient is w(s) (dx~/deta)^T J_theta(g^w) nu / (B D) with the guided teacher's full Jacobian;
  (c) after step 1 nu_ema = decay nu_ema0 + (1 - decay) nu1, used as nu_ema1 / (1 - decay^2).
  All draws from raw jax.random (key = fold_in(rng, step), halves fold_in(key, 0 / 1), then
  split(.)[0], then draw's split(., 4))."""
  k = 4
  config = _distill_config(variant="parameter_space", guidance=PS_GUIDANCE, nu_ema=PS_NU_DECAY,
                           eta=PS_ETA, time_sampling="continuous", spacing="uniform_logsnr",
                           weighting="snr_plus_one", num_student_steps=k)
  sgd = optax.sgd(1.0)
  step = jax.jit(steps.make_distill_step(config=config, denoise=_tiny_denoise, schedule=SCHEDULE,
                                         student_tx=sgd, aux_tx=None, data_key="x",
                                         null_label=NUM_CLASSES))
  theta = _tiny_params(0)
  eta0 = _perturb(theta, 1)
  lam_rng = np.random.default_rng(4)
  lam = jax.tree_util.tree_map(
      lambda p: jnp.asarray(lam_rng.uniform(0.5, 2.0, p.shape), jnp.float32), theta)
  x = jax.random.normal(jax.random.PRNGKey(30), (16, D))
  label = jnp.array([0, 1, 2, 3, 1, 0, 2, 1, 2, 2, 0, 1, 3, 0, 1, 2], jnp.int32)
  rng = jax.random.PRNGKey(31)
  state = steps.init_distill_state(config=config, init_params=eta0, student_tx=sgd)
  batch = {"x": x, "label": label}

  s1, m1 = step(state, theta, batch, rng, lam)
  nu0 = _ps_nu(eta0, theta, lam, x, label, rng, 0, k=k)
  _assert_tree_close(s1.nu_ema, jax.tree_util.tree_map(lambda v: (1 - PS_NU_DECAY) * v, nu0),
                     rtol=2e-4, what="nu_ema after step 0")
  np.testing.assert_allclose(float(m1["nu_norm"]), np.linalg.norm(_flat(nu0)), rtol=2e-4)
  want = _ps_student_grad(eta0, theta, nu0, x, label, rng, 0, k=k)
  got = jax.tree_util.tree_map(lambda a, b: a - b, eta0, s1.params)
  assert np.abs(_flat(want)).max() > 1e-5
  _assert_tree_close(got, want, rtol=5e-4, what="guided parameter-space student gradient")

  s2, m2 = step(s1, theta, batch, rng, lam)
  nu1 = _ps_nu(s1.params, theta, lam, x, label, rng, 1, k=k)
  ema1 = jax.tree_util.tree_map(lambda e, v: PS_NU_DECAY * e + (1 - PS_NU_DECAY) * v,
                                s1.nu_ema, nu1)
  _assert_tree_close(s2.nu_ema, ema1, rtol=2e-4, what="nu_ema after step 1")
  used1 = jax.tree_util.tree_map(lambda e: e / (1 - PS_NU_DECAY ** 2), ema1)
  np.testing.assert_allclose(float(m2["nu_norm"]), np.linalg.norm(_flat(used1)), rtol=2e-4)
  want = _ps_student_grad(s1.params, theta, used1, x, label, rng, 1, k=k)
  got = jax.tree_util.tree_map(lambda a, b: a - b, s1.params, s2.params)
  _assert_tree_close(got, want, rtol=5e-4, what="student gradient at step 1 (bias-corrected nu)")


# ----------------------------------------------------------------------------------------------
# 7. Initial state
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["alternating", "parameter_space"])
def test_student_ema_and_auxiliary_start_as_copies_of_the_teacher_ema(variant):
  """init_distill_state: params, ema_params and (alternating) aux_params equal init_params leaf
  by leaf, in their own buffers (deleting them leaves init_params intact); parameter space with
  nu_ema > 0 starts nu_ema at zeros and has no auxiliary."""
  config = _distill_config(variant=variant)
  teacher_ema = _tiny_params(0)
  student_tx, aux_tx = steps.make_optimizers(config)
  state = steps.init_distill_state(config=config, init_params=teacher_ema, student_tx=student_tx,
                                   aux_tx=aux_tx)
  copies = [state.params, state.ema_params]
  if variant == "alternating":
    copies.append(state.aux_params)
  else:
    assert state.aux_params == {} and state.aux_opt_state == {}
    _assert_tree_close(state.nu_ema, jax.tree_util.tree_map(jnp.zeros_like, teacher_ema), 0.0)
  ptr = lambda a: a.unsafe_buffer_pointer()
  seen = {ptr(a) for a in jax.tree_util.tree_leaves(teacher_ema)}
  for tree in copies:
    assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(teacher_ema)
    for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(teacher_ema)):
      np.testing.assert_array_equal(a, b)
      assert a is not b and ptr(a) not in seen
      seen.add(ptr(a))
  for tree in copies:
    for a in jax.tree_util.tree_leaves(tree):
      a.delete()
  assert np.isfinite(_flat(teacher_ema)).all()


# ----------------------------------------------------------------------------------------------
# 8. Weightings
# ----------------------------------------------------------------------------------------------

def test_weightings_against_their_formulas():
  """config_weight: 'teacher' = the teacher's weight on |x err|^2 (v: 1 + SNR, eps: SNR, x: 1,
  sigmoid: SNR sigmoid(b - logsnr), Kingma & Gao 2023), 'sigmoid' = sigmoid(logsnr - b),
  'snr_plus_one' = 1 + 1/(1/SNR + e^-5), 'constant' = 1, 'auto' = constant for k <= 2 else
  snr_plus_one."""
  ls = np.linspace(-15.0, 15.0, 13)
  snr = np.exp(ls)
  sig = lambda a: 1.0 / (1.0 + np.exp(-a))
  b = 1.7
  cases = [
      (dict(weighting="teacher", teacher_weighting="v"), 1.0 + snr),
      (dict(weighting="teacher", teacher_weighting="eps"), snr),
      (dict(weighting="teacher", teacher_weighting="x"), np.ones_like(ls)),
      (dict(weighting="teacher", teacher_weighting="sigmoid", weighting_bias=b),
       snr * sig(b - ls)),
      (dict(weighting="sigmoid", weighting_bias=b), sig(ls - b)),
      (dict(weighting="sigmoid"), sig(ls)),
      (dict(weighting="snr_plus_one"), 1.0 + 1.0 / (1.0 / snr + np.exp(-5.0))),
      (dict(weighting="constant"), np.ones_like(ls)),
      (dict(weighting="auto", num_student_steps=2), np.ones_like(ls)),
      (dict(weighting="auto", num_student_steps=8), 1.0 + 1.0 / (1.0 / snr + np.exp(-5.0))),
  ]
  for overrides, want in cases:
    got = mm.config_weight(_distill_config(**overrides), jnp.asarray(ls, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=2e-5, err_msg=str(overrides))


# ----------------------------------------------------------------------------------------------
# 9. The teacher's training step, schedule, clipping, EMA, non-finite guard
# ----------------------------------------------------------------------------------------------

class _TinyFlax(nn.Module):
  @nn.compact
  def __call__(self, z, logsnr, label, *, train):
    h = nn.Dense(8)(z) + nn.Embed(NUM_CLASSES + 1, 8)(label) + 0.1 * logsnr[:, None]
    h = nn.Dropout(0.3, deterministic=not train)(jnp.tanh(h))
    return nn.Dense(z.shape[-1])(h)


TEACHER_LR, TEACHER_EMA, TEACHER_DROP = 0.1, 0.9, 0.5


@functools.lru_cache(maxsize=None)
def _teacher_setup(prediction, weighting, bias):
  model = _TinyFlax()
  tx = optax.sgd(TEACHER_LR)
  step = jax.jit(train_steps.make_teacher_step(
      model=model, tx=tx, schedule=SCHEDULE, prediction=prediction, loss_weighting=weighting,
      sigmoid_bias=bias, num_classes=NUM_CLASSES, cond_drop_prob=TEACHER_DROP,
      ema_decay=TEACHER_EMA, data_key="image"))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, D)), jnp.zeros((1,)),
                      jnp.zeros((1,), jnp.int32), train=False)["params"]
  return model, tx, step, params


def _teacher_state(tx, params, ema, step):
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                    opt_state=tx.init(params), ema_params=ema,
                    nonfinite_step=jnp.asarray(-1, jnp.int32))


@pytest.mark.parametrize("prediction,weighting,bias", [("eps", "v", 0.0), ("v", "sigmoid", 2.0),
                                                       ("x", "eps", 0.0)])
def test_teacher_step_is_sgd_on_the_written_out_denoising_loss(prediction, weighting, bias):
  """make_teacher_step with optax.sgd(lr): params move by exactly -lr grad of
  mean_b w(logsnr_b) |x_b - x_hat_b|^2 / D with stratified times t_b = (u + b/n) mod 1, the
  prediction converted to x (eps: (z - sigma out)/alpha, v: alpha z - sigma out), w = the
  loss_weighting's weight on |x err|^2, labels dropped to the null class with cond_drop_prob;
  draws from key = fold_in(rng, step), t, eps, drop, dropout = split(key, 4). Also the EMA:
  ema <- decay ema + (1 - decay) params."""
  model, tx, step, params = _teacher_setup(prediction, weighting, bias)
  params = _perturb(params, 5, scale=0.3)
  ema0 = _perturb(params, 6)
  n = 8
  x = jax.random.normal(jax.random.PRNGKey(40), (n, D))
  label = jnp.array([0, 1, 2, 0, 1, 2, 0, 1], jnp.int32)
  rng, step_no = jax.random.PRNGKey(41), 3
  new, metrics = step(_teacher_state(tx, params, ema0, step_no), {"image": x, "label": label}, rng)

  key = jax.random.fold_in(rng, step_no)
  t_rng, eps_rng, drop_rng, dropout_rng = jax.random.split(key, 4)
  t = jnp.mod(jax.random.uniform(t_rng, ()) + jnp.arange(n) / n, 1.0)
  logsnr = _logsnr_cosine(t)
  a, s = (v[:, None] for v in _alpha_sigma(logsnr))
  z = a * x + s * jax.random.normal(eps_rng, x.shape)
  drop = jax.random.bernoulli(drop_rng, TEACHER_DROP, (n,))
  assert 0 < int(drop.sum()) < n
  dropped = jnp.where(drop, NUM_CLASSES, label)
  snr = jnp.exp(logsnr)
  w = {"v": 1.0 + snr, "eps": snr, "x": jnp.ones_like(snr),
       "sigmoid": snr * jax.nn.sigmoid(bias - logsnr)}[weighting]

  def loss(p):
    out = model.apply({"params": p}, z, logsnr, dropped, train=True,
                      rngs={"dropout": dropout_rng})
    x_hat = {"x": out, "eps": (z - s * out) / a, "v": a * z - s * out}[prediction]
    return jnp.mean(w * jnp.mean((x - x_hat) ** 2, -1))

  want_loss, grad = jax.value_and_grad(loss)(params)
  np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=2e-4)
  got = jax.tree_util.tree_map(lambda p, q: (p - q) / TEACHER_LR, params, new.params)
  _assert_tree_close(got, grad, rtol=1e-3, what=f"teacher gradient {prediction}/{weighting}")
  _assert_tree_close(new.ema_params, jax.tree_util.tree_map(
      lambda e, p: TEACHER_EMA * e + (1 - TEACHER_EMA) * p, ema0, new.params), rtol=1e-6,
      what="EMA")
  assert int(new.step) == step_no + 1 and int(new.nonfinite_step) == -1


def test_teacher_step_nonfinite_guard_keeps_params_and_records_the_first_bad_step():
  """A NaN batch: params, opt_state and EMA are kept, nonfinite_step = the 1-based step number
  of the FIRST bad step (state.step + 1), and later good or bad steps do not overwrite it."""
  _, tx, step, params = _teacher_setup("eps", "v", 0.0)
  good = {"image": jax.random.normal(jax.random.PRNGKey(42), (8, D)),
          "label": jnp.zeros((8,), jnp.int32)}
  bad = {"image": good["image"].at[3, 1].set(jnp.nan), "label": good["label"]}
  rng = jax.random.PRNGKey(43)
  state = _teacher_state(tx, params, params, 0)
  s1, _ = step(state, good, rng)
  assert int(s1.nonfinite_step) == -1
  s2, m2 = step(s1, bad, rng)
  assert not np.isfinite(float(m2["loss"]))
  assert int(s2.step) == 2 and int(s2.nonfinite_step) == 2
  _assert_tree_close(s2.params, s1.params, 0.0, "params kept")
  _assert_tree_close(s2.ema_params, s1.ema_params, 0.0, "ema kept")
  s3, _ = step(s2, good, rng)
  assert int(s3.nonfinite_step) == 2 and not np.allclose(_flat(s3.params), _flat(s2.params))
  s4, _ = step(s3, bad, rng)
  assert int(s4.nonfinite_step) == 2 and int(s4.step) == 4
  _assert_tree_close(s4.params, s3.params, 0.0, "params kept")


def test_learning_rate_schedule_against_the_warmup_cosine_formula():
  """lr(n) = lr n / W for n < W, then lr (1 + cos(pi min(n - W, T - W) / (T - W))) / 2
  (cosine) or lr (constant); without warmup the cosine starts at lr."""
  lr, warmup, total = 0.3, 10, 50
  n = np.arange(0, total + 6)
  cos = lambda m, span: lr * 0.5 * (1 + np.cos(np.pi * np.minimum(m, span) / span))
  cfg = ml_collections.ConfigDict(dict(learning_rate=lr, warmup_steps=warmup, schedule="cosine"))
  want = np.where(n < warmup, lr * n / warmup, cos(n - warmup, total - warmup))
  got = optim.learning_rate_schedule(cfg, total_steps=total)(jnp.asarray(n))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  cfg.schedule = "constant"
  got = optim.learning_rate_schedule(cfg, total_steps=total)(jnp.asarray(n))
  np.testing.assert_allclose(got, np.where(n < warmup, lr * n / warmup, lr), rtol=1e-5, atol=1e-7)
  cfg.schedule, cfg.warmup_steps = "cosine", 0
  got = optim.learning_rate_schedule(cfg, total_steps=total)(jnp.asarray(n))
  np.testing.assert_allclose(got, cos(n, total), rtol=1e-5, atol=1e-7)


def test_make_optimizer_clips_the_global_norm_then_applies_adamw():
  """Two steps of make_optimizer(grad_clip=1, weight_decay) against a hand computation in
  float64: g <- g min(1, c/|g|) (global norm), then AdamW with bias-corrected moments,
  update = -lr (m_hat / (sqrt(v_hat) + eps) + wd p). The first gradient (norm 5) is clipped,
  the second (norm 0.3) is not; without clipping the result would differ."""
  cfg = ml_collections.ConfigDict(dict(learning_rate=0.1, warmup_steps=0, schedule="constant",
                                       b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01,
                                       grad_clip=1.0))
  tx = optim.make_optimizer(cfg, total_steps=10)
  rng = np.random.default_rng(7)
  p0 = {"a": rng.standard_normal((3, 2)), "b": rng.standard_normal(4)}
  unit = lambda tree, norm: {k: v * norm / np.linalg.norm(_flat(tree)) for k, v in tree.items()}
  g1 = unit({"a": rng.standard_normal((3, 2)), "b": rng.standard_normal(4)}, 5.0)
  g2 = unit({"a": rng.standard_normal((3, 2)), "b": rng.standard_normal(4)}, 0.3)

  def hand(clip):
    p, m, v = dict(p0), {k: 0.0 for k in p0}, {k: 0.0 for k in p0}
    for i, g in enumerate((g1, g2), start=1):
      scale = min(1.0, 1.0 / np.linalg.norm(_flat(g))) if clip else 1.0
      for key in p:
        c = g[key] * scale
        m[key] = 0.9 * m[key] + 0.1 * c
        v[key] = 0.99 * v[key] + 0.01 * c ** 2
        m_hat, v_hat = m[key] / (1 - 0.9 ** i), v[key] / (1 - 0.99 ** i)
        p[key] = p[key] - 0.1 * (m_hat / (np.sqrt(v_hat) + 1e-8) + 0.01 * p[key])
    return p

  to32 = lambda t: {k: jnp.asarray(v, jnp.float32) for k, v in t.items()}
  params = to32(p0)
  state = tx.init(params)
  for g in (g1, g2):
    updates, state = tx.update(to32(g), state, params)
    params = optax.apply_updates(params, updates)
  want = hand(clip=True)
  _assert_tree_close(params, want, rtol=1e-5, what="clip + AdamW")
  unclipped = hand(clip=False)
  assert np.abs(_flat(unclipped) - _flat(want)).max() > 1e-3


# ----------------------------------------------------------------------------------------------
# 10. The k-step student sampler
# ----------------------------------------------------------------------------------------------

def _analytic_denoise(params, z, logsnr, label, *, train=False, rng=None):
  assert not train and rng is None
  return (params["a"] * jnp.sin(1.3 * z) + params["b"] * jnp.tanh(0.2 * logsnr)[:, None]
          + 0.3 * label[:, None].astype(jnp.float32))


@pytest.mark.parametrize("spacing", ["uniform_logsnr", "uniform_t"])
def test_student_sampler_with_clip_and_eta_is_the_written_out_ancestral_loop(spacing):
  """make_student_sampler (k = 4, eta = 0.5, clip = 1) against the loop written out:
  init, step = split(rng); z = N(init); keys = split(step, k); for i: x_hat = clip(g(z, l_i));
  z = DDIM-eta step l_i -> l_{i+1} with noise N(keys[i]); return the last x_hat; grid l_i at
  u_i = 1 - i/k by the formula of the spacing."""
  k, eta, clip = 4, 0.5, 1.0
  config = _distill_config(num_student_steps=k, eta=eta, spacing=spacing)
  params = {"a": 2.5, "b": 0.8}
  sampler = steps.make_student_sampler(config=config, denoise=_analytic_denoise,
                                       schedule=SCHEDULE, clip=clip)
  rng = jax.random.PRNGKey(50)
  shape = (6, D)
  label = jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)
  got = sampler(params, rng, shape=shape, label=label)

  grid = _logsnr_at(1.0 - np.arange(k + 1) / k, spacing)
  init_rng, step_rng = jax.random.split(rng)
  z = jax.random.normal(init_rng, shape)
  keys = jax.random.split(step_rng, k)
  clipped = 0
  for i in range(k):
    lt = jnp.full((shape[0],), grid[i])
    raw = _analytic_denoise(params, z, lt, label)
    clipped += int(jnp.sum(jnp.abs(raw) > clip))
    x_hat = jnp.clip(raw, -clip, clip)
    if i == k - 1:
      break
    z = _ddim_eta_step(z, x_hat, jnp.full((shape[0],), grid[i + 1]), lt,
                       jax.random.normal(keys[i], shape), eta)
  assert clipped > 0
  np.testing.assert_allclose(got, x_hat, rtol=1e-4, atol=2e-5)
