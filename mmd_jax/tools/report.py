"""Human-readable tables: every parameter's sharding, and memory per device.

`sharding_table` lists, per leaf: path, shape, logical names, mesh PartitionSpec, bytes per device,
and the notes (replicated because not divisible, fsdp_fill, fallback rule). `memory_table` sums
groups of leaves (params, optimizer state, EMA, auxiliary, ...).
"""
from __future__ import annotations

import math

from mmd_jax.parallel import sharding as sharding_lib


def fmt_bytes(n: float) -> str:
  for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= div:
      return f"{n / div:.2f} {unit}"
  return f"{int(n)} B"


def _spec_str(decision) -> str:
  parts = []
  for axes in decision.axes:
    parts.append("+".join(axes) if axes else "-")
  return "(" + ", ".join(parts) + ")" if parts else "()"


def sharding_table(decisions_tree, *, axis_sizes: dict, title: str = "") -> str:
  rows = sharding_lib.decisions_list(decisions_tree)
  header = ("path", "shape", "logical", "mesh", "bytes/device", "notes")
  table = [header]
  for d in rows:
    logical = "(" + ", ".join(n or "-" for n in d.names) + ")" if d.names else (
        "-" if not d.shape else d.source)
    notes = "; ".join(d.notes)
    table.append((d.path, "x".join(map(str, d.shape)) or "scalar", logical, _spec_str(d),
                  fmt_bytes(d.per_device_bytes(axis_sizes)), notes))
  widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
  lines = []
  if title:
    lines.append(title)
  for i, r in enumerate(table):
    lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1])
    if i == 0:
      lines.append("  ".join("-" * w for w in widths) + "  " + "-----")
  total = sum(d.nbytes() for d in rows)
  per_dev = sum(d.per_device_bytes(axis_sizes) for d in rows)
  n = sum(math.prod(d.shape) for d in rows)
  lines.append(f"{len(rows)} leaves, {n / 1e6:.2f}M values, {fmt_bytes(total)} in total, "
               f"{fmt_bytes(per_dev)} per device on mesh {axis_sizes}")
  return "\n".join(lines)


def memory_rows(groups: dict, *, axis_sizes: dict) -> list[dict]:
  """[{group, total_bytes, per_device_bytes}] for named trees of Decisions."""
  out = []
  for name, tree in groups.items():
    rows = sharding_lib.decisions_list(tree)
    out.append(dict(group=name, total_bytes=sum(d.nbytes() for d in rows),
                    per_device_bytes=sum(d.per_device_bytes(axis_sizes) for d in rows)))
  return out


def memory_table(groups: dict, *, axis_sizes: dict) -> str:
  rows = memory_rows(groups, axis_sizes=axis_sizes)
  lines = [f"{'state part':<16}{'total':>14}{'per device':>14}"]
  for r in rows:
    lines.append(f"{r['group']:<16}{fmt_bytes(r['total_bytes']):>14}"
                 f"{fmt_bytes(r['per_device_bytes']):>14}")
  lines.append(f"{'all':<16}{fmt_bytes(sum(r['total_bytes'] for r in rows)):>14}"
               f"{fmt_bytes(sum(r['per_device_bytes'] for r in rows)):>14}")
  return "\n".join(lines)
