"""Evaluation during and at the end of a run: samples per spec, the stand-in pixel metrics, sample
grids, WORKDIR/eval_results.jsonl, and the final evaluation's markdown table."""
from __future__ import annotations

import hashlib
import json
import os
import time

import jax
import numpy as np
from absl import logging
from etils import epath

from mmd_jax import io_utils
from mmd_jax.data import pipeline
from mmd_jax.evaluation import images as images_lib
from mmd_jax.evaluation import pixel_metrics, sampling
from mmd_jax.parallel import distributed
from mmd_jax.runs import common as runs_common
from mmd_jax.training import logging_lib


def caption_fn(text, labels, num_classes: int):
  """text_fn for sampling.generate: the real captions samples are conditioned on. With classes,
  the j-th sample of class c (class_labels order) gets the j-th real caption of class c
  (cycling); without, sample p gets real caption p (cycling)."""
  text, labels = np.asarray(text), np.asarray(labels)
  if num_classes > 0:
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    missing = [c for c, idx in enumerate(by_class) if len(idx) == 0]
    if missing:
      raise ValueError(f"no evaluation caption of class(es) {missing}.")

    def fn(sample_labels, offset):
      occurrence = (offset + np.arange(len(sample_labels))) // num_classes
      return np.stack([text[by_class[c][j % len(by_class[c])]]
                       for c, j in zip(np.asarray(sample_labels), occurrence)])
  else:
    def fn(sample_labels, offset):
      return text[(offset + np.arange(len(sample_labels))) % len(text)]
  return fn


def eval_text_fn(config, *, text_shape, num_classes: int):
  """caption_fn over the data set's real captions for a text-conditioned model that is
  evaluated (eval.num_samples > 0), else None."""
  if text_shape is None or config.eval.num_samples <= 0:
    return None
  text, labels = pipeline.load_eval_text(config.data)
  return caption_fn(text, labels, num_classes)


def evaluate(*, config, workdir, params, step: int, specs, sample_fn, reference, num_classes,
             rng, tag: str, text_fn=None):
  """Samples each spec, computes the stand-in metrics, writes grids and eval_results.jsonl.
  num_classes: the classes samples are balanced over (and scored against); text_fn: the captions
  of a text-conditioned model (caption_fn)."""
  rows = []
  for spec in specs:
    t0 = time.time()
    x, labels = sampling.generate(sample_fn, params, rng=rng, num=int(config.eval.num_samples),
                                  batch_size=int(config.eval.batch_size),
                                  num_classes=num_classes, text_fn=text_fn, **spec)
    metrics = reference.evaluate(x, labels if num_classes > 0 else None) if reference else {}
    row = {"step": int(step), **spec, **metrics, "num_samples": int(len(x)),
           "metric_kind": pixel_metrics.STAND_IN_LABEL, "tag": tag,
           "sample_seconds": round(time.time() - t0, 2)}
    rows.append(row)
    logging_lib.append_jsonl(os.path.join(workdir, "eval_results.jsonl"), row)
    if x.ndim == 4 and jax.process_index() == 0:
      per = int(config.eval.grid_per_class)
      k = max(num_classes, 1)
      order = np.concatenate([np.where(labels == c)[0][:per] for c in range(k)]) if (
          num_classes > 0) else np.arange(min(len(x), per * 4))
      if len(order) == per * k or num_classes == 0:
        path = os.path.join(workdir, "samples",
                            f"{tag}_step{step}_{spec['sampler']}{spec['num_steps']}"
                            f"_g{spec['guidance']:g}.png")
        epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
        images_lib.save_png(images_lib.grid(x[order], rows=k if num_classes else 4), path,
                            scale=4 if x.shape[1] <= 16 else 1)
        # One sample per class (the grid's first column), for side-by-side comparisons.
        np.save(path[:-4] + "_row.npy", x[order[::per]] if num_classes else x[:per])
    logging.info("eval %s step %d: %s", tag, step,
                 {k: v for k, v in row.items() if k not in ("metric_kind",)})
  return rows


