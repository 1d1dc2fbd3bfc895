"""Tests for mmd_jax.data (digits builder, grain pipeline, GMM source)."""

import json
import os
import shutil
import sys

import ml_collections
import numpy as np
import pytest
from sklearn.datasets import load_digits

from mmd_jax.data import pipeline
from mmd_jax.data import sources
from mmd_jax.data import tfds_source
from mmd_jax.data.errors import DatasetNotPreparedError

NUM_DIGITS = 1797


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  sources.ensure_digits_prepared(path)
  return path


def _cfg(**kw):
  return ml_collections.ConfigDict(dict(split="train", **kw))


def _digits(data_dir):
  return _cfg(name="digits", data_dir=data_dir)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ----------------------------------------------------------------------------
# Digits builder + pipeline basics
# ----------------------------------------------------------------------------


def test_digits_to_uint8_rounds_half_up():
  np.testing.assert_array_equal(
      sources.digits_to_uint8(np.array([0, 1, 8, 15, 16])),
      np.array([0, 16, 128, 239, 255], np.uint8),
  )
  with pytest.raises(ValueError, match="0, 16"):
    sources.digits_to_uint8(np.array([17]))


def test_digits_builder_writes_all_examples(data_dir):
  version_dir = os.path.join(data_dir, "mmd_digits", "1.0.0")
  info_path = os.path.join(version_dir, "dataset_info.json")
  mtime = os.path.getmtime(info_path)
  sources.ensure_digits_prepared(data_dir)  # Idempotent: no rebuild.
  assert os.path.getmtime(info_path) == mtime

  info = pipeline.dataset_info(_digits(data_dir))
  assert info["image_shape"] == (8, 8, 1)
  assert info["num_classes"] == 10
  assert info["num_examples"] == NUM_DIGITS

  images, labels = pipeline.load_eval_arrays(_digits(data_dir))
  assert images.shape == (NUM_DIGITS, 8, 8, 1) and images.dtype == np.float32
  assert labels.shape == (NUM_DIGITS,) and labels.dtype == np.int32
  assert images.min() == -1.0 and images.max() == 1.0
  # Exactly sklearn's digits (as a multiset; TFDS reorders records).
  ref = load_digits()
  ref_u8 = sources.digits_to_uint8(ref.images)[..., None]
  got_u8 = np.rint((images + 1.0) * 127.5).astype(np.uint8)
  key = lambda im, lab: sorted(  # pylint: disable=g-long-lambda
      a.tobytes() + bytes([int(b)]) for a, b in zip(im, lab))
  assert key(got_u8, labels) == key(ref_u8, ref.target)
  assert "tensorflow" not in sys.modules


def test_train_batches_shapes_and_ranges(data_dir):
  # Default sharding: jax.process_index() / jax.process_count() (= 0 / 1 here).
  it = pipeline.make_train_iterator(_digits(data_dir), global_batch_size=16,
                                    seed=0)
  assert (it.shard_index, it.shard_count) == (0, 1)
  batch = next(it)
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (16, 8, 8, 1)
  assert batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["label"].dtype == np.int32
  assert ((0 <= batch["label"]) & (batch["label"] < 10)).all()
  it.close()


def test_prepared_catalogue_style_dataset_uses_same_path(data_dir, tmp_path):
  # Any prepared array_record directory works, located purely by name.
  shutil.copytree(os.path.join(data_dir, "mmd_digits", "1.0.0"),
                  tmp_path / "my_set" / "2.0.0")
  cfg = _cfg(name="my_set", data_dir=str(tmp_path))
  assert pipeline.dataset_info(cfg)["num_examples"] == NUM_DIGITS
  batch = next(pipeline.make_train_iterator(
      cfg, global_batch_size=4, seed=1, shard_index=0, shard_count=1))
  assert batch["image"].shape == (4, 8, 8, 1)


# ----------------------------------------------------------------------------
# Determinism, sharding, resume
# ----------------------------------------------------------------------------


