"""Sample metrics: energy distance, sliced W2, log-likelihood, mode-weight error."""
import types

import numpy as np
import pytest
from scipy import stats

from mmd_jax.evaluation import sample_metrics as sm


def test_energy_distance_is_unbiased_and_agrees_with_scipy_in_1d():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(300, 1)), rng.normal(0.5, 1.0, size=(200, 1))
  got = sm.energy_distance(x, y)
  # scipy's V-statistic (diagonal included) is sqrt(2 xy - xx (n-1)/n - yy (m-1)/m).
  xx = sm._sum_pairwise_distances(x, x, same=True) / (300 * 299)
  yy = sm._sum_pairwise_distances(y, y, same=True) / (200 * 199)
  v_stat = stats.energy_distance(x[:, 0], y[:, 0]) ** 2
  np.testing.assert_allclose(got + xx / 300 + yy / 200, v_stat, rtol=1e-9)


def test_energy_distance_near_zero_for_same_distribution_positive_for_shifted():
  rng = np.random.default_rng(1)
  same = [sm.energy_distance(rng.normal(size=(500, 3)), rng.normal(size=(500, 3)))
          for _ in range(4)]
  assert abs(np.mean(same)) < 3e-3 and max(abs(v) for v in same) < 1e-2
  shifted = sm.energy_distance(rng.normal(size=(500, 3)), rng.normal(0.3, 1.0, size=(500, 3)))
  assert shifted > 0.05  # ~ 0.3^2 * E-factor; far outside the same-distribution spread


def test_sliced_w2_of_shifted_gaussians_is_shift_over_sqrt_dim():
  rng = np.random.default_rng(2)
  shift = np.array([1.0, -1.0, 0.5, 0.0])
  x = rng.normal(size=(4000, 4))
  y = rng.normal(size=(3000, 4)) + shift
  want = np.linalg.norm(shift) / 2.0  # E_theta (theta . m)^2 = |m|^2 / D
  np.testing.assert_allclose(sm.sliced_wasserstein2(x, y, num_projections=1024), want, rtol=0.05)
  assert sm.sliced_wasserstein2(x, x, num_projections=256) == 0.0
  with pytest.raises(ValueError, match="256"):
    sm.sliced_wasserstein2(x, y, num_projections=16)


def test_mode_weight_error_and_log_likelihood():
  mix = types.SimpleNamespace(weights=[0.5, 0.3, 0.2], means=[[-5.0], [0.0], [5.0]],
                              stds=[[0.5], [0.5], [0.5]])
  assert sm.mode_weight_error_from_assignments(np.array([0] * 6 + [1] * 2 + [2] * 2),
                                               mix.weights) == pytest.approx(0.1)
  x = np.array([[-5.1], [-4.9], [0.2], [5.3]])  # assigned 0, 0, 1, 2 -> fractions .5 .25 .25
  np.testing.assert_array_equal(sm.assign_components(x, mix), [0, 0, 1, 2])
  assert sm.mode_weight_error(x, mix) == pytest.approx(0.05)
  want = np.mean([np.log(sum(w * stats.norm.pdf(v, m[0], s[0]) for w, m, s in
                             zip(mix.weights, mix.means, mix.stds))) for v in x[:, 0]])
  assert sm.mean_log_likelihood(x, mix) == pytest.approx(want, rel=1e-9)
