"""Data sources: TFDS array_record datasets (read without TensorFlow) and a GMM.

Three things live here:

* `MmdDigits` / `ensure_digits_prepared`: scikit-learn's bundled 8x8 digits
  (Alpaydin & Kaynak, UCI "Optical Recognition of Handwritten Digits"; 1797
  images, values 0..16, 10 classes), written once into a local TFDS
  array_record dataset named "mmd_digits". Split "train" holds all 1797
  images: they are used both for training and as the reference set for
  metrics (no held-out split). Pixels are rescaled 0..16 -> 0..255 as
  round-half-up(v * 255 / 16), stored uint8 with shape (8, 8, 1).
* `MmdDigitsText` / `ensure_digits_text_prepared`: the same digits with a
  synthetic "caption embedding" per example, "mmd_digits_text": features
  {image, label, text: f32[TEXT_LEN, TEXT_DIM]}. It is a stand-in for a
  frozen text encoder's output, made by this project (no encoder, no
  download); see `caption_embedding`.
* `open_tfds_source`: opens any prepared TFDS dataset (catalogue or the digits)
  for random access. It first inspects the filesystem itself
  (`<data_dir>/<name>[/<config>]/<version>/` with dataset_info.json,
  features.json and `*-<split>.array_record-*` shards) and raises
  `DatasetNotPreparedError` with preparation instructions if anything is
  missing, so no TFDS call is ever made that could start a download.
  The dataset is then reconstructed from its directory
  (`tfds.builder_from_directory`), which needs neither TensorFlow nor the
  catalogue code.
* `GaussianMixture` (diagonal-covariance mixture) with a numpy and a JAX
  sampler, and `GaussianMixtureIterator`, an infinite, checkpointable,
  process-sharded batch iterator over it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Any, Mapping

import numpy as np
import tensorflow_datasets as tfds

from mmd_jax.data.errors import DatasetNotPreparedError

DATA_DIR_ENV = "MMD_JAX_DATA_DIR"
DIGITS_NAME = "mmd_digits"
DIGITS_VERSION = "1.0.0"
DIGITS_NUM_EXAMPLES = 1797
DIGITS_TEXT_NAME = "mmd_digits_text"
DIGITS_TEXT_VERSION = "1.0.0"
TEXT_LEN = 4  # tokens per caption
TEXT_DIM = 8  # width of a token embedding

_NAME_RE = re.compile(
    r"^(?P<name>[a-z0-9_]+(?:/[A-Za-z0-9_.\-]+)?)(?::(?P<version>\d+\.\d+\.\d+))?$"
)
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


# ----------------------------------------------------------------------------
# Data directories
# ----------------------------------------------------------------------------


def default_digits_data_dir() -> str:
  """$MMD_JAX_DATA_DIR if set, else ~/.cache/mmd_jax/tfds."""
  env = os.environ.get(DATA_DIR_ENV)
  if env:
    return os.path.expanduser(env)
  return os.path.join(os.path.expanduser("~"), ".cache", "mmd_jax", "tfds")


def default_tfds_data_dir() -> str:
  """$MMD_JAX_DATA_DIR, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  for env in (DATA_DIR_ENV, "TFDS_DATA_DIR"):
    if os.environ.get(env):
      return os.path.expanduser(os.environ[env])
  return os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


# ----------------------------------------------------------------------------
# Digits builder
# ----------------------------------------------------------------------------