def test_same_seed_same_batches_different_seed_differs(data_dir):
  kw = dict(global_batch_size=32, shard_index=0, shard_count=1)
  a = _take(pipeline.make_train_iterator(_digits(data_dir), seed=3, **kw), 3)
  b = _take(pipeline.make_train_iterator(_digits(data_dir), seed=3, **kw), 3)
  c = _take(pipeline.make_train_iterator(_digits(data_dir), seed=4, **kw), 3)
  _assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def _global_batches(cfg, shard_count, n, **kw):
  """The first n global batches: each process's batches concatenated in process order."""
  shards = [_take(pipeline.make_train_iterator(
      cfg, shard_index=p, shard_count=shard_count, include_index=True, **kw), n)
            for p in range(shard_count)]
  return [{k: np.concatenate([s[i][k] for s in shards]) for k in shards[0][i]}
          for i in range(n)]


def test_global_batches_do_not_depend_on_process_count(data_dir):
  kw = dict(global_batch_size=32, seed=0)
  one = _global_batches(_digits(data_dir), 1, 4, **kw)
  for shard_count in (2, 4):
    _assert_batches_equal(_global_batches(_digits(data_dir), shard_count, 4, **kw), one)


def test_one_process_order_is_pinned(data_dir):
  # Published digits results were trained on this order (recorded before the global batches
  # became process-count independent); batch 28 straddles the first epoch boundary.
  it = pipeline.make_train_iterator(_digits(data_dir), global_batch_size=64, seed=0,
                                    shard_index=0, shard_count=1, include_index=True)
  batches = _take(it, 29)
  assert batches[0]["index"][:8].tolist() == [371, 833, 10, 197, 594, 1082, 1677, 839]
  assert batches[0]["label"][:8].tolist() == [6, 7, 6, 7, 7, 5, 2, 2]
  assert batches[28]["index"][:8].tolist() == [128, 624, 918, 953, 1218, 433, 1614, 898]


def test_in_memory_reader_is_the_grain_stream_and_shares_its_state(data_dir):
  # The digits fit in memory, so make_train_iterator gathers from decoded arrays; with
  # in_memory_max_mb=0 it streams through grain. Both must give the same batches (two shards,
  # across the first epoch boundary) and resume from each other's saved state.
  streaming = _cfg(name="digits", data_dir=data_dir, in_memory_max_mb=0)
  kw = dict(global_batch_size=128, seed=5)
  assert type(pipeline.make_train_iterator(_digits(data_dir), **kw, shard_index=0,
                                           shard_count=1)).__name__ == "InMemoryTrainIterator"
  assert type(pipeline.make_train_iterator(streaming, **kw, shard_index=0,
                                           shard_count=1)).__name__ == "GrainTrainIterator"
  _assert_batches_equal(_global_batches(_digits(data_dir), 2, 16, **kw),
                        _global_batches(streaming, 2, 16, **kw))
  for saver, loader in ((_digits(data_dir), streaming), (streaming, _digits(data_dir))):
    it = pipeline.make_train_iterator(saver, shard_index=1, shard_count=2, **kw)
    _take(it, 13)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 3)
    resumed = pipeline.make_train_iterator(loader, shard_index=1, shard_count=2, **kw)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 3), expected)


def test_epochs_cover_split_and_reshuffle(data_dir):
  # 2 processes x 29 = 58 per global batch; 62 global batches = 3596 records, just over 2 epochs.
  stream = np.concatenate([b["index"] for b in _global_batches(
      _digits(data_dir), 2, 62, global_batch_size=58, seed=0)])
  epoch0, epoch1 = stream[:NUM_DIGITS], stream[NUM_DIGITS:2 * NUM_DIGITS]
  assert sorted(epoch0.tolist()) == list(range(NUM_DIGITS))  # each record once per epoch
  assert sorted(epoch1.tolist()) == list(range(NUM_DIGITS))
  assert not np.array_equal(epoch0, epoch1)  # a new order each epoch


