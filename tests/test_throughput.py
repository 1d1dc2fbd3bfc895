"""Throughput accounting (mmd_jax.training.throughput) and the accelerator benchmark's quick mode
(experiments/bench_gpu.py), so that neither rots between the times a GPU is lent."""
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from mmd_jax.training import throughput

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _device(kind, platform="gpu"):
  return types.SimpleNamespace(device_kind=kind, platform=platform)


@pytest.mark.parametrize("kind, peak", [("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12),
                                        ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 80GB HBM3", 989e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v5p", 459e12),
                                        ("TPU v5 lite", 197e12), ("TPU v4", 275e12)])
def test_peak_is_looked_up_by_device_name(kind, peak):
  value, source = throughput.device_peak(_device(kind))
  assert value == peak and source


def test_unknown_device_has_no_peak_and_says_so():
  value, source = throughput.device_peak(_device("Some Future Chip"))
  assert value != value and "some future chip" in source


def test_flops_of_a_lowered_program_and_the_plugin_fallback():
  n = 32
  lowered = jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(jnp.ones((n, n)), jnp.ones((n, n)))
  direct = throughput.flops_of(lowered)
  assert direct >= 2 * n ** 3

  class PluginLowered:  # what a GPU/TPU (PJRT plugin) Lowered does: no cost_analysis
    def cost_analysis(self):
      raise NotImplementedError("Lowered.cost_analysis not implemented on platform 'cuda'")

    def compiler_ir(self, dialect):
      return lowered.compiler_ir(dialect)

  assert throughput.flops_of(PluginLowered()) == direct


def test_meter_turns_steps_per_second_into_examples_flops_and_mfu():
  meter = throughput.Meter(batch_size=128, flops_per_step=1e14, device=_device("NVIDIA H200"))
  s = meter.scalars(steps_per_sec=4.0)
  assert s["examples_per_sec"] == 512.0
  assert s["flops_per_sec_per_device"] == 4e14
  assert s["mfu"] == pytest.approx(4e14 / 989e12)
  assert "MFU 40.4%" in throughput.summary(s)
  nan_meter = throughput.Meter(batch_size=2, flops_per_step=float("nan"),
                               device=_device("NVIDIA H200"))
  assert nan_meter.scalars(steps_per_sec=1.0) == {"examples_per_sec": 2.0}


def test_gpu_benchmark_quick_mode_runs_every_part_on_cpu(tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, "experiments/bench_gpu.py", "--platform=cpu", "--quick",
                         f"--out={out}"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  res = json.loads(out.read_text())
  assert set(res["parts"]) == {"teacher", "alternating", "parameter_space", "sampling"}
  for name in ("teacher", "alternating", "parameter_space"):
    row = res["parts"][name]
    assert row["finite"] and row["step_s"] > 0 and row["flops_per_step"] > 0
    assert row["mfu"] > 0 and row["examples_per_s"] == pytest.approx(row["batch"] / row["step_s"])
  # a distillation step runs three networks: it costs more FLOPs than a teacher step
  assert res["parts"]["alternating"]["flops_per_step"] > res["parts"]["teacher"]["flops_per_step"]
  s = res["parts"]["sampling"]
  assert s["teacher"]["finite"] and s["student"]["finite"]
  assert s["student_over_teacher_images_per_s"] > 1
  assert "| teacher |" in proc.stdout and "MFU against" in proc.stdout
