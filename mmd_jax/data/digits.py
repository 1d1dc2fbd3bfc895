"""The bundled 8x8 digits as local TFDS array_record datasets (no download).

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

Both are read back like any prepared dataset, with
`mmd_jax.data.tfds_source.open_tfds_source`.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds

from mmd_jax.data.tfds_source import DATA_DIR_ENV, is_usable_version_dir

DIGITS_NAME = "mmd_digits"
DIGITS_VERSION = "1.0.0"
DIGITS_NUM_EXAMPLES = 1797
DIGITS_TEXT_NAME = "mmd_digits_text"
DIGITS_TEXT_VERSION = "1.0.0"
TEXT_LEN = 4  # tokens per caption
TEXT_DIM = 8  # width of a token embedding


def default_digits_data_dir() -> str:
  """$MMD_JAX_DATA_DIR if set, else ~/.cache/mmd_jax/tfds."""
  env = os.environ.get(DATA_DIR_ENV)
  if env:
    return os.path.expanduser(env)
  return os.path.join(os.path.expanduser("~"), ".cache", "mmd_jax", "tfds")


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
  if is_usable_version_dir(version_dir, ["train"]):
    return
  os.makedirs(data_dir, exist_ok=True)
  builder = builder_cls(data_dir=data_dir, file_format="array_record")
  try:
    builder.download_and_prepare()
  except Exception:
    if is_usable_version_dir(version_dir, ["train"]):
      return
    raise
  if not is_usable_version_dir(version_dir, ["train"]):
    raise RuntimeError(
        f"building {name} under {data_dir!r} finished but "
        f"{version_dir!r} is incomplete; delete it and retry."
    )

