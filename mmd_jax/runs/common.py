"""What every run shares: its data shapes, sharding options, the one restore sequence, the
fingerprint of parameters, and the step programs it hands to the loop and to AOT.

A run (runs.teacher.TeacherRun, runs.student.StudentRun) is built from the config alone; the
loop (mmd_jax/loop.py), the evaluation (mmd_jax/evaluation/run.py), AOT and print_sharding
(mmd_jax/tools/) ask it for these parts and never rebuild them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mmd_jax import config_lib
from mmd_jax.data import pipeline
from mmd_jax.diffusion import conditioning
from mmd_jax.models import embeddings
from mmd_jax.parallel import distributed
from mmd_jax.parallel import mesh as mesh_lib
from mmd_jax.parallel import sharding as sharding_lib
from mmd_jax.training import checkpoint as ckpt_lib


# ----------------------------------------------------------------------------------------------
# Data shapes
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The shapes a run's model and step are built for.

  num_classes is the model's: the data set's class count, or 0 with model.class_conditional=False
  (labels then serve only evaluation, e.g. a text-conditioned model on digits_text);
  eval_classes is the data set's (samples are class-balanced over these)."""
  data_shape: tuple[int, ...]
  num_classes: int
  eval_classes: int
  data_key: str                 # "image" or "x"
  text_shape: tuple[int, int] | None
  is_image: bool


def data_spec(config, *, need_data: bool = True) -> DataSpec:
  """The run's shapes. With need_data=False and config.data.image_shape set (pod configs for
  --mode=aot / print_sharding) no data set is read; otherwise the prepared data set is, and
  config.data.image_shape (when set) and the model's text input must agree with it."""
  data = config.data
  text_shape = conditioning.model_text_shape(config.model)
  class_conditional = config.model.get("class_conditional", True)
  if not need_data and data.get("image_shape"):
    shape = tuple(int(s) for s in data.image_shape)
    classes = int(data.get("num_classes", 0))
    return DataSpec(shape, classes if class_conditional else 0, classes, "image", text_shape,
                    True)
  info = pipeline.dataset_info(data)
  want_image = data.get("image_shape")
  if want_image and info["image_shape"] is not None and (
      tuple(int(s) for s in want_image) != tuple(info["image_shape"])):
    raise config_lib.ConfigError(
        f"config.data.image_shape={tuple(want_image)} but data set {data.name!r} has "
        f"images {tuple(info['image_shape'])}; set --config.data.image_shape to match.")
  have = info.get("text_shape")
  msg = conditioning.text_shape_error(
      want=text_shape, have=have, want_what="the model (model.text_len, model.text_dim)",
      have_what=f"data set {data.name!r}")
  if msg:
    fix = (f"set --config.model.text_len={have[0]} --config.model.text_dim={have[1]}"
           if have else "use a data set with a 'text' feature (e.g. data.name=digits_text) or "
           "set model.text_dim=0")
    raise config_lib.ConfigError(f"{msg}; {fix}.")
  is_image = info["image_shape"] is not None
  classes = int(info["num_classes"])
  return DataSpec(tuple(info["data_shape"]), classes if class_conditional else 0, classes,
                  "image" if is_image else "x", text_shape, is_image)


# ----------------------------------------------------------------------------------------------
# Shardings
# ----------------------------------------------------------------------------------------------

def sharding_options(mesh_config) -> dict:
  """decide_tree's options (rules, fallback, strict, fsdp_fill): the models' logical rules
  (embeddings.default_logical_rules) updated by config.mesh."""
  return sharding_lib.options_from_config(mesh_config,
                                          model_rules=embeddings.default_logical_rules())


def shardings(abstract_boxed, *, mesh, options: dict, log: bool = True):
  """NamedShardings of a (boxed) abstract tree on `mesh`."""
  decisions = sharding_lib.decide_tree(abstract_boxed, axis_sizes=dict(mesh.shape), **options)
  if log:
    sharding_lib.log_notes(decisions)
  return sharding_lib.to_shardings(decisions, mesh)


