"""End-to-end teacher training on the bundled digits: outputs, resume, preemption, bad input."""
import json
import logging
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from mmd_jax import config_lib
from mmd_jax.data.errors import DatasetNotPreparedError
from mmd_jax.parallel.mesh import MeshError
from mmd_jax.training import checkpoint as ckpt_lib
from mmd_jax import loop
from tests import helpers


def test_run_writes_checkpoints_logs_samples_and_evaluation(trained):
  workdir, out = trained
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [2, 4, 6]
  assert all(np.isfinite(l["loss"]) and l["steps_per_sec"] > 0 for l in lines)
  # throughput as pod users read it: examples/s = batch x steps/s, FLOP/s per device, MFU
  assert all(l["examples_per_sec"] == pytest.approx(16 * l["steps_per_sec"]) for l in lines)
  assert all(l["flops_per_sec_per_device"] > 0 and l["mfu"] > 0 for l in lines)
  assert os.listdir(workdir / "tensorboard")
  evals = [json.loads(l) for l in open(workdir / "eval_results.jsonl")]
  final = [e for e in evals if e["tag"] == "final"]
  assert final and {"step", "sampler", "num_steps", "guidance", "fd_pixels",
                    "class_acc"} <= set(final[0])
  assert final[0]["step"] == 6 and "not FID" in final[0]["metric_kind"]
  assert 0.0 <= final[0]["class_acc"] <= 1.0 and final[0]["fd_pixels"] > 0
  pngs = os.listdir(workdir / "samples")
  assert any(p.startswith("final_step6_ancestral2") for p in pngs)
  assert out["final_eval"][0]["fd_pixels"] == final[0]["fd_pixels"]


def test_rerun_of_finished_run_resumes_without_training(trained, data_dir, caplog, monkeypatch):
  from mmd_jax.evaluation import periodic
  workdir, out = trained
  caplog.set_level(logging.INFO)

  def no_evaluation(**kwargs):
    raise AssertionError(f"evaluated again ({kwargs['tag']}, step {kwargs['step']})")

  monkeypatch.setattr(periodic, "evaluate", no_evaluation)
  evals_before = open(workdir / "eval_results.jsonl").read()
  metrics_before = open(workdir / "metrics.jsonl").read()
  again = loop.train_and_evaluate(helpers.tiny_digits_config(data_dir), str(workdir))
  assert int(again["state"].step) == 6 and again["program_hashes"] == []  # nothing compiled
  assert f"Resumed from {workdir}/checkpoints/6" in caplog.text
  assert "Reusing the final evaluation" in caplog.text
  # Reused, not rerun: no evaluation row and no metrics were appended.
  assert open(workdir / "eval_results.jsonl").read() == evals_before
  assert open(workdir / "metrics.jsonl").read() == metrics_before
  assert again["final_eval"] == json.load(open(workdir / "final_eval.json"))
  for a, b in zip(_leaves(again["state"]), _leaves(out["state"])):
    np.testing.assert_array_equal(a, b)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def _rewrite_checkpoint(workdir, step, config, *, kind, change):
  """Replaces checkpoint `step` of `workdir` by change(state), with fresh checksums."""
  from mmd_jax import runs
  from mmd_jax.parallel import mesh as mesh_lib
  run = runs.build(config, kind=kind, mesh=mesh_lib.make_mesh(config.mesh))
  ckpt = ckpt_lib.Checkpointer(str(workdir), async_save=False)
  if kind == "student":
    run.load_teacher()
  state, data = run.restore(ckpt, step)
  saved_config = ckpt.saved_config(step)
  shutil.rmtree(os.path.join(str(workdir), "checkpoints", str(step)))
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(str(workdir), async_save=False)
  assert ckpt.save(step, state=change(state), data_state=data, config_dict=saved_config)
  ckpt.close()


def test_resume_continues_from_the_saved_state_not_a_restart(trained, data_dir, tmp_path,
                                                             caplog):
  """A run stopped after checkpoint 3 resumes from it: the EMA saved there is shifted by delta,
  and the resumed run's final EMA is the uninterrupted one plus decay**3 * delta (the EMA is
  linear in its past and nothing else depends on it); every other leaf equals the
  uninterrupted run's, and metrics.jsonl gains only the steps after 3."""
  workdir = tmp_path / "stopped"
  shutil.copytree(trained[0], workdir)
  shutil.rmtree(workdir / "checkpoints" / "6")
  for name in ("final_eval.json", "final_eval.key.json"):
    os.remove(workdir / name)
  lines = open(workdir / "metrics.jsonl").readlines()
  open(workdir / "metrics.jsonl", "w").writelines(l for l in lines if json.loads(l)["step"] <= 3)
  config = helpers.tiny_digits_config(data_dir, **{"eval.num_samples": 0})
  delta = 0.25
  _rewrite_checkpoint(workdir, 3, config, kind="teacher", change=lambda s: s.replace(
      ema_params=jax.tree_util.tree_map(lambda x: x + delta, s.ema_params)))

  caplog.set_level(logging.INFO)
  out = loop.train_and_evaluate(config, str(workdir))
  assert f"Resumed from {workdir}/checkpoints/3 (teacher)" in caplog.text
  assert [json.loads(l)["step"] for l in open(workdir / "metrics.jsonl")] == [2, 4, 6]
  ref = trained[1]["state"]
  decay = float(config.optim.ema_decay)
  for part in ("params", "opt_state"):
    for a, b in zip(_leaves(getattr(out["state"], part)), _leaves(getattr(ref, part))):
      np.testing.assert_array_equal(a, b, err_msg=part)
  for a, b in zip(_leaves(out["state"].ema_params), _leaves(ref.ema_params)):
    np.testing.assert_allclose(a - b, decay ** 3 * delta, rtol=0, atol=1e-5)
  assert int(out["state"].step) == 6 and int(out["state"].nonfinite_step) == -1


