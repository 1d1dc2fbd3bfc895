"""Runs a config file's sweep locally, one run (and one work directory) per override dict, and
ends with one summary of every member's final evaluation.

  python experiments/sweep.py --config=configs/digits.py[:ARG] --workdir=/tmp/sweep [--dry_run]
  python experiments/sweep.py --summarize --workdir=/tmp/sweep [--metric=class_acc]

The config file defines `sweep() -> list[dict]` of dotted-key overrides. Each run is the normal
command line, `python -m mmd_jax.main --config=... --workdir=WORKDIR/<i>_<k=v...> --config.k=v`,
so a sweep member resumes like any run when the sweep is started again.

WORKDIR/sweep.json records the members, their overrides and the exit code of each member's last
run. The summary (WORKDIR/sweep_summary.{md,json,png}) collects each member's final evaluation:
WORKDIR/<member>/final_eval.json for a teacher or student run, WORKDIR/<member>/comparison.json
for a pipeline (the digits config's default mode). A member is `done` (final evaluation present),
`failed (exit N)` (its last run exited with N != 0), `running` (checkpoints, no final evaluation
yet), `interrupted` (the same, but the sweep that ran it is gone) or `not started`. The plot shows
the metric (--metric, default fd_pixels) against the swept value with the most distinct values,
one panel per method and number of steps, one line per setting of the other swept values.
`--summarize` rebuilds and prints the summary from the directory alone.
"""
from __future__ import annotations

import glob
import math
import os
import re
import socket
import subprocess
import sys
import time

from absl import app, flags

from mmd_jax import config_lib, io_utils

# The tests load this file more than once into one process; absl flags are defined once.
if "summarize" not in flags.FLAGS:
  flags.DEFINE_string("config", None, "Config file with a sweep() function, optionally :ARG.")
  flags.DEFINE_string("workdir", None, "Parent work directory; one subdirectory per run.")
  flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")
  flags.DEFINE_bool("summarize", False, "Only print (and rewrite) the summary of --workdir.")
  flags.DEFINE_string("metric", "fd_pixels", "The metric of the summary's plot, e.g. class_acc, fid.")
  flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS

MANIFEST = "sweep.json"
SUMMARY = "sweep_summary"
# Columns of the summary table, in this order, when any member's evaluation has them.
METRICS = ("fd_pixels", "class_acc", "fid", "standin_fd", "inception_score", "precision",
           "recall", "standin_is")
_MEMBER_RE = re.compile(r"^(\d{3})_(.*)$")


class SweepError(ValueError):
  """Bad input to the sweep launcher; reported in one line with exit code 2."""


def run_name(index: int, overrides: dict) -> str:
  text = ",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(overrides.items()))
  return f"{index:03d}_" + re.sub(r"[^A-Za-z0-9_.=,-]", "_", text)


def members(config_arg: str, workdir: str) -> list[dict]:
  """One dict per member: name, overrides and the command that runs it."""
  path = config_arg.split(":", 1)[0]
  module = config_lib.load_module(path)
  if not hasattr(module, "sweep"):
    raise config_lib.ConfigError(f"{path} defines no sweep() function.")
  base = config_lib.load_config_file(path, config_arg.split(":", 1)[1] if ":" in config_arg else "")
  out = []
  for i, overrides in enumerate(module.sweep()):
    config_lib.apply_overrides(base, overrides)  # unknown keys fail here, before any run starts
    name = run_name(i, overrides)
    cmd = [sys.executable, "-m", "mmd_jax.main", f"--config={config_arg}",
           f"--workdir={os.path.join(workdir, name)}"]
    cmd += [f"--config.{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
            for k, v in overrides.items()]
    out.append({"name": name, "overrides": dict(overrides), "command": cmd})
  return out


def commands(config_arg: str, workdir: str) -> list[list[str]]:
  return [m["command"] for m in members(config_arg, workdir)]


def _json_value(v):
  return list(v) if isinstance(v, tuple) else v


