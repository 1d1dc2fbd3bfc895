"""Checkpoints written before the run-object refactor (commit 4e832ee: training/loop.py and
distill/loop.py) restore with today's code: the teacher, both variants' students, and the teacher
fingerprint stored in the students (tests/data/checkpoints_4e832ee.tar.gz, made with that
commit's code from the tiny config below: teacher 2 steps, students 2 steps)."""
import os
import tarfile

import jax
import numpy as np
import pytest

from mmd_jax import loop
from mmd_jax.evaluation import run as eval_run
from tests import helpers

ARCHIVE = os.path.join(os.path.dirname(__file__), "data", "checkpoints_4e832ee.tar.gz")
TINY = {"model.base_channels": 4, "model.channel_mult": (1,), "model.head_dim": 4,
        "model.attn_resolutions": (), "training.checkpoint_every": 2, "training.max_to_keep": 1,
        "eval.num_samples": 0}
OLD_FINGERPRINT = "b5ca0fc6bc966182"  # what the old code stored as the students' teacher record


@pytest.fixture(scope="module")
def old_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("old")
  with tarfile.open(ARCHIVE) as tar:
    tar.extractall(root, filter="data")
  return root


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def test_old_teacher_restores_and_keeps_its_fingerprint(old_runs, data_dir):
  config = helpers.tiny_digits_config(data_dir, **{**TINY, "training.num_steps": 2})
  out = loop.train_and_evaluate(config, str(old_runs / "teacher"))
  assert int(out["state"].step) == 2 and out["program_hashes"] == []  # nothing left to train
  for a, b in zip(_leaves(out["state"].params), helpers.final_params(old_runs / "teacher", 2)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("variant", ["alternating", "parameter_space"])
def test_old_student_resumes_against_its_teacher(old_runs, data_dir, variant):
  workdir = str(old_runs / variant)
  config = helpers.tiny_digits_config(data_dir, **{
      **TINY, "distill.teacher": str(old_runs / "teacher"), "distill.variant": variant,
      "distill.num_steps": 3 if variant == "alternating" else 2})
  out = loop.distill_and_evaluate(config, workdir)
  # The fingerprint the old code stored matches today's (else the resume would be refused).
  assert out["teacher"].fingerprint == OLD_FINGERPRINT
  assert int(out["state"].step) == config.distill.num_steps
  if variant == "alternating":  # one more step, from the old state
    assert len(out["program_hashes"]) == 1 and os.path.isdir(os.path.join(workdir,
                                                                           "checkpoints", "3"))
  run = eval_run.load_run(config, workdir, overrides={"eval.num_samples": 8,
                                                      "eval.batch_size": 8})
  k = int(config.distill.num_student_steps)
  assert run.kind == "student" and run.specs == [{"sampler": "student", "num_steps": k,
                                                  "guidance": 0.0}]
