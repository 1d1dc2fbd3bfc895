"""Fault handling below the training loops: atomic writes, damaged evaluation state, checkpoint
integrity, missing steps, bad sampler specs, iterator-state mismatch, unknown config keys on the
command line and a distributed start-up that times out."""
import json
import logging
import os
import socket
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmd_jax import config_lib
from mmd_jax.evaluation import fid, sharded_eval
from mmd_jax.parallel import mesh as mesh_lib
from mmd_jax.training import checkpoint as ckpt_lib
from tests import helpers


def _mesh(n=8):
  return mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
                            devices=jax.devices()[:n])


def _no_traceback(out):
  assert "Traceback" not in out, out
  lines = [l for l in out.splitlines() if l.startswith("mmd_jax error")]
  assert len(lines) == 1, out
  return lines[0]


# ----------------------------------------------------------------------------------------------
# 1. Atomic writes and damaged files
# ----------------------------------------------------------------------------------------------

def test_io_utils_write_atomically_and_read_damaged_files_as_none(tmp_path, caplog):
  from mmd_jax import io_utils  # new module: imported here so the other tests run without it
  caplog.set_level(logging.WARNING)
  path = tmp_path / "a.json"
  io_utils.write_json_atomic(path, {"x": [1, 2], "y": "z"})
  assert io_utils.read_json_or_none(path, what="test file") == {"x": [1, 2], "y": "z"}
  io_utils.write_text_atomic(str(tmp_path / "t.txt"), "hello\n")
  assert (tmp_path / "t.txt").read_text() == "hello\n"
  io_utils.write_npz_atomic(tmp_path / "a.npz", {"a": np.arange(3)})
  np.testing.assert_array_equal(io_utils.read_npz_or_none(tmp_path / "a.npz", what="t")["a"],
                                np.arange(3))
  assert sorted(os.listdir(tmp_path)) == ["a.json", "a.npz", "t.txt"]  # no temporary files left

  path.write_text('{"x": [1, 2')  # truncated
  assert io_utils.read_json_or_none(path, what="test file") is None
  assert "test file" in caplog.text and str(path) in caplog.text
  caplog.clear()
  assert io_utils.read_json_or_none(tmp_path / "missing.json", what="other file") is None
  assert "missing.json" in caplog.text
  (tmp_path / "a.npz").write_bytes((tmp_path / "a.npz").read_bytes()[:40])
  assert io_utils.read_npz_or_none(tmp_path / "a.npz", what="npz") is None


def _fake_extractor():
  def fn(u8):
    x = u8.astype(jnp.float32).reshape(u8.shape[0], -1) / 255.0
    return x[:, :6], x[:, :3] * 2.0
  return fid.FeatureExtractor(jax.jit(fn), fid.standin_protocol(seed=0, feature_dim=6), 6)


def _fake_sampler(mesh):
  def sample_fn(params, rng, labels, *, sampler, num_steps, guidance):
    del sampler, num_steps, guidance
    x = jax.random.uniform(rng, (labels.shape[0], 4, 4, 1), minval=-1.0, maxval=1.0)
    return x * params + labels[:, None, None, None].astype(jnp.float32) * 0.01
  return sharded_eval.make_sharded_sampler(
      sample_fn, mesh=mesh, param_shardings=mesh_lib.replicated(mesh), sampler="fake",
      num_steps=1, guidance=0.0)