def run_sweep(sweep_members: list[dict], workdir: str, *, config_arg: str = "") -> list[str]:
  """Runs each member in turn, recording its exit code in WORKDIR/sweep.json before the next one
  starts; returns the names of the members that failed."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, MANIFEST)
  old = {m["name"]: m for m in (io_utils.read_json_or_none(path, what="sweep manifest",
                                                           missing_ok=True) or {}).get("members", [])}
  manifest = {"config": config_arg, "host": socket.gethostname(), "pid": os.getpid(),
              "members": [{"name": m["name"],
                           "overrides": {k: _json_value(v) for k, v in m["overrides"].items()},
                           "command": m["command"],
                           "exit_code": old.get(m["name"], {}).get("exit_code")}
                          for m in sweep_members]}
  io_utils.write_json_atomic(path, manifest)
  failed = []
  for i, (m, entry) in enumerate(zip(sweep_members, manifest["members"])):
    print(f"[{i + 1}/{len(sweep_members)}] {' '.join(m['command'])}", flush=True)
    entry.update(exit_code=None, started=time.time())
    io_utils.write_json_atomic(path, manifest)
    entry.update(exit_code=subprocess.call(m["command"]), finished=time.time())
    io_utils.write_json_atomic(path, manifest)
    if entry["exit_code"] != 0:
      failed.append(m["name"])
  return failed


def _parse_value(text: str):
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def _members_on_disk(workdir: str) -> tuple[list[dict], dict]:
  """The manifest's members, plus any NNN_k=v,... directory it does not list (its overrides are
  read back from the name: last key component, value as written)."""
  manifest = io_utils.read_json_or_none(os.path.join(workdir, MANIFEST), what="sweep manifest",
                                        missing_ok=True) or {}
  found = list(manifest.get("members", []))
  listed = {m["name"] for m in found}
  for name in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []:
    match = _MEMBER_RE.match(name)
    if match and name not in listed and os.path.isdir(os.path.join(workdir, name)):
      pairs = [p.split("=", 1) for p in match.group(2).split(",") if "=" in p]
      found.append({"name": name, "overrides": {k: _parse_value(v) for k, v in pairs},
                    "exit_code": None})
  return found, manifest


def _final_rows(member_dir: str) -> list[dict]:
  """The member's final evaluation, one row per method and sampler."""
  comparison = os.path.join(member_dir, "comparison.json")
  final = os.path.join(member_dir, "final_eval.json")
  for path, what in ((comparison, "pipeline comparison"), (final, "final evaluation")):
    rows = io_utils.read_json_or_none(path, what=what, missing_ok=True)
    if isinstance(rows, list) and rows:
      return [dict(r, method=r.get("method") or r.get("sampler", "?")) for r in rows]
  return []


def _has_checkpoints(member_dir: str) -> bool:
  """A checkpoints/ directory anywhere in the member (a pipeline has one per stage)."""
  return any(os.path.isdir(d) for d in glob.glob(os.path.join(member_dir, "**", "checkpoints"),
                                                 recursive=True))


def _sweep_alive(manifest: dict) -> bool:
  """Whether the sweep process that wrote the manifest still runs (unknown: assume it does)."""
  pid = manifest.get("pid")
  if not pid or manifest.get("host") != socket.gethostname():
    return True
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except OSError:  # e.g. PermissionError: it exists
    pass
  return True


def _status(member: dict, rows: list[dict], member_dir: str, manifest: dict) -> str:
  code = member.get("exit_code")
  if code not in (None, 0):
    return f"failed (exit {code})"
  if rows:
    return "done"
  if code == 0:
    return "finished without a final evaluation"
  if _has_checkpoints(member_dir):
    return "running" if _sweep_alive(manifest) else "interrupted"
  return "not started"