def test_state_saved_on_two_processes_resumes_on_one(data_dir):
  kw = dict(global_batch_size=32, seed=2)
  states = []
  for shard in range(2):
    it = pipeline.make_train_iterator(_digits(data_dir), shard_index=shard, shard_count=2, **kw)
    _take(it, 3)
    states.append(json.loads(json.dumps(it.get_state())))
  assert states[0] == states[1] and states[0]["shard_count"] == 2
  expected = _global_batches(_digits(data_dir), 1, 5, **kw)[3:]
  resumed = pipeline.make_train_iterator(
      _digits(data_dir), shard_index=0, shard_count=1, include_index=True, **kw)
  resumed.set_state(states[0])
  _assert_batches_equal(_take(resumed, 2), expected)
  other = pipeline.make_train_iterator(_digits(data_dir), global_batch_size=64, seed=2,
                                       shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match="global_batch_size: saved 32 vs now 64"):
    other.set_state(states[0])


def test_resume_from_state_matches_uninterrupted(data_dir):
  kw = dict(global_batch_size=64, seed=7, shard_index=0, shard_count=1)
  ref = pipeline.make_train_iterator(_digits(data_dir), **kw)
  _take(ref, 27)  # 1797 // 64 = 28 batches per epoch: resume near a boundary.
  state = json.loads(json.dumps(ref.get_state()))
  expected = _take(ref, 3)

  fresh = pipeline.make_train_iterator(_digits(data_dir), **kw)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 3), expected)

  other = pipeline.make_train_iterator(
      _digits(data_dir), **dict(kw, seed=8))
  with pytest.raises(ValueError, match="seed"):
    other.set_state(state)


def test_state_is_process_independent(data_dir):
  states = []
  for shard in range(2):
    it = pipeline.make_train_iterator(
        _digits(data_dir), global_batch_size=8, seed=0, shard_index=shard,
        shard_count=2)
    _take(it, 2)
    states.append(it.get_state())
  assert states[0] == states[1]


def test_batch_not_divisible_names_numbers(data_dir):
  with pytest.raises(ValueError, match=r"global_batch_size=10.*shard_count=3"):
    pipeline.make_train_iterator(_digits(data_dir), global_batch_size=10,
                                 seed=0, shard_index=0, shard_count=3)


# ----------------------------------------------------------------------------
# Missing datasets: clear error, never a download
# ----------------------------------------------------------------------------


@pytest.fixture
def no_tfds_network(monkeypatch):
  def forbidden(*args, **kwargs):
    raise AssertionError("a TFDS function that may download was called")
  for fn in ("builder", "load", "data_source"):
    monkeypatch.setattr(tfds_source.tfds, fn, forbidden)


def test_missing_catalogue_dataset_raises_with_instructions(
    tmp_path, no_tfds_network):
  # Fails fast: the error comes before any TFDS call that could download (no_tfds_network).
  with pytest.raises(DatasetNotPreparedError) as err:
    pipeline.make_train_iterator(
        _cfg(name="cifar10", data_dir=str(tmp_path)), global_batch_size=8,
        seed=0, shard_index=0, shard_count=1)
  msg = str(err.value)
  assert isinstance(err.value, ValueError)
  assert str(tmp_path / "cifar10") in msg
  assert f"tfds build cifar10 --file_format=array_record --data_dir={tmp_path}" in msg
  assert "download_and_prepare()" in msg


def test_tfrecord_only_preparation_is_rejected(data_dir, tmp_path,
                                               no_tfds_network):
  version_dir = tmp_path / "cifar10" / "3.0.2"
  version_dir.mkdir(parents=True)
  for f in ("dataset_info.json", "features.json"):
    shutil.copy(os.path.join(data_dir, "mmd_digits", "1.0.0", f), version_dir)
  (version_dir / "cifar10-train.tfrecord-00000-of-00001").write_bytes(b"")
  with pytest.raises(DatasetNotPreparedError, match="TFRecord") as err:
    pipeline.dataset_info(_cfg(name="cifar10", data_dir=str(tmp_path)))
  assert "--out_file_format=array_record" in str(err.value)


# ----------------------------------------------------------------------------
# Gaussian mixture
# ----------------------------------------------------------------------------

_SPEC = {"weights": [0.2, 0.8], "means": [[-4.0, 0.0], [3.0, 1.0]],
         "stds": [[0.5, 0.5], [1.0, 0.2]]}


