"""The diffusion math against brute-force Gaussian computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmd_jax.diffusion import conditioning, process, samplers
from mmd_jax.diffusion.schedules import Schedule, alpha_sigma


def _np_alpha_sigma(logsnr):
  a2 = 1.0 / (1.0 + np.exp(-logsnr))
  return np.sqrt(a2), np.sqrt(1.0 - a2)


@pytest.mark.parametrize("logsnr_s,logsnr_t", [(3.0, -1.0), (0.5, 0.4999), (-8.0, -14.0),
                                               (10.0, 9.0)])
def test_posterior_matches_brute_force_gaussian_conditioning(logsnr_s, logsnr_t):
  # Joint of (z_s, z_t) given x, as a 2x2 Gaussian built from z_s = a_s x + s_s e1,
  # z_t = a_{t|s} z_s + s_{t|s} e2; condition z_s on z_t in float64.
  a_s, s_s = _np_alpha_sigma(np.float64(logsnr_s))
  a_t, s_t = _np_alpha_sigma(np.float64(logsnr_t))
  a_ts = a_t / a_s
  s_ts2 = s_t**2 - a_ts**2 * s_s**2
  x, z_t = 0.7, -0.3
  mu = np.array([a_s * x, a_t * x])
  cov = np.array([[s_s**2, a_ts * s_s**2], [a_ts * s_s**2, a_ts**2 * s_s**2 + s_ts2]])
  want_mean = mu[0] + cov[0, 1] / cov[1, 1] * (z_t - mu[1])
  want_var = cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1]
  mean, std = process.posterior(z_t=jnp.full((1, 1), z_t), x=jnp.full((1, 1), x),
                                logsnr_s=jnp.array([logsnr_s]), logsnr_t=jnp.array([logsnr_t]))
  np.testing.assert_allclose(float(mean[0, 0]), want_mean, rtol=2e-4, atol=2e-6)
  np.testing.assert_allclose(float(std[0, 0]) ** 2, want_var, rtol=2e-3, atol=1e-9)


def test_posterior_is_stable_at_the_ends():
  z = jnp.ones((2, 3))
  x = jnp.zeros((2, 3))
  same = jnp.array([-20.0, 20.0])
  mean, std = process.posterior(z_t=z, x=x, logsnr_s=same, logsnr_t=same)
  np.testing.assert_allclose(mean, z, rtol=1e-6)
  np.testing.assert_allclose(std, 0.0, atol=1e-7)
  mean, std = process.posterior(z_t=z, x=x, logsnr_s=jnp.array([-19.0, -19.0]),
                                logsnr_t=jnp.array([-20.0, -20.0]))
  assert np.all(np.isfinite(mean)) and np.all(np.isfinite(std))


def test_ancestral_step_equals_posterior_sample_and_ddim_is_deterministic():
  key = jax.random.PRNGKey(0)
  z, x, noise = jax.random.normal(key, (3, 4, 5))
  ls, lt = jnp.full((4,), 1.0), jnp.full((4,), -2.0)
  mean, std = process.posterior(z_t=z, x=x, logsnr_s=ls, logsnr_t=lt)
  got = process.sample_step(z_t=z, x=x, logsnr_s=ls, logsnr_t=lt, noise=noise, eta=1.0)
  np.testing.assert_allclose(got, mean + std * noise, rtol=1e-5, atol=1e-5)
  a_s, s_s = alpha_sigma(1.0)
  a_t, s_t = alpha_sigma(-2.0)
  ddim = process.sample_step(z_t=z, x=x, logsnr_s=ls, logsnr_t=lt, noise=noise, eta=0.0)
  np.testing.assert_allclose(ddim, a_s * x + s_s * (z - a_t * x) / s_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "x", "v"])
def test_parameterisations_round_trip_and_loss_weighting(prediction):
  key = jax.random.PRNGKey(1)
  x, eps = jax.random.normal(key, (2, 4, 6))
  logsnr = jnp.array([-3.0, 0.0, 2.0, 5.0])
  z = process.diffuse(x=x, eps=eps, logsnr=logsnr)
  out = process.target(prediction=prediction, x=x, eps=eps, logsnr=logsnr)
  np.testing.assert_allclose(process.to_x(prediction=prediction, output=out, z=z, logsnr=logsnr),
                             x, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(process.to_eps(prediction=prediction, output=out, z=z,
                                            logsnr=logsnr), eps, rtol=1e-4, atol=1e-4)
  # A perturbed output: every parameterisation's eps-weighted loss equals the eps-MSE.
  bad_out = out + 0.1 * jax.random.normal(jax.random.PRNGKey(2), out.shape)
  eps_hat = process.to_eps(prediction=prediction, output=bad_out, z=z, logsnr=logsnr)
  want = jnp.mean(jnp.square(eps_hat - eps), axis=-1)
  got = process.denoising_loss(prediction=prediction, output=bad_out, x=x, eps=eps,
                               logsnr=logsnr, weighting="eps")
  np.testing.assert_allclose(got, want, rtol=1e-3)


def test_schedule_range_and_inverse():
  for sched in (Schedule("cosine", -15.0, 15.0),
                Schedule("shifted_cosine", -15.0, 15.0, resolution=128)):
    t = np.linspace(0, 1, 11)
    ls = sched.logsnr(t)
    assert np.all(np.diff(ls) < 0)
    np.testing.assert_allclose(sched.t_of_logsnr(ls), t, atol=1e-4)
  c = Schedule("cosine", -15.0, 15.0)
  np.testing.assert_allclose([c.logsnr(0.0), c.logsnr(1.0)], [15.0, -15.0], atol=1e-3)
  s = Schedule("shifted_cosine", -15.0, 15.0, resolution=128, shift_base=64)
  np.testing.assert_allclose(s.logsnr(0.5) - c.logsnr(0.5), 2 * np.log(0.5), atol=1e-5)
  with pytest.raises(ValueError, match="schedule kind"):
    Schedule("linear")


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_sampling_a_gaussian_with_its_exact_denoiser_reproduces_its_moments(sampler):
  # x ~ N(m, S): E[x | z_t] = m + a S (a^2 S + s^2 I)^-1 (z - a m).
  rng = np.random.default_rng(0)
  d = 3
  m = np.array([0.5, -1.0, 0.2])
  root = rng.normal(size=(d, d)) * 0.5
  cov = root @ root.T + 0.05 * np.eye(d)

  def denoise(z, logsnr, label):
    a, s = alpha_sigma(logsnr)
    a, s = a[:, None, None], s[:, None, None]
    k = a * jnp.asarray(cov) @ jnp.linalg.inv(a**2 * jnp.asarray(cov) + s**2 * jnp.eye(d))
    return jnp.asarray(m) + jnp.einsum("bij,bj->bi", k, z - a[:, :, 0] * jnp.asarray(m))

  n = 20000
  out = jax.jit(lambda key: samplers.get(sampler)(
      denoise_fn=denoise, rng=key, shape=(n, d), num_steps=64,
      schedule=Schedule("cosine", -15.0, 15.0), label=None, clip=None, settings=None))(
          jax.random.PRNGKey(3))
  out = np.asarray(out, np.float64)
  np.testing.assert_allclose(out.mean(0), m, atol=0.03)
  np.testing.assert_allclose(np.cov(out.T), cov, atol=0.04)


def test_one_step_sampler_returns_denoiser_of_initial_noise():
  key = jax.random.PRNGKey(4)

  def denoise(z, logsnr, label):
    return 2.0 * z + logsnr[:, None]

  out = samplers.sample(denoise_fn=denoise, rng=key, shape=(5, 2), num_steps=1,
                        schedule=Schedule(), eta=1.0)
  z1 = jax.random.normal(jax.random.split(key)[0], (5, 2))
  np.testing.assert_allclose(out, 2.0 * z1 + Schedule().logsnr(1.0), rtol=1e-5)


def test_guidance_combines_conditional_and_null_predictions():
  def denoise(z, logsnr, label):
    return z * 0 + label[:, None].astype(jnp.float32)

  g = conditioning.bind_text(conditioning.guided(
      lambda z, logsnr, label, text: denoise(z, logsnr, label), guidance=2.0, null_label=10),
      None)
  out = g(jnp.zeros((2, 1)), jnp.zeros((2,)), jnp.array([3, 4]))
  np.testing.assert_allclose(out[:, 0], [3 + 2 * (3 - 10), 4 + 2 * (4 - 10)])


def test_bad_sampler_arguments_are_named():
  with pytest.raises(ValueError, match="num_steps"):
    samplers.logsnr_grid(num_steps=0, schedule=Schedule())
  with pytest.raises(ValueError, match="sampler"):
    samplers.get("euler")
