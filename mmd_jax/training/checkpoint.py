"""Orbax checkpoints of a run: train state, data-iterator state and config, with resume checks.

Layout: WORKDIR/checkpoints/<step>/{state, data, config}. Saving is asynchronous. A checkpoint
that exists but cannot be restored is an error (never a silent restart), and a checkpoint from a
config with different shapes is refused before anything is compiled.
"""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "config")
# Config fields that change what the saved arrays mean or their shapes.
ARCHITECTURE_KEYS = ("model", "data.name", "diffusion.schedule", "distill.variant",
                     "distill.num_student_steps")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used, with the path and what to do about it."""


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

  def saved_config(self, step: int) -> dict:
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
    if step in self.manager.all_steps():
      return False  # never overwrite an existing checkpoint
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_dict)), force=True)

  def restore(self, step: int, *, abstract_state):
    """Restores (state, data_state) at `step` into the shardings of `abstract_state`."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(self._unreadable(step, e)) from e
    return restored["state"], dict(restored["data"])

  def _unreadable(self, step, error) -> str:
    return (f"The checkpoint {self.directory}/{step} exists but cannot be restored "
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
