"""The baselines (issue 14): progressive distillation and multistep consistency distillation.

Targets against a direct computation in float64 numpy (two DDIM steps of the teacher; one ODE
step plus the boundary condition), the steps' losses against the written-out loss with the
code's key derivation, the rounds of progressive distillation, and exact resume after SIGKILL.
The reference side never calls the function under test.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmd_jax.config_lib import ConfigError
from mmd_jax.diffusion.schedules import Schedule
from mmd_jax.distill import ddim_targets, progressive, steps
from mmd_jax.distill import moment_matching as mm
from mmd_jax.runs import student as student_run
from tests import helpers

SCHEDULE = Schedule()  # cosine, logsnr in [-15, 15], no shift


def _alpha_sigma_np(logsnr):
  logsnr = np.asarray(logsnr, np.float64)
  return np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))


def _ddim_np(z_t, x, l_t, l_s):
  """z_s = alpha_s x + sigma_s (z_t - alpha_t x) / sigma_t (DDIM, Song et al. 2021 eq. 12)."""
  a_t, s_t = (v[:, None] for v in _alpha_sigma_np(l_t))
  a_s, s_s = (v[:, None] for v in _alpha_sigma_np(l_s))
  return a_s * x + s_s * (z_t - a_t * x) / s_t


def _logsnr_np(u):
  hi, lo = 15.0, -15.0
  b = np.arctan(np.exp(-0.5 * hi))
  a = np.arctan(np.exp(-0.5 * lo)) - b
  return -2.0 * np.log(np.tan(a * np.asarray(u, np.float64) + b))


def _g_np(params, z, logsnr, label):
  return (params["a"] * np.sin(1.3 * z) + params["b"] * np.tanh(0.2 * logsnr)[:, None]
          + 0.3 * label[:, None])


def _g(params, z, logsnr, label, *, train=False, rng=None):
  """A nonlinear analytic x-predictor with parameters (no dropout)."""
  assert not train
  return (params["a"] * jnp.sin(1.3 * z) + params["b"] * jnp.tanh(0.2 * logsnr)[:, None]
          + 0.3 * label[:, None].astype(jnp.float32))


PARAMS = {"a": jnp.float32(0.8), "b": jnp.float32(-0.4)}
PARAMS_NP = {"a": 0.8, "b": -0.4}


def _inputs(seed=0, batch=6, dim=3):
  r = np.random.default_rng(seed)
  z = r.standard_normal((batch, dim))
  label = r.integers(0, 3, batch)
  return z, label


# ----------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------

def test_progressive_target_is_two_teacher_ddim_steps():
  """x_tilde's one DDIM step t -> s lands where two DDIM steps of the teacher land, and x_tilde
  is the closed form of Salimans & Ho (2022), Algorithm 2, in float64."""
  z, label = _inputs()
  u_t = np.array([1.0, 0.75, 0.5, 0.25, 0.125, 0.0625])
  n = np.array([1, 2, 4, 4, 8, 16], np.float64)
  l_t, l_m, l_s = _logsnr_np(u_t), _logsnr_np(u_t - 0.5 / n), _logsnr_np(u_t - 1 / n)
  z_m = _ddim_np(z, _g_np(PARAMS_NP, z, l_t, label), l_t, l_m)
  z_s = _ddim_np(z_m, _g_np(PARAMS_NP, z_m, l_m, label), l_m, l_s)
  a_t, s_t = (v[:, None] for v in _alpha_sigma_np(l_t))
  a_s, s_s = (v[:, None] for v in _alpha_sigma_np(l_s))
  want = (z_s - s_s / s_t * z) / (a_s - s_s / s_t * a_t)

  teacher = lambda zz, ll, c: _g(PARAMS, zz, ll, c)  # noqa: E731
  got = ddim_targets.two_step_target(
      teacher=teacher, z_t=jnp.asarray(z, jnp.float32), label=jnp.asarray(label),
      logsnr_t=jnp.asarray(l_t, jnp.float32), logsnr_mid=jnp.asarray(l_m, jnp.float32),
      logsnr_s=jnp.asarray(l_s, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)
  # The defining property: the student's single DDIM step with x_tilde reproduces z_s.
  np.testing.assert_allclose(_ddim_np(z, np.asarray(got, np.float64), l_t, l_s), z_s,
                             rtol=1e-4, atol=1e-4)


def test_consistency_target_is_one_ode_step_plus_the_boundary_condition():
  """Boundary rows (s = segment start): x_tilde's DDIM step t -> start lands on one teacher DDIM
  step z_s. Other rows: on the target network's DDIM jump from z_s to the segment start."""
  z, label = _inputs(seed=1)
  u_t = np.array([0.25, 0.5, 1.0, 0.3125, 0.6875, 0.9375])
  u_s = np.array([0.1875, 0.4375, 0.9375, 0.25, 0.625, 0.875])
  u_start = np.array([0.0, 0.25, 0.75, 0.25, 0.5, 0.75])
  at_start = u_s == u_start
  assert at_start.tolist() == [False, False, False, True, False, False]
  l_t, l_s, l_0 = _logsnr_np(u_t), _logsnr_np(u_s), _logsnr_np(u_start)
  z_s = _ddim_np(z, _g_np(PARAMS_NP, z, l_t, label), l_t, l_s)
  target_params = {"a": -0.3, "b": 0.7}
  jumped = _ddim_np(z_s, _g_np(target_params, z_s, l_s, label), l_s, l_0)
  z_ref = np.where(at_start[:, None], z_s, jumped)

  f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
  x_tilde, got_zs = ddim_targets.consistency_target(
      teacher=lambda zz, ll, c: _g(PARAMS, zz, ll, c),
      target_net=lambda zz, ll, c: _g({k: f32(v) for k, v in target_params.items()}, zz, ll, c),
      z_t=f32(z), label=jnp.asarray(label), logsnr_t=f32(l_t), logsnr_s=f32(l_s),
      logsnr_start=f32(l_0), at_start=jnp.asarray(at_start))
  np.testing.assert_allclose(np.asarray(got_zs), z_s, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(_ddim_np(z, np.asarray(x_tilde, np.float64), l_t, l_0), z_ref,
                             rtol=2e-4, atol=2e-4)
  # The boundary row does not depend on the target network at all.
  x_other, _ = ddim_targets.consistency_target(
      teacher=lambda zz, ll, c: _g(PARAMS, zz, ll, c),
      target_net=lambda zz, ll, c: 0.0 * zz, z_t=f32(z), label=jnp.asarray(label),
      logsnr_t=f32(l_t), logsnr_s=f32(l_s), logsnr_start=f32(l_0),
      at_start=jnp.asarray(at_start))
  np.testing.assert_array_equal(np.asarray(x_other)[3], np.asarray(x_tilde)[3])
  assert not np.allclose(np.asarray(x_other)[0], np.asarray(x_tilde)[0])


def test_a_point_mass_is_a_fixed_point_of_both_targets():
  """Data at a single point x0: the exact denoiser is x0 everywhere, every DDIM step is exact,
  and both targets equal x0: a student that predicts x0 has zero loss."""
  x0 = jnp.asarray([[0.3, -0.7, 0.1]] * 4, jnp.float32)
  const = lambda z, l, c: x0  # noqa: E731
  l = lambda u: jnp.asarray(_logsnr_np(np.asarray(u)), jnp.float32)  # noqa: E731
  z_t = jnp.asarray(np.random.default_rng(2).standard_normal((4, 3)), jnp.float32)
  pd = ddim_targets.two_step_target(teacher=const, z_t=z_t, label=None,
                                    logsnr_t=l([1.0, 0.5, 0.25, 0.125]),
                                    logsnr_mid=l([0.75, 0.375, 0.1875, 0.0625]),
                                    logsnr_s=l([0.5, 0.25, 0.125, 0.0]))
  mcd, _ = ddim_targets.consistency_target(
      teacher=const, target_net=const, z_t=z_t, label=None, logsnr_t=l([1.0, 0.5, 0.3, 0.2]),
      logsnr_s=l([0.9, 0.25, 0.25, 0.1]), logsnr_start=l([0.5, 0.25, 0.25, 0.0]),
      at_start=jnp.asarray([False, True, True, False]))
  np.testing.assert_allclose(np.asarray(pd), np.asarray(x0), atol=2e-4)
  np.testing.assert_allclose(np.asarray(mcd), np.asarray(x0), atol=2e-4)


# ----------------------------------------------------------------------------------------------
# The steps: loss written out with the code's key derivation
# ----------------------------------------------------------------------------------------------

def _config(variant, **kw):
  c = mm.default_config()
  c.update(dict(dict(variant=variant, num_student_steps=2, teacher_steps=8, batch_size=6,
                     num_steps=8, dropout="off"), **kw))
  return c


def _state_and_step(config, phase=None):
  tx, aux_tx = steps.make_optimizers(config)
  state = steps.init_distill_state(config=config, init_params=PARAMS, student_tx=tx,
                                   aux_tx=aux_tx)
  step = jax.jit(steps.make_distill_step(config=config, denoise=_g, schedule=SCHEDULE,
                                         student_tx=tx, aux_tx=aux_tx, phase=phase,
                                         data_key="x", null_label=None))
  return state, step


def _batch(seed=3):
  x, label = _inputs(seed=seed)
  return {"x": jnp.asarray(np.clip(x, -1, 1), jnp.float32), "label": jnp.asarray(label)}


def _step_keys(rng, step):
  key_b = jax.random.fold_in(jax.random.fold_in(rng, step), 1)
  return jax.random.split(key_b, 3)  # times, eps, dropout


def test_progressive_first_step_loss_is_the_written_out_loss():
  """Round 0 of teacher_steps = 8 -> k = 2 (2 rounds): the student has 4 steps, t = i/4, two
  teacher DDIM steps of 1/8 each, weight max(SNR_t, 1)."""
  config = _config("progressive")
  assert progressive.num_rounds(config) == 2
  state, step = _state_and_step(config, phase="first_round")
  batch, rng = _batch(), jax.random.PRNGKey(5)
  _, metrics = step(state, PARAMS, batch, rng)
  k_t, k_eps, _ = _step_keys(rng, 0)
  i = np.asarray(jax.random.randint(k_t, (6,), 1, 5), np.float64)
  eps = np.asarray(jax.random.normal(k_eps, (6, 3)), np.float64)
  x, label = np.asarray(batch["x"], np.float64), np.asarray(batch["label"])
  l_t, l_m, l_s = _logsnr_np(i / 4), _logsnr_np((i - 0.5) / 4), _logsnr_np((i - 1) / 4)
  a_t, s_t = (v[:, None] for v in _alpha_sigma_np(l_t))
  z = a_t * x + s_t * eps
  z_m = _ddim_np(z, _g_np(PARAMS_NP, z, l_t, label), l_t, l_m)
  z_s = _ddim_np(z_m, _g_np(PARAMS_NP, z_m, l_m, label), l_m, l_s)
  a_s, s_s = (v[:, None] for v in _alpha_sigma_np(l_s))
  x_tilde = (z_s - s_s / s_t * z) / (a_s - s_s / s_t * a_t)
  w = np.maximum(np.exp(l_t), 1.0)
  want = np.mean(w * np.mean((_g_np(PARAMS_NP, z, l_t, label) - x_tilde) ** 2, -1))
  np.testing.assert_allclose(float(metrics["distill_loss"]), want, rtol=2e-3)
  assert float(metrics["student_steps"]) == 4 and float(metrics["round"]) == 0


@pytest.mark.parametrize("target_network", ["stop_gradient", "ema"])
def test_consistency_first_step_loss_is_the_written_out_loss(target_network):
  """k = 2 segments of 4 teacher steps each; the target network is the student (its EMA starts
  as the student); boundary rows use the teacher's step alone."""
  config = _config("consistency", target_network=target_network)
  state, step = _state_and_step(config)
  assert bool(jax.tree_util.tree_leaves(state.aux_params)) == (target_network == "ema")
  batch, rng = _batch(seed=4), jax.random.PRNGKey(6)
  new, metrics = step(state, PARAMS, batch, rng)
  k_t, k_eps, _ = _step_keys(rng, 0)
  k_seg, k_j = jax.random.split(k_t)
  seg = np.asarray(jax.random.randint(k_seg, (6,), 0, 2), np.float64)
  j = np.asarray(jax.random.randint(k_j, (6,), 1, 5), np.float64)
  u_0, u_t, u_s = seg / 2, seg / 2 + j / 8, seg / 2 + (j - 1) / 8
  eps = np.asarray(jax.random.normal(k_eps, (6, 3)), np.float64)
  x, label = np.asarray(batch["x"], np.float64), np.asarray(batch["label"])
  l_t, l_s, l_0 = _logsnr_np(u_t), _logsnr_np(u_s), _logsnr_np(u_0)
  a_t, s_t = (v[:, None] for v in _alpha_sigma_np(l_t))
  z = a_t * x + s_t * eps
  z_s = _ddim_np(z, _g_np(PARAMS_NP, z, l_t, label), l_t, l_s)
  jumped = _ddim_np(z_s, _g_np(PARAMS_NP, z_s, l_s, label), l_s, l_0)
  z_ref = np.where((j == 1)[:, None], z_s, jumped)
  a_0, s_0 = (v[:, None] for v in _alpha_sigma_np(l_0))
  x_tilde = (z_ref - s_0 / s_t * z) / (a_0 - s_0 / s_t * a_t)
  w = np.maximum(np.exp(l_t), 1.0)
  want = np.mean(w * np.mean((_g_np(PARAMS_NP, z, l_t, label) - x_tilde) ** 2, -1))
  np.testing.assert_allclose(float(metrics["distill_loss"]), want, rtol=2e-3)
  np.testing.assert_allclose(float(metrics["boundary_fraction"]), np.mean(j == 1))
  if target_network == "ema":  # target <- 0.95 target + 0.05 student after the update
    for key in PARAMS:
      np.testing.assert_allclose(float(new.aux_params[key]), 0.95 * float(PARAMS[key])
                                 + 0.05 * float(new.params[key]), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Progressive distillation's rounds
# ----------------------------------------------------------------------------------------------

def test_progressive_rounds_split_the_budget_and_are_fixed_by_the_config():
  config = _config("progressive", teacher_steps=16)  # 16 -> 8 -> 4 -> 2: 3 rounds
  config.num_steps = 10
  assert progressive.num_rounds(config) == 3
  assert [progressive.round_start(config, r) for r in range(3)] == [0, 4, 7]
  assert [progressive.round_of(config, s) for s in range(10)] == [0] * 4 + [1] * 3 + [2] * 3
  assert [steps.program_index(config, s) for s in range(10)] == [0] * 4 + [1] * 6
  assert progressive.round_length(config) == 4
  assert steps.step_phases(config) == ("first_round", "later_rounds")
  single = _config("progressive", teacher_steps=4)
  assert steps.step_phases(single) == ("first_round",)
  for bad in (6, 2, 12):
    with pytest.raises(ValueError, match="k \\* 2\\^R"):
      steps.validate_config(_config("progressive", teacher_steps=bad))
  with pytest.raises(ValueError, match="multiple of"):
    steps.validate_config(_config("consistency", teacher_steps=7))
  with pytest.raises(ValueError, match="uniform_t"):
    steps.validate_config(_config("consistency", spacing="uniform_logsnr"))


def test_progressive_round_start_hands_the_ema_on_and_restarts_the_optimizer():
  """At the first step of round 1 the round teacher and the student both become the student's
  EMA, the optimizer restarts (its count is 1 after that step) and the student has k steps."""
  config = _config("progressive")  # 8 -> 4 -> 2, round 1 starts at step 4 of 8
  config.optim.learning_rate = 1e-2
  state, first = _state_and_step(config, phase="first_round")
  _, later = _state_and_step(config, phase="later_rounds")
  batch, rng = _batch(), jax.random.PRNGKey(7)
  for _ in range(4):
    state, m = first(state, PARAMS, batch, rng)
  assert int(state.step) == 4 and float(m["round"]) == 0
  ema = jax.device_get(state.ema_params)
  assert not np.allclose(float(ema["a"]), float(PARAMS["a"]))
  new, m = later(state, PARAMS, batch, rng)
  assert float(m["round"]) == 1 and float(m["student_steps"]) == 2
  for key in PARAMS:
    assert float(new.aux_params[key]) == float(ema[key])
  count = [x for x in jax.tree_util.tree_leaves(new.opt_state) if x.dtype == jnp.int32]
  assert count and all(int(c) == 1 for c in count)
  # One step later the round teacher stays put while the student moves on.
  newer, _ = later(new, PARAMS, batch, rng)
  for key in PARAMS:
    assert float(newer.aux_params[key]) == float(ema[key])
    assert float(newer.params[key]) != float(new.params[key])


def test_baseline_configs_are_refused_with_one_clear_error(data_dir):
  config = helpers.tiny_digits_config(data_dir, **{"distill.variant": "progressive",
                                                    "distill.num_student_steps": 8,
                                                    "distill.teacher_steps": 24})
  with pytest.raises(ConfigError, match="teacher_steps=24"):
    student_run.validate(config)
  config = helpers.tiny_digits_config(data_dir, **{"distill.variant": "consistency",
                                                    "distill.dropout": "shared"})
  with pytest.raises(ConfigError, match="no auxiliary"):
    student_run.validate(config)


def test_pipeline_refuses_a_bad_baseline_stage_before_the_teacher_stage(data_dir, tmp_path):
  from mmd_jax import pipeline
  config = helpers.tiny_digits_config(data_dir, **{
      "pipeline.students": "progressive:2,progressive:3"})
  with pytest.raises(ConfigError, match="teacher_steps=64 must be k \\* 2\\^R"):
    pipeline.run_pipeline(config, str(tmp_path / "p"))
  assert not os.path.exists(tmp_path / "p" / "teacher")


# ----------------------------------------------------------------------------------------------
# SIGKILL and resume, through the command line
# ----------------------------------------------------------------------------------------------

def _distill_cli(workdir, data_dir, teacher_dir, *flags, log=subprocess.PIPE):
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "mmd_jax.main", f"--config={helpers.DIGITS}:test",
         "--mode=distill", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
         f"--config.distill.teacher={teacher_dir}", "--config.eval.num_samples=0", *flags]
  return subprocess.Popen(cmd, cwd=helpers.REPO, env=env, stdout=log,
                          stderr=subprocess.STDOUT, text=True)


def _state_leaves(workdir, step):
  import orbax.checkpoint as ocp
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                          "state"))
  return {part: [np.asarray(x) for x in jax.tree_util.tree_leaves(state[part])]
          for part in state}


