"""FID, Inception Score and their feature statistics.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule
Converge to a Local Nash Equilibrium") is the Fréchet distance between
Gaussians fitted to Inception pool features of two image sets::

    d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}).

The numbers are only comparable under one protocol, named by :data:`PROTOCOL`:
samples in [-1, 1] are quantised to uint8 (:func:`quantize_to_uint8`), then
fed to pytorch-fid's InceptionV3 (``mmd_jax.models.inception``): /255,
bilinear resize to 299 (``align_corners=False``, no anti-aliasing), ``2x-1``,
2048-d pool features; mean and covariance accumulate in float64.

Reference statistics are .npz files with keys ``mu`` and ``sigma`` (the
layout of pytorch-fid and of the original TTUR code; the ADM/guided-diffusion
reference batches ``VIRTUAL_*.npz`` hold ``mu``/``sigma`` too, beside
``mu_s``/``sigma_s`` and the images ``arr_0``). Files written here add
``protocol`` and ``count``. Statistics from other code (TTUR, ADM: TF graph
with TF's own resize) follow a slightly different protocol; their FIDs are
close to, not identical with, ours.

Without Inception weights, :func:`make_feature_extractor` can fall back to a
fixed random network whose protocol string starts with ``STAND-IN, not FID``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np
import scipy.linalg

from mmd_jax import io_utils

__all__ = [
    "PROTOCOL",
    "STANDIN_PROTOCOL_PREFIX",
    "standin_protocol",
    "quantize_to_uint8",
    "FeatureStats",
    "init_stats",
    "update_stats",
    "merge_stats",
    "stats_to_mu_sigma",
    "frechet_distance",
    "ReferenceStats",
    "save_reference_stats",
    "load_reference_stats",
    "inception_score",
    "FeatureExtractor",
    "make_feature_extractor",
    "compute_statistics",
]

PROTOCOL = ("mmd_jax-fid-v1: pytorch-fid InceptionV3 pt_inception-2015-12-05 "
            "pool3 2048-d, uint8 quantised, bilinear 299 align_corners=False, "
            "float64 stats")
STANDIN_PROTOCOL_PREFIX = "STAND-IN, not FID"


def standin_protocol(*, seed: int, feature_dim: int) -> str:
  """Protocol string of the stand-in extractor (never comparable with FID)."""
  return (f"{STANDIN_PROTOCOL_PREFIX}: mmd_jax random-conv stand-in v1 "
          f"(seed={seed}, {feature_dim}-d, uint8 quantised, bilinear 64 "
          f"align_corners=False, float64 stats)")


def quantize_to_uint8(images: Any) -> np.ndarray:
  """Float images in [-1, 1] -> uint8 in [0, 255], rounding to nearest.

  ``floor(x * 127.5 + 128)`` clipped, the quantisation used when samples are
  saved as PNG (e.g. EDM's ``x * 127.5 + 128``). Values outside [-1, 1] clip.
  """
  x = np.asarray(images)
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"quantize_to_uint8 expects float images in [-1, 1], got "
                     f"dtype {x.dtype}; uint8 images need no quantisation.")
  return np.clip(np.floor(x.astype(np.float64) * 127.5 + 128.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------
# Feature statistics (float64 sums, mergeable across batches and hosts)


class FeatureStats(NamedTuple):
  """Sufficient statistics of a feature set: Σx, Σ x xᵀ (float64) and N.

  Sums add, so statistics of disjoint shards (batches, hosts) combine with
  :func:`merge_stats` (or by summing the arrays, e.g. after a gather).
  """
  sum: np.ndarray        # f64[D]
  sum_outer: np.ndarray  # f64[D, D]
  count: int


def init_stats(*, dim: int) -> FeatureStats:
  return FeatureStats(np.zeros((dim,), np.float64), np.zeros((dim, dim), np.float64), 0)


def update_stats(stats: FeatureStats, features: Any) -> FeatureStats:
  """Add a batch ``features`` [B, D] (any float dtype) to ``stats``."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[1] != stats.sum.shape[0]:
    raise ValueError(f"features must be [B, {stats.sum.shape[0]}], got {f.shape}.")
  return FeatureStats(stats.sum + f.sum(axis=0), stats.sum_outer + f.T @ f,
                      stats.count + f.shape[0])


def merge_stats(*stats: FeatureStats) -> FeatureStats:
  """Combine statistics of disjoint feature sets (e.g. one per host)."""
  if not stats:
    raise ValueError("merge_stats needs at least one FeatureStats.")
  dims = {s.sum.shape[0] for s in stats}
  if len(dims) != 1:
    raise ValueError(f"cannot merge statistics of different dims {sorted(dims)}.")
  return FeatureStats(sum(np.asarray(s.sum, np.float64) for s in stats),
                      sum(np.asarray(s.sum_outer, np.float64) for s in stats),
                      int(sum(int(s.count) for s in stats)))


def stats_to_mu_sigma(stats: FeatureStats) -> tuple[np.ndarray, np.ndarray]:
  """Mean and unbiased covariance (``np.cov(rowvar=False)``, as pytorch-fid)."""
  n = int(stats.count)
  if n < 2:
    raise ValueError(f"need at least 2 feature vectors for a covariance, got {n}.")
  mu = stats.sum / n
  sigma = (stats.sum_outer - n * np.outer(mu, mu)) / (n - 1)
  return mu, (sigma + sigma.T) / 2


# --------------------------------------------------------------------------
# Fréchet distance


def frechet_distance(*, mu1: Any, sigma1: Any, mu2: Any, sigma2: Any,
                     eps: float = 1e-6) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  ``Tr((S1 S2)^{1/2})`` comes from ``scipy.linalg.sqrtm``; if that is not
  finite (near-singular product, e.g. fewer samples than dims), ``eps * I``
  is added to both covariances. An imaginary residue above 1e-3 on the
  diagonal of the root means the inputs are not valid covariances and raises.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, "
                     f"sigma1 {s1.shape}, sigma2 {s2.shape}; stats must come "
                     f"from the same feature extractor.")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    warnings.warn(f"Fréchet distance: singular covariance product; adding "
                  f"{eps} * I to both covariances.")
    offset = eps * np.eye(s1.shape[0])
    covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
  if np.iscomplexobj(covmean):
    residue = np.max(np.abs(np.diagonal(covmean).imag))
    if residue > 1e-3:
      raise ValueError(f"Fréchet distance: imaginary component {residue:.3g} in "
                       f"sqrtm(S1 S2); covariances are not positive semi-definite.")
    covmean = covmean.real
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


