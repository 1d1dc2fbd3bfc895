"""Orbax checkpoints of a run: train state, data-iterator state and config, with resume checks.

Layout: WORKDIR/checkpoints/<step>/{state, data, config, checksums}. Saving is asynchronous. A
checkpoint that exists but cannot be restored is an error (never a silent restart), and a
checkpoint from a config with different shapes is refused before anything is compiled.

Integrity. Orbax checks the index of its files (crc32c) but not the array data: bytes flipped in a
data file restore silently as wrong weights. So every save also writes a `checksums` item (JSON):
per array leaf of the state its shape, dtype, two wrapping uint32 sums of its bit patterns (of
the words, and of the words through murmur3's bit mixer; mod 2**32), its float sum and sum of
squares and its count of non-finite values, all computed on device by one jitted reduction of
the GLOBAL arrays (cheap, no host copy of the weights, correct for arrays sharded over hosts),
fetched by one small device-to-host copy (so save() waits for the state). A state of at most
HOST_CHECKSUM_BYTES held whole by a single process is summed with numpy on the host instead: the
same integer sums, without compiling a reduction over every leaf (17 s for the digits UNet's 504
leaves, at every start of a process). Integer addition is exact
and order-free, so the bit sums are identical whatever mesh or device count the state is
restored onto; `restore` recomputes them and refuses a mismatch with a CheckpointError naming
the step (the earlier steps are kept: resume from one, or use a new work directory). A leaf
restored with another dtype than it was saved with is compared by its float sums with a
tolerance instead. Checkpoints written before checksums existed restore unverified (logged).
`save` refuses a state with NaN/inf values (NonFiniteStateError) before writing anything, so the
existing checkpoints stay the last good ones.
"""
from __future__ import annotations

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

ITEMS = ("state", "data", "config", "checksums")
CHECKSUM_VERSION = 1
HOST_CHECKSUM_BYTES = 256 * 2**20
# Config fields that change what the saved arrays mean or their shapes.
ARCHITECTURE_KEYS = ("model", "data.name", "diffusion.schedule", "distill.variant",
                     "distill.num_student_steps")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used, with the path and what to do about it."""


class NonFiniteStateError(CheckpointError, FloatingPointError):
  """save() was given a state with NaN/inf values; nothing was written."""


# ----------------------------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------------------------

def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaf_name(path) -> str:
  """'params/conv_in/kernel' for both dict and attribute paths (save and restore trees may be a
  dataclass and a dict of the same fields)."""
  return "/".join(_key_name(k) for k in path)


def _mix(h):
  """murmur3's 32-bit finalizer: a bijection of uint32 that spreads every input bit."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)  # numpy constants: the same code mixes jax and numpy arrays
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _leaf_sums(x):
  """(bits, bits_mix, sum, sum_sq, nonfinite) of one array (PRNG keys as their key data),
  computed where the array lives."""
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    width = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)  # 8-byte: [..., 2] words
  inexact = jnp.issubdtype(x.dtype, jnp.inexact)
  f = jnp.abs(x).astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.complexfloating) else (
      x.astype(jnp.float32))
  nonfinite = (jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) if inexact
               else jnp.zeros((), jnp.int32))
  return (jnp.sum(bits, dtype=jnp.uint32), jnp.sum(_mix(bits), dtype=jnp.uint32),
          jnp.sum(f), jnp.sum(f * f), nonfinite)


def _host_leaf_sums(x):
  """_leaf_sums of a host array with numpy (uint32 arithmetic wraps mod 2**32 as on device)."""
  x = np.ascontiguousarray(x).reshape(-1)
  if x.dtype == np.bool_:
    bits = x.astype(np.uint32)
  else:
    bits = x.view({1: np.uint8, 2: np.uint16}.get(x.dtype.itemsize, np.uint32)).astype(np.uint32)
  inexact = np.issubdtype(x.dtype, np.inexact) or x.dtype == jnp.bfloat16
  f = (np.abs(x) if np.issubdtype(x.dtype, np.complexfloating) else x).astype(np.float32)
  nonfinite = int(np.count_nonzero(~np.isfinite(x))) if inexact else 0
  with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN sums, as on device
    return (bits.sum(dtype=np.uint32), _mix(bits).sum(dtype=np.uint32), f.sum(dtype=np.float32),
            (f * f).sum(dtype=np.float32), nonfinite)


def _on_host(leaves) -> bool:
  """Whether the checksums of `leaves` are summed on the host (see the module docstring)."""
  return (jax.process_count() == 1
          and all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves)
          and sum(x.nbytes for x in leaves) <= HOST_CHECKSUM_BYTES)


@functools.lru_cache(maxsize=16)
def _checksum_program(mesh):
  def run(leaves):
    sums = [_leaf_sums(x) for x in leaves]
    return tuple(jnp.stack([s[i] for s in sums]) for i in range(5))
  if mesh is None:
    return jax.jit(run)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(run, out_shardings=replicated)


