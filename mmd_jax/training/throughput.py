"""Throughput of a compiled step, as pod users read it: examples/s, FLOP/s per device and MFU.

FLOPs are the lowered program's own (jax.stages.Lowered.cost_analysis(): XLA's count over the
program before optimisation, rematerialisation included, the same on every backend). The compiled
program's count is not used: on a GPU, convolutions and matmuls compile to cuDNN/cuBLAS library
calls that XLA's cost model does not count (measured on an H200: 1.1e12 FLOPs for a teacher step
whose lowered count is 1.07e14). MFU is achieved FLOP/s per device over the device's peak: the dense
bfloat16 peak of an accelerator from PEAKS (vendor datasheets, matched on jax's device_kind),
or on a CPU a float32 matmul measured once per process (there is no datasheet number for a
shared CPU, and its practical rate depends on the threads it gets).
"""
from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp

# Dense (no sparsity) bfloat16 peak FLOP/s per device. The first entry whose key is a substring
# of the lower-cased device_kind wins, so the more specific keys come first.
PEAKS: tuple[tuple[str, float, str], ...] = (
    ("h200 nvl", 835e12, "NVIDIA H200 NVL datasheet, dense BF16"),
    ("h200", 989e12, "NVIDIA H200 SXM datasheet, dense BF16"),
    ("h100 pcie", 756e12, "NVIDIA H100 PCIe datasheet, dense BF16"),
    ("h100 nvl", 835e12, "NVIDIA H100 NVL datasheet, dense BF16"),
    ("h100", 989e12, "NVIDIA H100 SXM datasheet, dense BF16"),
    ("gh200", 989e12, "NVIDIA GH200 datasheet, dense BF16"),
    ("b200", 2250e12, "NVIDIA B200 datasheet, dense BF16"),
    ("a100", 312e12, "NVIDIA A100 datasheet, dense BF16"),
    ("l40s", 362e12, "NVIDIA L40S datasheet, dense BF16"),
    ("l4", 121e12, "NVIDIA L4 datasheet, dense BF16"),
    ("a10g", 70e12, "NVIDIA A10G (AWS), dense BF16"),
    ("tpu v6 lite", 918e12, "Cloud TPU v6e, BF16"),
    ("tpu v6e", 918e12, "Cloud TPU v6e, BF16"),
    ("tpu v5 lite", 197e12, "Cloud TPU v5e, BF16"),
    ("tpu v5e", 197e12, "Cloud TPU v5e, BF16"),
    ("tpu v5p", 459e12, "Cloud TPU v5p, BF16"),
    ("tpu v5", 459e12, "Cloud TPU v5p, BF16"),
    ("tpu v4", 275e12, "Cloud TPU v4, BF16"),
    ("tpu v3", 123e12, "Cloud TPU v3, BF16 (per chip)"),
)
# The same numbers by TPU generation, for ahead-of-time reports (tools/aot.py).
TPU_PEAK_BF16 = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}


def _flops(cost) -> float:
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def flops_of(lowered) -> float:
  """FLOPs of one call of a lowered program, all devices together (divide by the device count
  for a sharded program); nan when no count can be made.

  Lowered.cost_analysis() is implemented only for backends without a PJRT plugin (the CPU);
  for GPU and TPU the same unoptimised module is counted with the CPU backend's cost model (the
  function behind Lowered.cost_analysis, a private one of jaxlib: hence the fallbacks)."""
  try:
    return _flops(lowered.cost_analysis())
  except NotImplementedError:
    pass
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    cpu = jax.local_devices(backend="cpu")[0].client
    module = lowered.compiler_ir("hlo").as_hlo_module()
    return _flops(_jax.hlo_module_cost_analysis(cpu, module))
  except Exception:  # noqa: BLE001 -- no CPU backend (JAX_PLATFORMS) or another jaxlib
    return float("nan")


def compiled_flops(compiled) -> float:
  """XLA's count for a compiled program, per device (library calls such as cuDNN/cuBLAS are not
  counted on a GPU; see the module docstring)."""
  try:
    return _flops(compiled.cost_analysis())
  except Exception:  # noqa: BLE001 -- some backends have no cost model
    return float("nan")


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(n: int = 1024, reps: int = 5) -> float:
  """float32 FLOP/s of a jitted n x n matmul on the default CPU device (best of `reps`)."""
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = math.inf
  for _ in range(reps):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def device_peak(device=None) -> tuple[float, str]:
  """(peak FLOP/s, where the number comes from) for `device` (default: the first device)."""
  device = device or jax.devices()[0]
  kind = str(getattr(device, "device_kind", "")).lower()
  if device.platform == "cpu":
    return measured_matmul_peak(), "float32 1024x1024 matmul measured at start-up (CPU)"
  for key, peak, source in PEAKS:
    if key in kind:
      return peak, source
  return float("nan"), f"no peak known for device kind {kind!r} (add it to PEAKS)"


class Meter:
  """Per-interval throughput of a loop: scalars(steps_per_sec=...) -> examples/s, FLOP/s per
  device and MFU (what is known).

  flops_per_step: per device, summed over one round of the programs the loop dispatches (the
  mean over programs when they alternate step by step)."""

  def __init__(self, *, batch_size: int, flops_per_step: float, device=None):
    self.batch_size = int(batch_size)
    self.flops_per_step = float(flops_per_step)
    self.peak, self.peak_source = device_peak(device)

  def scalars(self, *, steps_per_sec: float) -> dict:
    flops = self.flops_per_step * steps_per_sec
    out = {"examples_per_sec": self.batch_size * steps_per_sec}
    if math.isfinite(flops):
      out["flops_per_sec_per_device"] = flops
      if math.isfinite(self.peak) and self.peak > 0:
        out["mfu"] = flops / self.peak
    return out


def summary(scalars: dict) -> str:
  """'1.2e+03 ex/s  3.4 TFLOP/s/device  MFU 41.0%' from Meter.scalars (what is there)."""
  parts = []
  if "examples_per_sec" in scalars:
    parts.append(f"{scalars['examples_per_sec']:.4g} ex/s")
  if "flops_per_sec_per_device" in scalars:
    parts.append(f"{scalars['flops_per_sec_per_device'] / 1e12:.3g} TFLOP/s/device")
  if "mfu" in scalars:
    parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
  return "  ".join(parts)
