"""Sample-based metrics for low-dimensional generators (Gaussian-mixture benchmark).

All metrics take numpy arrays f[N, D] and compute in float64 numpy (no jit compile; blockwise so
that 10k x 10k pairwise distances stay within a few hundred MB).

- `energy_distance`: the unbiased U-statistic of the (squared) energy distance of Szekely & Rizzo
  (2013), D^2 = 2 E|X - Y| - E|X - X'| - E|Y - Y'|, with the i == j pairs left out of the two
  within-set means. Zero in expectation for equal distributions (so it can come out slightly
  negative), positive otherwise.
- `sliced_wasserstein2`: sqrt of the mean over random unit directions of the squared 1-D
  Wasserstein-2 distance between the projected samples (quantile coupling; Rabin et al. 2011,
  Bonneel et al. 2015). Unequal sample sizes are compared at the midpoint quantiles of the larger.
- `mean_log_likelihood`: mean log p(x) under a diagonal mixture with weights/means/stds.
- `mode_weight_error`: max_k |fraction of samples assigned to k - w_k|, each sample assigned to
  its most likely component (argmax_k w_k N(x; mu_k, s_k^2)).
"""
from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

_BLOCK_ELEMENTS = 8_000_000  # float64 entries of one pairwise-distance block (64 MB)


def _as_2d(name, x):
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"{name} must have shape [N, D] with N >= 2, got {x.shape}.")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains non-finite values ({np.sum(~np.isfinite(x))} entries).")
  return x


def _sum_pairwise_distances(a, b, *, same: bool):
  """sum_{i,j} |a_i - b_j| in float64 (the diagonal excluded by construction when same)."""
  sq_b = np.sum(b * b, axis=1)
  rows = max(1, _BLOCK_ELEMENTS // b.shape[0])
  total = 0.0
  for start in range(0, a.shape[0], rows):
    blk = a[start:start + rows]
    d2 = (-2.0 * blk) @ b.T  # in place from here on: this loop is the metric's whole cost
    d2 += sq_b[None, :]
    d2 += np.sum(blk * blk, axis=1)[:, None]
    np.maximum(d2, 0.0, out=d2)
    if same:
      idx = np.arange(blk.shape[0])
      d2[idx, start + idx] = 0.0
    np.sqrt(d2, out=d2)
    total += float(np.sum(d2))
  return total


def energy_distance(x, y) -> float:
  """Unbiased estimate of 2 E|X-Y| - E|X-X'| - E|Y-Y'| (Euclidean norm)."""
  x, y = _as_2d("x", x), _as_2d("y", y)
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"x and y must have the same dimension, got {x.shape} and {y.shape}.")
  n, m = x.shape[0], y.shape[0]
  xy = _sum_pairwise_distances(x, y, same=False) / (n * m)
  xx = _sum_pairwise_distances(x, x, same=True) / (n * (n - 1))
  yy = _sum_pairwise_distances(y, y, same=True) / (m * (m - 1))
  return 2.0 * xy - xx - yy


def random_directions(*, dim: int, num_projections: int, seed: int = 0) -> np.ndarray:
  """Unit vectors f64[num_projections, dim], uniform on the sphere."""
  if num_projections < 1:
    raise ValueError(f"num_projections must be >= 1, got {num_projections}.")
  v = np.random.default_rng(seed).standard_normal((num_projections, dim))
  return v / np.linalg.norm(v, axis=1, keepdims=True)


def _quantiles(sorted_values, n_out):
  n = sorted_values.shape[0]
  if n == n_out:
    return sorted_values
  # Hazen quantiles at the levels (i + 0.5) / n_out: linear interpolation of the sorted values
  # at the 0-based position n * level - 0.5.
  pos = np.clip(n * (np.arange(n_out) + 0.5) / n_out - 0.5, 0.0, n - 1.0)
  lo = np.floor(pos).astype(np.int64)
  hi = np.minimum(lo + 1, n - 1)
  frac = (pos - lo)[:, None]
  return (1.0 - frac) * sorted_values[lo] + frac * sorted_values[hi]


