"""Where every parameter lives on the mesh: logical axis rules (data), a regex fallback, notes.

A parameter created by the models carries one logical name per dimension (see
mmd_jax.models.embeddings). `config.mesh.rules` maps logical names to mesh axes; by default the
model family's rules (embeddings.default_logical_rules), which the config may override name by
name, e.g. `--config.mesh.rules="conv_out=none,embed=fsdp+tensor"`.

A leaf without logical names (an imported checkpoint, an optimizer counter) goes through
`config.mesh.fallback_rules`: (path regex, how) pairs, first match wins, where `how` is
  'auto'       the largest dimension divisible by the fsdp axis is split over fsdp (big_vision's
               FSDP strategy), everything else replicated;
  'replicate'  replicated;
  'A,B,...'    one entry per dimension: a mesh axis, 'none', or axes joined by '+'.
Scalars are always replicated.

A dimension that does not divide by its mesh axes is replicated with a logged note, or, with
`config.mesh.strict=True`, is an error naming the parameter, the dimension and the axis. With
`config.mesh.fsdp_fill=True` (default) a parameter whose rules leave the fsdp axis unused gets it
on its largest divisible replicated dimension, so FSDP memory scales as 1/fsdp for every leaf.

On a mesh whose data, fsdp and tensor axes are all > 1, the default rules leave `conv_out`
unsplit (avoid_xla_conv_grad_bug: XLA's SPMD partitioner returns wrong conv input gradients
there); naming `conv_out` in `config.mesh.rules` overrides this.

Everything here is a pure function of shapes and axis sizes ({"data": 8, "fsdp": 1, ...}), so the
decisions can be tested as data and printed for a pod on a laptop.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mmd_jax.parallel.mesh import MESH_AXES, MeshError

FSDP_AXIS = "fsdp"
DEFAULT_FALLBACK = ((r".*", "auto"),)

Axes = tuple[str, ...]  # mesh axes of one dimension; () = replicated


class ShardingRuleError(MeshError):
  """A sharding rule that cannot be applied: unknown logical name, bad axis, strict divisibility."""


# ----------------------------------------------------------------------------------------------
# Rules as data
# ----------------------------------------------------------------------------------------------

def _axes_of(value, *, where: str) -> Axes:
  if value is None:
    return ()
  if isinstance(value, str):
    parts = [p.strip() for p in value.split("+") if p.strip()]
    if len(parts) == 1 and parts[0].lower() in ("none", "null", "replicate", ""):
      return ()
  else:
    parts = list(value)
  bad = [p for p in parts if p not in MESH_AXES]
  if bad:
    raise ShardingRuleError(f"{where}: mesh axis {bad[0]!r} is not one of {MESH_AXES} "
                            "(use 'none' to replicate, 'fsdp+tensor' for two axes).")
  return tuple(parts)


def parse_rules(spec, *, base: Iterable[tuple[str, Any]]) -> dict[str, Axes]:
  """Logical name -> mesh axes: `base` (the model's defaults) updated by `spec`.

  spec: '' / None (the defaults), 'name=axis,name=none,name=fsdp+tensor', or a sequence of
  (name, axis | None | tuple of axes) pairs. A name unknown to `base` is an error (a typo would
  otherwise silently replicate that dimension).
  """
  rules = {name: _axes_of(axes, where=f"model logical rule {name!r}") for name, axes in base}
  for name, axes in _rule_pairs(spec):
    if name not in rules:
      raise ShardingRuleError(f"config.mesh.rules: unknown logical axis {name!r}; the model's "
                              f"names are {sorted(rules)}.")
    rules[name] = _axes_of(axes, where=f"config.mesh.rules {name}")
  return rules


def _rule_pairs(spec) -> list[tuple[str, Any]]:
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    return []
  if not isinstance(spec, str):
    return [tuple(p) for p in spec]
  pairs = []
  for item in spec.split(","):
    if not item.strip():
      continue
    if "=" not in item:
      raise ShardingRuleError(f"config.mesh.rules: cannot parse {item!r}; write NAME=AXIS, "
                              "e.g. 'conv_out=tensor,embed=none'.")
    name, axes = item.split("=", 1)
    pairs.append((name.strip(), axes.strip()))
  return pairs


# XLA's SPMD partitioner (jax 0.10.2 and 0.11.2, Shardy and GSPMD) can return a conv's input
# gradient with its batch shards permuted when the batch is split over data x fsdp and the kernel
# over fsdp (in) x tensor (out): experiments/xla_repros/spmd_conv_grad_batch_order.py, asserted
# still failing by tests/test_sharding.py. Drop this when that test reports XLA fixed it.
XLA_CONV_GRAD_BUG_NAMES = ("conv_out",)
XLA_CONV_GRAD_BUG_NOTE = ("conv_out not over tensor: XLA bug, "
                          "experiments/xla_repros/spmd_conv_grad_batch_order.py")


def avoid_xla_conv_grad_bug(rules: dict[str, Axes], axis_sizes, *,
                            explicit: Iterable[str] = ()) -> dict[str, Axes]:
  """`rules` without the tensor axis on conv_out when data, fsdp and tensor are all > 1, unless
  config.mesh.rules named conv_out (`explicit`)."""
  if not all(int(axis_sizes.get(a, 1)) > 1 for a in MESH_AXES):
    return rules
  out = dict(rules)
  for name in XLA_CONV_GRAD_BUG_NAMES:
    if name in out and name not in explicit:
      out[name] = tuple(a for a in out[name] if a != "tensor")
  return out


def parse_fallback(spec) -> tuple[tuple[str, str], ...]:
  """(regex, how) pairs from a sequence, or from 'REGEX:HOW;REGEX:HOW'; '' -> the default."""
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    return DEFAULT_FALLBACK
  if isinstance(spec, str):
    pairs = []
    for item in spec.split(";"):
      if not item.strip():
        continue
      regex, sep, how = item.rpartition(":")
      if not sep:
        raise ShardingRuleError(f"config.mesh.fallback_rules: cannot parse {item!r}; write "
                                "REGEX:HOW with HOW in auto | replicate | axis,axis,...")
      pairs.append((regex.strip(), how.strip()))
  else:
    pairs = [tuple(p) for p in spec]
  for regex, how in pairs:
    try:
      re.compile(regex)
    except re.error as e:
      raise ShardingRuleError(f"config.mesh.fallback_rules: bad regex {regex!r}: {e}") from None
    if how not in ("auto", "replicate"):
      for part in how.split(","):
        _axes_of(part, where=f"config.mesh.fallback_rules {regex!r}")
  return tuple(pairs)


# ----------------------------------------------------------------------------------------------
# One leaf
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Decision:
  """Where one leaf lives: per-dimension mesh axes, and why."""
  path: str
  shape: tuple[int, ...]
  dtype: str
  names: tuple[str, ...] | None  # logical names; None if the leaf had none
  axes: tuple[Axes, ...]         # per dimension
  source: str                    # 'rules', 'fallback <regex>' or 'scalar'
  notes: tuple[str, ...] = ()

  @property
  def spec(self) -> P:
    entries = [None if not a else (a[0] if len(a) == 1 else a) for a in self.axes]
    while entries and entries[-1] is None:
      entries.pop()
    return P(*entries)

  def shards(self, axis_sizes) -> int:
    return math.prod(axis_sizes[a] for axes in self.axes for a in axes)

  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

  def per_device_bytes(self, axis_sizes) -> int:
    return -(-self.nbytes() // self.shards(axis_sizes))


def _check_divisible(*, path, shape, axes, names, axis_sizes, strict, notes):
  """Replicates (or, strict, refuses) dimensions that do not divide over their mesh axes."""
  out, used = [], set()
  for i, (size, dim_axes) in enumerate(zip(shape, axes)):
    label = f"dim {i} ({names[i]}={size})" if names else f"dim {i} (size {size})"
    keep = []
    for a in dim_axes:
      if axis_sizes.get(a, 1) == 1:  # a size-1 axis splits nothing: leave the dim free
        continue
      if a in used:
        notes.append(f"{label}: mesh axis {a!r} already used by another dimension; replicated")
        continue
      keep.append(a)
    n = math.prod(axis_sizes[a] for a in keep)
    if keep and size % n:
      msg = (f"{label} does not divide over mesh axis {'+'.join(keep)}="
             f"{n}")
      if strict:
        raise ShardingRuleError(
            f"Parameter {path} {tuple(shape)}: {msg}. Change config.mesh (sizes or rules) or set "
            "config.mesh.strict=False to replicate such dimensions.")
      notes.append(msg + "; replicated")
      keep = []
    used.update(keep)
    out.append(tuple(keep))
  return tuple(out)


def _largest_divisible(shape, axes, n) -> int | None:
  best = None
  for i, size in enumerate(shape):
    if not axes[i] and size % n == 0 and size >= n and (best is None or size > shape[best]):
      best = i
  return best


def decide(*, path: str, shape: Sequence[int], dtype, names: Sequence[str] | None,
           rules: dict[str, Axes], axis_sizes: dict[str, int], fallback=DEFAULT_FALLBACK,
           strict: bool = False, fsdp_fill: bool = True) -> Decision:
  """The Decision for one leaf (see the module docstring)."""
  shape = tuple(int(s) for s in shape)
  dtype = str(np.dtype(dtype))
  notes: list[str] = []
  if not shape:
    return Decision(path, shape, dtype, None, (), "scalar")
  fsdp = int(axis_sizes.get(FSDP_AXIS, 1))
  if names is not None:
    names = tuple(names)
    if len(names) != len(shape):
      raise ShardingRuleError(f"Parameter {path} has shape {shape} but {len(names)} logical "
                              f"names {names}.")
    for i, name in enumerate(names):
      if name is not None and name not in rules:
        raise ShardingRuleError(
            f"Parameter {path} dim {i} has logical axis {name!r}, which no rule maps "
            f"(known: {sorted(rules)}). Add '{name}=AXIS' (or '{name}=none') to "
            "config.mesh.rules.")
    axes = tuple(rules[n] if n is not None else () for n in names)
    source = "rules"
  else:
    how, source = "replicate", "fallback (no match)"
    for regex, h in fallback:
      if re.search(regex, path):
        how, source = h, f"fallback {regex}"
        break
    if how == "auto":
      axes = tuple(() for _ in shape)
      i = _largest_divisible(shape, axes, fsdp) if fsdp > 1 else None
      if i is not None:
        axes = tuple((FSDP_AXIS,) if j == i else () for j in range(len(shape)))
    elif how == "replicate":
      axes = tuple(() for _ in shape)
    else:
      parts = how.split(",")
      if len(parts) != len(shape):
        raise ShardingRuleError(f"config.mesh.fallback_rules {regex!r}: {how!r} has "
                                f"{len(parts)} entries but {path} has shape {shape}.")
      axes = tuple(_axes_of(p, where=f"config.mesh.fallback_rules {regex!r}") for p in parts)
  axes = _check_divisible(path=path, shape=shape, axes=axes, names=names,
                          axis_sizes=axis_sizes, strict=strict, notes=notes)
  if fsdp_fill and fsdp > 1 and not any(FSDP_AXIS in a for a in axes):
    i = _largest_divisible(shape, axes, fsdp)
    if i is not None:
      axes = tuple(a + (FSDP_AXIS,) if j == i else a for j, a in enumerate(axes))
      notes.append(f"fsdp_fill: dim {i} over fsdp")
  return Decision(path, shape, dtype, names, axes, source, tuple(notes))


# ----------------------------------------------------------------------------------------------
# Trees
# ----------------------------------------------------------------------------------------------

def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def path_str(path) -> str:
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  return "/".join(parts)


def decide_tree(tree, *, rules: dict[str, Axes], axis_sizes: dict[str, int],
                fallback=DEFAULT_FALLBACK, strict: bool = False, fsdp_fill: bool = True,
                explicit_rules: Iterable[str] = ()):
  """A tree of Decisions shaped like nn.unbox(tree). Leaves may be boxed (nn.Partitioned, with
  logical names) or plain arrays / ShapeDtypeStructs (regex fallback).

  explicit_rules: the logical names config.mesh.rules set; avoid_xla_conv_grad_bug leaves them.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)
  safe = avoid_xla_conv_grad_bug(rules, axis_sizes, explicit=explicit_rules)
  changed = {n for n in rules if safe[n] != rules[n]}
  out = []
  for path, leaf in leaves:
    names = None
    if _is_box(leaf):
      names = tuple(getattr(leaf, "names", ()) or ()) or None
      leaf = leaf.value
    d = decide(path=path_str(path), shape=np.shape(leaf), dtype=leaf.dtype, names=names,
               rules=safe, axis_sizes=axis_sizes, fallback=fallback, strict=strict,
               fsdp_fill=fsdp_fill)
    if changed.intersection(names or ()):
      d = dataclasses.replace(d, notes=d.notes + (XLA_CONV_GRAD_BUG_NOTE,))
    out.append(d)
  return jax.tree_util.tree_unflatten(treedef, out)


