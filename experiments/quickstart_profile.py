"""Where the quickstart's wall time goes, from the log of one pipeline run.

    python -m mmd_jax.main --config=configs/digits.py --workdir=DIR 2>&1 | tee run.log
    python experiments/quickstart_profile.py run.log [other.log ...]   # one column per log

Each stage (teacher, each student) is split into: start-up (from the stage's first line to its
step compile), compile of the step program(s), training steps, periodic evaluations, and the
final evaluation of each sampler spec (its sampler's compile included), read from the absl
timestamps of the loop's log lines. The total is first line to last line. Two logs (e.g. a run
with MMD_JAX_CPU_DEFAULTS=0 and one without) give a before/after table.
"""
from __future__ import annotations

import re
import sys
from datetime import datetime

LINE = re.compile(r"^[IWE]\d{4} (\d\d:\d\d:\d\d\.\d+) +\d+ (\S+)\] (.*)$")
STAGE = re.compile(r"process \d+/\d+, ")
COMPILED = re.compile(r"(teacher|student) step compiled in")
STEP = re.compile(r"step (\d+)/(\d+) ")
EVAL = re.compile(r"eval (periodic|final) step \d+: \{'step': \d+, 'sampler': '(\w+)', "
                  r"'num_steps': (\d+)")


def _seconds(stamp: str) -> float:
  t = datetime.strptime(stamp, "%H:%M:%S.%f")
  return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6


def phases(path: str) -> dict[str, float]:
  """{phase name: seconds}, in order, plus 'total'."""
  events = []
  for raw in open(path, errors="replace"):
    m = LINE.match(raw.strip())
    if m:
      events.append((_seconds(m.group(1)), m.group(3)))
  if not events:
    raise SystemExit(f"{path}: no absl log lines")
  out: dict[str, float] = {}
  day = 0.0
  prev_t, stage, names = None, None, {"teacher": 0, "student": 0}

  def add(name, dt):
    out[name] = out.get(name, 0.0) + dt

  for t, text in events:
    if prev_t is not None and t + day < prev_t - 43200:  # past midnight
      day += 86400
    t += day
    dt = 0.0 if prev_t is None else t - prev_t
    if STAGE.search(text):
      stage = None
      phase = "between stages"
    elif m := COMPILED.search(text):
      kind = m.group(1)
      names[kind] += 1
      stage = kind if kind == "teacher" else f"student {names[kind]}"
      phase = f"{stage}: start-up + compile"
    elif STEP.search(text) and stage:
      phase = f"{stage}: training steps"
    elif m := EVAL.search(text):
      where = stage or "?"
      phase = (f"{where}: periodic evaluation" if m.group(1) == "periodic"
               else f"{where}: final {m.group(2)}:{m.group(3)}")
    else:
      phase = f"{stage}: other" if stage else "start-up (imports, restore, data; all stages)"
    add(phase, dt)
    prev_t = t
  out["total"] = prev_t - events[0][0]
  return out


def main(argv):
  if not argv:
    print(__doc__)
    return 2
  cols = [phases(p) for p in argv]
  keys = []
  for c in cols:
    keys += [k for k in c if k not in keys and k != "total"]
  keys.append("total")
  print("| phase | " + " | ".join(argv) + " |")
  print("|---|" + "---|" * len(argv))
  for k in keys:
    print(f"| {k} | " + " | ".join(f"{c.get(k, 0.0):.0f}" for c in cols) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
