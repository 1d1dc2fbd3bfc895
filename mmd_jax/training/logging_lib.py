"""Run logs: TensorBoard event files (tensorboardX, no TensorFlow), WORKDIR/metrics.jsonl,
WORKDIR/eval_results.jsonl, and progress lines with steps/s and ETA."""
from __future__ import annotations

import json
import os
import time

import jax
from absl import logging
from etils import epath


def append_jsonl(path: str, record: dict) -> None:
  if jax.process_index() != 0:
    return
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  with p.open("a") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")


class MetricWriter:
  """Writes scalars to TensorBoard and metrics.jsonl (process 0 only)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._tb = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict, *, jsonl: str = "metrics.jsonl") -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()
    append_jsonl(os.path.join(self.workdir, jsonl), {"step": int(step), **scalars})

  def close(self):
    if self._tb is not None:
      self._tb.close()


class Progress:
  """steps/s and ETA between calls: rate(step) measures, log(step, rate, text) prints."""

  def __init__(self, *, start_step: int, total_steps: int):
    self.total = total_steps
    self.last_step, self.last_time = start_step, time.time()

  def rate(self, step: int) -> float:
    """steps/s since the previous call (or the start)."""
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    return rate

  def log(self, step: int, rate: float, extra: str = "") -> None:
    eta = (self.total - step) / max(rate, 1e-9)
    logging.info("step %d/%d  %.2f steps/s  ETA %s  %s", step, self.total, rate,
                 time.strftime("%H:%M:%S", time.gmtime(eta)), extra)
