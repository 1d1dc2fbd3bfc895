"""Distillation runs on the digits: both variants, teacher checks, exact resume, the pipeline."""
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmd_jax import pipeline
from mmd_jax.distill import loop as distill_loop
from mmd_jax.distill import teacher as teacher_lib
from tests import helpers


def _student_config(data_dir, teacher_dir, **overrides):
  base = {"distill.teacher": str(teacher_dir), "training.checkpoint_every": 2,
          "training.log_every": 2, "training.eval_every": 100}
  base.update(overrides)
  return helpers.tiny_digits_config(data_dir, **base)


def _state_tree(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                         "state"))


def test_alternating_student_records_teacher_and_resumes_exactly(trained, data_dir, tmp_path):
  teacher_dir, teacher_out = trained
  workdir = str(tmp_path / "alt")
  out = distill_loop.distill_and_evaluate(_student_config(data_dir, teacher_dir), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  saved = _state_tree(workdir, 4)
  assert set(saved) >= {"params", "opt_state", "ema_params", "aux_params", "aux_opt_state"}
  n_student = sum(np.size(x) for x in jax.tree_util.tree_leaves(saved["params"]))
  n_saved = sum(np.size(x) for x in jax.tree_util.tree_leaves(saved))
  n_teacher = sum(np.size(x) for x in jax.tree_util.tree_leaves(teacher_out["state"].params))
  assert n_student == n_teacher
  # student, EMA, auxiliary and two Adam states (mu, nu) plus step counters: no teacher inside.
  assert 7 * n_teacher <= n_saved <= 7 * n_teacher + 16
  config = json.load(open(os.path.join(workdir, "checkpoints", "4", "config", "metadata")))
  assert config["teacher_record"]["fingerprint"] == out["teacher"].fingerprint
  assert config["teacher_record"]["path"] == str(teacher_dir)
  row = out["final_eval"][0]
  assert row["sampler"] == "student_alternating" and row["num_steps"] == 8
  assert 0.0 <= row["class_acc"] <= 1.0

  # A kill right after the step-2 checkpoint leaves exactly this on disk; the rerun must end
  # with the same student, auxiliary, optimizer states and data position.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  os.remove(os.path.join(workdir, "final_eval.json"))
  distill_loop.distill_and_evaluate(_student_config(data_dir, teacher_dir), workdir)
  again = _state_tree(workdir, 4)
  for a, b in zip(jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_parameter_space_student_runs_with_squared_gradient_preconditioner(trained, data_dir,
                                                                           tmp_path):
  teacher_dir, _ = trained
  config = _student_config(data_dir, teacher_dir, **{
      "distill.variant": "parameter_space", "distill.num_student_steps": 1,
      "distill.precond_batches": 2, "distill.num_steps": 2, "eval.final": ""})
  out = distill_loop.distill_and_evaluate(config, str(tmp_path / "ps"))
  saved = _state_tree(str(tmp_path / "ps"), 2)
  assert saved["aux_params"] == {} or not jax.tree_util.tree_leaves(saved["aux_params"])
  assert out["final_eval"][0]["sampler"] == "student_parameter_space"


def test_teacher_with_another_architecture_is_refused(trained, data_dir, tmp_path):
  teacher_dir, _ = trained
  config = _student_config(data_dir, teacher_dir, **{"model.base_channels": 32})
  with pytest.raises(teacher_lib.TeacherError, match="model.base_channels"):
    distill_loop.distill_and_evaluate(config, str(tmp_path / "bad"))
  with pytest.raises(teacher_lib.TeacherError, match="train the teacher first"):
    distill_loop.distill_and_evaluate(
        _student_config(data_dir, tmp_path / "nowhere"), str(tmp_path / "bad2"))


def test_pipeline_reuses_the_teacher_and_writes_the_comparison(trained, data_dir, tmp_path):
  teacher_dir, teacher_out = trained
  workdir = tmp_path / "pipe"
  shutil.copytree(teacher_dir, workdir / "teacher")
  config = helpers.tiny_digits_config(data_dir, **{"pipeline.students": "alternating:2"})
  rows = pipeline.run_pipeline(config, str(workdir))
  methods = [r["method"] for r in rows]
  assert methods == ["teacher ancestral", "student alternating"]
  assert rows[0]["fd_pixels"] == teacher_out["final_eval"][0]["fd_pixels"]  # reused, not rerun
  assert json.load(open(workdir / "comparison.json")) == rows
  assert "student alternating" in open(workdir / "comparison.md").read()
  assert os.path.exists(workdir / "comparison.png")