def test_damaged_sharded_eval_spec_or_state_is_recomputed_with_a_warning(tmp_path, caplog):
  mesh = _mesh()
  sampler, extractor = _fake_sampler(mesh), _fake_extractor()
  spec = dict(sampler="fake", num_steps=1, guidance=0.0, num_samples=20, batch_size=8, seed=0,
              num_classes=3)

  def evaluate(eval_dir, **kw):
    seen = []
    res = sharded_eval.evaluate_samples(
        spec=spec, sampler=sampler, params=jnp.float32(1.0), mesh=mesh, extractor=extractor,
        eval_dir=str(eval_dir), keep_features=True, save_every=1, on_batch=seen.append, **kw)
    return res, seen

  full, seen = evaluate(tmp_path / "full")
  assert full.complete and seen == [0, 1, 2]

  # A finished evaluation whose spec.json was truncated: recomputed from the start, same result.
  spec_file = tmp_path / "full" / "spec.json"
  spec_file.write_text(spec_file.read_text()[:25])
  caplog.clear()
  again, seen = evaluate(tmp_path / "full")
  assert seen == [0, 1, 2] and again.resumed_from == 0
  assert "spec.json" in caplog.text and "recomputing" in caplog.text
  np.testing.assert_array_equal(again.stats.sum, full.stats.sum)
  np.testing.assert_array_equal(again.features, full.features)
  assert json.loads(spec_file.read_text())["num_samples"] == 20

  # An interrupted evaluation whose latest state file is truncated: resumes from the save before.
  part = tmp_path / "part"
  first, seen = evaluate(part, max_batches=2)
  assert first.batches_done == 2 and seen == [0, 1]
  state = part / "state_p00000_b00000002.npz"
  state.write_bytes(state.read_bytes()[:100])
  caplog.clear()
  resumed, seen = evaluate(part)
  assert resumed.resumed_from == 1 and seen == [1, 2] and resumed.complete
  assert "state_p00000_b00000002.npz" in caplog.text
  np.testing.assert_allclose(resumed.stats.sum, full.stats.sum, rtol=1e-12)
  np.testing.assert_array_equal(resumed.features, full.features)


# ----------------------------------------------------------------------------------------------
# 2-3. Checkpoint integrity, non-finite saves, missing steps
# ----------------------------------------------------------------------------------------------

def _state(mesh, seed=0):
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rng = np.random.default_rng(seed)
  return {"params": {"w": jax.device_put(rng.normal(size=(64, 48)).astype(np.float32), sh),
                     "b": jax.device_put(rng.normal(size=(8,)).astype(np.float32), rep)},
          "step": jax.device_put(np.int32(seed), rep)}


def _abstract(state, mesh, spec):
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                        sharding=sh if "w" in jax.tree_util.keystr(p) else rep),
      state)


