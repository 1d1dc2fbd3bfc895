"""experiments/bench_train_step.py without torch: the ours/peer report at both shapes from a
synthetic result, and the command line applying the CPU defaults (a restart of the script) with
the peer skipped. Nothing is timed."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from mmd_jax import cpu_defaults
from tests import helpers

SCRIPT = os.path.join(helpers.REPO, "experiments", "bench_train_step.py")


def _bench():
  spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _teacher(params, batch, wall, flops):
  return {"params": params, "batch": batch, "compile_s": 20.0, "wall_s": wall,
          "wall_min_s": wall * 0.9, "cpu_s": 2 * wall, "flops": flops, "gflops_wall": 1.0,
          "gflop_per_cpu_s": 1.0, "minor_faults": 10.0, "loadavg_after": [1.0, 1.0, 1.0]}


def _peer(params, batch, wall, flops):
  return {"skipped": False, "params": params, "batch": batch, "step_wall_s": wall,
          "step_walls": [wall, wall * 0.8], "step_cpu_s": 2 * wall, "flops_per_step": flops,
          "minor_faults_per_step": 5.0, "loadavg": [1.0, 1.0, 1.0], "torch": "2.13.0",
          "diffusers": "0.35.0", "threads": 2, "glibc_tunables": "glibc.malloc.hugetlb=1",
          "omp_wait_policy": "PASSIVE"}


def test_report_has_one_ours_over_peer_line_per_shape():
  bench = _bench()
  state = {"raw_env": False, "opted_out": False, "backend_is_cpu": True,
           "XLA_FLAGS": "added by the CPU defaults", "GLIBC_TUNABLES": "added by the CPU defaults"}
  res = {"env": {"cpu_defaults": state, "XLA_FLAGS": cpu_defaults.XLA_SETTING,
                 "GLIBC_TUNABLES": cpu_defaults.GLIBC_SETTING, "JAX_THREEFRY_PARTITIONABLE": "",
                 "cpu_count": 2, "jax": "0"},
         "teacher": {"digits": _teacher(0.72e6, 64, 0.097, 4.4e9),
                     "cifar32": _teacher(4.14e6, 32, 2.0, 257.5e9)},
         "peer": {"digits": _peer(1.0e6, 64, 0.1, 5.5e9),
                  "cifar32": _peer(4.5e6, 32, 2.5, 278.7e9)}}
  ratios = bench.ours_over_peer(res)
  assert set(ratios) == {"digits", "cifar32"}
  assert ratios["digits"]["wall"] == pytest.approx(0.97)
  assert ratios["cifar32"]["best_wall"] == pytest.approx(2.0 * 0.9 / 2.0)
  assert ratios["cifar32"]["params"] == pytest.approx(4.14 / 4.5)
  text = bench.report(res)
  lines = [l for l in text.splitlines() if l.startswith("ours/peer (")]
  assert len(lines) == 2, text
  assert lines[0].startswith("ours/peer (digits 8x8x1, batch 64): wall 0.97 (0.097 s / 0.100 s)")
  assert lines[1].startswith("ours/peer (32x32, batch 32): wall 0.80")
  assert "FLOPs 0.80 (4.4 / 5.5 GFLOP), params 0.72 (0.72M / 1.00M)" in lines[0]
  assert "peer torch (digits) |" in text and "| peer torch (cifar32) |" in text
  assert text.splitlines()[0].startswith("CPU defaults (mmd_jax/cpu_defaults.py): on")
  json.dumps(ratios)

  res["peer"]["digits"] = {"skipped": True, "reason": "torch not importable"}
  text = bench.report(res)
  assert "PEER SKIPPED (digits 8x8x1): torch not importable" in text
  assert sum(l.startswith("ours/peer (") for l in text.splitlines()) == 1


def test_command_line_applies_the_cpu_defaults_and_skips_a_missing_peer(tmp_path):
  out = tmp_path / "bench.json"
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", cpu_defaults.OPT_OUT, cpu_defaults.REEXEC_MARKER)}
  env.update(JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--quick", "--parts=peer", "--configs=digits,cifar32",
       f"--torch_python={tmp_path}/missing/python", f"--out={out}"], cwd=tmp_path, env=env,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "mmd_jax: CPU defaults:" in proc.stderr  # said once, before the restart
  res = json.loads(out.read_text())
  state = res["env"]["cpu_defaults"]
  assert state["GLIBC_TUNABLES"] == "added by the CPU defaults"
  assert cpu_defaults.GLIBC_SETTING in res["env"]["GLIBC_TUNABLES"]
  if cpu_defaults._xla_knows_flag():
    assert state["XLA_FLAGS"] == "added by the CPU defaults"
    assert cpu_defaults.XLA_SETTING in res["env"]["XLA_FLAGS"]
  assert set(res["peer"]) == {"digits", "cifar32"}
  assert all(p["skipped"] for p in res["peer"].values()) and res["ours_over_peer"] == {}
  assert "CPU defaults (mmd_jax/cpu_defaults.py): on" in proc.stdout
  assert "PEER SKIPPED (32x32)" in proc.stdout


def test_the_peers_digits_widths_follow_the_digits_config():
  """bench_peer_torch.py runs without mmd_jax, so its digits widths are written out: they must
  be configs/digits.py's (the ours/peer ratio compares equal networks)."""
  from mmd_jax import config_lib
  from mmd_jax.models import unet
  path = os.path.join(helpers.REPO, "experiments", "bench_peer_torch.py")
  spec = importlib.util.spec_from_file_location("bench_peer_torch", path)
  peer = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(peer)
  model = config_lib.load_config_file(helpers.DIGITS).model
  widths = tuple(model.base_channels * m for m in model.channel_mult)
  shape = peer.SHAPES["digits"]
  assert shape["block_out_channels"] == widths
  assert shape["layers_per_block"] == model.num_res_blocks
  assert shape["attention_head_dim"] == model.head_dim
  assert {unet.group_count(w) for w in widths} == {shape["norm_num_groups"]}
