"""Training / evaluation input pipelines (grain over TFDS array_record; GMM).

`config_data` (an ml_collections.ConfigDict, or any mapping with `.get`) fields:

  name (str, required)
      "digits": scikit-learn's 8x8 digits, built on first use into data_dir as
                the TFDS dataset "mmd_digits" (split "train" = all 1797 images,
                used both for training and as the metrics reference set).
      "digits_text": the same digits with a synthetic caption embedding
                f32[4, 8] per example under "text" (TFDS "mmd_digits_text",
                built on first use; a stand-in for a text encoder's output,
                see sources.caption_embedding).
      "gmm":    Gaussian mixture read from `spec_path` (see sources.GaussianMixture).
      other:    a TFDS name, optionally with config/version, e.g. "cifar10",
                "imagenet_resized/64x64", "cifar10:3.0.2". It must already be
                prepared as array_record under data_dir; otherwise
                DatasetNotPreparedError explains how. Nothing is downloaded.
  data_dir (str, optional)
      TFDS data directory. Default: $MMD_JAX_DATA_DIR, else ~/.cache/mmd_jax/tfds
      for "digits" and $TFDS_DATA_DIR or ~/tensorflow_datasets for others.
  split (str, default "train")
      TFDS split, slicing allowed ("train[:90%]", "train+test").
  spec_path (str)                     [gmm only] JSON file of the mixture.
  num_eval_examples (int, 10000)      [gmm only] size of load_eval_arrays' sample.
  eval_seed (int, 0)                  [gmm only] seed of that sample.
  num_threads (int, default 2)        grain ReadOptions.num_threads (0: no threads).
  prefetch_buffer_size (int, default 4)  batches read ahead per process.
  in_memory_max_mb (float, default 512)  a split whose decoded records fit in this many
      MiB is decoded once into arrays and each batch is one gather (the same stream,
      state and checkpoints as the grain reader, ~7x less host time per batch on the
      digits); 0 always streams through grain.

Images come out as float32 NHWC in [-1, 1] (uint8 / 127.5 - 1) and labels as
int32; datasets without a "label" feature get all-zero labels and
num_classes 0. Resizing is out of scope (imagenet_resized is already sized).
Text-conditioned data sets have a "text" feature: a fixed-shape float tensor
[L, D] of text-encoder embeddings (computed offline, e.g. T5 outputs), which
comes out as batch["text"] f32[b, L, D]; dataset_info reports its shape as
"text_shape" (None without text). All-zero text is reserved as the null text
of classifier-free guidance (see mmd_jax.diffusion.conditioning).

Train stream (per process, grain MapDataset):
    source -> shuffle(seed') -> repeat() ->
    batch(b = global_batch_size // shard_count, drop_remainder) ->
    [shard_index::shard_count] -> to float
The whole split is reshuffled every epoch deterministically (epoch e uses a
permutation derived from seed and e) and cut into blocks of b records; process
p takes blocks p, p + P, p + 2P, ... (P = shard_count). So global batch i, the
processes' i-th batches concatenated in process order, is records
[i * G, (i + 1) * G) of the shuffled stream (G = global_batch_size) for every
P: the global batch sequence does not depend on the process count, and with
one process it is the stream of earlier versions of this module. Batches
straddle epoch boundaries, so no record is dropped. No worker processes are
used; optional reader threads do not affect the order.

Iterator state (get_state) is a small JSON-able dict such as
    {"kind": "tfds", "dataset": "mmd_digits", "split": "train", "seed": 0,
     "global_batch_size": 64, "shard_count": 1, "grain": {"next_index": 12}}
next_index counts global batches drawn. The state contains no process index
and is identical on every process (all processes draw the same number of
batches), so saving process 0's copy is enough, and it restores on any process
count (shard_count is informational): a run checkpointed on 2 hosts resumes on
1 with the same global batches. set_state refuses a state from a different
dataset/split/seed/global batch size with an IteratorStateMismatchError (a
ValueError and a user error: one line naming the field and the fix). Determinism is
guaranteed for a fixed grain version (0.2.18) and dataset preparation.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import grain
import numpy as np

from mmd_jax.data import iterators, sources
from mmd_jax.data.errors import DatasetNotPreparedError
from mmd_jax.data.iterators import TrainIterator

__all__ = [
    "DatasetNotPreparedError",
    "TrainIterator",
    "dataset_info",
    "load_eval_arrays",
    "load_eval_text",
    "make_train_iterator",
    "resolve_tfds_name_and_dir",
]

_EVAL_READ_CHUNK = 1024


# ----------------------------------------------------------------------------
# Config helpers
# ----------------------------------------------------------------------------


def _get(config_data: Any, key: str, default: Any = None) -> Any:
  value = config_data.get(key, default)
  return default if value is None else value


def _name(config_data: Any) -> str:
  name = _get(config_data, "name")
  if not isinstance(name, str) or not name:
    raise ValueError(
        "config.data.name must be a non-empty string: 'digits', 'gmm' or a TFDS "
        f"name such as 'cifar10'; got {name!r}."
    )
  return name


def resolve_tfds_name_and_dir(config_data: Any) -> tuple[str, str]:
  """(tfds name, data_dir) for an image dataset; builds the digits if needed."""
  name = _name(config_data)
  if name == "gmm":
    raise ValueError("config.data.name='gmm' is not a TFDS dataset.")
  data_dir = _get(config_data, "data_dir", "")
  if name in ("digits", sources.DIGITS_NAME):
    data_dir = os.path.expanduser(data_dir or sources.default_digits_data_dir())
    sources.ensure_digits_prepared(data_dir)
    return sources.DIGITS_NAME, data_dir
  if name in ("digits_text", sources.DIGITS_TEXT_NAME):
    data_dir = os.path.expanduser(data_dir or sources.default_digits_data_dir())
    sources.ensure_digits_text_prepared(data_dir)
    return sources.DIGITS_TEXT_NAME, data_dir
  return name, os.path.expanduser(data_dir or sources.default_tfds_data_dir())


def _open(config_data: Any) -> sources.TfdsSource:
  name, data_dir = resolve_tfds_name_and_dir(config_data)
  split = _get(config_data, "split", "train")
  src = sources.open_tfds_source(name, data_dir=data_dir, split=split)
  _image_layout(src)  # Validate features before anything long happens.
  _text_shape(src)
  return src


def _load_gmm(config_data: Any) -> sources.GaussianMixture:
  spec_path = _get(config_data, "spec_path")
  if not spec_path:
    raise ValueError(
        "config.data.name='gmm' needs config.data.spec_path, a JSON file "
        '{"weights": [K], "means": [[D]*K], "stds": [[D]*K]}.'
    )
  return sources.GaussianMixture.from_json(os.path.expanduser(spec_path))


# ----------------------------------------------------------------------------
# Features and preprocessing
# ----------------------------------------------------------------------------


def _image_layout(src: sources.TfdsSource) -> tuple[tuple[int, int, int], int]:
  """((H, W, C), num_classes) after checking the feature dict is usable."""
  features = src.features
  keys = list(features.keys()) if hasattr(features, "keys") else []
  if "image" not in keys:
    raise ValueError(
        f"dataset {src.name!r} has features {keys}; an 'image' feature is "
        "required (optionally 'label')."
    )
  image = features["image"]
  shape = tuple(image.shape)
  if len(shape) != 3 or any(d is None for d in shape):
    raise ValueError(
        f"dataset {src.name!r} has image shape {shape}; a fixed (H, W, C) shape "
        "is required (resizing is out of scope: use e.g. imagenet_resized/64x64)."
    )
  if np.dtype(image.np_dtype) != np.uint8:
    raise ValueError(
        f"dataset {src.name!r} has image dtype {np.dtype(image.np_dtype)}; uint8 is "
        "required."
    )
  num_classes = 0
  if "label" in keys:
    num_classes = getattr(features["label"], "num_classes", None)
    if not num_classes:
      raise ValueError(
          f"dataset {src.name!r} has a 'label' feature that is not a "
          "ClassLabel; cannot infer num_classes."
      )
  return shape, int(num_classes)


def _text_shape(src: sources.TfdsSource) -> tuple[int, int] | None:
  """(L, D) of the "text" feature (text-encoder embeddings), None without one."""
  features = src.features
  if "text" not in (list(features.keys()) if hasattr(features, "keys") else []):
    return None
  text = features["text"]
  shape = tuple(getattr(text, "shape", ()) or ())
  dtype = getattr(text, "np_dtype", None)
  if (len(shape) != 2 or any(d is None for d in shape) or dtype is None
      or not np.issubdtype(np.dtype(dtype), np.floating)):
    raise ValueError(
        f"dataset {src.name!r} has a 'text' feature of shape {shape} and dtype "
        f"{dtype}; text conditioning needs fixed-shape float embeddings "
        "[tokens, width] (tfds.features.Tensor(shape=(L, D), dtype=np.float32)), "
        "e.g. a text encoder's outputs padded to L tokens."
    )
  return int(shape[0]), int(shape[1])


def _select(index: int, record: Mapping[str, Any], *, has_label: bool,
            include_index: bool, has_text: bool = False) -> dict[str, Any]:
  out = {
      "image": np.asarray(record["image"], np.uint8),
      "label": np.int32(record["label"] if has_label else 0),
  }
  if has_text:
    out["text"] = np.asarray(record["text"], np.float32)
  if include_index:
    out["index"] = np.int64(index)
  return out


# ----------------------------------------------------------------------------
# Train iterator
# ----------------------------------------------------------------------------


def _resolve_shards(shard_index: int | None, shard_count: int | None
                   ) -> tuple[int, int]:
  if (shard_index is None) != (shard_count is None):
    raise ValueError(
        "pass both shard_index and shard_count, or neither (then "
        "jax.process_index()/jax.process_count() are used); got "
        f"shard_index={shard_index!r}, shard_count={shard_count!r}."
    )
  if shard_index is None:
    import jax  # pylint: disable=g-import-not-at-top
    shard_index, shard_count = jax.process_index(), jax.process_count()
  if not (isinstance(shard_count, (int, np.integer)) and shard_count >= 1):
    raise ValueError(f"shard_count must be an int >= 1, got {shard_count!r}.")
  if not (isinstance(shard_index, (int, np.integer))
          and 0 <= shard_index < shard_count):
    raise ValueError(
        f"shard_index must be an int in [0, shard_count={shard_count}), got "
        f"{shard_index!r}."
    )
  return int(shard_index), int(shard_count)


def _per_process_batch(global_batch_size: Any, shard_count: int) -> int:
  if (isinstance(global_batch_size, bool)
      or not isinstance(global_batch_size, (int, np.integer))
      or global_batch_size < 1):
    raise ValueError(
        f"global_batch_size must be a positive int, got {global_batch_size!r}."
    )
  if global_batch_size % shard_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} is not divisible by the number "
        f"of processes (shard_count={shard_count}); use a multiple of "
        f"{shard_count}."
    )
  return int(global_batch_size) // shard_count


def _shuffle_seed(seed: int) -> int:
  # Our own derivation (not grain's private one) keeps the order stable across
  # grain versions, and decorrelates seed s epoch e+1 from seed s+1 epoch e
  # (grain's shuffle uses seed + epoch internally).
  return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])


def make_train_iterator(
    config_data: Any,
    *,
    global_batch_size: int,
    seed: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    include_index: bool = False,
) -> TrainIterator:
  """Returns an infinite iterator of per-process training batches.

  Each `next()` gives {"image": f32[b,H,W,C] in [-1,1], "label": i32[b]} (plus
  "text": f32[b,L,D] for data sets with a text feature; or
  {"x": f32[b,D], "label": i32[b]} for name="gmm") with
  b = global_batch_size // shard_count. `include_index=True` adds
  "index": i64[b], the record index within the split (for tests/debugging).

  Raises:
    ValueError: global_batch_size not divisible by shard_count (names both),
      bad seed/shard arguments, or unusable dataset features.
    DatasetNotPreparedError: the TFDS dataset is not prepared as array_record.
  """
  shard_index, shard_count = _resolve_shards(shard_index, shard_count)
  per_process = _per_process_batch(global_batch_size, shard_count)
  seed = sources.check_seed(seed)

  if _name(config_data) == "gmm":
    return iterators.GmmTrainIterator(sources.GaussianMixtureIterator(
        _load_gmm(config_data), global_batch_size=int(global_batch_size),
        seed=seed, shard_index=shard_index, shard_count=shard_count))

  src = _open(config_data)
  _, num_classes = _image_layout(src)
  has_text = _text_shape(src) is not None
  num_records = len(src.source)
  if num_records < 1:
    raise ValueError(f"dataset {src.name!r} split {src.split!r} has no records.")
  identity = {
      "kind": "tfds",
      "dataset": src.name,
      "split": src.split,
      "seed": seed,
      "global_batch_size": int(global_batch_size),
      "shard_count": shard_count,
  }
  shards = dict(per_process_batch_size=per_process, shard_index=shard_index,
                shard_count=shard_count)

  def select(index, record):
    # Later epochs ask the source for index + epoch * num_records.
    return _select(index % num_records, record, has_label=num_classes > 0,
                   include_index=include_index, has_text=has_text)

  max_bytes = float(_get(config_data, "in_memory_max_mb", 512)) * 2**20
  if num_records * iterators.decoded_nbytes(select(0, src.source[0])) <= max_bytes:
    records = [select(i, r) for i, r in enumerate(
        src.source.__getitems__(list(range(num_records))))]
    arrays = {k: np.stack([r[k] for r in records]) for k in records[0]}
    return iterators.InMemoryTrainIterator(arrays, seed=_shuffle_seed(seed),
                                           identity=identity, **shards)

  ds = grain.MapDataset.source(src.source).map_with_index(select)
  ds = ds.shuffle(seed=_shuffle_seed(seed)).repeat(None)
  # Sharding whole per-process batches after the shuffle keeps the global
  # batches independent of shard_count (see the module docstring).
  ds = ds.batch(per_process, drop_remainder=True)
  ds = ds[shard_index::shard_count].map(iterators.to_model_batch)
  read_options = grain.ReadOptions(
      num_threads=int(_get(config_data, "num_threads", 2)),
      prefetch_buffer_size=int(_get(config_data, "prefetch_buffer_size", 4)),
  )
  iterator = iter(ds.to_iter_dataset(read_options))
  return iterators.GrainTrainIterator(iterator, identity=identity, **shards)


# ----------------------------------------------------------------------------
# Metadata and eval arrays
# ----------------------------------------------------------------------------


def dataset_info(config_data: Any) -> dict[str, Any]:
  """{"image_shape": (H, W, C), "num_classes", "num_examples", "data_shape",
  "text_shape"}.

  text_shape is (L, D) for data sets with a "text" feature, else None.
  For name="gmm": image_shape None, data_shape (D,), num_classes K (labels are
  component indices), num_examples None (infinite), text_shape None.
  """
  if _name(config_data) == "gmm":
    gmm = _load_gmm(config_data)
    return {"image_shape": None, "data_shape": (gmm.dim,),
            "num_classes": gmm.num_components, "num_examples": None,
            "text_shape": None}
  src = _open(config_data)
  shape, num_classes = _image_layout(src)
  return {"image_shape": shape, "data_shape": shape,
          "num_classes": num_classes, "num_examples": len(src.source),
          "text_shape": _text_shape(src)}


def load_eval_arrays(config_data: Any, *, max_examples: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Whole split in record order: (f32[N,H,W,C] in [-1,1], i32[N]).

  Meant for small sets (digits, a CIFAR-10 split); `max_examples` keeps the
  first N records. For name="gmm" returns a fixed sample
  (f32[N,D], i32[N]) of config num_eval_examples (default 10000) drawn with
  config eval_seed (default 0).
  """
  if max_examples is not None and (
      not isinstance(max_examples, (int, np.integer)) or max_examples < 1):
    raise ValueError(f"max_examples must be a positive int, got {max_examples!r}.")
  if _name(config_data) == "gmm":
    gmm = _load_gmm(config_data)
    n = int(_get(config_data, "num_eval_examples", 10000))
    if max_examples is not None:
      n = min(n, int(max_examples))
    sample = gmm.sample(int(_get(config_data, "eval_seed", 0)), n)
    return sample["x"], sample["label"]

  out = _read_eval(config_data, max_examples=max_examples, with_text=False)
  return out["image"], out["label"]