def _flip_bytes(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  largest = max(files, key=os.path.getsize)
  size = os.path.getsize(largest)
  with open(largest, "r+b") as f:
    f.seek(size // 2 - 32)
    data = f.read(64)
    f.seek(size // 2 - 32)
    f.write(bytes(b ^ 0xFF for b in data))


def test_host_and_device_checksums_agree():
  # A small single-process state is summed on the host (numpy), anything else on device (one
  # jitted reduction): the integer sums and counts must be identical, the float sums close.
  mesh = _mesh()
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(0)
  w = rng.normal(size=(16, 3)).astype(np.float32)
  w[0, 0], w[3, 1] = np.nan, -np.inf
  tree = {"w": jax.device_put(w, sharded),
          "bf16": jnp.asarray(rng.normal(size=(5, 7)), jnp.bfloat16),
          "i32": jnp.asarray(rng.integers(-2**31, 2**31 - 1, size=(33,)), jnp.int32),
          "u8": jnp.asarray(rng.integers(0, 255, size=(9,)), jnp.uint8),
          "b": jnp.asarray([True, False, True]), "scalar": jnp.float32(3.5),
          "key": jax.random.key(1)}
  host = ckpt_lib.state_checksums(tree)
  assert ckpt_lib._on_host(jax.tree_util.tree_leaves(tree))
  old = ckpt_lib.HOST_CHECKSUM_BYTES
  try:
    ckpt_lib.HOST_CHECKSUM_BYTES = 0
    device = ckpt_lib.state_checksums(tree)
  finally:
    ckpt_lib.HOST_CHECKSUM_BYTES = old
  assert host["leaves"].keys() == device["leaves"].keys()
  for name, h in host["leaves"].items():
    d = device["leaves"][name]
    assert {k: h[k] for k in ("shape", "dtype", "bits", "bits_mix", "nonfinite")} == {
        k: d[k] for k in ("shape", "dtype", "bits", "bits_mix", "nonfinite")}, name
    for k in ("sum", "sum_sq"):
      a, b = float(h[k]), float(d[k])
      assert a == b or (np.isnan(a) and np.isnan(b)) or abs(a - b) <= 1e-5 * max(1, abs(a)), name
  assert host["leaves"]["w"]["nonfinite"] == 2
  assert ckpt_lib.checksum_mismatches(host, device) == ([], len(host["leaves"]))


@pytest.mark.parametrize("host_bytes", [0, ckpt_lib.HOST_CHECKSUM_BYTES], ids=["device", "host"])
def test_corrupt_checkpoint_is_refused_naming_the_step_and_earlier_steps_still_restore(
    tmp_path, monkeypatch, host_bytes):
  monkeypatch.setattr(ckpt_lib, "HOST_CHECKSUM_BYTES", host_bytes)
  mesh = _mesh()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  states = {s: _state(mesh, seed=s) for s in (1, 2)}
  for s, st in states.items():
    assert ckpt.save(s, state=st, data_state={"i": s}, config_dict={"c": 1})
  ckpt.close()
  _flip_bytes(str(tmp_path / "checkpoints" / "2"))

  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"step 2\b") as info:
    ckpt.restore(2, abstract_state=_abstract(states[2], mesh, ("data",)))
  assert "kept: [1]" in str(info.value) or "cannot be restored" in str(info.value)
  # The earlier step restores and verifies, also onto another mesh and device count.
  for m, spec in ((_mesh(), (None, "data")), (_mesh(1), ())):
    state, data = ckpt.restore(1, abstract_state=_abstract(states[1], m, spec))
    assert data == {"i": 1}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]),
                                  np.asarray(states[1]["params"]["w"]))
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()


def test_checkpoint_without_checksums_from_older_code_still_restores(tmp_path, caplog):
  mesh = _mesh()
  state = _state(mesh)
  old = ocp.CheckpointManager(  # exactly what the code before checksums wrote
      str(tmp_path / "checkpoints"),
      options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True),
      item_names=("state", "data", "config"))
  old.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave({"i": 3}),
                                      config=ocp.args.JsonSave({"c": 1})), force=True)
  old.wait_until_finished()
  old.close()
  caplog.set_level(logging.INFO)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  restored, data = ckpt.restore(3, abstract_state=_abstract(state, mesh, ("data",)))
  assert data == {"i": 3}
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]),
                                np.asarray(state["params"]["w"]))
  assert "no checksums" in caplog.text
  ckpt.close()


def test_save_refuses_a_non_finite_state_and_keeps_earlier_checkpoints(tmp_path):
  mesh = _mesh()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  good = _state(mesh)
  assert ckpt.save(1, state=good, data_state={}, config_dict={})
  bad = jax.tree_util.tree_map(lambda x: x, good)
  bad["params"]["b"] = good["params"]["b"].at[3].set(jnp.nan)
  with pytest.raises(ckpt_lib.NonFiniteStateError, match=r"step 2 .*NaN/inf.*params/b"):
    ckpt.save(2, state=bad, data_state={}, config_dict={})
  assert isinstance(ckpt_lib.NonFiniteStateError("x"), ckpt_lib.CheckpointError)
  ckpt.wait()
  assert ckpt.all_steps() == [1]
  assert sorted(p for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()) == ["1"]
  state, _ = ckpt.restore(1, abstract_state=_abstract(good, mesh, ("data",)))
  assert np.all(np.isfinite(np.asarray(state["params"]["b"])))
  ckpt.close()


