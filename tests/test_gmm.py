"""The exact Gaussian-mixture denoiser and log-density against brute-force numerics."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from mmd_jax.models import gmm

_denoise = jax.jit(gmm.denoise, static_argnames="conditional")

MIX_1D = types.SimpleNamespace(weights=[0.2, 0.5, 0.3], means=[[-2.0], [0.3], [1.5]],
                               stds=[[0.3], [0.1], [0.6]])


def _brute_force_posterior_mean(z, logsnr):
  """E[x | z] by quadrature over x on a fine grid, in float64."""
  alpha2 = 1.0 / (1.0 + np.exp(-logsnr))
  alpha, sigma = np.sqrt(alpha2), np.sqrt(1.0 - alpha2)
  x = np.linspace(-6.0, 6.0, 400_001)
  w = np.asarray(MIX_1D.weights)
  mu = np.asarray(MIX_1D.means)[:, 0]
  sd = np.asarray(MIX_1D.stds)[:, 0]
  log_px = logsumexp(np.log(w)[:, None] - 0.5 * ((x[None] - mu[:, None]) / sd[:, None]) ** 2
                     - np.log(sd)[:, None], axis=0)
  log_lik = -0.5 * ((z[:, None] - alpha * x[None]) / sigma) ** 2
  log_post = log_px[None] + log_lik
  post = np.exp(log_post - log_post.max(axis=1, keepdims=True))
  return np.sum(post * x[None], axis=1) / np.sum(post, axis=1)


@pytest.mark.parametrize("logsnr", [-10.0, -2.0, 0.0, 3.0, 8.0])
def test_exact_denoiser_matches_quadrature_on_1d_mixture(logsnr):
  z = np.array([-2.5, -1.0, -0.1, 0.2, 0.9, 2.0])
  want = _brute_force_posterior_mean(z, logsnr)
  params = gmm.gmm_params(MIX_1D)
  got = _denoise(params, jnp.asarray(z[:, None], jnp.float32), jnp.full((6,), logsnr, jnp.float32))
  np.testing.assert_allclose(np.asarray(got)[:, 0], want, rtol=1e-3, atol=1e-4)


def test_conditional_labels_pick_a_component_and_null_gives_the_mixture():
  params = gmm.gmm_params(MIX_1D)
  z = jnp.array([[0.4], [0.4], [0.4]])
  logsnr = jnp.array([1.0, 1.0, 1.0])
  got = _denoise(params, z, logsnr, jnp.array([0, 2, 3]), conditional=True)
  a2 = 1.0 / (1.0 + np.exp(-1.0))
  a, s2 = np.sqrt(a2), 1.0 - a2
  for row, k in ((0, 0), (1, 2)):
    mu, v = MIX_1D.means[k][0], MIX_1D.stds[k][0] ** 2
    np.testing.assert_allclose(float(got[row, 0]), mu + a * v / (a2 * v + s2) * (0.4 - a * mu),
                               rtol=1e-5)
  np.testing.assert_allclose(float(got[2, 0]), _brute_force_posterior_mean(np.array([0.4]), 1.0)[0],
                             rtol=1e-3)


def test_log_prob_matches_direct_density_and_is_differentiable_in_the_parameters():
  mix = types.SimpleNamespace(weights=[0.7, 0.3], means=[[0.0, 1.0], [2.0, -1.0]],
                              stds=[[1.0, 0.5], [0.2, 0.3]])
  x = np.array([[0.1, 0.9], [1.9, -1.2], [5.0, 5.0]])
  dens = 0.0
  for w, mu, sd in zip(mix.weights, np.asarray(mix.means), np.asarray(mix.stds)):
    dens = dens + w * np.prod(np.exp(-0.5 * ((x - mu) / sd) ** 2) / (np.sqrt(2 * np.pi) * sd),
                              axis=1)
  params = gmm.gmm_params(mix)
  np.testing.assert_allclose(np.asarray(jax.jit(gmm.log_prob)(params, jnp.asarray(x))),
                             np.log(dens), rtol=1e-4)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(gmm.denoise(p, jnp.asarray(x, jnp.float32),
                                                         jnp.zeros(3)))))(params)
  assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in jax.tree_util.tree_leaves(grads))


def test_bad_mixture_is_a_clear_error():
  with pytest.raises(ValueError, match="means"):
    gmm.gmm_params(types.SimpleNamespace(weights=[1.0], means=[0.0], stds=[1.0]))


def test_benchmark_extra_rows_parse_fields_seeds_and_errors():
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                      "gmm_benchmark.py")
  spec = importlib.util.spec_from_file_location("gmm_benchmark", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  rows = bench.parse_extra("alt:k=1:time_sampling=continuous:seeds=3; ps:k=8:nu_ema=0.5:eta=0")
  assert rows == [("alt", 1, {"time_sampling": "continuous"}, 3),
                  ("ps", 8, {"nu_ema": 0.5, "eta": 0.0}, 1)]
  with pytest.raises(ValueError, match="unknown distill field 'bogus'"):
    bench.parse_extra("alt:k=8:bogus=1")
  with pytest.raises(ValueError, match="needs k="):
    bench.parse_extra("alt:eta=0.5")
  with pytest.raises(ValueError, match="seeds must be >= 1"):
    bench.parse_extra("alt:k=2:seeds=0")
