"""Markdown table of AOT results (the JSON files that `--mode=aot` writes into its --workdir).

    python -m mmd_jax.main --config=configs/imagenet64_distill.py --workdir=/tmp/aot/in64 \\
        --mode=aot --topology=v5p:4x4x4
    python experiments/aot_report.py /tmp/aot/*/aot_*.json

'compile s (CPU s)': XLA's compile, wall seconds on the machine that compiled and the CPU seconds
of all its threads (the TPU backend generates code on as many threads as there are cores; on a
shared machine the wall time also counts time spent waiting for a core).
"""
import json
import sys


def _gib(b):
  return f"{b / 2**30:.1f}"


def _compile_time(r) -> str:
  wall = f"{r['compile_seconds']:.0f}"
  return f"{wall} ({r['compile_cpu_seconds']:.0f})" if "compile_cpu_seconds" in r else wall


def table(rows) -> str:
  head = ("| program | topology | mesh | params | batch | dtype/remat | arg GiB | out GiB | "
          "temp GiB | peak GiB | HBM GiB | fits (10%) | FLOPs/step/chip | est. step s | MFU | "
          "compile s (CPU s) |")
  lines = [head, "|" + "---|" * 16]
  for r in rows:
    est, mfu = r["est_step_seconds"], r["est_mfu"]
    if est and est > 0:
      est_s, mfu_s = f"{est:.3f}", f"{mfu * 100:.0f}%"
    elif r.get("roofline_step_seconds", float("nan")) == r.get("roofline_step_seconds"):
      est_s = f">= {r['roofline_step_seconds']:.3f} (roofline)"
      mfu_s = f"<= {r['roofline_mfu'] * 100:.0f}%"
    else:
      est_s, mfu_s = "n/a", "n/a"
    mesh = "x".join(str(v) for v in r["mesh"].values())
    lines.append(
        f"| {r['program']} | {r['topology']} | {mesh} | {r['num_params'] / 1e6:.0f}M | "
        f"{r['batch_size']} | {r['dtype']}/{'remat' if r['remat'] else 'no remat'} | "
        f"{_gib(r['argument_bytes'])} | {_gib(r['output_bytes'])} | {_gib(r['temp_bytes'])} | "
        f"{_gib(r['peak_bytes'])} | {_gib(r['hbm_bytes'])} | {'yes' if r['fits'] else 'NO'} | "
        f"{r['flops_per_device']:.2e} | {est_s} | {mfu_s} | {_compile_time(r)} |")
  return "\n".join(lines)


if __name__ == "__main__":
  print(table([json.load(open(p)) for p in sys.argv[1:]]))