# --------------------------------------------------------------------------
# Reference statistics files


class ReferenceStats(NamedTuple):
  mu: np.ndarray
  sigma: np.ndarray
  protocol: str | None  # None: written by other code (pytorch-fid, TTUR, ADM)
  count: int | None


def save_reference_stats(path: str | os.PathLike[str], *, mu: Any, sigma: Any,
                         protocol: str, count: int) -> None:
  """Write ``mu``, ``sigma`` (float64), ``protocol`` and ``count`` to .npz.

  pytorch-fid reads such a file directly (it uses only ``mu``/``sigma``).
  """
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"need mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}.")
  io_utils.write_npz_atomic(path, dict(mu=mu, sigma=sigma, protocol=np.array(str(protocol)),
                                       count=np.array(int(count), np.int64)))


def load_reference_stats(path: str | os.PathLike[str], *,
                         expected_protocol: str | None = None) -> ReferenceStats:
  """Read reference statistics (keys ``mu``, ``sigma``; no pickle).

  Accepts files from :func:`save_reference_stats`, pytorch-fid / TTUR
  (``mu``, ``sigma``) and ADM ``VIRTUAL_*.npz`` reference batches (their
  ``mu``/``sigma``; ``mu_s``/``sigma_s`` and ``arr_0`` are ignored). If
  ``expected_protocol`` is given and the file records a different protocol,
  raises ValueError (a stand-in file never passes for FID and vice versa).
  """
  with np.load(path, allow_pickle=False) as data:
    keys = set(data.files)
    if not {"mu", "sigma"} <= keys:
      hint = (" It holds images under 'arr_0' (an ADM sample/reference batch "
              "without statistics): compute mu/sigma from them with "
              "experiments/compute_fid_reference.py." if "arr_0" in keys else "")
      raise ValueError(f"{path}: no 'mu'/'sigma' arrays (keys {sorted(keys)}).{hint}")
    mu = np.asarray(data["mu"], np.float64)
    sigma = np.asarray(data["sigma"], np.float64)
    protocol = str(data["protocol"]) if "protocol" in keys else None
    count = int(data["count"]) if "count" in keys else None
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{path}: mu {mu.shape} / sigma {sigma.shape} are not [D] / [D, D].")
  if expected_protocol is not None and protocol is not None and protocol != expected_protocol:
    raise ValueError(f"{path} was computed under protocol {protocol!r}, not "
                     f"{expected_protocol!r}; recompute the reference statistics "
                     f"with the same feature extractor.")
  return ReferenceStats(mu, sigma, protocol, count)