def test_final_evaluation_is_reused_only_when_nothing_that_changes_it_changed(
    trained, data_dir, tmp_path, caplog):
  workdir = tmp_path / "copy"
  shutil.copytree(trained[0], workdir)
  caplog.set_level(logging.INFO)

  def final_rows():
    return [json.loads(l) for l in open(workdir / "eval_results.jsonl")
            if json.loads(l)["tag"] == "final"]

  def rerun(**overrides):
    caplog.clear()
    n = len(final_rows())
    out = loop.train_and_evaluate(helpers.tiny_digits_config(data_dir, **overrides),
                                  str(workdir))
    return out["final_eval"], len(final_rows()) - n

  rows, new = rerun()
  assert new == 0 and "Reusing the final evaluation" in caplog.text
  rows, new = rerun(**{"eval.num_samples": 24, "eval.batch_size": 24})
  assert new == 1 and rows[0]["num_samples"] == 24 and "num_samples 40 -> 24" in caplog.text
  assert json.load(open(workdir / "final_eval.json")) == rows
  rows, new = rerun(**{"eval.num_samples": 24, "eval.batch_size": 24, "eval.use_ema": False})
  assert new == 1 and "use_ema True -> False" in caplog.text
  rows, new = rerun(**{"eval.num_samples": 24, "eval.batch_size": 24, "eval.use_ema": False})
  assert new == 0  # the same settings again: reused
  # A truncated final_eval.json is recomputed with a warning, never a traceback.
  text = open(workdir / "final_eval.json").read()
  open(workdir / "final_eval.json", "w").write(text[:len(text) // 2])
  rows, new = rerun(**{"eval.num_samples": 24, "eval.batch_size": 24, "eval.use_ema": False})
  assert new == 1 and "final evaluation" in caplog.text and "damaged" in caplog.text
  # Restored at step 6 with num_steps=3: step 6 is evaluated and labelled 6, never 3.
  rows, new = rerun(**{"training.num_steps": 3})
  assert new == 1 and [r["step"] for r in rows] == [6]
  assert [r["step"] for r in json.load(open(workdir / "final_eval.json"))] == [6]
  assert "beyond the configured 3 steps" in caplog.text
  assert final_rows()[-1]["step"] == 6


def test_incompatible_config_is_refused_and_checkpoint_kept(trained, data_dir):
  workdir, _ = trained
  before = sorted(os.listdir(workdir / "checkpoints"))
  config = helpers.tiny_digits_config(data_dir, **{"model.base_channels": 32})
  with pytest.raises(ckpt_lib.CheckpointError, match="model.base_channels"):
    loop.train_and_evaluate(config, str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == before


def test_corrupt_checkpoint_is_an_error_not_a_restart(trained, data_dir, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(trained[0], workdir)
  state_dir = workdir / "checkpoints" / "6" / "state"
  for root, _, files in os.walk(state_dir):
    for f in files:
      if not f.startswith("_"):
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  with pytest.raises(ckpt_lib.CheckpointError, match="cannot be restored"):
    loop.train_and_evaluate(helpers.tiny_digits_config(data_dir), str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]


@pytest.mark.parametrize("key,value,error,match", [
    ("training.num_steps", 0, config_lib.ConfigError, "training.num_steps"),
    ("training.num_steps", -5, config_lib.ConfigError, "positive integer"),
    ("training.batch_size", 12, MeshError, "does not divide"),
    ("data.name", "cifar10", DatasetNotPreparedError, "array_record"),
    ("eval.final", "ancestral:x", config_lib.ConfigError, "SAMPLER:STEPS"),
])
def test_bad_input_fails_fast_with_a_named_error(data_dir, tmp_path, monkeypatch, key, value,
                                                 error, match):
  from mmd_jax.runs import common
  config = helpers.tiny_digits_config(data_dir, **{key: value})

  def no_compile(*args):
    raise AssertionError(f"a step program was lowered before the {error.__name__}")

  monkeypatch.setattr(common.StepProgram, "lower", no_compile)  # before any compile
  with pytest.raises(error, match=match):
    loop.train_and_evaluate(config, str(tmp_path / "w"))


def test_unknown_config_key_on_the_command_line(tmp_path, data_dir):
  proc = helpers.cli(tmp_path / "w", data_dir, "--config.training.bogus=3")
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 2, out
  assert "Traceback" not in out
  (line,) = [l for l in out.splitlines() if l.startswith("mmd_jax error")]
  assert "training.bogus" in line and "checkpoint_every" in line, line
  assert not (tmp_path / "w").exists()  # refused before anything was written


def test_non_finite_loss_stops_with_the_step_and_keeps_last_good_checkpoint(trained, data_dir,
                                                                             tmp_path):
  workdir = str(tmp_path / "nan")
  shutil.copytree(trained[0], workdir)  # finite checkpoints 3 and 6 to resume from
  blowup = helpers.tiny_digits_config(
      data_dir, **{"training.num_steps": 12, "training.checkpoint_every": 1,
                   "training.log_every": 1, "optim.learning_rate": 1e30,
                   "eval.final": ""})
  with pytest.raises(loop.NonFiniteLossError, match=r"step \d+") as info:
    loop.train_and_evaluate(blowup, workdir)
  message = str(info.value)
  bad = int(re.search(r"(?:at|by) step (\d+)", message).group(1))
  good = int(re.search(r"last good checkpoint \((\d+), verified finite\)", message).group(1))
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps and max(steps) == good and good < bad, (steps, message)
  for p in helpers.final_params(workdir, max(steps)):
    assert np.all(np.isfinite(p))


def _wait_for_checkpoint(workdir, proc, timeout=240):
  ckpts = os.path.join(workdir, "checkpoints")
  t0 = time.time()
  while time.time() - t0 < timeout:
    done = [s for s in (os.listdir(ckpts) if os.path.isdir(ckpts) else []) if s.isdigit()]
    if done:
      return sorted(int(s) for s in done)
    if proc.poll() is not None:
      raise AssertionError("run ended before its first checkpoint:\n" + proc.stdout.read())
    time.sleep(0.02)
  raise AssertionError("no checkpoint appeared")


# A constant learning rate: the first N steps of a run do not depend on its num_steps, so the run
# to be killed can be one that cannot finish before the kill, whenever the kill comes.
UNENDING = ("--config.optim.schedule=constant", "--config.training.checkpoint_every=4",
            "--config.training.log_every=4", "--config.eval.final=")


def test_sigkill_then_rerun_equals_uninterrupted_run_bit_for_bit(data_dir, tmp_path):
  killed = tmp_path / "killed"
  proc = helpers.cli(killed, data_dir, *UNENDING, "--config.training.num_steps=100000")
  _wait_for_checkpoint(str(killed), proc)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  saved = max(int(s) for s in os.listdir(killed / "checkpoints") if s.isdigit())
  logged = [json.loads(l)["step"] for l in open(killed / "metrics.jsonl")]
  assert logged and max(logged) >= saved
  # The rerun, and an uninterrupted run, both to 8 steps past the checkpoint (side by side).
  end = saved + 8
  flags = (*UNENDING, f"--config.training.num_steps={end}")
  ref = tmp_path / "ref"
  procs = helpers.cli(killed, data_dir, *flags), helpers.cli(ref, data_dir, *flags)
  (out, _), (ref_out, _) = (p.communicate(timeout=300) for p in procs)
  assert [p.returncode for p in procs] == [0, 0], (out, ref_out)
  assert f"Resumed from {killed}/checkpoints/{saved} (teacher)" in out
  assert "Resumed from" not in ref_out
  # The rerun logged only the steps after the checkpoint it resumed from.
  after = [json.loads(l)["step"] for l in open(killed / "metrics.jsonl")][len(logged):]
  assert after == [saved + 4, end], after
  for a, b in zip(helpers.final_params(str(ref), end), helpers.final_params(str(killed), end)):
    np.testing.assert_array_equal(a, b)


# Far more steps than run in the test: the run cannot finish before SIGTERM reaches it. The
# flags of the SIGKILL test: the same step program, loaded from the session's compilation cache.
TERM_FLAGS = (*UNENDING, "--config.training.num_steps=100000")


def test_sigterm_saves_a_checkpoint_and_exits_75(data_dir, tmp_path):
  from mmd_jax import errors
  workdir = tmp_path / "term"
  proc = helpers.cli(workdir, data_dir, *TERM_FLAGS)
  _wait_for_checkpoint(str(workdir), proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == errors.EXIT_PREEMPTED == 75, out
  stopped = int(re.search(r"Preempted at step (\d+)", out).group(1))
  assert f"preempted at step {stopped}" in out and "Traceback" not in out
  assert stopped < 100000 and str(stopped) in os.listdir(workdir / "checkpoints")
  assert not (workdir / "final_eval.json").exists()


def test_sigterm_during_the_pipelines_teacher_stage_exits_75_and_distils_nothing(data_dir,
                                                                                 tmp_path):
  workdir = tmp_path / "pipe"
  proc = helpers.cli(workdir, data_dir, *TERM_FLAGS, "--mode=pipeline",
                     "--config.pipeline.students=alternating:2")
  _wait_for_checkpoint(str(workdir / "teacher"), proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 75, out
  assert re.search(r"teacher stage was preempted at step \d+", out) and "Traceback" not in out
  assert not (workdir / "students").exists() and not (workdir / "comparison.md").exists()
