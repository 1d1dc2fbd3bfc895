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
from mmd_jax.models import build as model_build
from mmd_jax.parallel import mesh as mesh_lib
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


def test_init_from_names_a_student_of_this_teacher(trained, data_dir, tmp_path):
  teacher_dir, _ = trained
  cfg = lambda path: _student_config(data_dir, teacher_dir, **{"distill.init_from": str(path)})
  with pytest.raises(teacher_lib.TeacherError, match="no checkpoints under"):
    distill_loop.distill_and_evaluate(cfg(tmp_path / "nowhere"), str(tmp_path / "a"))
  with pytest.raises(teacher_lib.TeacherError, match="not a distilled student"):
    distill_loop.distill_and_evaluate(cfg(teacher_dir), str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "b" / "checkpoints" / "2")


def test_pipeline_reuses_the_teacher_and_writes_the_comparison(trained, data_dir, tmp_path):
  teacher_dir, teacher_out = trained
  workdir = tmp_path / "pipe"
  shutil.copytree(teacher_dir, workdir / "teacher")
  config = helpers.tiny_digits_config(data_dir, **{
      "pipeline.students": "alternating:2,alternating:1:from=alternating:2"})
  rows = pipeline.run_pipeline(config, str(workdir))
  methods = [r["method"] for r in rows]
  assert methods == ["teacher ancestral", "student alternating",
                     "student alternating (from alternating k=2)"]
  assert rows[0]["fd_pixels"] == teacher_out["final_eval"][0]["fd_pixels"]  # reused, not rerun
  assert json.load(open(workdir / "comparison.json")) == rows
  assert "student alternating" in open(workdir / "comparison.md").read()
  assert os.path.exists(workdir / "comparison.png")
  # The k = 1 stage started from the k = 2 student's final EMA parameters (progressive init).
  source = str(workdir / "students" / "alternating_k2")
  final = max(int(s) for s in os.listdir(os.path.join(source, "checkpoints")))
  source_ema = _state_tree(source, final)["ema_params"]
  progressive = workdir / "students" / "alternating_k1_from_alternating_k2"
  step = max(int(s) for s in os.listdir(progressive / "checkpoints"))
  record = json.load(open(progressive / "checkpoints" / str(step) / "config" / "metadata"))[
      "init_record"]
  assert record["path"] == source and record["step"] == final
  assert record["num_student_steps"] == 2
  cfg = pipeline.student_config(config, teacher_dir=str(workdir / "teacher"),
                                stage=pipeline.parse_students(config.pipeline.students)[1],
                                students_dir=str(workdir / "students"))
  mesh, rules = mesh_lib.make_mesh(cfg.mesh), model_build.logical_rules(cfg.model, cfg.mesh)
  teacher = teacher_lib.load_teacher(cfg.distill.teacher, config=cfg, data_shape=(8, 8, 1),
                                     num_classes=10, mesh=mesh, rules=rules)
  params, _ = teacher_lib.load_student_params(cfg.distill.init_from, teacher=teacher, mesh=mesh,
                                              rules=rules, mesh_config=cfg.mesh)
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(params)),
                  jax.tree_util.tree_leaves(source_ema)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(Exception, match="must be an earlier entry"):
    pipeline.parse_students("alternating:1:from=alternating:2,alternating:2")