def with_shardings(abstract_boxed, shardings_tree):
  """ShapeDtypeStructs of an abstract tree carrying its shardings (lowering and restore targets)."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(abstract_boxed),
      shardings_tree)


# ----------------------------------------------------------------------------------------------
# Checkpoints: the one restore sequence
# ----------------------------------------------------------------------------------------------

def locate(path: str) -> tuple[str, int | None]:
  """(work directory, step or None for latest) from a work directory or a step directory
  (`.../checkpoints/<step>`)."""
  path = path.rstrip("/")
  m = re.match(r"^(.*)/checkpoints/(\d+)$", path)
  if m:
    return m.group(1), int(m.group(2))
  return path, None


def open_checkpoint(path: str, *, error: Callable[[str], Exception], missing: str):
  """(Checkpointer, work directory, step) of the run at `path` (a work directory: its latest
  step, chosen by process 0 for every process; or a step directory). error(message) builds the
  exception; `missing` is the fix named when there is no checkpoint."""
  workdir, step = locate(path)
  if "://" not in workdir and not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise error(f"no checkpoints under {workdir!r}: {missing}")
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  if step is None:
    step = ckpt.latest_step()
    step = distributed.agree(-1 if step is None else step)
    if step < 0:
      ckpt.close()
      raise error(f"{workdir}/checkpoints holds no finished checkpoint: {missing}")
  else:
    try:
      ckpt.require_step(step)
    except Exception:
      ckpt.close()
      raise
  return ckpt, workdir, int(step)


# State fields added after checkpoints were already written, with the value an older checkpoint
# (which lacks the field) restores as. nonfinite_step: the in-step guard's record (-1: none).
ADDED_FIELDS = {"nonfinite_step": np.int32(-1)}


def saved_state_fields(ckpt, step: int) -> set[str] | None:
  """Which fields of ADDED_FIELDS the state saved at `step` has (from Orbax's tree metadata;
  process 0 reads, every process gets its answer), or None when that cannot be read."""
  names = None
  if jax.process_index() == 0:
    try:
      meta = ocp.StandardCheckpointHandler().metadata(
          epath.Path(ckpt.directory) / str(int(step)) / "state")
      names = set(getattr(meta, "tree", meta).keys())
    except Exception:  # noqa: BLE001 -- the restore itself reports an unreadable checkpoint
      names = None
  have = -1 if names is None else sum(1 << i for i, f in enumerate(ADDED_FIELDS) if f in names)
  have = distributed.agree(have)
  if have < 0:
    return None
  return {f for i, f in enumerate(ADDED_FIELDS) if have & (1 << i)}


def restore(ckpt, step: int, *, abstract_boxed, shardings_tree):
  """(state, data-iterator state) of checkpoint `step`, restored into the given shardings.

  A checkpoint written before a field of ADDED_FIELDS existed is restored with the structure it
  was saved with, and the field is added with its default value."""
  target = with_shardings(abstract_boxed, shardings_tree)
  fields = [f.name for f in dataclasses.fields(target)] if dataclasses.is_dataclass(target) else []
  added = [f for f in ADDED_FIELDS if f in fields]
  present = saved_state_fields(ckpt, step) if added else None
  absent = [f for f in added if present is not None and f not in present]
  if not absent:
    return ckpt.restore(step, abstract_state=target)
  logging.info("Checkpoint %s/%d predates the state field(s) %s: restoring its own structure "
               "and adding them with their defaults.", ckpt.directory, step, absent)
  state, data = ckpt.restore(step, abstract_state={f: getattr(target, f) for f in fields
                                                   if f not in absent})
  for f in absent:
    value = np.asarray(ADDED_FIELDS[f])
    state[f] = jax.make_array_from_callback(value.shape, getattr(target, f).sharding,
                                            lambda idx, v=value: v[idx])
  return type(target)(**{f: state[f] for f in fields}), data


# ----------------------------------------------------------------------------------------------
# Fingerprint
# ----------------------------------------------------------------------------------------------

def fingerprint(params) -> str:
  """A short hash of the parameters' structure, shapes and float64-printed sums / sums of squares,
  computed on device (no host copy of the weights). Leaf by leaf, not as one jitted reduction:
  fused sums differ in the last bits, and this hash is stored in every student's checkpoints
  (a different value would refuse to resume them)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  sums = jax.device_get([(jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(
      jnp.float32)))) for x in leaves])
  h = hashlib.sha256(str(treedef).encode())
  for x, (s, q) in zip(leaves, sums):
    h.update(f"{x.shape}{x.dtype}{np.float64(s):.9e}{np.float64(q):.9e}".encode())
  return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Step programs
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class StepProgram:
  """One jitted program of a run's step: program(state, frozen, batch, rng) -> (state, metrics),
  with the state donated. `frozen` holds the inputs the step reads but never updates (the
  teacher's parameters, a preconditioner; {} for a teacher run)."""
  name: str
  jitted: Any

  def lower(self, *args):
    return self.jitted.lower(*args)