# Bump when the final evaluation's numbers change for the same inputs (metrics, sampling).
FINAL_EVAL_VERSION = 1
_KEY_FILE = "final_eval.key.json"


def final_eval_key(*, config, step: int, params, specs, use_ema: bool,
                   sampling: dict | None = None) -> dict:
  """Everything that changes a final evaluation's numbers: stored beside final_eval.json
  (final_eval.key.json) and compared before the rows are reused. sampling: the run's sampler
  clip and settings (a student's eta, spacing, grid)."""
  return {"version": FINAL_EVAL_VERSION, "step": int(step), "sampling": sampling or {},
          "fingerprint": runs_common.fingerprint(params),
          "specs": [{k: s[k] for k in ("sampler", "num_steps", "guidance")} for s in specs],
          "num_samples": int(config.eval.num_samples),
          "batch_size": int(config.eval.batch_size), "use_ema": bool(use_ema),
          "seed": int(config.seed), "data": str(config.data.name),
          "metric_kind": pixel_metrics.STAND_IN_LABEL}


def _rows_digest(rows) -> str:
  return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reusable_final_eval(workdir: str, *, key: dict) -> list[dict]:
  """The rows of WORKDIR/final_eval.json when they were computed with exactly `key`
  (final_eval_key) and are intact, else [] (and the evaluation is run again). A truncated or
  unreadable file is recomputed with a warning. Process 0 decides for every process (the
  evaluation it would skip is a collective)."""
  rows = io_utils.read_json_or_none(os.path.join(workdir, "final_eval.json"),
                                    what="final evaluation", missing_ok=True)
  saved = io_utils.read_json_or_none(os.path.join(workdir, _KEY_FILE),
                                     what="final evaluation key", missing_ok=True)
  want = json.loads(json.dumps(key))
  why = None
  if not isinstance(rows, list):
    why = "missing or damaged" if rows is None else "not a list of rows"
  elif not isinstance(saved, dict):
    why = "no record of its settings (written by an older version)"
  elif saved.get("rows_digest") != _rows_digest(rows):
    why = "its rows do not match the record of their settings"
  else:
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in want.items() if saved.get(k) != v]
    why = ("settings changed: " + "; ".join(changed)) if changed else None
  if why and rows is not None and jax.process_index() == 0:
    logging.info("Not reusing %s/final_eval.json (%s): evaluating again.", workdir, why)
  if not distributed.agree(int(why is None)):
    return []
  return rows if why is None else []


def markdown_table(rows, *, metric_names=("fd_pixels", "class_acc")) -> str:
  head = "| sampler | steps | guidance | " + " | ".join(metric_names) + " |"
  lines = [head, "|" + "---|" * (3 + len(metric_names))]
  for r in rows:
    vals = [f"{r[m]:.4f}" if m in r else "-" for m in metric_names]
    lines.append(f"| {r.get('label', r['sampler'])} | {r['num_steps']} | {r['guidance']:g} | "
                 + " | ".join(vals) + " |")
  return "\n".join(lines)


def write_final(rows, *, workdir: str, what: str, step: int, use_ema: bool,
                key: dict | None = None) -> None:
  """WORKDIR/final_eval.json and final_eval.md, then final_eval.key.json (the settings `key`
  and a digest of the rows; written last, so it never vouches for rows it was not written with)
  (process 0; atomic: a killed write leaves the old file or none, never half of one)."""
  if jax.process_index() != 0:
    return
  key_path = os.path.join(workdir, _KEY_FILE)
  epath.Path(key_path).unlink(missing_ok=True)
  io_utils.write_json_atomic(os.path.join(workdir, "final_eval.json"), rows, indent=1)
  io_utils.write_text_atomic(
      os.path.join(workdir, "final_eval.md"),
      f"{what.capitalize()} at step {step}, EMA={use_ema}; {pixel_metrics.STAND_IN_LABEL}.\n\n"
      f"{markdown_table(rows)}\n")
  if key is not None:
    io_utils.write_json_atomic(key_path, dict(key, rows_digest=_rows_digest(rows)))
