"""Loading what a distillation starts from: the trained teacher (checkpoint, architecture check,
fingerprint) and, optionally, an earlier student of the same teacher (distill.init_from).

The teacher is named by a work directory (its latest checkpoint) or by one Orbax step directory
(`.../checkpoints/<step>`). Its architecture comes from the config saved beside its parameters and
must equal the distillation config's model section. The teacher is never written into the
student's checkpoints; its path, step and a fingerprint are recorded instead.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmd_jax.training import checkpoint as ckpt_lib
from mmd_jax.training import optim, state as state_lib


class TeacherError(ValueError):
  """A teacher checkpoint that is missing or does not fit the distillation config."""


@dataclasses.dataclass
class Teacher:
  params: Any            # EMA parameters (unboxed)
  opt_state: Any         # the teacher's optimizer state (Adam second moments for Lambda)
  config: ml_collections.ConfigDict  # the teacher's own saved config
  path: str
  step: int
  fingerprint: str
  param_shardings: Any = None   # NamedShardings of params (reused for the student)
  abstract_params: Any = None   # boxed abstract params (logical names, for derived states)


def _locate(path: str) -> tuple[str, int | None]:
  """(work directory, step or None for latest) from a work directory or a step directory."""
  path = path.rstrip("/")
  m = re.match(r"^(.*)/checkpoints/(\d+)$", path)
  if m:
    return m.group(1), int(m.group(2))
  return path, None


def fingerprint(params) -> str:
  """A short hash of the parameters' structure, shapes and float64 sums / sums of squares,
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


def model_mismatch(teacher_model: dict, model: dict) -> list[str]:
  ignore = ("dropout", "remat", "dtype")
  keys = sorted(set(teacher_model) | set(model))
  norm = lambda v: list(v) if isinstance(v, tuple) else v
  return [f"model.{k}: teacher has {norm(teacher_model.get(k))!r}, config has "
          f"{norm(model.get(k))!r}" for k in keys
          if k not in ignore and norm(teacher_model.get(k)) != norm(model.get(k))]


def load_teacher(path: str, *, config, data_shape, num_classes: int, mesh, rules,
                 text_shape=None) -> Teacher:
  """Restores the teacher's EMA parameters and optimizer state onto `mesh`.

  text_shape: (tokens, width) of the text embeddings of a text-conditioned model (config.model
  text_len, text_dim), else None.
  Raises TeacherError if there is no checkpoint or its architecture (text input included)
  differs from config.model.
  """
  from mmd_jax.diffusion import conditioning
  from mmd_jax.models import build as model_build
  if not path:
    raise TeacherError("No teacher given: set --config.distill.teacher=WORKDIR (a teacher work "
                       "directory) or WORKDIR/checkpoints/STEP.")
  workdir, step = _locate(path)
  if "://" not in workdir and not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise TeacherError(f"No teacher checkpoints under {workdir!r}: train the teacher first "
                       f"(python -m mmd_jax.main --mode=train --workdir={workdir} ...).")
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise TeacherError(f"{workdir}/checkpoints holds no finished checkpoint; train the teacher "
                       "first.")
  saved = ml_collections.ConfigDict(ckpt.saved_config(step))
  diffs = model_mismatch(saved.model.to_dict(), config.model.to_dict())
  text_diff = conditioning.text_shape_error(
      want=conditioning.model_text_shape(saved.model), have=conditioning.model_text_shape(
          config.model), want_what="the teacher", have_what="the config's model")
  if text_diff:
    diffs.insert(0, text_diff)
  if saved.data.name != config.data.name:
    diffs.append(f"data.name: teacher has {saved.data.name!r}, config has {config.data.name!r}")
  if diffs:
    raise TeacherError(
        f"The teacher at {workdir}/checkpoints/{step} does not match the distillation config:\n  "
        + "\n  ".join(diffs) + "\nSet the config's model section to the teacher's "
        "(the student has the teacher's architecture), or point distill.teacher elsewhere.")
  model = model_build.build_model(saved.model, data_shape=data_shape, num_classes=num_classes)
  tx = optim.make_optimizer(saved.optim, total_steps=int(saved.training.num_steps))
  abstract = state_lib.abstract_state(model, tx, data_shape=data_shape, num_classes=num_classes,
                                      text_shape=text_shape)
  shardings = state_lib.state_shardings(abstract, mesh=mesh, rules=rules,
                                        mesh_config=config.mesh)
  state, _ = ckpt.restore(step, abstract_state=ckpt_lib.abstract_with_shardings(
      state_lib.unboxed(abstract), shardings))
  ckpt.close()
  return Teacher(params=state.ema_params, opt_state=state.opt_state, config=saved, path=workdir,
                 step=int(step), fingerprint=fingerprint(state.ema_params),
                 param_shardings=shardings.ema_params, abstract_params=abstract.ema_params)


def load_student_params(path: str, *, teacher: Teacher, mesh, rules, mesh_config):
  """(EMA parameters, record) of a student distilled from `teacher`, for distill.init_from.

  Progressive initialisation: a k = 1 student started from a trained k = 2 student instead of
  from the teacher, whose t = 1 prediction is close to the data mean for every z_1 (on the 16-D
  GMM benchmark the teacher-initialised k = 1 student collapsed onto one mode; see the README).
  Any variant and k may be the source; it must be a --mode=distill run of this same teacher.
  """
  from mmd_jax.distill import steps as distill_steps  # pylint: disable=g-import-not-at-top
  what = f"distill.init_from={path!r}"
  workdir, step = _locate(path)
  if "://" not in workdir and not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise TeacherError(f"{what}: no checkpoints under {workdir!r}. Distil that student first "
                       "(--mode=distill), or leave distill.init_from empty.")
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise TeacherError(f"{what}: {workdir}/checkpoints holds no finished checkpoint.")
    saved = ml_collections.ConfigDict(ckpt.saved_config(step))
    record = saved.get("teacher_record")
    if record is None:
      raise TeacherError(f"{what}: {workdir} is not a distilled student (its saved config has "
                         "no teacher record). Name the work directory of a --mode=distill run.")
    if record.get("fingerprint") != teacher.fingerprint:
      raise TeacherError(
          f"{what}: that student was distilled from another teacher (fingerprint "
          f"{record.get('fingerprint')} at {record.get('path')}); this run's teacher is "
          f"{teacher.fingerprint} at {teacher.path}. Name a student of this teacher.")
    student_tx, aux_tx = distill_steps.make_optimizers(saved.distill)
    abstract = jax.eval_shape(lambda p: distill_steps.init_distill_state(
        config=saved.distill, init_params=p, student_tx=student_tx, aux_tx=aux_tx),
                              teacher.abstract_params)
    shardings = state_lib.state_shardings(abstract, mesh=mesh, rules=rules,
                                          mesh_config=mesh_config)
    state, _ = ckpt.restore(step, abstract_state=ckpt_lib.abstract_with_shardings(
        state_lib.unboxed(abstract), shardings))
  finally:
    ckpt.close()
  return state.ema_params, {"path": workdir, "step": int(step),
                            "variant": str(saved.distill.variant),
                            "num_student_steps": int(saved.distill.num_student_steps),
                            "fingerprint": fingerprint(state.ema_params)}