def test_a_missing_explicit_step_is_reported_as_not_found(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  state = {"w": jnp.ones(4)}
  ckpt.save(5, state=state, data_state={}, config_dict={"c": 1})
  assert ckpt.require_step(5) == 5
  match = r"checkpoint step 99 not found in .*checkpoints; available steps: \[5\]"
  with pytest.raises(ckpt_lib.CheckpointError, match=match):
    ckpt.require_step(99)
  with pytest.raises(ckpt_lib.CheckpointError, match=match):
    ckpt.saved_config(99)
  with pytest.raises(ckpt_lib.CheckpointError, match=match):
    ckpt.restore(99, abstract_state=jax.eval_shape(lambda: state))
  ckpt.close()


# ----------------------------------------------------------------------------------------------
# 4-7. Input validation and command-line failures: one line, exit 2, no traceback
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,match", [
    ("ancestral:2:nan", "finite number >= 0"), ("ancestral:2:-1", "finite number >= 0"),
    ("ddim:4:inf", "finite number >= 0"), ("ancestral:0", "positive integer"),
    ("ancestral:-3", "positive integer"), ("ancestral:2.5", "SAMPLER:STEPS")])
def test_bad_sampler_specs_are_config_errors(text, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.parse_sampler_specs(text, key="eval.final")
  assert config_lib.parse_sampler_specs("ddim:8:0,ancestral:2:1.5")[1]["guidance"] == 1.5


def _run(proc, timeout=300):
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    raise AssertionError(f"no exit within {timeout} s:\n{out[-3000:]}") from None
  return proc.returncode, out


def test_cli_bad_spec_and_unknown_config_key_exit_2_with_one_line(tmp_path, data_dir):
  rc, out = _run(helpers.cli(tmp_path / "spec", data_dir, "--config.eval.final=ancestral:2:nan"))
  assert rc == 2, out
  assert "ancestral:2:nan" in _no_traceback(out)
  rc, out = _run(helpers.cli(tmp_path / "key", data_dir, "--config.model.nonexistent=1"))
  assert rc == 2, out
  line = _no_traceback(out)
  assert "model.nonexistent" in line and "base_channels" in line


def test_resuming_with_another_seed_exits_2_naming_the_field(tmp_path, data_dir):
  # A constant learning rate: the step program of tests/test_train_loop.py's CLI runs (cached).
  quick = ("--config.training.num_steps=2", "--config.training.checkpoint_every=2",
           "--config.training.log_every=2", "--config.eval.final=", "--config.eval.periodic=",
           "--config.optim.schedule=constant")
  rc, out = _run(helpers.cli(tmp_path / "w", data_dir, *quick))
  assert rc == 0, out
  rc, out = _run(helpers.cli(tmp_path / "w", data_dir, *quick, "--config.training.num_steps=4",
                             "--config.seed=7"))
  assert rc == 2, out
  line = _no_traceback(out)
  assert "seed" in line and ("--config.seed=0" in line or "--workdir" in line), line


def test_iterator_state_mismatch_is_a_user_error_naming_the_field(tmp_path):
  from mmd_jax import errors
  from mmd_jax.data import pipeline
  path = tmp_path / "gmm.json"
  path.write_text(json.dumps({"weights": [0.5, 0.5], "means": [[0.0], [2.0]],
                              "stds": [[1.0], [0.5]]}))
  cfg = ml_collections.ConfigDict(dict(name="gmm", spec_path=str(path)))
  state = pipeline.make_train_iterator(cfg, global_batch_size=4, seed=0, shard_index=0,
                                       shard_count=1).get_state()
  other = pipeline.make_train_iterator(cfg, global_batch_size=4, seed=7, shard_index=0,
                                       shard_count=1)
  with pytest.raises(errors.USER_ERRORS, match=r"seed: saved 0 vs now 7.*--config\.seed=0"):
    other.set_state(state)
  from mmd_jax.data import sources  # the GMM iterator's own check raises the same class
  inner = sources.GaussianMixtureIterator(
      sources.GaussianMixture.from_dict({"weights": [1.0], "means": [[0.0]], "stds": [[1.0]]}),
      global_batch_size=4, seed=7, shard_index=0, shard_count=1)
  with pytest.raises(errors.USER_ERRORS, match="seed: saved 0 vs now 7"):
    inner.set_state(dict(state, seed=0))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_distributed_start_up_timeout_exits_2_with_our_message(tmp_path, data_dir):
  proc = helpers.cli(tmp_path / "d", data_dir, "--num_processes=2", "--process_id=0",
                     f"--coordinator_address=127.0.0.1:{_free_port()}",
                     "--distributed_timeout_s=10")
  rc, out = _run(proc)
  assert rc == 2, (rc, out)
  line = _no_traceback(out)
  assert "DistributedInitError" in line and "within 10 s" in line


# ----------------------------------------------------------------------------------------------
# 8. Exit codes, the distillation step's non-finite guard, unfinished teachers, every mode's
#    user errors end to end
# ----------------------------------------------------------------------------------------------

def test_exit_codes_are_distinct():
  from mmd_jax import errors, loop
  codes = (errors.EXIT_OK, errors.EXIT_USER_ERROR, errors.EXIT_NONFINITE, errors.EXIT_PREEMPTED)
  assert codes == (0, 2, 3, 75)
  # A non-finite loss is its own outcome, not a user error (it used to exit 2).
  assert not issubclass(loop.NonFiniteLossError, errors.USER_ERRORS)
  assert issubclass(loop.NonFiniteLossError, errors.NONFINITE_ERRORS)
  assert issubclass(ckpt_lib.NonFiniteStateError, errors.NONFINITE_ERRORS)


def test_distill_step_guard_keeps_the_last_good_state_and_records_the_first_bad_step():
  from mmd_jax.distill import common, steps
  state = common.DistillState(
      step=jnp.int32(0), params={"w": jnp.ones(3)}, opt_state={"m": jnp.zeros(3)},
      ema_params={"w": jnp.ones(3)}, aux_params={}, aux_opt_state={}, nu_ema={},
      nonfinite_step=jnp.int32(-1))

  def fake_step(state, scale):  # params <- params * scale; metric: the loss `scale`
    new = state.replace(step=state.step + 1, params={"w": state.params["w"] * scale},
                        opt_state={"m": state.opt_state["m"] + 1.0})
    return new, {"loss": scale}

  step = jax.jit(steps.guard_nonfinite(fake_step))
  s1, _ = step(state, jnp.float32(2.0))
  assert int(s1.step) == 1 and int(s1.nonfinite_step) == -1
  np.testing.assert_array_equal(s1.params["w"], 2.0)
  for bad in (jnp.nan, jnp.inf, 1e30):  # NaN, inf, and a finite update that exploded
    s2, metrics = step(s1, jnp.float32(bad))
    assert int(s2.step) == 2 and int(s2.nonfinite_step) == 2, bad
    np.testing.assert_array_equal(s2.params["w"], 2.0)  # the old state, every part of it
    np.testing.assert_array_equal(s2.opt_state["m"], 1.0)
  s3, _ = step(s2, jnp.float32(3.0))  # later good steps apply; the first bad step stays recorded
  assert int(s3.nonfinite_step) == 2
  np.testing.assert_array_equal(s3.params["w"], 6.0)
  assert 1e19 < steps.EXPLODED < 1e20


def test_distillation_that_explodes_exits_3_and_leaves_only_good_checkpoints(trained, data_dir,
                                                                             tmp_path):
  """The probe of issue 12: distill.optim.learning_rate=1e38, checkpoint_every=1."""
  from mmd_jax.distill import steps
  teacher_dir, _ = trained
  workdir = tmp_path / "student"
  proc = helpers.cli(workdir, data_dir, "--mode=distill", f"--config.distill.teacher={teacher_dir}",
                     "--config.distill.optim.learning_rate=1e38",
                     "--config.training.checkpoint_every=1", "--config.training.log_every=1",
                     "--config.distill.num_steps=12", "--config.eval.num_samples=0")
  rc, out = _run(proc)
  assert rc == 3, (rc, out)
  line = _no_traceback(out)
  assert "NonFiniteLossError" in line
  import re  # the step it names is a checkpoint on disk, the latest one, finite and not exploded
  good = int(re.search(r"last good checkpoint \((\d+), verified finite\)", line).group(1))
  steps_on_disk = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  assert steps_on_disk and steps_on_disk[-1] == good, (steps_on_disk, line)
  for s in steps_on_disk:
    tree = ocp.StandardCheckpointer().restore(str(workdir / "checkpoints" / str(s) / "state"))
    for name in ("params", "ema_params", "aux_params", "opt_state", "aux_opt_state"):
      for x in jax.tree_util.tree_leaves(tree[name]):
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
          assert np.all(np.isfinite(x)), (s, name)
          if "opt_state" not in name:
            assert np.abs(x).max() < steps.EXPLODED, (s, name, np.abs(x).max())
    assert int(tree["nonfinite_step"]) == -1


def test_a_student_refuses_an_unfinished_teacher_unless_a_step_is_named(trained, data_dir,
                                                                        tmp_path):
  import shutil
  from mmd_jax import runs
  from mmd_jax.runs import student
  teacher = tmp_path / "teacher"
  shutil.copytree(trained[0], teacher)
  shutil.rmtree(teacher / "checkpoints" / "6")  # preempted after step 3 of 6
  config = helpers.tiny_digits_config(data_dir, **{"distill.teacher": str(teacher)})
  run = runs.build(config, kind="student", mesh=mesh_lib.make_mesh(config.mesh))
  with pytest.raises(student.TeacherError,
                     match=r"not finished: its latest checkpoint is step 3 of its "
                           r"training.num_steps=6"):
    run.load_teacher()
  named = helpers.tiny_digits_config(data_dir,
                                     **{"distill.teacher": str(teacher / "checkpoints" / "3")})
  run = runs.build(named, kind="student", mesh=mesh_lib.make_mesh(named.mesh))
  assert run.load_teacher().step == 3  # an explicitly named step is the user's choice


def test_every_mode_reports_user_errors_in_one_line_with_exit_2(tmp_path, data_dir, trained):
  procs = {
      "distill": helpers.cli(tmp_path / "d", data_dir, "--mode=distill",
                             f"--config.distill.teacher={tmp_path / 'no_teacher'}"),
      "distill_step": helpers.cli(tmp_path / "d99", data_dir, "--mode=distill",
                                  f"--config.distill.teacher={trained[0]}/checkpoints/99"),
      "pipeline": helpers.cli(tmp_path / "p", data_dir, "--mode=pipeline",
                              "--config.pipeline.students=alternating:two"),
      "print_sharding": helpers.cli(tmp_path / "s", data_dir, "--mode=print_sharding",
                                    "--topology=v5p:4x"),
  }
  expect = {"distill": ("TeacherError", "train the teacher first"),
            "distill_step": ("step 99 not found", "available steps: [3, 6]"),
            "pipeline": ("ConfigError", "cannot parse 'alternating:two'"),
            "print_sharding": ("AotError", "is not GEN:AxB[xC]")}
  for mode, proc in procs.items():
    rc, out = _run(proc)
    assert rc == 2, (mode, rc, out)
    line = _no_traceback(out)
    for part in expect[mode]:
      assert part in line, (mode, line)
  assert not (tmp_path / "p" / "teacher" / "checkpoints").exists()
  d99 = tmp_path / "d99" / "checkpoints"
  assert not d99.exists() or not os.listdir(d99)  # nothing saved
