"""`python -m mmd_jax.main --mode=eval` on the tiny digits teacher: rows in eval_results.jsonl,
and one-line user errors (exit 2, no traceback)."""
import json
import shutil

import pytest

from mmd_jax.evaluation import run as eval_run
from tests import helpers

FLAGS = ("--mode=eval", "--config.eval.num_samples=28", "--config.eval.batch_size=8",
         "--config.eval.save_every=2", "--config.eval.specs=ancestral:2",
         "--config.eval.reference_examples=200")


def test_eval_mode_writes_results_with_the_protocol(trained, data_dir, tmp_path):
  workdir = tmp_path / "teacher"
  shutil.copytree(trained[0], workdir)  # the shared fixture stays as it was
  proc = helpers.cli(workdir, data_dir, *FLAGS, devices=8)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert "STAND-IN" in out and "NOT FID" in out
  rows = [json.loads(l) for l in open(workdir / "eval_results.jsonl")]
  row = [r for r in rows if r.get("tag") == "eval"][-1]
  assert (row["step"], row["sampler"], row["num_steps"], row["guidance"]) == (6, "ancestral", 2,
                                                                            0.0)
  assert row["run"] == "teacher" and row["num_samples"] == 28
  assert row["protocol"].startswith("STAND-IN, not FID")
  assert row["protocol_version"].startswith("mmd_jax-standin-v1")
  assert "fid" not in row and row["standin_fd"] > 0
  assert row["standin_inception_score"] >= 1.0
  assert 0.0 <= row["standin_precision"] <= 1.0 and 0.0 <= row["standin_recall"] <= 1.0
  assert row["fd_pixels"] > 0 and 0.0 <= row["class_acc"] <= 1.0


def test_eval_mode_user_errors(trained, data_dir, tmp_path):
  proc = helpers.cli(tmp_path / "nothing", data_dir, *FLAGS)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 2, out
  assert "No checkpoint in" in out and "Traceback" not in out
  config = helpers.tiny_digits_config(data_dir)
  missing = str(tmp_path / "inception.npz")
  with pytest.raises(eval_run.EvalError, match="inception_npz.*does not exist"):
    eval_run.load_run(config, str(trained[0]), overrides={"eval.inception_npz": missing})
  with pytest.raises(eval_run.EvalError, match="fid_reference.*does not exist"):
    eval_run.load_run(config, str(trained[0]), overrides={"eval.fid_reference": missing})
  with pytest.raises(eval_run.EvalError, match="is a teacher"):
    eval_run.load_run(config, str(trained[0]), overrides={"eval.specs": "student:2"})
