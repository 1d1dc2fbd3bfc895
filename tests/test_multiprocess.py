"""Two processes on 127.0.0.1 (jax.distributed, 4 fake CPU devices each) train with FSDP over all
8 devices, write a checkpoint together and are killed; one process with 8 devices restores it on
a different mesh and continues with the losses and parameters of an uninterrupted run.

The workers are this file run as a script (`python tests/test_multiprocess.py ROLE ...`), so each
gets its own XLA_FLAGS before jax is imported. Every wait is bounded.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH = 16
DIM = 16
CKPT_STEP = 3
TOTAL_STEPS = 6


# ----------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------

def _setup(mesh_shape):
  """Model, step, mesh and born-sharded-state factory shared by both roles."""
  import jax
  import ml_collections
  import optax

  from mmd_jax.diffusion.schedules import Schedule
  from mmd_jax.models import build as model_build
  from mmd_jax.parallel import layout
  from mmd_jax.parallel import mesh as mesh_lib
  from mmd_jax.training import state as state_lib
  from mmd_jax.training import steps

  model_cfg = ml_collections.ConfigDict(dict(kind="mlp", hidden=32, depth=2, dropout=0.0))
  model = model_build.build_model(model_cfg, data_shape=(DIM,), num_classes=0)
  tx = optax.adam(1e-2, eps=1e-3)
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(
      dict(zip(("data", "fsdp", "tensor"), mesh_shape))))
  abstract, sh = layout.teacher_layout(model=model, tx=tx, data_shape=(DIM,), num_classes=0,
                                       mesh=mesh, model_config=model_cfg)
  step_fn = steps.make_teacher_step(model=model, tx=tx, schedule=Schedule(), prediction="v",
                                    loss_weighting="v", num_classes=0, cond_drop_prob=0.0,
                                    ema_decay=0.9, data_key="x")
  step = layout.jit_teacher_step(step_fn, state_shardings=sh, mesh=mesh)

  def fresh_state():
    return state_lib.create_train_state(model, tx, rng=jax.random.PRNGKey(0), data_shape=(DIM,),
                                        num_classes=0, shardings=sh)

  def batch(i):
    """This process's rows of the global batch of step i (same data whatever the layout)."""
    rows = np.random.default_rng(100 + i).standard_normal((GLOBAL_BATCH, DIM)).astype(np.float32)
    per = GLOBAL_BATCH // jax.process_count()
    local = rows[jax.process_index() * per:(jax.process_index() + 1) * per]
    return mesh_lib.global_batch({"x": local}, mesh=mesh)

  return abstract, sh, step, fresh_state, batch


def _train_steps(state, step, batch, first, last, losses):
  import jax
  for i in range(first, last):
    state, metrics = step(state, batch(i), jax.random.PRNGKey(1))
    losses.append(float(metrics["loss"]))
  return state


def _flat_params(state):
  import jax
  return [np.asarray(x).tolist() for x in
          jax.tree_util.tree_leaves(jax.device_get(state.params))]


def worker_train(workdir, coordinator, process_id):
  """Process `process_id` of 2: steps 1..3, checkpoint at 3, then keeps training until killed."""
  from mmd_jax.parallel import distributed
  distributed.initialize(coordinator_address=coordinator, num_processes=2,
                         process_id=process_id, timeout_s=60)
  import jax
  from mmd_jax.training import checkpoint as ckpt_lib
  info = distributed.log_topology()
  assert info["process_count"] == 2 and info["global_devices"] == 8, info
  _, sh, step, fresh_state, batch = _setup((1, 8, 1))  # FSDP across both processes
  state = fresh_state()
  kernel = jax.tree_util.tree_leaves(state.params)[1]
  assert len(kernel.sharding.device_set) == 8 and not kernel.is_fully_addressable
  losses = []
  state = _train_steps(state, step, batch, 0, CKPT_STEP, losses)
  ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=2)
  ckpt.save(CKPT_STEP, state=state, data_state={"next_batch": CKPT_STEP},
            config_dict={"test": "multiprocess"})
  ckpt.wait()
  with open(os.path.join(workdir, f"losses_{process_id}.json"), "w") as f:
    json.dump({"losses": losses, "info": info}, f)
  print(f"SAVED {CKPT_STEP}", flush=True)
  for _ in range(600):  # keep the collectives busy until the test kills this process
    state, _ = step(state, batch(0), jax.random.PRNGKey(1))
    jax.block_until_ready(state.step)
    time.sleep(0.05)


