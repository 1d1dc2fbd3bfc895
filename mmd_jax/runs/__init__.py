"""What a run is: a teacher run or a student run of any registered variant, built from the config.

    run = runs.build(config, kind="teacher" | "student", mesh=mesh)

The loop, the evaluation, AOT and print_sharding obtain the abstract state and its shardings,
init-or-restore, the step programs, the sampler and eval specs, and the fingerprint from it.
"""
from __future__ import annotations

from mmd_jax.runs import base, common, student, teacher

KINDS = {"teacher": teacher.TeacherRun, "student": student.StudentRun}
Run = base.Run
fingerprint = common.fingerprint


def kind_of(config, saved: dict | None = None) -> str:
  """'student' or 'teacher'. With a saved config: a student when it has a teacher record (a
  distilled run). Without: config.mode 'train' / 'distill' decides; otherwise (a pipeline config,
  no mode) a config with a distill section is a student."""
  if saved is not None:
    return "student" if "teacher_record" in saved else "teacher"
  mode = config.get("mode")
  if mode in ("train", "distill"):
    return "teacher" if mode == "train" else "student"
  return "student" if config.get("distill") is not None else "teacher"


def build(config, *, kind: str, mesh, need_data: bool = True) -> base.Run:
  """The run of `kind` for `config` on `mesh`; need_data=False reads no data set when
  config.data.image_shape gives the shapes (AOT, print_sharding)."""
  return KINDS[kind](config, mesh=mesh, need_data=need_data)