@pytest.mark.parametrize("change, match", [
    ({"weights": [0.5, 0.6]}, "sum to 1"),
    ({"weights": [1.0, 0.0]}, "weights must be > 0"),
    ({"means": [[0.0, 0.0]]}, r"\[2, D\]"),
    ({"stds": [[1.0], [1.0]]}, "same shape"),
    ({"stds": [[1.0, 0.0], [1.0, 1.0]]}, "stds must be > 0"),
])
def test_gmm_validation(change, match):
  with pytest.raises(ValueError, match=match):
    sources.GaussianMixture.from_dict(dict(_SPEC, **change))


def test_gmm_json_roundtrip_and_bad_keys(tmp_path):
  path = tmp_path / "gmm.json"
  sources.GaussianMixture.from_dict(_SPEC).to_json(path)
  gmm = sources.GaussianMixture.from_json(path)
  np.testing.assert_allclose(gmm.means, _SPEC["means"])
  path.write_text(json.dumps({"weights": [1.0], "means": [[0.0]]}))
  with pytest.raises(ValueError, match="missing.*stds"):
    sources.GaussianMixture.from_json(path)


def test_gmm_sampler_statistics():
  gmm = sources.GaussianMixture.from_dict(_SPEC)
  s = gmm.sample(0, 20000)
  assert s["x"].shape == (20000, 2) and s["x"].dtype == np.float32
  assert s["label"].dtype == np.int32
  np.testing.assert_allclose(np.bincount(s["label"]) / 20000, [0.2, 0.8],
                             atol=0.015)
  for k in range(2):
    xk = s["x"][s["label"] == k]
    np.testing.assert_allclose(xk.mean(0), _SPEC["means"][k], atol=0.05)
    np.testing.assert_allclose(xk.std(0), _SPEC["stds"][k], rtol=0.05)
  np.testing.assert_allclose(s["x"].mean(0), [1.6, 0.8], atol=0.1)
  np.testing.assert_array_equal(gmm.sample(0, 10)["x"], gmm.sample(0, 10)["x"])


def test_gmm_sample_jax_statistics():
  import jax  # pylint: disable=g-import-not-at-top
  gmm = sources.GaussianMixture.from_dict(_SPEC)
  s = gmm.sample_jax(jax.random.key(0), 4000)
  assert s["x"].shape == (4000, 2) and s["label"].dtype == np.int32
  assert abs(float(np.mean(np.asarray(s["label"]))) - 0.8) < 0.03


def test_gmm_pipeline_iterator_resume_and_shards(tmp_path):
  path = tmp_path / "gmm.json"
  path.write_text(json.dumps(_SPEC))
  cfg = _cfg(name="gmm", spec_path=str(path))
  info = pipeline.dataset_info(cfg)
  assert info["data_shape"] == (2,) and info["num_classes"] == 2

  kw = dict(global_batch_size=8, seed=5, shard_count=2)
  it = pipeline.make_train_iterator(cfg, shard_index=0, **kw)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 2)
  assert expected[0]["x"].shape == (4, 2)
  fresh = pipeline.make_train_iterator(cfg, shard_index=0, **kw)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 2), expected)

  other_shard = pipeline.make_train_iterator(cfg, shard_index=1, **kw)
  other_shard.set_state(state)
  second_half = next(other_shard)
  assert not np.array_equal(second_half["x"], expected[0]["x"])
  # The same global batches on one process, resumed from the two-process state.
  one = pipeline.make_train_iterator(cfg, global_batch_size=8, seed=5, shard_index=0,
                                     shard_count=1)
  one.set_state(state)
  _assert_batches_equal(
      [next(one)], [{k: np.concatenate([expected[0][k], second_half[k]]) for k in second_half}])
  with pytest.raises(ValueError, match=r"global_batch_size=9.*shard_count=2"):
    pipeline.make_train_iterator(cfg, global_batch_size=9, seed=0,
                                 shard_index=0, shard_count=2)
  x, labels = pipeline.load_eval_arrays(cfg, max_examples=100)
  assert x.shape == (100, 2) and labels.shape == (100,)
