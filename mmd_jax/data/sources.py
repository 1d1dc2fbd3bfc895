"""Data sources, one module per kind; this module re-exports their public names.

* `mmd_jax.data.digits`: the bundled 8x8 digits ("mmd_digits") and the digits
  with synthetic caption embeddings ("mmd_digits_text") as local TFDS
  array_record datasets (`ensure_digits_prepared`, `caption_embedding`, ...).
* `mmd_jax.data.tfds_source`: finding and opening any prepared TFDS dataset
  for random access without TensorFlow or the network (`open_tfds_source`).
* `mmd_jax.data.gmm`: the diagonal Gaussian mixture and its checkpointable,
  process-sharded batch iterator.
"""

from __future__ import annotations

from mmd_jax.data.digits import (
    CAPTION_TEMPLATES,
    DIGIT_WORDS,
    DIGITS_NAME,
    DIGITS_NUM_EXAMPLES,
    DIGITS_TEXT_NAME,
    DIGITS_TEXT_VERSION,
    DIGITS_VERSION,
    TEXT_DIM,
    TEXT_LEN,
    TEXT_NOISE_STD,
    MmdDigits,
    MmdDigitsText,
    caption_embedding,
    default_digits_data_dir,
    digits_to_uint8,
    ensure_digits_prepared,
    ensure_digits_text_prepared,
    token_embeddings,
)
from mmd_jax.data.errors import DatasetNotPreparedError
from mmd_jax.data.gmm import (
    GaussianMixture,
    GaussianMixtureIterator,
    check_seed,
    check_state_matches,
)
from mmd_jax.data.tfds_source import (
    DATA_DIR_ENV,
    TfdsSource,
    default_tfds_data_dir,
    find_prepared_version_dir,
    open_tfds_source,
)

__all__ = [
    "CAPTION_TEMPLATES",
    "DATA_DIR_ENV",
    "DIGITS_NAME",
    "DIGITS_NUM_EXAMPLES",
    "DIGITS_TEXT_NAME",
    "DIGITS_TEXT_VERSION",
    "DIGITS_VERSION",
    "DIGIT_WORDS",
    "DatasetNotPreparedError",
    "GaussianMixture",
    "GaussianMixtureIterator",
    "MmdDigits",
    "MmdDigitsText",
    "TEXT_DIM",
    "TEXT_LEN",
    "TEXT_NOISE_STD",
    "TfdsSource",
    "caption_embedding",
    "check_seed",
    "check_state_matches",
    "default_digits_data_dir",
    "default_tfds_data_dir",
    "digits_to_uint8",
    "ensure_digits_prepared",
    "ensure_digits_text_prepared",
    "find_prepared_version_dir",
    "open_tfds_source",
    "token_embeddings",
]
