"""Opening a prepared TFDS dataset (catalogue or the digits) without touching the network.

`open_tfds_source` first inspects the filesystem itself
(`<data_dir>/<name>[/<config>]/<version>/` with dataset_info.json,
features.json and `*-<split>.array_record-*` shards) and raises
`DatasetNotPreparedError` with preparation instructions if anything is
missing, so no TFDS call is ever made that could start a download.
The dataset is then reconstructed from its directory
(`tfds.builder_from_directory`), which needs neither TensorFlow nor the
catalogue code.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Any

import tensorflow_datasets as tfds

from mmd_jax.data.errors import DatasetNotPreparedError

DATA_DIR_ENV = "MMD_JAX_DATA_DIR"

_NAME_RE = re.compile(
    r"^(?P<name>[a-z0-9_]+(?:/[A-Za-z0-9_.\-]+)?)(?::(?P<version>\d+\.\d+\.\d+))?$"
)
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def default_tfds_data_dir() -> str:
  """$MMD_JAX_DATA_DIR, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  for env in (DATA_DIR_ENV, "TFDS_DATA_DIR"):
    if os.environ.get(env):
      return os.path.expanduser(os.environ[env])
  return os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def is_usable_version_dir(version_dir: str, splits: list[str]) -> bool:
  """Whether version_dir has dataset_info.json, features.json and array_record shards of splits."""
  return (
      os.path.isfile(os.path.join(version_dir, "dataset_info.json"))
      and os.path.isfile(os.path.join(version_dir, "features.json"))
      and all(_shard_files(version_dir, s, "array_record") for s in splits)
  )


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
    if is_usable_version_dir(version_dir, splits):
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