def _fmt(v) -> str:
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def collect(workdir: str, *, metric: str = "fd_pixels") -> dict:
  """The summary of the sweep in `workdir` (see the module docstring) as a JSON-able dict."""
  found, manifest = _members_on_disk(workdir)
  if not found:
    raise SweepError(f"no sweep members under {workdir!r}: neither {MANIFEST} nor NNN_* member "
                     "directories. Pass the --workdir of a sweep.")
  swept = []
  for m in found:
    swept += [k for k in m["overrides"] if k not in swept]
  out_members = []
  for m in found:
    member_dir = os.path.join(workdir, m["name"])
    rows = _final_rows(member_dir)
    out_members.append({
        "name": m["name"], "overrides": m["overrides"], "exit_code": m.get("exit_code"),
        "status": _status(m, rows, member_dir, manifest),
        "rows": [{k: r[k] for k in ("method", "sampler", "num_steps", "guidance", "step", *METRICS)
                  if k in r} for r in rows]})
  present = [k for k in METRICS if any(k in r for m in out_members for r in m["rows"])]
  return {"workdir": os.path.abspath(workdir), "metric": metric, "swept": swept,
          "metrics": ([metric] if metric in present else []) + [k for k in present if k != metric],
          "members": out_members}


def check_metric(summary: dict) -> None:
  """A metric that no finished member reports is a typo: say which ones there are."""
  if summary["metrics"] and summary["metric"] not in summary["metrics"]:
    raise SweepError(f"--metric={summary['metric']}: no member's final evaluation has it; "
                     f"choose one of {', '.join(summary['metrics'])}.")


def markdown(summary: dict) -> str:
  swept, metrics = summary["swept"], summary["metrics"]
  head = ["member", *swept, "status", "method", "steps", *metrics]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for m in summary["members"]:
    values = [_fmt(m["overrides"].get(k, "")) for k in swept]
    for r in m["rows"] or [{}]:
      steps = r.get("num_steps", "")
      if r.get("guidance"):
        steps = f"{steps} (guidance {r['guidance']:g})"
      cells = [m["name"], *values, m["status"], r.get("method", ""), str(steps),
               *[_fmt(r[k]) if k in r else "" for k in metrics]]
      lines.append("| " + " | ".join(cells) + " |")
  counts = {}
  for m in summary["members"]:
    key = m["status"].split(" (")[0]
    counts[key] = counts.get(key, 0) + 1
  tally = ", ".join(f"{n} {k}" for k, n in counts.items())
  note = (" fd_pixels / class_acc are stand-in metrics on pixels, not FID."
          if any(k in ("fd_pixels", "class_acc") for k in metrics) else "")
  return (f"Sweep {summary['workdir']}: {len(summary['members'])} members ({tally}).{note}\n\n"
          + "\n".join(lines) + "\n")


def _x_key(summary: dict) -> str | None:
  """The swept key for the plot's x axis: most distinct values, numeric ones first."""
  def distinct(k):
    return {repr(m["overrides"].get(k)) for m in summary["members"]}
  def numeric(k):
    return all(isinstance(m["overrides"].get(k), (int, float)) for m in summary["members"])
  keys = sorted(summary["swept"], key=lambda k: (-len(distinct(k)), not numeric(k)))
  return keys[0] if keys else None


