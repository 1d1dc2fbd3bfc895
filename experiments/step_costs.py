"""XLA's FLOPs per training step of every distillation variant's own step programs, and the
measured wall time per step of finished runs.

    python experiments/step_costs.py --config=configs/digits.py --data_dir=DIR \
        [--pipeline=WORKDIR] [--ks=8]

For each registered variant (and k in --ks) it lowers the programs the loop runs
(mmd_jax.tools.aot.lower_programs: the same programs, hashed alike) on this machine's devices,
compiles them and prints XLA's cost_analysis FLOPs (a step of progressive distillation is one of
its two programs: round 0 with the real teacher, or a later round; their FLOPs are equal when
the teacher has the student's architecture). With --pipeline it also reads every
students/<variant>_k<k>/metrics.jsonl there and prints the median logged steps/s (wall time on
a machine that may have been shared: an upper bound on the cost).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmd_jax import config_lib  # pylint: disable=wrong-import-position
from mmd_jax.distill import steps  # pylint: disable=wrong-import-position
from mmd_jax.tools import aot  # pylint: disable=wrong-import-position


def flops_per_step(config) -> list[tuple[str, float]]:
  out = []
  for program in aot.lower_programs(config, jax.devices(), kind="student"):
    cost = program.lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out.append((program.name, float(cost.get("flops", float("nan")))))
  return out


def wall_per_step(workdir: str) -> float | None:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  rates = [json.loads(l).get("steps_per_sec") for l in open(path)]
  rates = [r for r in rates if r]
  return 1.0 / float(np.median(rates)) if rates else None


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/digits.py")
  p.add_argument("--data_dir", default="")
  p.add_argument("--pipeline", default="", help="a pipeline work directory with students/")
  p.add_argument("--ks", default="8")
  args = p.parse_args(argv)
  print("| variant | k | batch | program | GFLOP/step | wall s/step (median, from the run) |")
  print("|---|---|---|---|---|---|")
  for variant in steps.VARIANTS:
    for k in (int(x) for x in args.ks.split(",")):
      config = config_lib.load_config_file(args.config.split(":")[0],
                                           args.config.partition(":")[2])
      config = config_lib.apply_overrides(config, {
          "data.data_dir": args.data_dir, "distill.variant": variant,
          "distill.num_student_steps": k})
      wall = wall_per_step(os.path.join(args.pipeline, "students", f"{variant}_k{k}")
                           ) if args.pipeline else None
      for name, flops in flops_per_step(config):
        print(f"| {variant} | {k} | {config.distill.batch_size} | {name} | {flops / 1e9:.3f} | "
              f"{'' if wall is None else f'{wall:.3f}'} |", flush=True)


if __name__ == "__main__":
  main()
