"""Sharded, resumable evaluation (mmd_jax.evaluation.sharded_eval) on the tiny digits teacher:
8 devices give the statistics of 1 device, and an interrupted evaluation resumes to the
statistics of an uninterrupted one."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from mmd_jax import config_lib
from mmd_jax.evaluation import run as eval_run
from mmd_jax.evaluation import sharded_eval
from mmd_jax.parallel import mesh as mesh_lib
from tests import helpers

# 28 samples in global batches of 8: 4 batches, the last one half padding.
EVAL = {"eval.num_samples": 28, "eval.batch_size": 8, "eval.save_every": 2,
        "eval.specs": "ancestral:2", "eval.reference_examples": 200}


class Stop(Exception):
  pass


def _evaluate(run, extractor, eval_dir, **kw):
  spec = dict(run.specs[0], num_samples=28, batch_size=8, seed=0, num_classes=run.eval_classes,
              checkpoint_step=run.step, fingerprint=run.fingerprint)
  kw = dict(dict(pixel_stats=True, keep_features=True, keep_logits=True, save_every=2), **kw)
  return sharded_eval.evaluate_samples(
      spec=spec, sampler=run.sharded_sampler(run.specs[0]), params=run.params, mesh=run.mesh,
      extractor=extractor, eval_dir=str(eval_dir), **kw)


def _assert_same(a, b, rtol):
  assert a.stats.count == b.stats.count == 28
  np.testing.assert_allclose(a.stats.sum, b.stats.sum, rtol=rtol, atol=rtol)
  np.testing.assert_allclose(a.stats.sum_outer, b.stats.sum_outer, rtol=rtol, atol=rtol)
  np.testing.assert_allclose(a.pixel_stats.sum, b.pixel_stats.sum, rtol=rtol, atol=rtol)
  np.testing.assert_allclose(a.pixel_stats.sum_outer, b.pixel_stats.sum_outer, rtol=rtol,
                             atol=rtol)
  np.testing.assert_allclose(a.features, b.features, rtol=rtol, atol=rtol)
  np.testing.assert_allclose(a.logits, b.logits, rtol=rtol, atol=rtol)


def test_eight_devices_match_one_and_interrupted_evaluation_resumes(trained, data_dir,
                                                                   tmp_path):
  workdir, _ = trained
  config = helpers.tiny_digits_config(data_dir, **EVAL)
  run8 = eval_run.load_run(config, str(workdir))
  assert run8.mesh.devices.size == 8 and run8.kind == "teacher"
  extractor = eval_run.make_extractor(run8.config)
  assert extractor.is_standin and extractor.dim == 256

  full = _evaluate(run8, extractor, tmp_path / "full")
  assert full.complete and full.num_batches == 4 and full.resumed_from == 0
  assert full.features.shape == (28, 256) and full.logits.shape[0] == 28
  # Padding is excluded by weights: the sums equal those of the 28 kept feature rows.
  f = full.features.astype(np.float64)
  np.testing.assert_allclose(full.stats.sum, f.sum(0), rtol=1e-5)
  np.testing.assert_allclose(full.stats.sum_outer, f.T @ f, rtol=1e-5, atol=1e-3)

  # One device, same seeds: the same statistics within float32 tolerance.
  one = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
                           devices=jax.devices()[:1])
  run1 = eval_run.load_run(config, str(workdir), mesh=one)
  single = _evaluate(run1, extractor, tmp_path / "single")
  _assert_same(full, single, rtol=2e-4)

  # Interrupted twice: a clean stop after 1 batch (saved), then a crash after batch 2 whose
  # last save is at 2 batches; the rerun resumes there and ends with the same statistics.
  part = tmp_path / "part"
  first = _evaluate(run8, extractor, part, max_batches=1)
  assert not first.complete and first.batches_done == 1

  def crash(b):
    if b == 2:
      raise Stop()

  with pytest.raises(Stop):
    _evaluate(run8, extractor, part, on_batch=crash)
  seen = []
  resumed = _evaluate(run8, extractor, part, on_batch=seen.append)
  assert resumed.resumed_from == 2 and seen == [2, 3] and resumed.complete
  _assert_same(full, resumed, rtol=1e-12)
  assert sorted(p for p in os.listdir(part) if p.startswith("state")) == [
      "state_p00000_b00000002.npz", "state_p00000_b00000004.npz"]

  # A finished evaluation is reused without sampling; another spec gets its own directory.
  again = _evaluate(run8, extractor, part, on_batch=seen.append)
  assert seen == [2, 3] and again.resumed_from == 4
  _assert_same(full, again, rtol=1e-12)
  with pytest.raises(ValueError, match="holds another evaluation"):
    _evaluate(run8, extractor, part, keep_features=False)
  spec = dict(run8.specs[0], num_samples=28, batch_size=8, seed=0)
  assert sharded_eval.run_name(spec) != sharded_eval.run_name(dict(spec, num_samples=27))
  assert sharded_eval.run_name(spec) != sharded_eval.run_name(dict(spec, seed=1))


def test_spec_resolution_for_teachers_and_students(data_dir):
  from mmd_jax import runs  # pylint: disable=g-import-not-at-top
  cfg = helpers.tiny_digits_config(data_dir)
  cfg.distill.update(variant="alternating", num_student_steps=4)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  student, teacher = (runs.build(cfg, kind=k, mesh=mesh) for k in ("student", "teacher"))
  assert eval_run.resolve_specs(cfg, run=student, workdir="w") == [
      {"sampler": "student", "num_steps": 4, "guidance": 0.0}]
  assert eval_run.resolve_specs(cfg, run=student, workdir="w",
                                text="student:2")[0]["num_steps"] == 2
  # Samplers are one registry: a student may also be sampled with the teacher's samplers.
  assert eval_run.resolve_specs(cfg, run=student, workdir="w", text="ddim:8") == [
      {"sampler": "ddim", "num_steps": 8, "guidance": 0.0}]
  with pytest.raises(eval_run.EvalError, match="sampler 'euler'"):
    eval_run.resolve_specs(cfg, run=student, workdir="w", text="euler:8")
  assert eval_run.resolve_specs(cfg, run=teacher, workdir="w") == [
      {"sampler": "ancestral", "num_steps": 2, "guidance": 0.0}]   # eval.final
  with pytest.raises(eval_run.EvalError, match="cannot sample this teacher run"):
    eval_run.resolve_specs(cfg, run=teacher, workdir="w", text="student:2")
  with pytest.raises(config_lib.ConfigError, match="SAMPLER:STEPS"):
    eval_run.resolve_specs(cfg, run=teacher, workdir="w", text="ddim")
  unconditional_cfg = ml_collections.ConfigDict(cfg.to_dict())
  unconditional_cfg.model.class_conditional = False
  unconditional = runs.build(unconditional_cfg, kind="teacher", mesh=mesh)
  with pytest.raises(eval_run.EvalError, match="class- or text-conditional"):
    eval_run.resolve_specs(cfg, run=unconditional, workdir="w", text="ddim:2:1.5")


def test_reference_files_are_checked_against_the_protocol(tmp_path, data_dir):
  from mmd_jax.evaluation import fid
  cfg = eval_run.effective_config(None, helpers.tiny_digits_config(data_dir).to_dict(),
                                  {"eval.reference_examples": 16, "eval.batch_size": 8})
  standin = fid.FeatureExtractor(None, fid.standin_protocol(seed=0, feature_dim=4), 4)
  inception = fid.FeatureExtractor(None, fid.PROTOCOL, 4)
  mine, other = str(tmp_path / "mine.npz"), str(tmp_path / "other.npz")
  fid.save_reference_stats(mine, mu=np.ones(4), sigma=np.eye(4), protocol=standin.protocol,
                           count=10)
  fid.save_reference_stats(other, mu=np.ones(3), sigma=np.eye(3), protocol=fid.PROTOCOL,
                           count=10)

  def load(path, extractor):
    c = config_lib.apply_overrides(cfg, {"eval.fid_reference": path})
    return eval_run.load_reference(c, str(tmp_path), extractor, None, need_features=False)

  ref = load(mine, standin)
  assert ref.source == mine and np.array_equal(ref.mu, np.ones(4))
  with pytest.raises(eval_run.EvalError, match="protocol"):
    load(mine, inception)      # stand-in statistics never pass for FID
  with pytest.raises(eval_run.EvalError, match="3-d statistics"):
    load(other, inception)
  np.savez(other, mu=np.ones(4), sigma=np.eye(4))  # a pytorch-fid file: no protocol recorded
  assert load(other, inception).source == other


# ----------------------------------------------------------------------------------------------
# Two processes (jax.distributed on 127.0.0.1, 4 fake CPU devices each)
# ----------------------------------------------------------------------------------------------

_DRIVER = """
import json, sys
from mmd_jax.parallel import distributed
distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                       process_id=int(sys.argv[2]), timeout_s=120)
from mmd_jax.evaluation import run as eval_run
from tests import helpers
config = helpers.tiny_digits_config(sys.argv[3], **json.loads(sys.argv[4]))
for workdir, max_batches in json.loads(sys.argv[5]):
  eval_run.evaluate_checkpoint(config, workdir, max_batches=max_batches)
