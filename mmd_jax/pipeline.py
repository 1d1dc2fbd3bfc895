"""run_pipeline(config, workdir): teacher -> students -> one comparison table, on one config.

  WORKDIR/teacher                      the teacher run (reused when already trained)
  WORKDIR/students/<variant>_k<k>      one distillation run per entry of config.pipeline.students
                                       (..._from_<variant>_k<k> for a progressive entry)
  WORKDIR/comparison.{md,json,png}     every method's metrics; a row of samples per method

Each stage is the ordinary command with --mode=train or --mode=distill on its own work directory,
so any stage can be rerun alone; rerunning the pipeline reuses finished stages.
"""
from __future__ import annotations

import dataclasses
import os
import re

import jax
import ml_collections
import numpy as np

from mmd_jax import config_lib, io_utils, loop
from mmd_jax.evaluation import images as images_lib
from mmd_jax.evaluation import pixel_metrics
from mmd_jax.runs import student as student_run


_STUDENT_RE = re.compile(r"^(\w+):(\d+)(?::from=(\w+):(\d+))?$")


@dataclasses.dataclass(frozen=True)
class StudentStage:
  variant: str
  k: int
  init_from: tuple[str, int] | None = None   # (variant, k) of an earlier entry

  @property
  def name(self) -> str:
    base = f"{self.variant}_k{self.k}"
    return base if self.init_from is None else f"{base}_from_{self.init_from[0]}_k{self.init_from[1]}"

  @property
  def method(self) -> str:
    src = "" if self.init_from is None else f" (from {self.init_from[0]} k={self.init_from[1]})"
    return f"student {self.variant}{src}"


def parse_students(text: str) -> list[StudentStage]:
  """config.pipeline.students: 'VARIANT:K[:from=VARIANT:K],...'. A 'from=' entry starts from the
  EMA parameters of that earlier entry's student (distill.init_from), e.g.
  'alternating:2,alternating:1:from=alternating:2'."""
  out = []
  for item in (text or "").split(","):
    item = item.strip()
    if not item:
      continue
    m = _STUDENT_RE.match(item)
    if not m or int(m.group(2)) < 1:
      raise config_lib.ConfigError(f"config.pipeline.students: cannot parse {item!r}; write "
                                   "VARIANT:K[:from=VARIANT:K], e.g. 'alternating:8,"
                                   "alternating:2,alternating:1:from=alternating:2'.")
    src = None if m.group(3) is None else (m.group(3), int(m.group(4)))
    if src is not None and not any(s.init_from is None and (s.variant, s.k) == src for s in out):
      raise config_lib.ConfigError(
          f"config.pipeline.students: {item!r} starts from {src[0]}:{src[1]}, which must be an "
          "earlier entry of the list (without from=).")
    out.append(StudentStage(m.group(1), int(m.group(2)), src))
  return out


def student_config(config, *, teacher_dir: str, stage: StudentStage, students_dir: str):
  c = ml_collections.ConfigDict(config.to_dict())
  c.distill.teacher = teacher_dir
  c.distill.variant = stage.variant
  c.distill.num_student_steps = stage.k
  if stage.init_from is not None:
    c.distill.init_from = os.path.join(students_dir, StudentStage(*stage.init_from).name)
  return c


def stage_dirs(config, workdir):
  teacher_dir = os.path.join(workdir, "teacher")
  students = [(s, os.path.join(workdir, "students", s.name))
              for s in parse_students(config.pipeline.students)]
  return teacher_dir, students


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  teacher_dir, students = stage_dirs(config, workdir)
  students_dir = os.path.join(workdir, "students")
  configs = [student_config(config, teacher_dir=teacher_dir, stage=s, students_dir=students_dir)
             for s, _ in students]
  for c in configs:  # check all stages' configs before the first long stage
    config_lib.validate(c)
    student_run.validate(c)
  rows = []
  out = loop.train_and_evaluate(config, teacher_dir)
  _stop_if_preempted(out, "teacher", teacher_dir)
  rows += [dict(r, method=f"teacher {r['sampler']}", stage_dir=teacher_dir)
           for r in out["final_eval"]]
  for (stage, student_dir), c in zip(students, configs):
    res = loop.distill_and_evaluate(c, student_dir)
    _stop_if_preempted(res, f"student {stage.name}", student_dir)
    rows += [dict(r, method=stage.method, stage_dir=student_dir) for r in res["final_eval"]]
  write_comparison(rows, workdir=workdir)
  return rows


def _stop_if_preempted(out: dict, stage: str, stage_dir: str) -> None:
  """A preempted stage ends the pipeline (loop.PreemptedError): the next stage must not start
  from an unfinished one, and no comparison is written from partial results."""
  if out["preempted"]:
    raise loop.PreemptedError(
        f"the pipeline's {stage} stage was preempted at step {int(out['state'].step)}; its "
        f"checkpoint is saved in {stage_dir}/checkpoints. Rerun the same command to continue "
        "the pipeline from there.")


def _sample_row_path(row, stage_dir):
  return os.path.join(stage_dir, "samples",
                      f"final_step{row['step']}_{row['sampler']}{row['num_steps']}"
                      f"_g{row['guidance']:g}_row.npy")


def comparison_markdown(rows) -> str:
  lines = ["| method | steps | guidance | fd_pixels | class_acc |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['num_steps']} | {r['guidance']:g} | "
                 f"{r.get('fd_pixels', float('nan')):.3f} | {r.get('class_acc', float('nan')):.3f} |")
  return "\n".join(lines)


def _row_label(row) -> list[str]:
  """The text beside a row of comparison.png: the method, then steps and metrics."""
  detail = [f"{row['num_steps']} steps"]
  if row.get("guidance"):
    detail.append(f"guidance {row['guidance']:g}")
  detail += [f"{k} {row[k]:.3f}" for k in ("fd_pixels", "class_acc") if k in row]
  return [row["method"], "  ".join(detail)]


def write_comparison_png(rows, *, path):
  """A row of samples (one per class) per method, labelled with the method, its steps and
  metrics. Rows whose samples are missing are left out; nothing is written if none remain."""
  strips, labels = [], []
  for r in rows:
    sample_path = _sample_row_path(r, r["stage_dir"])
    if os.path.exists(sample_path):
      strips.append(np.load(sample_path, allow_pickle=False))
      labels.append(_row_label(r))
  if not strips or len({s.shape for s in strips}) != 1:
    return
  picture = images_lib.labelled_rows(
      strips, labels, title=f"One row per method, one sample per class ({pixel_metrics.STAND_IN_LABEL})",
      column_labels=[str(i) for i in range(strips[0].shape[0])],
      min_scale=4 if strips[0].shape[1] <= 16 else 1)
  images_lib.save_png(picture, path)


def write_comparison(rows, *, workdir):
  if jax.process_index() != 0 or not rows:
    return
  table = comparison_markdown(rows)
  header = f"Digits comparison ({pixel_metrics.STAND_IN_LABEL}; EMA parameters).\n\n"
  io_utils.write_text_atomic(os.path.join(workdir, "comparison.md"), header + table + "\n")
  io_utils.write_json_atomic(os.path.join(workdir, "comparison.json"), rows, indent=1)
  write_comparison_png(rows, path=os.path.join(workdir, "comparison.png"))
  print(f"\n{header}{table}\n(rows of comparison.png, top to bottom: "
        f"{', '.join(r['method'] + ' ' + str(r['num_steps']) for r in rows)})\n", flush=True)
