"""The per-process training batch iterators of mmd_jax.data.pipeline (built by its
make_train_iterator) and the identity check of their saved state."""

from __future__ import annotations

import json
from typing import Any, Mapping

import grain
import numpy as np

from mmd_jax.data import sources
from mmd_jax.data.errors import IteratorStateMismatchError


def to_model_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = dict(batch)
  out["image"] = batch["image"].astype(np.float32) / np.float32(127.5) - 1.0
  out["label"] = batch["label"].astype(np.int32)
  if "text" in batch:
    out["text"] = batch["text"].astype(np.float32)
  return out


# How a user sets each identity field of an iterator state (the fix named in a mismatch error).
_STATE_FIELD_HINTS = {
    "seed": "--config.seed={saved!r}",
    "global_batch_size": ("global batch size {saved!r} (--config.training.batch_size, or "
                          "--config.distill.batch_size for a student)"),
    "dataset": "data set {saved!r} (--config.data.name / --config.data.data_dir)",
    "split": "split {saved!r} (--config.data.split)",
    "kind": "a {saved!r} data source (--config.data.name)",
}


def check_same_stream(state: Any, current: Mapping[str, Any], *,
                      ignore: tuple[str, ...]) -> None:
  """Raises IteratorStateMismatchError, in one line naming each differing field and the fix,
  if the saved iterator `state` describes another input stream than `current`.

  A state that is not a dict or lacks fields is left to sources.check_state_matches.
  """
  if not isinstance(state, Mapping) or any(k not in state for k in current):
    return
  diffs = [k for k in current if k not in ignore and state[k] != current[k]]
  if not diffs:
    return
  what = "; ".join(f"{k}: saved {state[k]!r} vs now {current[k]!r}" for k in diffs)
  fix = ", ".join(_STATE_FIELD_HINTS.get(k, k + "={saved!r}").format(saved=state[k])
                  for k in diffs)
  raise IteratorStateMismatchError(
      f"The checkpoint's data-iterator state is for another input stream ({what}), so resuming "
      f"would not reproduce the same batches. Resume with the checkpoint's value ({fix}), or "
      "use a new --workdir for the new value.")


class TrainIterator:
  """Infinite per-process batch iterator with JSON-able get_state/set_state."""

  per_process_batch_size: int
  shard_index: int
  shard_count: int

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def get_state(self) -> dict[str, Any]:
    raise NotImplementedError

  def set_state(self, state: Mapping[str, Any]) -> None:
    raise NotImplementedError

  def close(self) -> None:
    """Releases reader threads (optional; safe to call twice)."""


def _check_identity(state: Any, identity: dict[str, Any]) -> None:
  """Refuses a saved state of a grain-indexed stream (either reader) from another stream."""
  current = dict(identity, grain=None)
  check_same_stream(state, current, ignore=("grain", "shard_count"))
  sources.check_state_matches(state, current, ignore=("grain", "shard_count"))


class GrainTrainIterator(TrainIterator):
  """Wraps a grain DatasetIterator and adds identity checks to its state."""

  def __init__(self, iterator: grain.DatasetIterator, *, identity: dict[str, Any],
               per_process_batch_size: int, shard_index: int, shard_count: int):
    self._iterator = iterator
    self._identity = identity
    self.per_process_batch_size = per_process_batch_size
    self.shard_index = shard_index
    self.shard_count = shard_count

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    state = dict(self._identity, grain=self._iterator.get_state())
    return json.loads(json.dumps(state))  # Plain JSON types only.

  def set_state(self, state: Mapping[str, Any]) -> None:
    _check_identity(state, self._identity)
    self._iterator.set_state(state["grain"])

  def close(self) -> None:
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


def decoded_nbytes(record: Mapping[str, Any]) -> int:
  return sum(np.asarray(v).nbytes for v in record.values())


class InMemoryTrainIterator(TrainIterator):
  """The grain stream of make_train_iterator for a split held decoded in memory.

  The record order comes from the same grain index arithmetic applied to range(num_records)
  (shuffle, repeat, batch, shard slice), so batches, `get_state` ({"grain": {"next_index": i}})
  and resumption are those of GrainTrainIterator: either reader resumes the other's state."""

  def __init__(self, arrays: dict[str, np.ndarray], *, seed: int, identity: dict[str, Any],
               per_process_batch_size: int, shard_index: int, shard_count: int):
    num_records = len(next(iter(arrays.values())))
    self._arrays = arrays
    self._indices = (grain.MapDataset.range(num_records).shuffle(seed=seed).repeat(None)
                     .batch(per_process_batch_size, drop_remainder=True)
                     [shard_index::shard_count])
    self._next = 0
    self._identity = identity
    self.per_process_batch_size = per_process_batch_size
    self.shard_index = shard_index
    self.shard_count = shard_count

  def __next__(self) -> dict[str, np.ndarray]:
    rows = np.asarray(self._indices[self._next])
    self._next += 1
    return to_model_batch({k: v[rows] for k, v in self._arrays.items()})

  def get_state(self) -> dict[str, Any]:
    return json.loads(json.dumps(dict(self._identity, grain={"next_index": self._next})))

  def set_state(self, state: Mapping[str, Any]) -> None:
    _check_identity(state, self._identity)
    saved = state["grain"]
    if not (isinstance(saved, Mapping) and isinstance(saved.get("next_index"), int)
            and saved["next_index"] >= 0):
      raise IteratorStateMismatchError(
          f"the saved data iterator state {saved!r} has no non-negative 'next_index'; the "
          "checkpoint's data_state is damaged: resume from an earlier checkpoint.")
    self._next = int(saved["next_index"])


class GmmTrainIterator(TrainIterator):

  def __init__(self, inner: sources.GaussianMixtureIterator):
    self._inner = inner
    self.per_process_batch_size = inner.per_process_batch_size
    self.shard_index = inner.shard_index
    self.shard_count = inner.shard_count

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._inner)

  def get_state(self) -> dict[str, Any]:
    return self._inner.get_state()

  def set_state(self, state: Mapping[str, Any]) -> None:
    check_same_stream(state, self._inner.get_state(), ignore=("step", "shard_count"))
    self._inner.set_state(state)