def sliced_wasserstein2(x, y, *, num_projections: int = 512, seed: int = 0) -> float:
  """Sliced Wasserstein-2: sqrt(mean_theta W2^2(theta^T X, theta^T Y))."""
  x, y = _as_2d("x", x), _as_2d("y", y)
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"x and y must have the same dimension, got {x.shape} and {y.shape}.")
  if num_projections < 256:
    raise ValueError(f"Use at least 256 projections for a stable estimate, got {num_projections}.")
  dirs = random_directions(dim=x.shape[1], num_projections=num_projections, seed=seed)
  px, py = np.sort(x @ dirs.T, axis=0), np.sort(y @ dirs.T, axis=0)
  n = max(px.shape[0], py.shape[0])
  px, py = _quantiles(px, n), _quantiles(py, n)
  return float(np.sqrt(np.mean(np.square(px - py))))


def _mixture_arrays(mixture):
  w = np.asarray(mixture.weights, np.float64)
  mu = np.asarray(mixture.means, np.float64)
  sd = np.asarray(mixture.stds, np.float64)
  if mu.ndim != 2 or sd.shape != mu.shape or w.shape != mu.shape[:1]:
    raise ValueError(f"Mixture needs weights [K], means [K, D], stds [K, D]; got {w.shape}, "
                     f"{mu.shape}, {sd.shape}.")
  return w / w.sum(), mu, sd


def component_log_joint(x, mixture) -> np.ndarray:
  """log w_k + log N(x; mu_k, diag(s_k^2)): f64[N, K]."""
  w, mu, sd = _mixture_arrays(mixture)
  x = _as_2d("x", x)
  if x.shape[1] != mu.shape[1]:
    raise ValueError(f"Samples have dimension {x.shape[1]}, mixture has {mu.shape[1]}.")
  out = np.empty((x.shape[0], w.shape[0]))
  for k in range(w.shape[0]):  # per component keeps memory at N x D
    r = (x - mu[k]) / sd[k]
    out[:, k] = (np.log(w[k]) - 0.5 * np.sum(r * r, axis=1) - np.sum(np.log(sd[k]))
                 - 0.5 * mu.shape[1] * np.log(2 * np.pi))
  return out


def mean_log_likelihood(x, mixture) -> float:
  """Mean of log p(x) over the samples, p the true mixture."""
  return float(np.mean(logsumexp(component_log_joint(x, mixture), axis=1)))


def assign_components(x, mixture) -> np.ndarray:
  """Most likely component of each sample: i64[N]."""
  return np.argmax(component_log_joint(x, mixture), axis=1)


def mode_weight_error_from_assignments(assignments, weights) -> float:
  """max_k |mean(assignments == k) - weights[k]|."""
  weights = np.asarray(weights, np.float64)
  assignments = np.asarray(assignments)
  if assignments.ndim != 1 or assignments.size == 0:
    raise ValueError(f"assignments must be a non-empty vector, got shape {assignments.shape}.")
  if assignments.min() < 0 or assignments.max() >= weights.shape[0]:
    raise ValueError(f"assignments must lie in [0, {weights.shape[0]}).")
  frac = np.bincount(assignments, minlength=weights.shape[0]) / assignments.size
  return float(np.max(np.abs(frac - weights / weights.sum())))


def mode_weight_error(x, mixture) -> float:
  """max_k |fraction assigned to component k - w_k|."""
  return mode_weight_error_from_assignments(assign_components(x, mixture), mixture.weights)


def all_metrics(samples, reference, mixture, *, num_projections: int = 512, seed: int = 0) -> dict:
  """{"energy", "sliced_w2", "loglik", "mode_weight_error"} of samples vs reference samples."""
  samples = _as_2d("samples", samples)
  return {
      "energy": energy_distance(samples, reference),
      "sliced_w2": sliced_wasserstein2(samples, reference, num_projections=num_projections,
                                       seed=seed),
      "loglik": mean_log_likelihood(samples, mixture),
      "mode_weight_error": mode_weight_error(samples, mixture),
  }