def load_eval_text(config_data: Any, *, max_examples: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray] | None:
  """(text f32[N, L, D], labels i32[N]) of the split in record order, the same
  records as load_eval_arrays; None for data sets without a "text" feature.
  Evaluation conditions its samples on these real captions."""
  if max_examples is not None and (
      not isinstance(max_examples, (int, np.integer)) or max_examples < 1):
    raise ValueError(f"max_examples must be a positive int, got {max_examples!r}.")
  if _name(config_data) == "gmm" or _text_shape(_open(config_data)) is None:
    return None
  out = _read_eval(config_data, max_examples=max_examples, with_text=True)
  return out["text"], out["label"]


def _read_eval(config_data: Any, *, max_examples: int | None, with_text: bool
              ) -> dict[str, np.ndarray]:
  src = _open(config_data)
  _, num_classes = _image_layout(src)
  n = len(src.source)
  if max_examples is not None:
    n = min(n, int(max_examples))
  keys = ("image", "label") + (("text",) if with_text else ())
  parts = {k: [] for k in keys}
  for start in range(0, n, _EVAL_READ_CHUNK):
    indices = list(range(start, min(n, start + _EVAL_READ_CHUNK)))
    records = src.source.__getitems__(indices)
    rows = [_select(i, r, has_label=num_classes > 0, include_index=False,
                    has_text=with_text)
            for i, r in zip(indices, records)]
    batch = iterators.to_model_batch({k: np.stack([r[k] for r in rows]) for k in keys})
    for k in keys:
      parts[k].append(batch[k])
  return {k: np.concatenate(v) for k, v in parts.items()}