def is_decision(x) -> bool:
  return isinstance(x, Decision)


def decisions_list(decisions_tree) -> list[Decision]:
  return jax.tree_util.tree_leaves(decisions_tree, is_leaf=is_decision)


def to_shardings(decisions_tree, mesh):
  """NamedShardings for a tree of Decisions."""
  return jax.tree_util.tree_map(lambda d: NamedSharding(mesh, d.spec), decisions_tree,
                                is_leaf=is_decision)


def options_from_config(mesh_config, *, model_rules) -> dict:
  """Keyword arguments of decide_tree (less axis_sizes) from config.mesh."""
  get = mesh_config.get if hasattr(mesh_config, "get") else (lambda k, d=None: d)
  spec = get("rules", "")
  return dict(rules=parse_rules(spec, base=model_rules),
              fallback=parse_fallback(get("fallback_rules", "")),
              strict=bool(get("strict", False)), fsdp_fill=bool(get("fsdp_fill", True)),
              explicit_rules=frozenset(name for name, _ in _rule_pairs(spec)))


def log_notes(decisions_tree, *, limit: int = 20) -> int:
  """Logs the replication/fill notes of a tree of Decisions (once per path); returns the count."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  rows = [(d.path, n) for d in decisions_list(decisions_tree) for n in d.notes
          if not n.startswith("fsdp_fill") and n != XLA_CONV_GRAD_BUG_NOTE]
  workaround = sum(n == XLA_CONV_GRAD_BUG_NOTE for d in decisions_list(decisions_tree)
                   for n in d.notes)
  if workaround:
    logging.info("sharding note: %d parameters: %s; set config.mesh.rules='conv_out=tensor' to "
                 "split them anyway", workaround, XLA_CONV_GRAD_BUG_NOTE)
  for path, note in rows[:limit]:
    logging.info("sharding note: %s: %s", path, note)
  if len(rows) > limit:
    logging.info("sharding notes: %d more (see --mode=print_sharding)", len(rows) - limit)
  return len(rows)


def tree_shardings(abstract_tree, *, mesh, model_rules, mesh_config=None, log: bool = True):
  """NamedShardings for a (boxed) abstract tree on `mesh`, from the model's rules and config.mesh."""
  opts = options_from_config(mesh_config if mesh_config is not None else {},
                             model_rules=model_rules)
  decisions = decide_tree(abstract_tree, axis_sizes=dict(mesh.shape), **opts)
  if log:
    log_notes(decisions)
  return to_shardings(decisions, mesh)