print("driver done", flush=True)
"""
_METRICS = ("standin_fd", "standin_inception_score", "standin_precision", "standin_recall",
            "fd_pixels", "class_acc")


def _eval_rows(workdir):
  path = os.path.join(workdir, "eval_results.jsonl")
  if not os.path.exists(path):
    return []
  return [json.loads(l) for l in open(path) if json.loads(l)["tag"] == "eval"]


def test_two_processes_give_the_statistics_of_one_and_an_interrupted_evaluation_resumes_on_one(
    trained, data_dir, tmp_path):
  """--mode=eval's evaluation as two processes of 4 devices: the same numbers as one process of
  8 devices (the samples do not depend on the process count); an evaluation stopped after 2 of 4
  batches on two processes finishes on one, from batch 2."""
  import shutil
  import socket
  import subprocess
  import sys
  dirs = {name: str(tmp_path / name) for name in ("two", "stopped", "one")}
  for d in dirs.values():
    shutil.copytree(trained[0], d)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    coordinator = f"127.0.0.1:{s.getsockname()[1]}"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4 "
                       "--xla_backend_optimization_level=0")
  plan = json.dumps([[dirs["two"], None], [dirs["stopped"], 2]])
  logs = [str(tmp_path / f"p{i}.log") for i in range(2)]
  procs = []
  for i in range(2):
    with open(logs[i], "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, "-c", _DRIVER, coordinator, str(i), str(data_dir), json.dumps(EVAL),
           plan], cwd=helpers.REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  try:
    # Meanwhile (2 cores), the one-process 8-device reference, in this process.
    config = helpers.tiny_digits_config(data_dir, **EVAL)
    (one,) = eval_run.evaluate_checkpoint(config, dirs["one"], print_table=False)
    for p in procs:
      p.wait(timeout=600)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=60)
  text = [open(l).read() for l in logs]
  for p, t in zip(procs, text):
    assert p.returncode == 0 and "driver done" in t, t[-3000:]

  (two,) = _eval_rows(dirs["two"])
  assert two["num_samples"] == one["num_samples"] == 28
  for key in _METRICS:
    np.testing.assert_allclose(two[key], one[key], rtol=1e-4, err_msg=key)

  # Stopped after 2 batches on two processes: no row yet, one merged state on disk.
  assert _eval_rows(dirs["stopped"]) == []
  (eval_dir,) = [os.path.join(dirs["stopped"], "eval", d)
                 for d in os.listdir(os.path.join(dirs["stopped"], "eval"))
                 if not d.endswith(".npz")]
  assert sorted(p for p in os.listdir(eval_dir) if p.startswith("state")) == [
      "state_p00000_b00000002.npz"]
  seen = []
  (resumed,) = eval_run.evaluate_checkpoint(config, dirs["stopped"], on_batch=seen.append,
                                            print_table=False)
  assert resumed["resumed_from_batch"] == 2 and seen == [2, 3]
  for key in _METRICS:
    np.testing.assert_allclose(resumed[key], one[key], rtol=1e-4, err_msg=key)