def worker_resume(workdir):
  """One process, 8 devices, mesh (4, 2, 1): restore step 3 and continue; also the reference."""
  import jax
  import flax.linen as nn
  from mmd_jax.training import checkpoint as ckpt_lib
  abstract, sh, step, fresh_state, batch = _setup((4, 2, 1))
  ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=2)
  assert ckpt.latest_step() == CKPT_STEP, ckpt.latest_step()
  target = ckpt_lib.abstract_with_shardings(nn.unbox(abstract), sh)
  state, data_state = ckpt.restore(CKPT_STEP, abstract_state=target)
  assert int(state.step) == CKPT_STEP and data_state == {"next_batch": CKPT_STEP}
  resumed = []
  state = _train_steps(state, step, batch, CKPT_STEP, TOTAL_STEPS, resumed)
  reference = []
  ref_state = _train_steps(fresh_state(), step, batch, 0, TOTAL_STEPS, reference)
  out = {"resumed": resumed, "reference": reference, "params": _flat_params(state),
         "reference_params": _flat_params(ref_state), "devices": jax.device_count()}
  with open(os.path.join(workdir, "resume.json"), "w") as f:
    json.dump(out, f)
  print("RESUMED", flush=True)


# ----------------------------------------------------------------------------------------------
# Test side
# ----------------------------------------------------------------------------------------------

def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(args, devices, log_path):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  log = open(log_path, "w")
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], cwd=REPO, env=env,
                          stdout=log, stderr=subprocess.STDOUT), log


def _wait_for(predicate, procs, timeout, what, logs):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if predicate():
      return
    for p in procs:
      if p.poll() is not None and p.returncode != 0:
        break
    else:
      time.sleep(0.2)
      continue
    break
  tails = "\n".join(f"--- {l}\n" + open(l).read()[-3000:] for l in logs)
  raise AssertionError(f"{what} did not happen within {timeout} s (or a worker died):\n{tails}")


def test_two_processes_checkpoint_then_resume_on_one_process(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  coordinator = f"127.0.0.1:{_free_port()}"
  logs = [str(tmp_path / f"worker{i}.log") for i in range(2)]
  procs, files = [], []
  try:
    for i in range(2):
      p, f = _spawn(["train", workdir, coordinator, str(i)], 4, logs[i])
      procs.append(p)
      files.append(f)
    saved = lambda: all("SAVED" in open(l).read() for l in logs)
    _wait_for(saved, procs, 90, "the two-process checkpoint", logs)
    assert all(p.poll() is None for p in procs)  # still training: killed, not finished
  finally:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
      p.wait(timeout=30)
    for f in files:
      f.close()
  runs = [json.load(open(os.path.join(workdir, f"losses_{i}.json"))) for i in range(2)]
  assert runs[0]["losses"] == runs[1]["losses"]
  assert [r["info"]["process_index"] for r in runs] == [0, 1]
  assert all(r["info"]["local_devices"] == 4 for r in runs)

  log = str(tmp_path / "resume.log")
  proc, f = _spawn(["resume", workdir], 8, log)
  try:
    proc.wait(timeout=90)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait(timeout=30)
    f.close()
  assert proc.returncode == 0, open(log).read()[-3000:]
  out = json.load(open(os.path.join(workdir, "resume.json")))
  assert out["devices"] == 8
  np.testing.assert_allclose(runs[0]["losses"], out["reference"][:CKPT_STEP], rtol=1e-5)
  np.testing.assert_allclose(out["resumed"], out["reference"][CKPT_STEP:], rtol=1e-5)
  for a, b in zip(out["params"], out["reference_params"]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  role = sys.argv[1]
  if role == "train":
    worker_train(sys.argv[2], sys.argv[3], int(sys.argv[4]))
  elif role == "resume":
    worker_resume(sys.argv[2])
  else:
    raise SystemExit(f"unknown role {role!r}")
