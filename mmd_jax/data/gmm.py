"""A diagonal-covariance Gaussian mixture as a data source.

`GaussianMixture` has a numpy and a JAX sampler; `GaussianMixtureIterator` is
an infinite, checkpointable, process-sharded batch iterator over it.
`check_state_matches` validates a saved iterator state against the current
stream (also used for the TFDS iterators in `mmd_jax.data.pipeline`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

from mmd_jax import io_utils
from mmd_jax.data.errors import IteratorStateMismatchError


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
  """Mixture of K diagonal Gaussians in D dimensions.

  p(x) = sum_k weights[k] * N(x; means[k], diag(stds[k]**2)).
  Arrays are stored as float64 numpy; weights are renormalised to sum exactly
  to one after validation.

  JSON format (`from_json` / `to_json`):
      {"weights": [K], "means": [[D] * K], "stds": [[D] * K]}
  """

  weights: np.ndarray  # f64[K]
  means: np.ndarray  # f64[K, D]
  stds: np.ndarray  # f64[K, D]

  def __post_init__(self):
    weights = _as_float_array("weights", self.weights)
    means = _as_float_array("means", self.means)
    stds = _as_float_array("stds", self.stds)
    if weights.ndim != 1 or weights.shape[0] == 0:
      raise ValueError(
          f"GaussianMixture weights must be a non-empty vector [K], got shape "
          f"{weights.shape}."
      )
    k = weights.shape[0]
    if means.ndim != 2 or means.shape[0] != k or means.shape[1] == 0:
      raise ValueError(
          f"GaussianMixture means must have shape [K, D] = [{k}, D] with D >= 1 "
          f"(K from weights), got {means.shape}."
      )
    if stds.shape != means.shape:
      raise ValueError(
          f"GaussianMixture stds must have the same shape as means {means.shape} "
          f"(one std per component and dimension), got {stds.shape}."
      )
    if np.any(weights <= 0):
      raise ValueError(
          f"GaussianMixture weights must be > 0 (drop empty components), got "
          f"{weights}."
      )
    if abs(weights.sum() - 1.0) > 1e-6:
      raise ValueError(
          f"GaussianMixture weights must sum to 1, got sum {weights.sum()!r}; "
          "normalise them (w / sum(w))."
      )
    if np.any(stds <= 0):
      raise ValueError(
          f"GaussianMixture stds must be > 0, got min {stds.min()!r}."
      )
    object.__setattr__(self, "weights", weights / weights.sum())
    object.__setattr__(self, "means", means)
    object.__setattr__(self, "stds", stds)

  @property
  def num_components(self) -> int:
    return int(self.weights.shape[0])

  @property
  def dim(self) -> int:
    return int(self.means.shape[1])

  # -- serialisation ---------------------------------------------------------

  def to_dict(self) -> dict[str, list]:
    return {
        "weights": self.weights.tolist(),
        "means": self.means.tolist(),
        "stds": self.stds.tolist(),
    }

  @classmethod
  def from_dict(cls, spec: Mapping[str, Any]) -> "GaussianMixture":
    if not isinstance(spec, Mapping):
      raise ValueError(
          f"GaussianMixture spec must be a JSON object, got {type(spec).__name__}."
      )
    expected = {"weights", "means", "stds"}
    missing, extra = expected - set(spec), set(spec) - expected
    if missing or extra:
      raise ValueError(
          "GaussianMixture spec must have exactly the keys "
          f"{sorted(expected)}; missing {sorted(missing)}, unexpected "
          f"{sorted(extra)}."
      )
    return cls(weights=spec["weights"], means=spec["means"], stds=spec["stds"])

  def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
    """Returns the JSON text; also writes it to `path` when given."""
    text = json.dumps(self.to_dict(), indent=2)
    if path is not None:
      io_utils.write_text_atomic(path, text + "\n")
    return text

  @classmethod
  def from_json(cls, path: str | os.PathLike[str]) -> "GaussianMixture":
    try:
      with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    except FileNotFoundError as e:
      raise ValueError(f"GaussianMixture spec file {path!r} not found.") from e
    except json.JSONDecodeError as e:
      raise ValueError(
          f"GaussianMixture spec file {path!r} is not valid JSON: {e}"
      ) from e
    return cls.from_dict(spec)

  # -- sampling --------------------------------------------------------------

  def sample(
      self, rng: int | np.random.Generator, n: int
  ) -> dict[str, np.ndarray]:
    """Draws n samples with numpy: {"x": f32[n, D], "label": i32[n]}.

    `rng` is a non-negative int seed or a `np.random.Generator`; the label is
    the index of the component each sample came from.
    """
    n = _check_count(n)
    if not isinstance(rng, np.random.Generator):
      rng = np.random.default_rng(check_seed(rng))
    label = rng.choice(self.num_components, size=n, p=self.weights)
    noise = rng.standard_normal((n, self.dim))
    x = self.means[label] + self.stds[label] * noise
    return {"x": x.astype(np.float32), "label": label.astype(np.int32)}

  def sample_jax(self, key, n: int) -> dict[str, Any]:
    """JAX version of `sample` (traceable; n static): f32[n, D], i32[n]."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    n = _check_count(n)
    key_label, key_noise = jax.random.split(key)
    log_w = jnp.log(jnp.asarray(self.weights, jnp.float32))
    label = jax.random.categorical(key_label, log_w, shape=(n,))
    noise = jax.random.normal(key_noise, (n, self.dim), jnp.float32)
    means = jnp.asarray(self.means, jnp.float32)
    stds = jnp.asarray(self.stds, jnp.float32)
    return {
        "x": means[label] + stds[label] * noise,
        "label": label.astype(jnp.int32),
    }


