"""Noise schedules of a variance-preserving diffusion, parameterised by logSNR.

z_t = alpha_t x + sigma_t eps with alpha_t^2 = sigmoid(logsnr_t), sigma_t^2 = sigmoid(-logsnr_t)
and logsnr_t decreasing in t in [0, 1].

- cosine: logsnr(t) = -2 log tan(a t + b), with a, b chosen so that the range is
  [logsnr_min, logsnr_max] (Nichol & Dhariwal 2021; Kingma et al. 2021, VDM).
- shifted cosine: cosine + 2 log(shift_base / resolution) ("simple diffusion",
  Hoogeboom et al. 2023, eq. 5): higher resolutions need more noise at the same t.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULE_KINDS = ("cosine", "shifted_cosine")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A logSNR schedule. Hashable, so it can be a static argument of jitted code."""
  kind: str = "cosine"
  logsnr_min: float = -15.0
  logsnr_max: float = 15.0
  resolution: int = 64
  shift_base: int = 64

  def __post_init__(self):
    if self.kind not in SCHEDULE_KINDS:
      raise ValueError(f"Unknown schedule kind {self.kind!r}; choose one of {SCHEDULE_KINDS}.")
    if not self.logsnr_min < self.logsnr_max:
      raise ValueError(
          f"Schedule needs logsnr_min < logsnr_max, got {self.logsnr_min} and {self.logsnr_max}.")

  @property
  def shift(self) -> float:
    if self.kind == "shifted_cosine":
      return 2.0 * math.log(self.shift_base / self.resolution)
    return 0.0

  def _ab(self):
    b = math.atan(math.exp(-0.5 * self.logsnr_max))
    a = math.atan(math.exp(-0.5 * self.logsnr_min)) - b
    return a, b

  def logsnr(self, t):
    """logSNR at time t in [0, 1]: numpy in, numpy out (float32); a jax array gives a jax array."""
    a, b = self._ab()
    xp = _xp(t)
    return (-2.0 * xp.log(xp.tan(a * xp.asarray(t, xp.float32) + b)) + self.shift).astype(
        xp.float32)

  def t_of_logsnr(self, logsnr):
    """Inverse of `logsnr`: the time at which the schedule reaches a given logSNR."""
    a, b = self._ab()
    xp = _xp(logsnr)
    logsnr = xp.asarray(logsnr, xp.float32) - self.shift
    return (xp.arctan(xp.exp(-0.5 * logsnr)) - b) / a


def _xp(value):
  return jnp if isinstance(value, jax.Array) else np


def alpha_sigma(logsnr):
  """(alpha, sigma) from logSNR, computed through log-sigmoid to stay exact at the ends."""
  logsnr = jnp.asarray(logsnr, jnp.float32)
  alpha = jnp.exp(0.5 * jax_log_sigmoid(logsnr))
  sigma = jnp.exp(0.5 * jax_log_sigmoid(-logsnr))
  return alpha, sigma


def jax_log_sigmoid(x):
  return -jnp.logaddexp(0.0, -x)


def schedule_from_config(config) -> Schedule:
  """Builds a Schedule from a ConfigDict with fields kind, logsnr_min, logsnr_max[, shift_base]."""
  return Schedule(
      kind=config.kind,
      logsnr_min=float(config.logsnr_min),
      logsnr_max=float(config.logsnr_max),
      resolution=int(config.get("resolution", 64)),
      shift_base=int(config.get("shift_base", 64)),
  )