BASELINE_RUNS = {
    # 8 -> 4 -> 2 steps: two rounds, round 1 from step 8; the kill lands in round 0.
    "progressive": ("--config.distill.variant=progressive", "--config.distill.num_student_steps=2",
                    "--config.distill.teacher_steps=8"),
    "consistency": ("--config.distill.variant=consistency", "--config.distill.num_student_steps=2",
                    "--config.distill.teacher_steps=8", "--config.distill.target_network=ema"),
}


# Checkpoints every 4 steps: the kill follows the first one (step 4), the rerun runs 4 -> 16.
SIGKILL_STEPS = 16


@pytest.mark.parametrize("name", sorted(BASELINE_RUNS))
def test_baseline_sigkill_then_rerun_equals_uninterrupted_run_bit_for_bit(trained, data_dir,
                                                                         tmp_path, name):
  teacher_dir, _ = trained
  flags = BASELINE_RUNS[name] + (f"--config.distill.num_steps={SIGKILL_STEPS}",
                                 "--config.training.checkpoint_every=4",
                                 "--config.training.log_every=4")
  # The uninterrupted reference runs beside the killed run and its rerun (the wall time of the
  # test is then about one run's, not three).
  ref = str(tmp_path / "ref")
  ref_log = open(tmp_path / "ref.log", "w")  # a file, not a pipe nobody reads until the end
  ref_proc = _distill_cli(ref, data_dir, teacher_dir, *flags, log=ref_log)
  try:
    killed = str(tmp_path / "killed")
    proc = _distill_cli(killed, data_dir, teacher_dir, *flags)
    ckpts = os.path.join(killed, "checkpoints")
    t0 = time.time()
    while not (os.path.isdir(ckpts) and any(s.isdigit() for s in os.listdir(ckpts))):
      assert proc.poll() is None, proc.stdout.read()
      assert time.time() - t0 < 600
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    saved = max(int(s) for s in os.listdir(ckpts) if s.isdigit())
    assert saved < SIGKILL_STEPS, "the run finished before it was killed"
    proc = _distill_cli(killed, data_dir, teacher_dir, *flags)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert f"Resumed from {killed}/checkpoints/{saved} (student)" in out
    ref_proc.wait(timeout=600)
    ref_log.close()
    ref_out = (tmp_path / "ref.log").read_text()
    assert ref_proc.returncode == 0, ref_out
    assert "2 program(s)" in ref_out if name == "progressive" else "1 program(s)" in ref_out
  finally:
    if ref_proc.poll() is None:  # a failed assertion above: no process outlives the test
      ref_proc.kill()
      ref_proc.wait()
  logged = [json.loads(l) for l in open(os.path.join(killed, "metrics.jsonl"))]
  if name == "progressive":  # the rerun crossed into round 1 at step 8
    assert {r["step"]: r["round"] for r in logged if r["step"] in (8, 12)} == {8: 0.0, 12: 1.0}
  a, b = _state_leaves(ref, SIGKILL_STEPS), _state_leaves(killed, SIGKILL_STEPS)
  assert sorted(a) == sorted(b)
  for part in a:
    for x, y in zip(a[part], b[part]):
      np.testing.assert_array_equal(x, y, err_msg=part)