def _as_float_array(field: str, value: Any) -> np.ndarray:
  try:
    arr = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"GaussianMixture {field} must be a (nested) list of numbers: {e}"
    ) from e
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"GaussianMixture {field} must be finite, got {arr}.")
  return arr


def _check_count(n: Any) -> int:
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"number of samples must be a positive int, got {n!r}.")
  return int(n)


def check_seed(seed: Any) -> int:
  if (
      isinstance(seed, bool)
      or not isinstance(seed, (int, np.integer))
      or not 0 <= seed < 2**32
  ):
    raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}.")
  return int(seed)


class GaussianMixtureIterator:
  """Infinite, checkpointable, sharded batch iterator over a GaussianMixture.

  Global batch `step` (G = global_batch_size samples) is drawn from a numpy
  generator seeded with the SeedSequence fold-in (seed, step, 0), so batches
  are independent of how many were drawn before; shard p of P gets its rows
  [p * G / P, (p + 1) * G / P). Every process draws the whole global batch
  (cheap for low-dimensional data) so that the global batches, and the
  meaning of the state, do not depend on the process count.
  State: {"kind": "gmm", "seed", "global_batch_size", "shard_count", "step"};
  it is the same on every process, so saving process 0's state suffices, and
  it restores on any process count (shard_count is informational).
  """

  def __init__(
      self,
      mixture: GaussianMixture,
      *,
      global_batch_size: int,
      seed: int,
      shard_index: int,
      shard_count: int,
  ):
    self.mixture = mixture
    self.seed = check_seed(seed)
    self.global_batch_size = global_batch_size
    self.shard_index = shard_index
    self.shard_count = shard_count
    self.per_process_batch_size = _check_count(global_batch_size // shard_count)
    self._step = 0

  def __iter__(self) -> "GaussianMixtureIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    # The constant 0 (formerly the shard index) keeps one-process streams as
    # they were before the global batch became process-count independent.
    rng = np.random.default_rng([self.seed, self._step, 0])
    self._step += 1
    batch = self.mixture.sample(rng, self.global_batch_size)
    rows = slice(self.shard_index * self.per_process_batch_size,
                 (self.shard_index + 1) * self.per_process_batch_size)
    return {k: v[rows] for k, v in batch.items()}

  def get_state(self) -> dict[str, Any]:
    return {
        "kind": "gmm",
        "seed": self.seed,
        "global_batch_size": self.global_batch_size,
        "shard_count": self.shard_count,
        "step": self._step,
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    check_state_matches(state, self.get_state(), ignore=("step", "shard_count"))
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"iterator state 'step' must be an int >= 0, got {step!r}.")
    self._step = int(step)


def check_state_matches(
    state: Mapping[str, Any], current: Mapping[str, Any], *, ignore: tuple[str, ...]
) -> None:
  """Raises IteratorStateMismatchError (a ValueError and a user error) unless `state`
  describes the same stream as `current`."""
  if not isinstance(state, Mapping):
    raise IteratorStateMismatchError(
        f"iterator state must be a dict from get_state(), got {type(state).__name__}."
    )
  missing = [k for k in current if k not in state]
  if missing:
    raise IteratorStateMismatchError(
        f"iterator state lacks keys {missing}; it must come from get_state() of "
        f"the same kind of iterator (expected keys {sorted(current)})."
    )
  diffs = [
      f"{k}: saved {state[k]!r} vs now {current[k]!r}"
      for k in current
      if k not in ignore and state[k] != current[k]
  ]
  if diffs:
    raise IteratorStateMismatchError(
        "iterator state was saved for a different input stream ("
        + "; ".join(diffs)
        + "); resuming would not reproduce the same batches. Restore with the "
        "same dataset, split, seed and global batch size."
    )