def digits_to_uint8(images: np.ndarray) -> np.ndarray:
  """Maps integer digit intensities 0..16 to uint8 0..255 (round half up)."""
  values = np.asarray(images).astype(np.int64)
  if values.min() < 0 or values.max() > 16:
    raise ValueError(
        f"digit intensities must lie in [0, 16], got [{values.min()}, "
        f"{values.max()}]"
    )
  return ((values * 255 + 8) // 16).astype(np.uint8)


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  """(uint8[1797, 8, 8, 1] images, int labels) of scikit-learn's bundled digits."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  return digits_to_uint8(digits.images)[..., None], digits.target


def _digits_features(**extra) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
      "label": tfds.features.ClassLabel(num_classes=10),
      **extra,
  })


class MmdDigits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """scikit-learn's 8x8 digits as a TFDS dataset (split "train" = all 1797).

  Not registered in the TFDS catalogue: it is only ever built by
  `ensure_digits_prepared` and read back from its directory like any other
  prepared dataset.
  """

  name = DIGITS_NAME
  VERSION = tfds.core.Version(DIGITS_VERSION)
  RELEASE_NOTES = {DIGITS_VERSION: "sklearn digits, 0..16 scaled to 0..255."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # No checksums file next to our code. Returning None also avoids TFDS's
    # package-resource lookup, which needs the optional `importlib_resources`.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    # tfds.core.DatasetInfo directly: `dataset_info_from_configs` expects the
    # builder to live in a TFDS-style package directory.
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn load_digits(): 8x8 grey digits, 10 classes.",
        features=_digits_features(),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, (image, label) in enumerate(zip(*_sklearn_digits())):
      yield i, {"image": image, "label": int(label)}


# ----------------------------------------------------------------------------
# Digits with synthetic caption embeddings (a text-to-image stand-in)
# ----------------------------------------------------------------------------

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven",
               "eight", "nine")
# Caption templates; "{}" is the digit's word. Each has TEXT_LEN tokens.
CAPTION_TEMPLATES = (
    ("a", "handwritten", "digit", "{}"),
    ("the", "number", "{}", "written"),
    ("{}", "written", "by", "hand"),
)
_VOCAB = tuple(sorted({w for t in CAPTION_TEMPLATES for w in t if w != "{}"}
                      | set(DIGIT_WORDS)))
_TEXT_SEED = 20240613
TEXT_NOISE_STD = 0.1


def token_embeddings() -> dict[str, np.ndarray]:
  """The fixed table word -> f32[TEXT_DIM] (standard normal, seeded)."""
  table = np.random.default_rng(_TEXT_SEED).standard_normal(
      (len(_VOCAB), TEXT_DIM)).astype(np.float32)
  return dict(zip(_VOCAB, table))


def caption_embedding(index: int, label: int,
                      table: Mapping[str, np.ndarray] | None = None
                      ) -> tuple[str, np.ndarray]:
  """(caption, f32[TEXT_LEN, TEXT_DIM]) of digit example `index` of class `label`.

  A synthetic stand-in for a text encoder's output, made by this project: the
  caption is one of CAPTION_TEMPLATES (chosen per example) filled with the
  digit's word; its embedding is the fixed random embedding of each token
  (`token_embeddings`) plus N(0, TEXT_NOISE_STD^2) noise per example. Both
  depend only on (index, label), so the data set is the same on every build.
  No caption is all zeros (zeros are the null text of guidance).
  """
  table = token_embeddings() if table is None else table
  rng = np.random.default_rng([_TEXT_SEED, int(index)])
  template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
  words = [DIGIT_WORDS[int(label)] if w == "{}" else w for w in template]
  emb = np.stack([table[w] for w in words])
  emb = emb + TEXT_NOISE_STD * rng.standard_normal(emb.shape)
  return " ".join(words), emb.astype(np.float32)


class MmdDigitsText(MmdDigits, skip_registration=True):
  """The 8x8 digits with a synthetic caption embedding per example.

  Features {image: uint8[8, 8, 1], label: ClassLabel(10),
  text: f32[TEXT_LEN, TEXT_DIM]}; split "train" = all 1797 images in the same
  order as MmdDigits. The text is `caption_embedding(i, label)`: a stand-in
  for a frozen text encoder's output, made by this project. Built only by
  `ensure_digits_text_prepared`, read like any prepared data set.
  """

  name = DIGITS_TEXT_NAME
  VERSION = tfds.core.Version(DIGITS_TEXT_VERSION)
  RELEASE_NOTES = {DIGITS_TEXT_VERSION: "sklearn digits + synthetic caption embeddings."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "scikit-learn load_digits() with a synthetic caption embedding "
            f"f32[{TEXT_LEN}, {TEXT_DIM}] per example (fixed random token "
            "embeddings of a templated caption such as 'a handwritten digit "
            "seven', plus small per-example noise): a stand-in for a text "
            "encoder's output, made by mmd_jax."),
        features=_digits_features(text=tfds.features.Tensor(
            shape=(TEXT_LEN, TEXT_DIM), dtype=np.float32)),
        supervised_keys=("image", "label"),
    )

  def _generate_examples(self):
    table = token_embeddings()
    for i, (image, label) in enumerate(zip(*_sklearn_digits())):
      _, text = caption_embedding(i, int(label), table)
      yield i, {"image": image, "label": int(label), "text": text}


def _digits_version_dir(data_dir: str) -> str:
  return os.path.join(data_dir, DIGITS_NAME, DIGITS_VERSION)


def _is_usable_version_dir(version_dir: str, splits: list[str]) -> bool:
  return (
      os.path.isfile(os.path.join(version_dir, "dataset_info.json"))
      and os.path.isfile(os.path.join(version_dir, "features.json"))
      and all(_shard_files(version_dir, s, "array_record") for s in splits)
  )


def ensure_digits_prepared(data_dir: str | os.PathLike[str]) -> None:
  """Builds the "mmd_digits" array_record dataset under data_dir if missing.

  Idempotent: returns immediately when the dataset is already there. Several
  processes may call it at once: TFDS writes into a temporary directory and
  renames it, and a loser of that race accepts the winner's result.
  """
  _ensure_built(MmdDigits, DIGITS_NAME, DIGITS_VERSION, data_dir)


def ensure_digits_text_prepared(data_dir: str | os.PathLike[str]) -> None:
  """Builds "mmd_digits_text" (digits + caption embeddings) under data_dir if
  missing; idempotent and safe to race, like `ensure_digits_prepared`."""
  _ensure_built(MmdDigitsText, DIGITS_TEXT_NAME, DIGITS_TEXT_VERSION, data_dir)


def _ensure_built(builder_cls, name: str, version: str,
                  data_dir: str | os.PathLike[str]) -> None:
  data_dir = os.path.expanduser(os.fspath(data_dir))
  version_dir = os.path.join(data_dir, name, version)
  if _is_usable_version_dir(version_dir, ["train"]):
    return
  os.makedirs(data_dir, exist_ok=True)
  builder = builder_cls(data_dir=data_dir, file_format="array_record")
  try:
    builder.download_and_prepare()
  except Exception:
    if _is_usable_version_dir(version_dir, ["train"]):
      return
    raise
  if not _is_usable_version_dir(version_dir, ["train"]):
    raise RuntimeError(
        f"building {name} under {data_dir!r} finished but "
        f"{version_dir!r} is incomplete; delete it and retry."
    )


# ----------------------------------------------------------------------------
# Opening a prepared TFDS dataset without touching the network
# ----------------------------------------------------------------------------


def _base_splits(split: str) -> list[str]:
  """"train[:90%]+test" -> ["train", "test"]."""
  out = []
  for part in split.split("+"):
    base = part.strip().split("[", 1)[0].strip()
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", base):
      raise ValueError(
          f"cannot parse split {split!r}; use a TFDS split such as 'train', "
          "'train[:90%]' or 'train+test'."
      )
    out.append(base)
  return out


def _shard_files(version_dir: str, split: str, file_format: str) -> list[str]:
  pattern = os.path.join(glob.escape(version_dir), f"*-{split}.{file_format}*")
  return sorted(glob.glob(pattern))


def _version_key(version: str) -> tuple[int, ...]:
  return tuple(int(v) for v in version.split("."))


def _preparation_help(name: str, data_dir: str) -> str:
  return (
      "To prepare it, on a machine with network access run\n"
      "    pip install tensorflow tensorflow-datasets\n"
      f"    tfds build {name} --file_format=array_record --data_dir={data_dir}\n"
      "or, equivalently,\n"
      '    python -c "import tensorflow_datasets as tfds; '
      f"tfds.builder('{name}', data_dir='{data_dir}', "
      "file_format='array_record').download_and_prepare()\"\n"
      "(datasets with manual downloads also need --manual_dir), then copy "
      f"{os.path.join(data_dir, name.split('/')[0])} to this machine and point "
      f"config.data.data_dir (or ${DATA_DIR_ENV}) at its parent directory. "
      "TensorFlow is only needed for preparing, not for reading."
  )


def find_prepared_version_dir(
    name: str, *, data_dir: str | os.PathLike[str], split: str = "train"
) -> str:
  """Returns `<data_dir>/<name>/<version>` holding array_record shards of split.

  `name` is a TFDS name, optionally with config and version:
  "cifar10", "imagenet_resized/64x64", "cifar10:3.0.2". Without a version the
  newest usable version directory is chosen. Only the filesystem is consulted.

  Raises:
    DatasetNotPreparedError: nothing usable is there; the message says where we
      looked, what we found (e.g. TFRecord shards) and how to prepare it.
    ValueError: malformed name or split.
  """
  match = _NAME_RE.match(name)
  if not match:
    raise ValueError(
        f"invalid TFDS dataset name {name!r}; expected e.g. 'cifar10', "
        "'imagenet_resized/64x64' or 'cifar10:3.0.2'."
    )
  base_name, version = match.group("name"), match.group("version")
  data_dir = os.path.expanduser(os.fspath(data_dir))
  splits = _base_splits(split)
  dataset_dir = os.path.join(data_dir, base_name)

  if version is not None:
    candidates = [version]
  elif os.path.isdir(dataset_dir):
    candidates = sorted(
        (d for d in os.listdir(dataset_dir) if _VERSION_RE.match(d)),
        key=_version_key,
        reverse=True,
    )
  else:
    candidates = []

  for cand in candidates:
    version_dir = os.path.join(dataset_dir, cand)
    if _is_usable_version_dir(version_dir, splits):
      return version_dir

  # Diagnose why nothing was usable, starting with the newest version.
  details = []
  for cand in candidates:
    version_dir = os.path.join(dataset_dir, cand)
    if not os.path.isdir(version_dir):
      details.append(f"{version_dir} does not exist")
      continue
    if not os.path.isfile(os.path.join(version_dir, "dataset_info.json")):
      details.append(f"{version_dir} has no dataset_info.json")
      continue
    if not os.path.isfile(os.path.join(version_dir, "features.json")):
      details.append(
          f"{version_dir} has no features.json (prepared with TFDS < 4.0?); "
          "re-prepare it with a recent tensorflow-datasets"
      )
      continue
    for s in splits:
      if _shard_files(version_dir, s, "array_record"):
        continue
      tfrecords = _shard_files(version_dir, s, "tfrecord")
      if tfrecords:
        details.append(
            f"{version_dir} holds split {s!r} only as TFRecord "
            f"({os.path.basename(tfrecords[0])}, ...); this library reads "
            "array_record only (random access without TensorFlow). Convert it "
            "with `tfds convert_format --dataset_version_dir="
            f"{version_dir} --out_file_format=array_record` (needs "
            "tensorflow) or re-prepare with --file_format=array_record"
        )
      else:
        details.append(f"{version_dir} has no shards for split {s!r}")
  if not candidates:
    details.append(
        f"{dataset_dir} does not exist"
        if not os.path.isdir(dataset_dir)
        else f"{dataset_dir} contains no version directories (e.g. 3.0.2)"
    )
  raise DatasetNotPreparedError(
      f"TFDS dataset {name!r} (split {split!r}) is not prepared in array_record "
      f"format under data_dir {data_dir!r}. Looked in {dataset_dir}: "
      + "; ".join(details)
      + ".\n"
      + _preparation_help(base_name, data_dir)
  )


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """A random-access view of one split: `source[i]` -> dict of numpy values."""

  name: str
  split: str
  version_dir: str
  source: Any  # tfds ArrayRecordDataSource: __len__, __getitem__, __getitems__
  features: Any  # tfds.features.FeaturesDict


def open_tfds_source(
    name: str, *, data_dir: str | os.PathLike[str], split: str = "train"
) -> TfdsSource:
  """Opens a prepared split for random access (no TensorFlow, no network)."""
  version_dir = find_prepared_version_dir(name, data_dir=data_dir, split=split)
  builder = tfds.builder_from_directory(version_dir, file_format="array_record")
  available = set(builder.info.splits.keys())
  missing = [s for s in _base_splits(split) if s not in available]
  if missing:
    raise ValueError(
        f"dataset {name!r} has no split(s) {missing}; available: "
        f"{sorted(available)}."
    )
  source = builder.as_data_source(split=split)
  return TfdsSource(
      name=name,
      split=split,
      version_dir=version_dir,
      source=source,
      features=builder.info.features,
  )


# ----------------------------------------------------------------------------
# Gaussian mixture
# ----------------------------------------------------------------------------


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
      with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
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
  """Raises ValueError unless `state` describes the same stream as `current`."""
  if not isinstance(state, Mapping):
    raise ValueError(
        f"iterator state must be a dict from get_state(), got {type(state).__name__}."
    )
  missing = [k for k in current if k not in state]
  if missing:
    raise ValueError(
        f"iterator state lacks keys {missing}; it must come from get_state() of "
        f"the same kind of iterator (expected keys {sorted(current)})."
    )
  diffs = [
      f"{k}: saved {state[k]!r} vs now {current[k]!r}"
      for k in current
      if k not in ignore and state[k] != current[k]
  ]
  if diffs:
    raise ValueError(
        "iterator state was saved for a different input stream ("
        + "; ".join(diffs)
        + "); resuming would not reproduce the same batches. Restore with the "
        "same dataset, split, seed and global batch size."
    )
