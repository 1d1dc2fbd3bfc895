"""Evaluation sampling sharded over the mesh, with resumable float64 feature statistics.

Layout. N samples are drawn in global batches of B rows (config.eval.batch_size), split over the
mesh's batch axes ("data", "fsdp") by explicit jit in/out shardings. Every process runs the same
ceil(N / B) batches (one compiled shape); rows whose global index is >= N are padding and enter
every statistic with weight 0.

Randomness. Batch b uses the key fold_in(fold_in(PRNGKey(seed), b), 0) for all its rows
(labels class-balanced by global row index). JAX's partitionable threefry makes the samples
independent of the mesh, the device count and the process count: they depend on (seed, B)
only, so an evaluation gives the same statistics on one process or several, and one stopped on
two processes resumes on one.

Statistics. Each row is owned by one process (the first device holding it in mesh order). A
process quantises its rows to uint8 on the host (the FID protocol, mmd_jax.evaluation.fid), runs
the feature network on the global batch, and adds weighted float64 sums (fid.FeatureStats) of its
rows; optionally also pixel-space sums and a classifier's hits (the digits stand-ins), and the
rows' features / logits (for precision-recall and the Inception Score). At the end the sums are
added over processes.

Resume. The state lives in WORKDIR/eval/<run name>, where the name ends in a hash of the spec
(checkpoint step and fingerprint, sampler, steps, guidance, N, B, seed, feature protocol, what
is kept, ...; not the process count), so another spec never reuses it:
  spec.json                          the spec (written once, checked on resume; a damaged one
                                     is rewritten and the evaluation recomputed, with a warning)
  state_p00000_b<done>.npz           the accumulators of ALL processes after `done` batches,
                                     summed (the last two kept)
  chunk_p00000_b<start>-<end>.npz    kept rows (global index, features, logits) of those batches,
                                     from all processes
written every `save_every` batches (np.savez, read with allow_pickle=False), all of them atomically
(mmd_jax.io_utils: temporary file + rename), by process 0 only: at a save the processes add up
their sums and gather their kept rows (collectives every process enters at the same batch).
Process 0 alone reads spec.json and the saves and decides, for every process, whether the spec
matches and after which batch to resume (the others start that run with empty sums; process 0
holds the restored ones), so a process count different from the interrupted run's resumes too,
and no process can skip a collective because it saw other files. A finished evaluation returns
at once. A damaged state or chunk file (e.g. truncated) is dropped with a warning and its
batches are sampled again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from mmd_jax import io_utils
from mmd_jax.evaluation import fid
from mmd_jax.evaluation.sampling import class_labels
from mmd_jax.parallel import distributed
from mmd_jax.parallel import mesh as mesh_lib

# 2: one merged state of all processes, written by process 0; keys independent of the process
# count (1: one state per process, keys per process).
STATE_VERSION = 2
# What process 0 found in spec.json (agreed by every process): none or damaged, the same spec,
# another spec.
_SPEC_NEW, _SPEC_SAME, _SPEC_OTHER = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Keys, shardings, rows
# ----------------------------------------------------------------------------------------------

def batch_keys(*, seed: int, batch_index: int, num_groups: int = 1) -> np.ndarray:
  """uint32[num_groups, 2]: key of row block p of batch b = fold_in(fold_in(seed, b), p). The
  evaluation uses one group (its samples do not depend on the process count)."""
  key = jax.random.fold_in(jax.random.PRNGKey(int(seed)), int(batch_index))
  return np.stack([np.asarray(jax.random.fold_in(key, p)) for p in range(int(num_groups))])


def make_sharded_sampler(sample_fn: Callable, *, mesh, param_shardings, sampler: str,
                         num_steps: int, guidance: float):
  """jit(params, keys[P, 2], labels[B]) -> x[B, ...], batch split over the mesh's batch axes.

  `sample_fn(params, rng, labels, *, sampler, num_steps, guidance)` is the unsharded sampler
  (mmd_jax.evaluation.sampling.make_sample_fn, or a distilled student's).
  """
  batch_sh = mesh_lib.batch_sharding(mesh)

  def run(params, keys, labels):
    groups = keys.shape[0]
    x = jax.vmap(lambda k, l: sample_fn(params, k, l, sampler=sampler, num_steps=num_steps,
                                        guidance=guidance))(keys, labels.reshape((groups, -1)))
    return x.reshape((labels.shape[0],) + x.shape[2:])

  return jax.jit(run, in_shardings=(param_shardings, mesh_lib.replicated(mesh), batch_sh),
                 out_shardings=batch_sh)


def owned_blocks(sharding, shape) -> list[tuple[int, int]]:
  """Row ranges [start, stop) of a batch-sharded array that this process owns.

  A row block belongs to the process of the first device (in the sharding's device order) that
  holds it, so rows replicated over the tensor axis are counted once.
  """
  owner: dict[tuple[int, int], int] = {}
  for device, index in sharding.devices_indices_map(tuple(shape)).items():
    rows = index[0]
    block = (rows.start or 0, shape[0] if rows.stop is None else rows.stop)
    owner.setdefault(block, device.process_index)
  me = jax.process_index()
  return sorted(b for b, p in owner.items() if p == me)


def fetch_rows(array, blocks) -> np.ndarray:
  """This process's rows (the concatenated `blocks`) of a global array, as numpy."""
  shards = []
  for shard in array.addressable_shards:
    rows = shard.index[0]
    shards.append((rows.start or 0, array.shape[0] if rows.stop is None else rows.stop, shard))
  out = []
  for a, b in blocks:
    for s0, s1, shard in shards:
      if s0 <= a and b <= s1:
        out.append(np.asarray(shard.data)[a - s0:b - s0])
        break
    else:
      raise RuntimeError(f"rows [{a}, {b}) are not addressable from process "
                         f"{jax.process_index()}")
  return np.concatenate(out) if out else np.zeros((0,) + array.shape[1:], array.dtype)


def block_indices(blocks) -> np.ndarray:
  return np.concatenate([np.arange(a, b) for a, b in blocks]) if blocks else np.zeros(0, int)


def to_global(host_rows: np.ndarray, sharding):
  """A global array from a full-size host array of which only this process's rows matter."""
  return jax.make_array_from_callback(host_rows.shape, sharding, lambda index: host_rows[index])


def _features(extractor: fid.FeatureExtractor, u8: np.ndarray, batch_sh):
  """(features, logits) of a global uint8 batch, laid out like the batch."""
  out = extractor.fn(to_global(u8, batch_sh))
  return tuple(a if a.sharding.is_equivalent_to(batch_sh, a.ndim) else
               jax.device_put(a, batch_sh) for a in out)


def to_rgb_uint8(images) -> np.ndarray:
  u8 = fid.quantize_to_uint8(images)
  return np.repeat(u8, 3, axis=-1) if u8.shape[-1] == 1 else u8


# ----------------------------------------------------------------------------------------------
# Accumulators
# ----------------------------------------------------------------------------------------------

def _weighted(stats: fid.FeatureStats, x, w) -> fid.FeatureStats:
  x = np.asarray(x, np.float64).reshape(len(w), -1)
  xw = x * w[:, None]
  return fid.FeatureStats(stats.sum + xw.sum(0), stats.sum_outer + xw.T @ x,
                          stats.count + int(round(float(w.sum()))))


@dataclasses.dataclass
class Accumulator:
  """Weighted float64 sums of this process's rows, plus the kept rows since the last save."""
  feat: fid.FeatureStats
  pix: fid.FeatureStats | None = None
  class_correct: float = 0.0
  class_count: float = 0.0
  pending: list = dataclasses.field(default_factory=list)  # (idx, features, logits) since save

  @classmethod
  def new(cls, *, feature_dim: int, pixel_dim: int | None) -> "Accumulator":
    return cls(fid.init_stats(dim=feature_dim),
               fid.init_stats(dim=pixel_dim) if pixel_dim else None)

  def add(self, *, features, weights, pixels=None, correct=None, index=None, keep_features=False,
          logits=None):
    self.feat = _weighted(self.feat, features, weights)
    if self.pix is not None and pixels is not None:
      self.pix = _weighted(self.pix, pixels, weights)
    if correct is not None:
      self.class_correct += float(np.sum(weights * correct))
      self.class_count += float(np.sum(weights))
    if keep_features or logits is not None:
      keep = weights > 0
      self.pending.append((np.asarray(index)[keep],
                           np.asarray(features, np.float32)[keep] if keep_features else None,
                           np.asarray(logits, np.float32)[keep] if logits is not None else None))

  def arrays(self, *, batches_done: int) -> dict:
    out = dict(version=np.array(STATE_VERSION), batches_done=np.array(batches_done, np.int64),
               feat_sum=self.feat.sum, feat_sum_outer=self.feat.sum_outer,
               feat_count=np.array(self.feat.count, np.int64),
               class_correct=np.array(self.class_correct), class_count=np.array(self.class_count))
    if self.pix is not None:
      out.update(pix_sum=self.pix.sum, pix_sum_outer=self.pix.sum_outer,
                 pix_count=np.array(self.pix.count, np.int64))
    return out

  @classmethod
  def from_arrays(cls, d) -> "Accumulator":
    feat = fid.FeatureStats(d["feat_sum"], d["feat_sum_outer"], int(d["feat_count"]))
    pix = (fid.FeatureStats(d["pix_sum"], d["pix_sum_outer"], int(d["pix_count"]))
           if "pix_sum" in d else None)
    return cls(feat, pix, float(d["class_correct"]), float(d["class_count"]))


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def run_name(spec: dict) -> str:
  """Readable prefix + hash of the whole spec: another spec gets another directory."""
  digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
  prefix = (f"step{spec.get('checkpoint_step', 'x')}_{spec['sampler']}{spec['num_steps']}"
            f"_g{float(spec['guidance']):g}_n{spec['num_samples']}")
  return f"{re.sub(r'[^A-Za-z0-9_.-]', '-', prefix)}_{digest}"


def write_npz(path: epath.Path, arrays: dict) -> None:
  """Atomic np.savez (io_utils.write_npz_atomic): a crash never leaves a truncated file."""
  io_utils.write_npz_atomic(path, arrays)


def read_npz(path: epath.Path) -> dict:
  """All arrays of an npz (allow_pickle=False); raises on a missing or damaged file."""
  with np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def _state_steps(eval_dir: epath.Path, proc: int) -> list[int]:
  found = []
  for p in eval_dir.glob(f"state_p{proc:05d}_b*.npz"):
    m = re.match(r"state_p\d+_b(\d+)\.npz$", p.name)
    if m:
      found.append(int(m.group(1)))
  return sorted(found)


def _chunks(eval_dir: epath.Path, proc: int) -> list[tuple[int, int, epath.Path]]:
  out = []
  for p in eval_dir.glob(f"chunk_p{proc:05d}_b*.npz"):
    m = re.match(r"chunk_p\d+_b(\d+)-(\d+)\.npz$", p.name)
    if m:
      out.append((int(m.group(1)), int(m.group(2)), p))
  return sorted(out, key=lambda c: c[0])


def _discard_progress(eval_dir: epath.Path) -> None:
  """Removes the saved states and chunks (the evaluation restarts from batch 0)."""
  for pattern in ("state_p*_b*.npz", "chunk_p*_b*.npz"):
    for p in eval_dir.glob(pattern):
      p.unlink(missing_ok=True)


def _readable_progress(eval_dir: epath.Path, proc: int) -> tuple[dict[int, dict], dict[str, dict]]:
  """({done: state arrays}, {chunk file name: arrays}) of this process's usable saves.

  A state or chunk file that is truncated or unreadable (a crash mid-write by an older version,
  a damaged disk) is removed with a warning; a state after a damaged chunk is dropped too (its
  kept rows are incomplete), so the evaluation resumes from an earlier save or from the start.
  """
  chunks, first_bad_chunk_end = {}, None
  for c0, c1, p in _chunks(eval_dir, proc):
    arrays = io_utils.read_npz_or_none(p, what="sharded evaluation rows")
    if arrays is None or "index" not in arrays:
      logging.warning("evaluation %s: dropping damaged %s; batches from %d on are recomputed.",
                      eval_dir, p.name, c0)
      p.unlink(missing_ok=True)
      first_bad_chunk_end = c1 if first_bad_chunk_end is None else min(first_bad_chunk_end, c1)
    else:
      chunks[p.name] = arrays
  states = {}
  for done in _state_steps(eval_dir, proc):
    p = eval_dir / f"state_p{proc:05d}_b{done:08d}.npz"
    arrays = io_utils.read_npz_or_none(p, what="sharded evaluation state")
    ok = arrays is not None
    if ok:
      try:
        Accumulator.from_arrays(arrays)
        ok = int(arrays["batches_done"]) == done
      except (KeyError, ValueError, TypeError):
        ok = False
    if not ok:
      logging.warning("evaluation %s: dropping damaged %s; resuming from an earlier save.",
                      eval_dir, p.name)
      p.unlink(missing_ok=True)
    elif first_bad_chunk_end is not None and done >= first_bad_chunk_end:
      logging.warning("evaluation %s: dropping %s (kept rows of an earlier batch are "
                      "damaged).", eval_dir, p.name)
      p.unlink(missing_ok=True)
    else:
      states[done] = arrays
  return states, chunks


def _allgather_f64(x: np.ndarray) -> np.ndarray:
  """Sum of a float64 array over processes, exact (bits travel as uint32, jax may lack x64)."""
  x = np.ascontiguousarray(x, np.float64)
  if jax.process_count() == 1:
    return x
  bits = np.asarray(multihost_utils.process_allgather(x.view(np.uint32)))
  return bits.view(np.float64).reshape((-1,) + x.shape).sum(0)


def _allgather_rows(x: np.ndarray) -> np.ndarray:
  """Concatenation over processes of per-process row arrays of different lengths (a process
  without rows may pass a (0, 0) array: the width is taken from the others)."""
  if jax.process_count() == 1:
    return x
  meta = np.asarray([len(x), x.shape[1] if x.ndim > 1 else -1], np.int32)
  table = np.asarray(multihost_utils.process_allgather(meta)).reshape(-1, 2)
  n, width = table[:, 0], int(table[:, 1].max())
  if x.ndim > 1 and len(x) == 0:
    x = np.zeros((0, width) + x.shape[2:], x.dtype)
  pad = np.zeros((int(n.max()) - len(x),) + x.shape[1:], x.dtype)
  raw = np.concatenate([x, pad])
  if raw.dtype == np.float64:
    raise ValueError("gather float32 / integer rows only")
  if raw.dtype == np.int64:
    raw = raw.astype(np.int32)
  table = np.asarray(multihost_utils.process_allgather(raw))
  return np.concatenate([table[i, :n[i]] for i in range(len(n))]).astype(x.dtype)


def merge_over_processes(acc: Accumulator) -> Accumulator:
  feat = fid.FeatureStats(_allgather_f64(acc.feat.sum), _allgather_f64(acc.feat.sum_outer),
                          int(round(float(_allgather_f64(np.array([acc.feat.count], float))[0]))))
  pix = None
  if acc.pix is not None:
    pix = fid.FeatureStats(_allgather_f64(acc.pix.sum), _allgather_f64(acc.pix.sum_outer),
                           int(round(float(_allgather_f64(np.array([acc.pix.count], float))[0]))))
  cc = _allgather_f64(np.array([acc.class_correct, acc.class_count]))
  return Accumulator(feat, pix, float(cc[0]), float(cc[1]))


# ----------------------------------------------------------------------------------------------
# The evaluation loop
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class EvalResult:
  stats: fid.FeatureStats            # merged over processes
  pixel_stats: fid.FeatureStats | None
  class_acc: float | None
  features: np.ndarray | None        # [N, D] in global sample order, if kept
  logits: np.ndarray | None
  batches_done: int
  num_batches: int
  resumed_from: int
  eval_dir: str

  @property
  def complete(self) -> bool:
    return self.batches_done == self.num_batches


def evaluate_samples(*, spec: dict, sampler, params, mesh, extractor: fid.FeatureExtractor,
                     eval_root: str | None = None, eval_dir: str | None = None, classifier=None, pixel_stats: bool = False,
                     keep_features: bool = False, keep_logits: bool = False,
                     save_every: int = 10, max_batches: int | None = None,
                     on_batch: Callable[[int], Any] | None = None) -> EvalResult:
  """Samples `spec` with the sharded `sampler` and accumulates its statistics, resumably.

  spec: {"sampler", "num_steps", "guidance", "num_samples", "batch_size", "seed",
  "num_classes", ...} (any further identity fields, e.g. the checkpoint's step and fingerprint).
  sampler: make_sharded_sampler(...) for this spec. The state goes to eval_root/<run_name of the
  full spec> (the spec plus process count, feature protocol and what is kept), or to an explicit
  eval_dir, which must not hold another spec. classifier: an sklearn-style classifier of
  flattened images whose hits give class_acc; pixel_stats: also accumulate pixel-space sums.
  max_batches: stop (after saving) once this call has run that many batches. on_batch(b): called
  after batch b and its save, if any (an exception there leaves the last save on disk).
  """
  n, bsz = int(spec["num_samples"]), int(spec["batch_size"])
  if n < 1 or bsz < 1:
    raise ValueError(f"num_samples and batch_size must be >= 1, got {n}, {bsz}.")
  num_batches = math.ceil(n / bsz)
  procs, me = jax.process_count(), jax.process_index()
  full_spec = dict(spec, protocol=extractor.protocol,
                   keep_features=bool(keep_features), keep_logits=bool(keep_logits),
                   pixel_stats=bool(pixel_stats), classifier=classifier is not None,
                   state_version=STATE_VERSION)
  if (eval_root is None) == (eval_dir is None):
    raise ValueError("pass exactly one of eval_root and eval_dir.")
  eval_dir = eval_dir or os.path.join(eval_root, run_name(full_spec))
  path = epath.Path(eval_dir)
  spec_file = path / "spec.json"

  # ----- process 0 reads the directory and decides for every process -----
  status, start, states, chunks = _SPEC_NEW, 0, {}, {}
  if me == 0:
    path.mkdir(parents=True, exist_ok=True)
    saved = None
    if spec_file.exists():
      saved = io_utils.read_json_or_none(spec_file, what="sharded evaluation spec")
      if not isinstance(saved, dict):
        logging.warning("evaluation %s: spec.json is damaged; recomputing this evaluation from "
                        "the start (saved batches are not trusted without their spec).",
                        eval_dir)
        _discard_progress(path)
        saved = None
      elif saved != json.loads(json.dumps(full_spec)):
        status = _SPEC_OTHER
      else:
        status = _SPEC_SAME
    if saved is None:
      io_utils.write_json_atomic(spec_file, full_spec)
    if status == _SPEC_SAME:
      states, chunks = _readable_progress(path, 0)
      start = max(states) if states else 0
  status = distributed.agree(status)
  if status == _SPEC_OTHER:
    raise ValueError(f"{eval_dir} holds another evaluation (spec.json differs from {full_spec}); "
                     "remove it or use another eval directory.")
  start = distributed.agree(start)

  # ----- resume: process 0 holds the sums and kept rows of the batches before `start` -----
  acc, kept = None, []
  if me == 0:
    acc = Accumulator.from_arrays(states[start]) if start > 0 else None
    for c0, c1, p in _chunks(path, 0):
      if c1 <= start:
        kept.append(chunks[p.name])
      else:
        p.unlink()  # rows of batches after the resume point: they are sampled again
  if start:
    logging.info("evaluation %s: resuming after %d of %d batches", eval_dir, start, num_batches)

  batch_sh = mesh_lib.batch_sharding(mesh)
  blocks = owned_blocks(batch_sh, (bsz,))
  rows = block_indices(blocks)
  last_save = start
  ran = 0

  def save(done):
    """Collective: every process calls it after the same batch; process 0 writes."""
    nonlocal last_save
    merged = merge_over_processes(acc)
    if keep_features or keep_logits:
      mine = {"index": np.concatenate([p[0] for p in acc.pending]).astype(np.int64)}
      if keep_features:
        mine["features"] = _concat_rows([p[1] for p in acc.pending])
      if keep_logits:
        mine["logits"] = _concat_rows([p[2] for p in acc.pending])
      kept.append(mine)
      gathered = {k: _allgather_rows(v) for k, v in mine.items()}
      if me == 0:
        write_npz(path / f"chunk_p00000_b{last_save:08d}-{done:08d}.npz", gathered)
    acc.pending = []
    if me == 0:
      write_npz(path / f"state_p00000_b{done:08d}.npz", merged.arrays(batches_done=done))
      for old in _state_steps(path, 0)[:-2]:
        (path / f"state_p00000_b{old:08d}.npz").unlink()
    last_save = done

  for b in range(start, num_batches):
    if max_batches is not None and ran >= max_batches:
      break
    labels = class_labels(bsz, int(spec["num_classes"]), offset=b * bsz)
    keys = batch_keys(seed=int(spec["seed"]), batch_index=b, num_groups=1)
    x = sampler(params, keys, to_global(labels, batch_sh))
    x_rows = fetch_rows(x, blocks)
    weights = (b * bsz + rows < n).astype(np.float64)
    u8 = np.zeros((bsz,) + x_rows.shape[1:3] + (3,), np.uint8)
    u8[rows] = to_rgb_uint8(x_rows)
    feats, logits = _features(extractor, u8, batch_sh)
    f_rows = fetch_rows(feats, blocks)
    flat = x_rows.reshape(len(rows), -1)
    if acc is None:
      acc = Accumulator.new(feature_dim=f_rows.shape[1],
                            pixel_dim=flat.shape[1] if pixel_stats else None)
    correct = (np.asarray(classifier.predict(flat.astype(np.float64))) == labels[rows]
               ).astype(np.float64) if classifier is not None else None
    acc.add(features=f_rows, weights=weights, pixels=flat if pixel_stats else None,
            correct=correct, index=b * bsz + rows, keep_features=keep_features,
            logits=fetch_rows(logits, blocks) if keep_logits else None)
    ran += 1
    done = b + 1
    if done % max(1, int(save_every)) == 0 or done == num_batches:
      save(done)
    if on_batch is not None:
      on_batch(b)
  done = start + ran
  if done != last_save:
    save(done)

  if procs > 1 or acc is None:  # the same accumulator shapes on every process
    pix_dim = distributed.agree(acc.pix.sum.shape[0] if acc is not None and acc.pix is not None
                                else 0)
  if acc is None:  # nothing sampled here and nothing restored (max_batches=0, or process > 0)
    acc = Accumulator.new(feature_dim=extractor.dim, pixel_dim=pix_dim or None)
  merged = merge_over_processes(acc)
  features = logits_all = None
  if keep_features or keep_logits:
    idx = np.concatenate([k["index"] for k in kept]) if kept else np.zeros(0, np.int64)
    order = np.argsort(_allgather_rows(idx.astype(np.int64)), kind="stable")
    if keep_features:
      f = _concat_rows([k["features"] for k in kept], dim=merged.feat.sum.shape[0])
      features = _allgather_rows(f)[order]
    if keep_logits:
      logits_all = _allgather_rows(_concat_rows([k["logits"] for k in kept]))[order]
  return EvalResult(
      stats=merged.feat, pixel_stats=merged.pix,
      class_acc=(merged.class_correct / merged.class_count) if merged.class_count else None,
      features=features, logits=logits_all, batches_done=done, num_batches=num_batches,
      resumed_from=start, eval_dir=eval_dir)


def _concat_rows(parts, *, dim: int = 0) -> np.ndarray:
  """float32 rows of the kept parts; (0, dim) for none (_allgather_rows agrees on the width)."""
  parts = [p for p in parts if p is not None]
  if parts:
    return np.concatenate(parts).astype(np.float32)
  return np.zeros((0, dim), np.float32)


def feature_pass(*, images, extractor: fid.FeatureExtractor, mesh, batch_size: int,
                 keep_features: bool = False) -> tuple[fid.FeatureStats, np.ndarray | None]:
  """Float64 feature statistics (and features, in order) of host images [N, H, W, C] (float in
  [-1, 1] or uint8), through the same sharded path as the samples. Every process passes the
  same images."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = fid.quantize_to_uint8(images)
  n = len(images)
  batch_sh = mesh_lib.batch_sharding(mesh)
  blocks = owned_blocks(batch_sh, (batch_size,))
  rows = block_indices(blocks)
  acc = Accumulator.new(feature_dim=extractor.dim, pixel_dim=None)
  for start in range(0, n, batch_size):
    part = images[start:start + batch_size]
    u8 = np.zeros((batch_size,) + part.shape[1:3] + (3,), np.uint8)
    u8[:len(part)] = np.repeat(part, 3, axis=-1) if part.shape[-1] == 1 else part
    feats = _features(extractor, u8, batch_sh)[0]
    acc.add(features=fetch_rows(feats, blocks), weights=(start + rows < n).astype(np.float64),
            index=start + rows, keep_features=keep_features)
  merged = merge_over_processes(acc)
  if not keep_features:
    return merged.feat, None
  idx = np.concatenate([p[0] for p in acc.pending]).astype(np.int64)
  f = np.concatenate([p[1] for p in acc.pending])
  order = np.argsort(_allgather_rows(idx), kind="stable")
  return merged.feat, _allgather_rows(f)[order]
