"""End-to-end teacher training on the bundled digits: outputs, resume, preemption, bad input."""
import json
import os
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
from mmd_jax.training import loop
from tests import helpers


def test_run_writes_checkpoints_logs_samples_and_evaluation(trained):
  workdir, out = trained
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [2, 4, 6]
  assert all(np.isfinite(l["loss"]) and l["steps_per_sec"] > 0 for l in lines)
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


def test_rerun_of_finished_run_resumes_without_training(trained, data_dir):
  workdir, out = trained
  again = loop.train_and_evaluate(helpers.tiny_digits_config(data_dir), str(workdir))
  assert int(again["state"].step) == 6
  assert again["final_eval"] == json.load(open(workdir / "final_eval.json"))
  np.testing.assert_array_equal(
      jax.tree_util.tree_leaves(again["state"].params)[0],
      jax.tree_util.tree_leaves(out["state"].params)[0])


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
def test_bad_input_fails_fast_with_a_named_error(data_dir, tmp_path, key, value, error, match):
  config = helpers.tiny_digits_config(data_dir, **{key: value})
  t0 = time.time()
  with pytest.raises(error, match=match):
    loop.train_and_evaluate(config, str(tmp_path / "w"))
  assert time.time() - t0 < 5.0  # before any compile


def test_unknown_config_key_on_the_command_line(tmp_path, data_dir):
  proc = helpers.cli(tmp_path / "w", data_dir, "--config.training.bogus=3")
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0
  assert "bogus" in out


def test_non_finite_loss_stops_with_the_step_and_keeps_last_good_checkpoint(data_dir, tmp_path):
  workdir = str(tmp_path / "nan")
  loop.train_and_evaluate(helpers.tiny_digits_config(
      data_dir, **{"training.num_steps": 2, "training.checkpoint_every": 2,
                   "eval.final": ""}), workdir)
  blowup = helpers.tiny_digits_config(
      data_dir, **{"training.num_steps": 12, "training.checkpoint_every": 1,
                   "training.log_every": 1, "optim.learning_rate": 1e30,
                   "eval.final": ""})
  with pytest.raises(loop.NonFiniteLossError, match=r"step \d+") as info:
    loop.train_and_evaluate(blowup, workdir)
  bad = int(str(info.value).split("step ")[1].split(".")[0])
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps and max(steps) < bad
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


LONG = ("--config.training.num_steps=40", "--config.training.checkpoint_every=4",
        "--config.training.log_every=4", "--config.eval.final=")


def test_sigkill_then_rerun_equals_uninterrupted_run_bit_for_bit(data_dir, tmp_path):
  ref = tmp_path / "ref"
  proc = helpers.cli(ref, data_dir, *LONG)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out

  killed = tmp_path / "killed"
  proc = helpers.cli(killed, data_dir, *LONG)
  seen = _wait_for_checkpoint(str(killed), proc)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert min(seen) < 40
  proc = helpers.cli(killed, data_dir, *LONG)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert "Resumed from" in out
  for a, b in zip(helpers.final_params(str(ref), 40), helpers.final_params(str(killed), 40)):
    np.testing.assert_array_equal(a, b)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path):
  workdir = tmp_path / "term"
  proc = helpers.cli(workdir, data_dir, *LONG)
  seen = _wait_for_checkpoint(str(workdir), proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "Preempted at step" in out
  stopped = int(out.split("Preempted at step ")[1].split(";")[0])
  assert stopped < 40
  assert str(stopped) in os.listdir(workdir / "checkpoints")
