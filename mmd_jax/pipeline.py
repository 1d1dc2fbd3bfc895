"""run_pipeline(config, workdir): teacher -> students -> one comparison table, on one config.

  WORKDIR/teacher                      the teacher run (reused when already trained)
  WORKDIR/students/<variant>_k<k>      one distillation run per entry of config.pipeline.students
  WORKDIR/comparison.{md,json,png}     every method's metrics; a row of samples per method

Each stage is the ordinary command with --mode=train or --mode=distill on its own work directory,
so any stage can be rerun alone; rerunning the pipeline reuses finished stages.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from etils import epath

from mmd_jax import config_lib
from mmd_jax.evaluation import images as images_lib
from mmd_jax.evaluation import pixel_metrics
from mmd_jax.training import loop as train_loop


def parse_students(text: str) -> list[tuple[str, int]]:
  out = []
  for item in (text or "").split(","):
    item = item.strip()
    if not item:
      continue
    variant, _, k = item.partition(":")
    if not k.isdigit() or int(k) < 1:
      raise config_lib.ConfigError(f"config.pipeline.students: cannot parse {item!r}; write "
                                   "VARIANT:K, e.g. 'alternating:8,parameter_space:8'.")
    out.append((variant, int(k)))
  return out


def student_config(config, *, teacher_dir: str, variant: str, k: int):
  c = ml_collections.ConfigDict(config.to_dict())
  c.distill.teacher = teacher_dir
  c.distill.variant = variant
  c.distill.num_student_steps = k
  return c


def stage_dirs(config, workdir):
  teacher_dir = os.path.join(workdir, "teacher")
  students = [(v, k, os.path.join(workdir, "students", f"{v}_k{k}"))
              for v, k in parse_students(config.pipeline.students)]
  return teacher_dir, students


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  from mmd_jax.distill import loop as distill_loop
  teacher_dir, students = stage_dirs(config, workdir)
  for v, k, _ in students:  # check all stages' configs before the first long stage
    config_lib.validate(student_config(config, teacher_dir=teacher_dir, variant=v, k=k))
  rows = []
  out = train_loop.train_and_evaluate(config, teacher_dir)
  rows += [dict(r, method=f"teacher {r['sampler']}") for r in out["final_eval"]]
  for variant, k, student_dir in students:
    c = student_config(config, teacher_dir=teacher_dir, variant=variant, k=k)
    res = distill_loop.distill_and_evaluate(c, student_dir)
    rows += [dict(r, method=f"student {variant}") for r in res["final_eval"]]
  write_comparison(rows, workdir=workdir)
  return rows


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


def write_comparison(rows, *, workdir):
  if jax.process_index() != 0 or not rows:
    return
  table = comparison_markdown(rows)
  header = f"Digits comparison ({pixel_metrics.STAND_IN_LABEL}; EMA parameters).\n\n"
  with epath.Path(os.path.join(workdir, "comparison.md")).open("w") as f:
    f.write(header + table + "\n")
  with epath.Path(os.path.join(workdir, "comparison.json")).open("w") as f:
    json.dump(rows, f, indent=1)
  strips = []
  for r in rows:
    stage = os.path.join(workdir, "teacher") if r["method"].startswith("teacher") else os.path.join(
        workdir, "students", f"{r['sampler'].removeprefix('student_')}_k{r['num_steps']}")
    path = _sample_row_path(r, stage)
    if os.path.exists(path):
      strips.append(np.load(path, allow_pickle=False))
  if strips and len({s.shape for s in strips}) == 1:
    grid = images_lib.grid(np.concatenate(strips), rows=len(strips))
    images_lib.save_png(grid, os.path.join(workdir, "comparison.png"),
                        scale=4 if strips[0].shape[1] <= 16 else 1)
  print(f"\n{header}{table}\n(rows of comparison.png, top to bottom: "
        f"{', '.join(r['method'] + ' ' + str(r['num_steps']) for r in rows)})\n", flush=True)