def state_checksums(state) -> dict:
  """The `checksums` record of a state (see the module docstring): JSON-able, per leaf."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  names = [_leaf_name(p) for p, _ in flat]
  leaves = [x if isinstance(x, jax.Array) else np.asarray(x) for _, x in flat]
  out = {"version": CHECKSUM_VERSION, "leaves": {}}
  if not leaves:
    return out
  leaves = [jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
            else x for x in leaves]
  mesh = next((x.sharding.mesh for x in leaves if isinstance(x, jax.Array)
               and isinstance(x.sharding, jax.sharding.NamedSharding)), None)
  try:
    if _on_host(leaves):
      per_leaf = [_host_leaf_sums(np.asarray(x)) for x in leaves]
      bits, bits_mix, sums, sums_sq, nonfinite = (np.asarray(c) for c in zip(*per_leaf))
    else:
      bits, bits_mix, sums, sums_sq, nonfinite = (
          np.asarray(a) for a in _checksum_program(mesh)(leaves))
  except ValueError:  # leaves on different device sets cannot share one program: leaf by leaf
    per_leaf = [[np.asarray(a)[0] for a in _checksum_program(None)([x])] for x in leaves]
    bits, bits_mix, sums, sums_sq, nonfinite = (np.asarray(c) for c in zip(*per_leaf))
  for i, (name, x) in enumerate(zip(names, leaves)):
    out["leaves"][name] = {
        "shape": [int(d) for d in np.shape(x)], "dtype": str(x.dtype),
        "bits": int(bits[i]), "bits_mix": int(bits_mix[i]),
        "sum": format(float(sums[i]), ".9e"), "sum_sq": format(float(sums_sq[i]), ".9e"),
        "nonfinite": int(nonfinite[i])}
  return out


def _sums_close(saved: dict, now: dict) -> bool:
  """Float comparison for a leaf restored with another dtype (rounding changes every bit)."""
  try:
    s, q = float(saved["sum"]), float(saved["sum_sq"])
    s2, q2 = float(now["sum"]), float(now["sum_sq"])
  except (KeyError, ValueError):
    return False
  n = max(1, math.prod(saved["shape"]))
  # |sum change| <= rel * sum|x| <= rel * sqrt(n * sum_sq) (Cauchy-Schwarz); bf16 rel ~ 0.4%.
  return (abs(s - s2) <= 1e-2 * math.sqrt(n * q) + 1e-30 and abs(q - q2) <= 2e-2 * q + 1e-30)


def checksum_mismatches(saved: dict, now: dict) -> tuple[list[str], int]:
  """(names of leaves whose restored values differ from the saved checksums, leaves compared)."""
  bad, compared = [], 0
  now_leaves = now.get("leaves", {})
  for name, s in saved.get("leaves", {}).items():
    r = now_leaves.get(name)
    if r is None:
      continue  # not part of this restore
    compared += 1
    if list(r["shape"]) != list(s["shape"]):
      bad.append(f"{name} (shape {r['shape']} vs saved {s['shape']})")
    elif r["dtype"] == s["dtype"]:
      if (r["bits"], r["bits_mix"]) != (s["bits"], s["bits_mix"]):
        bad.append(name)
    elif not _sums_close(s, r):
      bad.append(f"{name} (restored as {r['dtype']}, saved {s['dtype']})")
  return bad, compared


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def incompatible_keys(saved: dict, current: dict, *,
                      keys=ARCHITECTURE_KEYS, ignore=("model.dropout", "model.remat",
                                                      "model.dtype")) -> list[str]:
  """Dotted config keys under `keys` whose values differ between two config dicts."""
  a = json.loads(json.dumps(_flatten(saved), default=str))
  b = json.loads(json.dumps(_flatten(current), default=str))
  diffs = []
  for k in sorted(set(a) | set(b)):
    if not any(k == p or k.startswith(p + ".") for p in keys) or k in ignore:
      continue
    if a.get(k) != b.get(k):
      diffs.append(f"{k}: checkpoint has {a.get(k)!r}, config has {b.get(k)!r}")
  return diffs


class Checkpointer:
  """A thin wrapper over ocp.CheckpointManager for one work directory."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
               subdir: str = "checkpoints"):
    self.directory = os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir,
                                  subdir)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             enable_async_checkpointing=async_save,
                                             create=True),
        item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """The finished checkpoint steps in this work directory, ascending."""
    return sorted(int(s) for s in self.manager.all_steps())

  def require_step(self, step: int) -> int:
    """Checks that an explicitly named step exists (e.g. from WORKDIR/checkpoints/STEP);
    raises CheckpointError "checkpoint step S not found in DIR; available steps: [...]"."""
    steps = self.all_steps()
    if int(step) not in steps:
      hint = (f"name one of those (WORKDIR/checkpoints/{steps[-1]}), or the work directory "
              "itself for its latest step" if steps else "train this run first")
      raise CheckpointError(f"checkpoint step {step} not found in {self.directory}; available "
                            f"steps: {steps}. Fix the path: {hint}.")
    return int(step)

  def saved_config(self, step: int) -> dict:
    self.require_step(step)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
      return dict(restored["config"])
    except Exception as e:  # noqa: BLE001 -- any failure here means the checkpoint is unusable
      raise CheckpointError(self._unreadable(step, e)) from e

  def check_compatible(self, step: int, config_dict: dict) -> None:
    diffs = incompatible_keys(self.saved_config(step), config_dict)
    if diffs:
      raise CheckpointError(
          f"The work directory's checkpoint {self.directory}/{step} was written with an "
          "incompatible config:\n  " + "\n  ".join(diffs) +
          "\nUse a new --workdir for this config, or run with the checkpoint's values. "
          "Nothing was changed on disk.")

  def save(self, step: int, *, state, data_state: dict, config_dict: dict) -> bool:
    """Starts writing checkpoint `step` with the state's checksums; False if it exists.

    Raises NonFiniteStateError (nothing written, earlier checkpoints untouched) if the state
    holds NaN/inf values.
    """
    if step in self.manager.all_steps():
      return False  # never overwrite an existing checkpoint
    checksums = state_checksums(state)
    bad = {k: v["nonfinite"] for k, v in checksums["leaves"].items() if v["nonfinite"]}
    if bad:
      names = ", ".join(f"{k} ({n})" for k, n in list(bad.items())[:5])
      more = f" and {len(bad) - 5} more leaves" if len(bad) > 5 else ""
      raise NonFiniteStateError(
          f"Refusing to save checkpoint step {step} in {self.directory}: the state has NaN/inf "
          f"values in {names}{more}. Nothing was written; the existing checkpoints (latest: "
          f"{self.latest_step()}) are untouched. Lower the learning rate or check the data, then "
          "rerun to resume from the latest checkpoint.")
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_dict), checksums=ocp.args.JsonSave(checksums)),
        force=True)

  def has_checksums(self, step: int) -> bool:
    return (epath.Path(self.directory) / str(int(step)) / "checksums").exists()

  def restore(self, step: int, *, abstract_state):
    """Restores (state, data_state) at `step` into the shardings of `abstract_state`, verified
    against the checksums saved with it (CheckpointError on a mismatch)."""
    self.require_step(step)
    verify = self.has_checksums(step)
    args = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    if verify:
      args["checksums"] = ocp.args.JsonRestore()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(self._unreadable(step, e)) from e
    state = restored["state"]
    if not verify:
      logging.warning("Checkpoint %s/%d has no checksums (written by an older version): "
                      "restored without verifying its arrays.", self.directory, step)
    else:
      saved = dict(restored["checksums"])
      bad, compared = checksum_mismatches(saved, state_checksums(state))
      if bad:
        raise CheckpointError(self._corrupt(step, bad, compared))
      if not compared:
        logging.warning("Checkpoint %s/%d: no restored array matched a saved checksum (another "
                        "state structure?); not verified.", self.directory, step)
      else:
        logging.info("Checkpoint %s/%d: %d arrays match their saved checksums.",
                     self.directory, step, compared)
    return state, dict(restored["data"])

  def _corrupt(self, step, bad, compared) -> str:
    earlier = [s for s in self.all_steps() if s < int(step)]
    if earlier:
      fix = (f"Resume from an earlier step instead (kept: {earlier}): move {self.directory}/"
             f"{step} out of {self.directory} and rerun (the run resumes from step "
             f"{earlier[-1]}), or where a checkpoint path is taken name "
             f"WORKDIR/checkpoints/{earlier[-1]}; or start over with a new --workdir.")
    else:
      fix = (f"There is no earlier step to fall back to: move {self.directory}/{step} aside "
             "and rerun to start over, or use a new --workdir.")
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return (f"The checkpoint {self.directory}/{step} (step {step}) is corrupt: {len(bad)} of "
            f"{compared} arrays do not match the checksums written with it ({shown}). It was not "
            f"used, and nothing was changed on disk. {fix}")

  def _unreadable(self, step, error) -> str:
    return (f"The checkpoint {self.directory}/{step} (step {step}) exists but cannot be restored "
            f"({type(error).__name__}: {str(error)[:500]}). The run was not restarted from "
            f"scratch. If the config changed the state's structure (e.g. optim.grad_clip "
            f"switched on or off), run with the checkpoint's config (saved in its 'config' item); "
            f"if the files are damaged, move that step directory aside to resume from an earlier "
            f"checkpoint, or use a new --workdir.")

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
