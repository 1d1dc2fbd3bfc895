"""Ahead-of-time compilation for a TPU slice on this CPU machine (needs libtpu, from
`pip install "jax[tpu]==0.10.2"`), the print_sharding mode, and the fit/MFU arithmetic."""
import os
import subprocess
import sys
import types

import pytest

from mmd_jax import config_lib
from mmd_jax.tools import aot, cli
from mmd_jax.parallel.mesh import MeshError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, arg="runlocal", **overrides):
  config = config_lib.load_config_file(os.path.join(REPO, "configs", name), arg)
  return config_lib.apply_overrides(config, overrides)


def test_small_teacher_step_compiles_for_a_tpu_topology():
  # The smallest UNet that still has every kind of layer (conv, res, attention, class table).
  config = _config("imagenet64.py", **{"model.channel_mult": (1,), "model.attn_resolutions": (),
                                       "model.base_channels": 8, "model.head_dim": 8})
  row = aot.run_aot(config, topology="v5e:2x2")
  assert row["devices"] == 4 and row["chip"] == "v5e" and row["program"] == "teacher"
  assert row["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  assert row["hbm_bytes"] == 16 * 2**30 and row["fits"]
  assert 0 < row["argument_bytes"] and 0 < row["temp_bytes"] < 2**30
  assert row["flops_per_device"] > 0
  assert "fits with 10% headroom" in aot.format_row(row)
  # Wall and CPU seconds of lowering and compiling (on a shared machine they differ a lot).
  assert row["compile_cpu_seconds"] > 0 and row["lower_seconds"] > 0
  assert row["compile_seconds"] > 0
  assert "s CPU" in aot.format_row(row)


def test_fit_and_mfu_arithmetic():
  mem = types.SimpleNamespace(argument_size_in_bytes=40 * 2**30, output_size_in_bytes=40 * 2**30,
                              alias_size_in_bytes=40 * 2**30, temp_size_in_bytes=50 * 2**30,
                              generated_code_size_in_bytes=0)
  compiled = types.SimpleNamespace(memory_analysis=lambda: mem, cost_analysis=lambda: {
      "flops": 459e12 * 0.5, "optimal_seconds": 1.0})
  row = aot.analyse(compiled, topology="v5p:4x4x4", devices=[object()] * 64, num_params=1,
                    batch_size=1, compile_seconds=0.0)
  assert row["peak_bytes"] == 90 * 2**30 and row["hbm_bytes"] == 95 * 2**30
  assert not row["fits"]  # 90 GiB > 0.9 * 95 GiB
  assert row["est_mfu"] == pytest.approx(0.5)
  mem.temp_size_in_bytes = 40 * 2**30
  assert aot.analyse(compiled, topology="v5p:4x4x4", devices=[object()] * 64, num_params=1,
                     batch_size=1, compile_seconds=0.0)["fits"]


def test_bad_topology_and_batch_fail_before_compiling():
  with pytest.raises(aot.AotError, match="Unknown TPU generation"):
    aot.run_aot(_config("imagenet64.py"), topology="v9z:2x2")
  with pytest.raises(aot.AotError, match="GEN:AxB"):
    aot.num_chips("v5p-128")
  with pytest.raises(MeshError, match="batch_size=6 does not divide"):
    aot.run_aot(_config("imagenet64.py", **{"training.batch_size": 6}), topology="v5e:2x2")


def test_print_sharding_for_a_pod_config_on_this_machine(capsys):
  text = cli.print_sharding(_config("imagenet64_distill.py", ""), topology="v5p:4x4x4")
  assert "mesh {'data': 4, 'fsdp': 16, 'tensor': 1}" in text
  assert "params/conv_in/kernel" in text and "(conv_height, conv_width, conv_in, conv_out)" in text
  assert "388.34M values" in text
  for part in ("opt_state", "aux_params", "teacher (arg)"):
    assert part in text


def test_main_cli_modes_report_user_errors_without_traceback(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "mmd_jax.main", f"--config={REPO}/configs/t2i512.py:runlocal",
       f"--workdir={tmp_path}", "--mode=aot"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 2 and "needs --topology" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_aot_report_table_has_compile_times():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "aot_report", os.path.join(REPO, "experiments", "aot_report.py"))
  report = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(report)
  row = dict(program="distill/alternating", topology="v5p:4x4x4", mesh={"data": 4, "fsdp": 16},
             num_params=388e6, batch_size=2048, dtype="bfloat16", remat=True,
             argument_bytes=2**30, output_bytes=2**30, temp_bytes=2**31, peak_bytes=3 * 2**30,
             hbm_bytes=95 * 2**30, fits=True, flops_per_device=1e13, est_step_seconds=0.25,
             est_mfu=0.5, compile_seconds=3600.0, compile_cpu_seconds=1800.0)
  lines = report.table([row]).splitlines()
  assert len(lines) == 3 and lines[0].count("|") == lines[2].count("|")
  assert "| 4x16 | 388M | 2048 |" in lines[2] and "| yes |" in lines[2]
  assert lines[2].endswith("| 0.250 | 50% | 3600 (1800) |")