def plot(summary: dict, path: str) -> bool:
  """metric against the swept value; False (and no file) when no member has the metric."""
  metric, x_key = summary["metric"], _x_key(summary)
  points = {}  # (method, steps, guidance) -> {other settings: [(x, y)]}
  for m in summary["members"]:
    others = ", ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in m["overrides"].items()
                       if k != x_key)
    x = m["overrides"].get(x_key, m["name"]) if x_key else m["name"]
    for r in m["rows"]:
      if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric]):
        panel = (r["method"], r.get("num_steps"), r.get("guidance") or 0)
        points.setdefault(panel, {}).setdefault(others, []).append((x, r[metric]))
  if not points:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  xs = [m["overrides"].get(x_key, m["name"]) if x_key else m["name"] for m in summary["members"]]
  numeric = all(isinstance(x, (int, float)) for x in xs)
  categories = list(dict.fromkeys(map(str, xs)))
  cols = min(3, len(points))
  rows = math.ceil(len(points) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  for ax, (panel, lines) in zip(axes.flat, points.items()):  # in the order of the tables
    for label, pts in sorted(lines.items()):
      pts = sorted(pts, key=lambda p: p[0] if numeric else categories.index(str(p[0])))
      px = [p[0] if numeric else categories.index(str(p[0])) for p in pts]
      ax.plot(px, [p[1] for p in pts], "o-", label=label or None)
    method, steps, guidance = panel
    ax.set_title(f"{method}, {steps} steps" + (f", guidance {guidance:g}" if guidance else ""),
                 fontsize=9)
    if numeric:  # every swept value gets a tick, so members without a point show as gaps
      ticks = sorted(set(xs))
      if ticks[0] > 0 and ticks[-1] / ticks[0] >= 10:
        ax.set_xscale("log")
      ax.set_xticks(ticks, [_fmt(t) for t in ticks], fontsize=7)
      ax.minorticks_off()
      span = (ticks[-1] - ticks[0]) or abs(ticks[0]) or 1.0
      if ax.get_xscale() == "linear":
        ax.set_xlim(ticks[0] - 0.08 * span, ticks[-1] + 0.08 * span)
    else:
      ax.set_xticks(range(len(categories)), categories, rotation=30, fontsize=7)
      ax.set_xlim(-0.5, len(categories) - 0.5)
    ax.set_xlabel(x_key or "member")
    ax.set_ylabel(metric + (" (stand-in)" if metric in ("fd_pixels", "class_acc") else ""))
    if any(lines):
      ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(points):]:
    ax.axis("off")
  missing = {}
  for m in summary["members"]:
    if not m["rows"]:
      key = m["status"].split(" (")[0]
      missing[key] = missing.get(key, 0) + 1
  note = ", ".join(f"{n} {k}" for k, n in missing.items())
  fig.suptitle(f"{metric} against {x_key or 'member'}; {len(summary['members'])} members"
               + (f", without results: {note} (see {SUMMARY}.md)" if note else ""), fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def summarize(workdir: str, *, metric: str = "fd_pixels", strict: bool = False) -> str:
  """Writes WORKDIR/sweep_summary.{md,json,png} and returns the markdown. strict: an unknown
  metric is an error (SweepError) rather than a summary without a plot."""
  summary = collect(workdir, metric=metric)
  if strict:
    check_metric(summary)
  text = markdown(summary)
  io_utils.write_text_atomic(os.path.join(workdir, SUMMARY + ".md"), text)
  io_utils.write_json_atomic(os.path.join(workdir, SUMMARY + ".json"), summary)
  png = os.path.join(workdir, SUMMARY + ".png")
  if plot(summary, png + ".tmp.png"):
    os.replace(png + ".tmp.png", png)
    text += f"\nPlot of {metric}: {png}\n"
  else:
    text += f"\nNo plot: no finished member reports {metric}.\n"
  return text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    if FLAGS.summarize:
      print(summarize(FLAGS.workdir, metric=FLAGS.metric, strict=True), flush=True)
      return
    if not FLAGS.config:
      raise SweepError("--config is required unless --summarize is given.")
    sweep_members = members(FLAGS.config, FLAGS.workdir)
    if FLAGS.dry_run:
      for i, m in enumerate(sweep_members):
        print(f"[{i + 1}/{len(sweep_members)}] {' '.join(m['command'])}", flush=True)
      return
    failed = run_sweep(sweep_members, FLAGS.workdir, config_arg=FLAGS.config)
    print("\n" + summarize(FLAGS.workdir, metric=FLAGS.metric), flush=True)
  except (SweepError, config_lib.ConfigError) as e:
    print(f"sweep error ({type(e).__name__}): {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  if failed:
    sys.exit(f"{len(failed)} sweep run(s) failed: {failed}")


if __name__ == "__main__":
  app.run(main)
