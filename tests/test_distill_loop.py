"""Distillation runs on the digits: both variants, teacher checks, exact resume, the pipeline."""
import json
import logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmd_jax import pipeline
from mmd_jax import loop as distill_loop
from mmd_jax import runs
from mmd_jax.runs import student as teacher_lib
from mmd_jax.parallel import mesh as mesh_lib
from mmd_jax.training import checkpoint as ckpt_lib
from tests import helpers


def _student_config(data_dir, teacher_dir, **overrides):
  base = {"distill.teacher": str(teacher_dir), "training.checkpoint_every": 2,
          "training.log_every": 2, "training.eval_every": 100}
  base.update(overrides)
  return helpers.tiny_digits_config(data_dir, **base)


def _state_tree(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                         "state"))


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def _rewrite_checkpoint(workdir, step, config, change):
  """Replaces the student's checkpoint `step` by change(state), with fresh checksums."""
  run = runs.build(config, kind="student", mesh=mesh_lib.make_mesh(config.mesh))
  run.load_teacher()
  ckpt = ckpt_lib.Checkpointer(str(workdir), async_save=False)
  state, data = run.restore(ckpt, step)
  saved_config = ckpt.saved_config(step)
  ckpt.close()
  shutil.rmtree(os.path.join(str(workdir), "checkpoints", str(step)))
  ckpt = ckpt_lib.Checkpointer(str(workdir), async_save=False)
  assert ckpt.save(step, state=change(state), data_state=data, config_dict=saved_config)
  ckpt.close()


def _stop_after(workdir, step):
  """What a kill right after checkpoint `step` leaves on disk: later checkpoints, the final
  evaluation and later metrics gone."""
  for s in os.listdir(os.path.join(workdir, "checkpoints")):
    if s.isdigit() and int(s) > step:
      shutil.rmtree(os.path.join(workdir, "checkpoints", s))
  for name in ("final_eval.json", "final_eval.key.json", "final_eval.md"):
    if os.path.exists(os.path.join(workdir, name)):
      os.remove(os.path.join(workdir, name))
  path = os.path.join(workdir, "metrics.jsonl")
  lines = [l for l in open(path) if json.loads(l)["step"] <= step]
  open(path, "w").writelines(lines)


def test_alternating_student_records_teacher_and_resumes_exactly(trained, data_dir, tmp_path,
                                                                 caplog):
  teacher_dir, teacher_out = trained
  workdir = str(tmp_path / "alt")
  out = distill_loop.distill_and_evaluate(_student_config(data_dir, teacher_dir), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  saved = _state_tree(workdir, 4)
  assert set(saved) >= {"params", "opt_state", "ema_params", "aux_params", "aux_opt_state",
                        "nonfinite_step"}
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
  assert row["sampler"] == "student" and row["num_steps"] == 8
  assert 0.0 <= row["class_acc"] <= 1.0

  # A kill right after the step-2 checkpoint, whose EMA is then shifted by delta: the rerun
  # resumes from it (not from the teacher): its final EMA is the uninterrupted one plus
  # decay**2 * delta, and every other leaf (student, auxiliary, both optimizer states, data
  # position) ends exactly as in the uninterrupted run.
  _stop_after(workdir, 2)
  config = _student_config(data_dir, teacher_dir, **{"eval.num_samples": 0})
  delta = 0.25
  _rewrite_checkpoint(workdir, 2, config, lambda s: s.replace(
      ema_params=jax.tree_util.tree_map(lambda x: x + delta, s.ema_params)))
  caplog.set_level(logging.INFO)
  again_out = distill_loop.distill_and_evaluate(config, workdir)
  assert f"Resumed from {workdir}/checkpoints/2 (student)" in caplog.text
  assert [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))] == [2, 4]
  again = _state_tree(workdir, 4)
  assert sorted(again) == sorted(saved)
  decay = float(config.distill.ema_decay)
  for part in saved:
    for a, b in zip(_leaves(saved[part]), _leaves(again[part])):
      if part == "ema_params":
        np.testing.assert_allclose(b - a, decay ** 2 * delta, rtol=0, atol=1e-5)
      else:
        np.testing.assert_array_equal(a, b, err_msg=part)
  assert int(again_out["state"].step) == 4


