"""Two processes on 127.0.0.1 (jax.distributed, 4 fake CPU devices each) run the real training
loop (`python -m mmd_jax.main --mode=train` on configs/digits.py:test) with FSDP over all 8
devices, so each process holds half of every sharded array. After their first checkpoint ONE of
them gets SIGTERM: JAX's preemption sync manager tells the other, both save the same step S and
both exit with 75 (errors.EXIT_PREEMPTED). One process with 8 devices then resumes that work
directory through the same loop to step S + 5 and ends with the losses and parameters of an
uninterrupted one-process 8-device run of S + 5 steps.

The workers are configured for far more steps than they can run, at a constant learning rate
(so the first steps do not depend on num_steps): the SIGTERM interrupts them whenever it comes.

All runs use the FSDP mesh (data=1, fsdp=8): on a data-parallel mesh Orbax saves replicated
arrays in slices, and its first save costs ~10 CPU-seconds here. Restoring onto another mesh is
tested in test_sharding.py. The uninterrupted reference runs alongside the resumed run (the
machine has 2 cores; running it afterwards would leave one idle). Every wait is for an event (a
checkpoint directory, a process exit), bounded.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from tests import helpers

# Checkpoints every 2 steps. SIGTERM goes out when the first one (step 2) appears; the agreed
# stop comes a few steps later (the notice travels through the coordination service). A
# two-process step takes seconds here (gloo), so the earlier the first checkpoint, the shorter
# the test.
WORKER_STEPS = 100000
MORE_STEPS = 5  # the resumed run's steps past the agreed stop
COMMON = (f"--config={helpers.DIGITS}:test", "--mode=train",
          "--config.optim.schedule=constant", "--config.training.log_every=1",
          "--config.training.checkpoint_every=2",
          "--config.eval.final=", "--config.eval.periodic=", "--config.eval.num_samples=0",
          "--config.mesh.data=1", "--config.mesh.fsdp=8")
# Each run (the workers up to their checkpoint, the reference, the resumed run) must end within
# this many seconds of its start: a bound against hangs, generous for a loaded 2-core machine.
RUN_TIMEOUT_S = 600
# float32 on CPU: the two-process run reduces across processes (gloo), in another order than one
# process does. Losses and gradient norms then differ by ~1e-7 relative. Parameters are compared as a whole: Adam turns rounding-level gradients of
# parameters that barely matter (e.g. biases whose gradient is ~0) into steps of ~learning rate,
# so single elements differ by up to ~2e-4 while the whole vector differs by ~2e-5 relative
# (one training step changes it by ~2e-3).
LOSS_RTOL = 1e-5
# Parameters after a resume on another process count: measured 2.01e-4 relative on the loaded
# 2-core machine (Adam amplifies the rounding of near-zero gradients); losses match at 1e-5.
PARAMS_RTOL = 1e-3


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(workdir, data_dir, flags, *, devices, log_path):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      "--xla_backend_optimization_level=0")
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "mmd_jax.main", *COMMON, f"--workdir={workdir}",
         f"--config.data.data_dir={data_dir}", *flags]
  with open(log_path, "w") as log:
    return subprocess.Popen(cmd, cwd=helpers.REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _tails(logs):
  return "\n".join(f"--- {l}\n" + open(l).read()[-3000:] for l in logs)


def _wait_for_checkpoint(ckpt_dir, procs, logs, timeout):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if os.path.isdir(ckpt_dir) and any(s.isdigit() for s in os.listdir(ckpt_dir)):
      return
    if any(p.poll() is not None for p in procs):
      raise AssertionError(f"a worker ended before the first checkpoint:\n{_tails(logs)}")
    time.sleep(0.05)
  raise AssertionError(f"no checkpoint within {timeout} s:\n{_tails(logs)}")


def _finish(proc, log, timeout, *, code=0):
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    raise AssertionError(f"run did not finish within {timeout} s:\n{_tails([log])}") from None
  assert proc.returncode == code, (proc.returncode, _tails([log]))
  return open(log).read()


def _metrics(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def _logged_losses(log_text):
  """{step: loss text} from the progress lines every process prints."""
  return dict(re.findall(rf"step (\d+)/{WORKER_STEPS} .* loss (\S+)", log_text))


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_then_resume_on_one(
    tmp_path, data_dir):
  work, ref = str(tmp_path / "run"), str(tmp_path / "ref")
  ckpt_dir = os.path.join(work, "checkpoints")
  coordinator = f"127.0.0.1:{_free_port()}"
  logs = {name: str(tmp_path / f"{name}.log") for name in ("worker0", "worker1", "ref", "resume")}
  procs = {}
  try:
    for i in range(2):
      procs[f"worker{i}"] = _spawn(
          work, data_dir, (f"--config.training.num_steps={WORKER_STEPS}",
                           f"--coordinator_address={coordinator}", "--num_processes=2",
                           f"--process_id={i}", "--distributed_timeout_s=120"),
          devices=4, log_path=logs[f"worker{i}"])
    workers = [procs["worker0"], procs["worker1"]]
    worker_logs = [logs["worker0"], logs["worker1"]]
    _wait_for_checkpoint(ckpt_dir, workers, worker_logs, RUN_TIMEOUT_S)
    procs["worker1"].send_signal(signal.SIGTERM)  # one process only
    for p, log in zip(workers, worker_logs):
      _finish(p, log, RUN_TIMEOUT_S, code=75)
    saved = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
    before_resume = _metrics(work)

    end = max(saved) + MORE_STEPS
    flags = (f"--config.training.num_steps={end}",)
    procs["ref"] = _spawn(ref, data_dir, flags, devices=8, log_path=logs["ref"])
    procs["resume"] = _spawn(work, data_dir, flags, devices=8, log_path=logs["resume"])
    ref_log = _finish(procs["ref"], logs["ref"], RUN_TIMEOUT_S)
    resume_log = _finish(procs["resume"], logs["resume"], RUN_TIMEOUT_S)
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait(timeout=60)

  worker_text = [open(l).read() for l in worker_logs]
  stopped = []
  for i, text in enumerate(worker_text):
    assert f"process {i}/2: 4 local / 8 global cpu devices" in text
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in text
    assert "Traceback" not in text and "EnforceNotMet" not in text
    stopped.append(int(re.search(r"Preempted at step (\d+)", text).group(1)))
  # Both stopped at the same step, saved it together, and it is the latest checkpoint.
  assert stopped[0] == stopped[1] == max(saved), (stopped, saved)
  losses = [_logged_losses(t) for t in worker_text]
  common = set(losses[0]) & set(losses[1])
  assert common and all(losses[0][s] == losses[1][s] for s in common)
  assert "process 0/1, 8 local / 8 global devices, mesh {'data': 1, 'fsdp': 8" in resume_log
  assert f"Resumed from {ckpt_dir}/{max(saved)}" in resume_log
  assert "Resumed from" not in ref_log

  reference = {m["step"]: m for m in _metrics(ref)}
  assert sorted(reference) == list(range(1, end + 1))
  resumed = _metrics(work)[len(before_resume):]
  assert [m["step"] for m in resumed] == list(range(max(saved) + 1, end + 1))
  assert [m["step"] for m in before_resume] == list(range(1, max(saved) + 1))
  for m in before_resume + resumed:  # the two-process steps, then the resumed ones
    for key in ("loss", "grad_norm"):
      np.testing.assert_allclose(m[key], reference[m["step"]][key], rtol=LOSS_RTOL,
                                 err_msg=f"{key} at step {m['step']}")
  got, want = helpers.final_params(work, end), helpers.final_params(ref, end)
  assert [a.shape for a in got] == [b.shape for b in want]
  diff = np.sqrt(sum(np.sum((a - b).astype(np.float64) ** 2) for a, b in zip(got, want)))
  norm = np.sqrt(sum(np.sum(b.astype(np.float64) ** 2) for b in want))
  assert diff <= PARAMS_RTOL * norm, diff / norm
