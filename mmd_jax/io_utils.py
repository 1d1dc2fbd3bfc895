"""Small files written so that a crash never leaves a half-written one behind, and read so that a
damaged one is reported instead of crashing.

Ground floor: imports only the standard library, numpy and etils.epath, so any module may use it.

Writers (`write_text_atomic`, `write_json_atomic`, `write_npz_atomic`, `write_bytes_atomic`):
  local path   the bytes go to a temporary file in the same directory (same file system), which is
               flushed, fsync'ed and then moved over the target with os.replace: a reader sees the
               old file or the new one, never a truncated one, even if the process is killed.
  gs:// etc.   a plain write through epath. Object stores have no atomic rename (a "rename" is a
               copy plus a delete), but an object upload is itself all-or-nothing: the object
               appears only once the upload completed, so a plain write is already atomic there.

Readers (`read_json_or_none`, `read_npz_or_none`) return None and log a warning naming the file
when it is missing, truncated or unparsable, so callers can recompute instead of dying on a
JSONDecodeError. npz files are read with allow_pickle=False (nothing here loads pickles).
"""
from __future__ import annotations

import io
import json
import logging
import os
import uuid
import zipfile
from typing import Any, Mapping

import numpy as np
from etils import epath

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike | epath.Path


def is_local(path: PathLike) -> bool:
  """True for paths on the local file system (no scheme, or file://)."""
  text = os.fspath(path) if not isinstance(path, str) else path
  return "://" not in str(text) or str(text).startswith("file://")


def _local(path: PathLike) -> str:
  text = str(os.fspath(path))
  return text[len("file://"):] if text.startswith("file://") else text


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically (see the module docstring)."""
  if not is_local(path):
    # Object stores (gs://, s3://): no atomic rename exists, but an upload is all-or-nothing.
    epath.Path(path).write_bytes(data)
    return
  target = _local(path)
  directory = os.path.dirname(os.path.abspath(target))
  tmp = os.path.join(directory,
                     f".{os.path.basename(target)}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise
  try:  # make the rename itself durable; not possible on every platform / file system
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  except OSError:
    pass


def write_text_atomic(path: PathLike, text: str) -> None:
  """Writes a UTF-8 text file atomically."""
  write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: PathLike, obj: Any, *, indent: int | None = 1,
                      sort_keys: bool = True) -> None:
  """Writes `obj` as JSON atomically (non-JSON values are written with str())."""
  write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def write_npz_atomic(path: PathLike, arrays: Mapping[str, Any]) -> None:
  """Writes arrays with np.savez atomically (read them back with read_npz_or_none)."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes_atomic(path, buf.getvalue())


def _read_bytes_or_none(path: PathLike, what: str, missing_ok: bool) -> bytes | None:
  p = epath.Path(path)
  try:
    return p.read_bytes()
  except FileNotFoundError:
    if not missing_ok:
      logger.warning("%s %s is missing.", what, p)
    return None
  except OSError as e:
    logger.warning("%s %s cannot be read (%s: %s).", what, p, type(e).__name__, e)
    return None


def read_json_or_none(path: PathLike, *, what: str, missing_ok: bool = False) -> Any | None:
  """The parsed JSON at `path`, or None (with a warning naming the file) when it is missing,
  truncated or not valid JSON. `what` says what the file is, e.g. "evaluation spec".
  missing_ok: no warning for a missing file (it is expected on a first run)."""
  data = _read_bytes_or_none(path, what, missing_ok)
  if data is None:
    return None
  try:
    return json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
    logger.warning("%s %s is damaged (truncated or not valid JSON: %s); ignoring it.",
                   what, epath.Path(path), e)
    return None


def read_npz_or_none(path: PathLike, *, what: str, missing_ok: bool = False
                     ) -> dict[str, np.ndarray] | None:
  """All arrays of the npz at `path` (allow_pickle=False), or None with a warning naming the
  file when it is missing, truncated or not a valid npz."""
  data = _read_bytes_or_none(path, what, missing_ok)
  if data is None:
    return None
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
    logger.warning("%s %s is damaged (%s: %s); ignoring it.", what, epath.Path(path),
                   type(e).__name__, e)
    return None