def test_parameter_space_student_resumes_every_leaf_including_nu_ema(trained, data_dir,
                                                                    tmp_path, caplog):
  """Resuming restores nu_ema (and recomputes the same squared-gradient preconditioner):
  every leaf ends as in the uninterrupted run; a changed nu_ema changes the result."""
  teacher_dir, _ = trained
  config = _student_config(data_dir, teacher_dir, **{
      "distill.variant": "parameter_space", "distill.num_student_steps": 2,
      "distill.precond_batches": 2, "eval.num_samples": 0})
  assert float(config.distill.nu_ema) > 0 and config.distill.preconditioner == "squared_grads"
  workdir = str(tmp_path / "ps")
  distill_loop.distill_and_evaluate(config, workdir)
  ref = _state_tree(workdir, 4)
  assert jax.tree_util.tree_leaves(ref["nu_ema"])
  assert not jax.tree_util.tree_leaves(ref["aux_params"])

  caplog.set_level(logging.INFO)
  _stop_after(workdir, 2)
  distill_loop.distill_and_evaluate(config, workdir)
  assert f"Resumed from {workdir}/checkpoints/2 (student)" in caplog.text
  assert [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))] == [2, 4]
  resumed = _state_tree(workdir, 4)
  for part in ref:
    for a, b in zip(_leaves(ref[part]), _leaves(resumed[part])):
      np.testing.assert_array_equal(a, b, err_msg=part)

  _stop_after(workdir, 2)
  _rewrite_checkpoint(workdir, 2, config, lambda s: s.replace(
      nu_ema=jax.tree_util.tree_map(lambda x: 3.0 * x, s.nu_ema)))
  distill_loop.distill_and_evaluate(config, workdir)
  changed = _state_tree(workdir, 4)
  assert any(not np.array_equal(a, b) for a, b in zip(_leaves(ref["params"]),
                                                       _leaves(changed["params"])))


def test_parameter_space_student_runs_with_squared_gradient_preconditioner(trained, data_dir,
                                                                           tmp_path):
  teacher_dir, _ = trained
  config = _student_config(data_dir, teacher_dir, **{
      "distill.variant": "parameter_space", "distill.num_student_steps": 1,
      "distill.precond_batches": 2, "distill.num_steps": 2, "eval.final": ""})
  out = distill_loop.distill_and_evaluate(config, str(tmp_path / "ps"))
  saved = _state_tree(str(tmp_path / "ps"), 2)
  assert saved["aux_params"] == {} or not jax.tree_util.tree_leaves(saved["aux_params"])
  assert out["final_eval"][0]["sampler"] == "student"


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


def test_pipeline_reuses_the_teacher_and_writes_the_comparison(trained, data_dir, tmp_path,
                                                              monkeypatch):
  from mmd_jax.evaluation import periodic
  teacher_dir, teacher_out = trained
  workdir = tmp_path / "pipe"
  shutil.copytree(teacher_dir, workdir / "teacher")
  config = helpers.tiny_digits_config(data_dir, **{
      "pipeline.students": "alternating:2,alternating:1:from=alternating:2"})
  evals = open(workdir / "teacher" / "eval_results.jsonl").read()
  evaluate, evaluated = periodic.evaluate, []

  def spy(**kwargs):  # the students are evaluated; the finished teacher must not be
    evaluated.append(os.path.basename(kwargs["workdir"]))
    return evaluate(**kwargs)

  monkeypatch.setattr(periodic, "evaluate", spy)
  rows = pipeline.run_pipeline(config, str(workdir))
  assert "teacher" not in evaluated and len(evaluated) == 2, evaluated
  methods = [r["method"] for r in rows]
  assert methods == ["teacher ancestral", "student alternating",
                     "student alternating (from alternating k=2)"]
  # Reused, not rerun: the teacher's evaluation log gained no row.
  assert open(workdir / "teacher" / "eval_results.jsonl").read() == evals
  assert rows[0]["fd_pixels"] == teacher_out["final_eval"][0]["fd_pixels"]
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
  run = runs.build(cfg, kind="student", mesh=mesh_lib.make_mesh(cfg.mesh))
  params, _ = run._load_init_from()  # pylint: disable=protected-access
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(params)),
                  jax.tree_util.tree_leaves(source_ema)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(Exception, match="must be an earlier entry"):
    pipeline.parse_students("alternating:1:from=alternating:2,alternating:2")


def test_preempted_teacher_stage_stops_the_pipeline_and_the_rerun_continues(data_dir, tmp_path,
                                                                          monkeypatch, caplog):
  """SIGTERM during the teacher stage (simulated: the loop's agreed stop at step 3): the pipeline
  stops with PreemptedError (exit 75 on the command line), distils nothing and writes no
  comparison; the rerun resumes the teacher from step 3, then distils from the finished one."""
  workdir = tmp_path / "pipe"
  config = helpers.tiny_digits_config(data_dir, **{
      "pipeline.students": "alternating:2", "distill.num_steps": 2})
  monkeypatch.setattr(distill_loop._Preemption, "stop_at",  # pylint: disable=protected-access
                      lambda self, step: step == 3)
  with pytest.raises(distill_loop.PreemptedError, match="teacher stage was preempted at step 3"):
    pipeline.run_pipeline(config, str(workdir))
  assert sorted(os.listdir(workdir / "teacher" / "checkpoints")) == ["3"]
  assert not (workdir / "students").exists() and not (workdir / "comparison.md").exists()
  monkeypatch.undo()

  caplog.set_level(logging.INFO)
  rows = pipeline.run_pipeline(config, str(workdir))
  assert f"Resumed from {workdir}/teacher/checkpoints/3 (teacher)" in caplog.text
  assert [r["method"] for r in rows] == ["teacher ancestral", "student alternating"]
  assert rows[0]["step"] == 6 and (workdir / "comparison.md").exists()
  record = json.load(open(workdir / "students" / "alternating_k2" / "checkpoints" / "2" /
                          "config" / "metadata"))["teacher_record"]
  assert record["step"] == 6