def jit_program(name: str, fn, *, state_shardings, frozen_shardings, mesh) -> StepProgram:
  repl = mesh_lib.replicated(mesh)
  return StepProgram(name, jax.jit(
      fn, in_shardings=(state_shardings, frozen_shardings, mesh_lib.batch_sharding(mesh), repl),
      out_shardings=(state_shardings, repl), donate_argnums=(0,)))


def program_hash(lowered) -> str:
  """sha256 (16 hex digits) of a lowered program's StableHLO, independent of symbol names.

  JAX names repeated sub-functions from a per-process counter (@silu_18) and shares or repeats
  identical ones depending on what was traced before, so the same program lowered in another
  order differs as text. Each function is hashed by its body with every call replaced by the
  callee's hash (a Merkle hash from @main down), which names and sharing do not change. Equal
  hashes mean the same program: used to show that AOT compiles what the loop runs."""
  lines = lowered.as_text().splitlines()
  functions, outside, i = {}, [], 0
  while i < len(lines):
    m = re.match(r"\s*func\.func (?:public |private )?@([\w.$-]+)", lines[i])
    if not m:
      outside.append(re.sub(r"^module @[\w.$-]+", "module", lines[i]))
      i += 1
      continue
    end = i + 1
    while lines[end] != lines[i][:len(lines[i]) - len(lines[i].lstrip())] + "}":
      end += 1
    functions[m.group(1)] = "\n".join([lines[i].replace(f"@{m.group(1)}", "@self", 1)]
                                      + lines[i + 1:end + 1])
    i = end + 1
  memo: dict[str, str] = {}

  def digest(name):
    if name not in memo:
      body = re.sub(r"@([\w.$-]+)", lambda c: "@" + (digest(c.group(1)) if c.group(1)
                                                     in functions else c.group(1)),
                    functions[name])
      memo[name] = hashlib.sha256(body.encode()).hexdigest()
    return memo[name]

  top = "\n".join(outside) + digest("main")
  return hashlib.sha256(top.encode()).hexdigest()[:16]


def abstract_batch(*, batch_size: int, spec: DataSpec, mesh) -> dict:
  """ShapeDtypeStructs of one global batch, sharded like the loop's batches."""
  sh = mesh_lib.batch_sharding(mesh)
  batch = {spec.data_key: jax.ShapeDtypeStruct((batch_size,) + tuple(spec.data_shape),
                                               jnp.float32, sharding=sh)}
  if spec.num_classes > 0:
    batch["label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sh)
  if spec.text_shape:
    batch["text"] = jax.ShapeDtypeStruct((batch_size,) + tuple(spec.text_shape), jnp.float32,
                                         sharding=sh)
  return batch


def abstract_rng(mesh):
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=mesh_lib.replicated(mesh))