# --------------------------------------------------------------------------
# Inception Score


def inception_score(*, logits: Any, num_splits: int = 10) -> tuple[float, float]:
  """Inception Score (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))``.

  ``logits`` [N, C] (all 1008 Inception logits, as the original code's
  softmax). The set is cut into ``num_splits`` contiguous splits; returns the
  mean and standard deviation of the per-split scores. Float64 throughout.
  """
  z = np.asarray(logits, np.float64)
  if z.ndim != 2 or num_splits < 1 or z.shape[0] < num_splits:
    raise ValueError(f"need logits [N, C] with N >= num_splits={num_splits}, got {z.shape}.")
  log_p = z - z.max(axis=1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
  scores = []
  for part in np.array_split(log_p, num_splits):
    log_py = np.log(np.exp(part).mean(axis=0))
    kl = np.sum(np.exp(part) * (part - log_py), axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------
# Feature extractors and accumulation


class FeatureExtractor(NamedTuple):
  """``fn(uint8[B,H,W,3]) -> (f32[B,dim] features, f32[B,1008] logits)``."""
  fn: Callable[[Any], tuple[Any, Any]]
  protocol: str
  dim: int

  @property
  def is_standin(self) -> bool:
    return self.protocol.startswith(STANDIN_PROTOCOL_PREFIX)


def make_feature_extractor(*, inception_npz: str | os.PathLike[str] | None,
                           allow_standin: bool = False, standin_seed: int = 0,
                           standin_dim: int = 2048) -> FeatureExtractor:
  """The FID Inception extractor, or (only if allowed) the labelled stand-in.

  ``inception_npz``: converted weights (see ``mmd_jax.models.inception``).
  If it is None or missing and ``allow_standin`` is True, returns the fixed
  random stand-in network with a ``STAND-IN, not FID`` protocol; otherwise
  raises with instructions.
  """
  from mmd_jax.models import inception  # jax/flax import kept out of the stats code

  if inception_npz is not None and os.path.exists(inception_npz):
    variables = inception.load_inception_params(os.fspath(inception_npz))
    return FeatureExtractor(inception.make_inception_feature_fn(variables),
                            PROTOCOL, inception.POOL_FEATURES)
  if not allow_standin:
    raise FileNotFoundError(
        f"Inception weights not found ({inception_npz!r}). Download pytorch-fid's "
        f"pt_inception-2015-12-05-6726825d.pth (GitHub mseitzer/pytorch-fid, release "
        f"'FID weights'), convert it with experiments/convert_inception_weights.py, "
        f"or pass allow_standin=True for a labelled non-FID stand-in.")
  warnings.warn("Using the STAND-IN feature extractor: the numbers are not FID.")
  return FeatureExtractor(
      inception.make_standin_feature_fn(seed=standin_seed, feature_dim=standin_dim),
      standin_protocol(seed=standin_seed, feature_dim=standin_dim), standin_dim)


def compute_statistics(*, extractor: FeatureExtractor, batches: Iterable[Any],
                       batch_size: int | None = None, keep_logits: bool = False,
                       keep_features: bool = False) -> dict[str, Any]:
  """Run ``extractor`` over image batches and accumulate float64 statistics.

  ``batches`` yields uint8 [B,H,W,C] (or float in [-1, 1], quantised here);
  C=1 is tiled to RGB, as pytorch-fid's ``convert('RGB')`` does.
  With ``batch_size`` set, every batch is zero-padded to that size so the
  jitted network compiles once; padded rows are dropped. Returns
  ``{"stats": FeatureStats, "logits": f32[N,1008] | None,
  "features": f32[N,D] | None}`` (features are needed for precision/recall).
  """
  stats = init_stats(dim=extractor.dim)
  logits, feats = [], []
  for images in batches:
    images = np.asarray(images)
    if np.issubdtype(images.dtype, np.floating):
      images = quantize_to_uint8(images)
    if images.ndim == 4 and images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    n = images.shape[0]
    if batch_size is not None:
      if n > batch_size:
        raise ValueError(f"batch of {n} images exceeds batch_size={batch_size}.")
      images = np.concatenate(
          [images, np.zeros((batch_size - n,) + images.shape[1:], images.dtype)])
    f, z = extractor.fn(images)
    f, z = np.asarray(f)[:n], np.asarray(z)[:n]
    stats = update_stats(stats, f)
    if keep_logits:
      logits.append(z)
    if keep_features:
      feats.append(f)
  return {"stats": stats,
          "logits": np.concatenate(logits) if keep_logits and logits else None,
          "features": np.concatenate(feats) if keep_features and feats else None}
