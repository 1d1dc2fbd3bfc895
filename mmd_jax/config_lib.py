"""Config helpers: the `get_config(arg)` argument string, validation with clear errors, sweeps.

A config file `configs/NAME.py` defines `get_config(arg: str = "")` returning a ConfigDict, and
may define `sweep() -> list[dict]` of dotted-key overrides. The argument is a comma-separated
list of flags and key=value pairs, e.g. "runlocal" or "runlocal,steps=8".
"""
from __future__ import annotations

import importlib.util
import json
import math
import os

import ml_collections


class ConfigError(ValueError):
  """A config value that cannot work, with the reason and the fix in the message."""


def parse_arg(arg: str | None) -> dict:
  """Parses "runlocal,steps=8" into {"runlocal": True, "steps": "8"}."""
  out = {}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" in part:
      key, value = part.split("=", 1)
      out[key.strip()] = value.strip()
    else:
      out[part] = True
  return out


def load_config_file(path: str, arg: str = "") -> ml_collections.ConfigDict:
  """Loads configs/NAME.py and calls its get_config(arg) (same as `--config=path:arg`)."""
  module = load_module(path)
  return module.get_config(arg)


def load_module(path: str):
  if not os.path.exists(path):
    raise ConfigError(f"Config file {path!r} does not exist.")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """Returns a copy with dotted-key overrides applied; an unknown key is a ConfigError."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
      if part not in node:
        raise ConfigError(f"Unknown config key {key!r} (no field {part!r}).")
      node = node[part]
    if parts[-1] not in node:
      raise ConfigError(f"Unknown config key {key!r}; valid keys here: {sorted(node.keys())}.")
    node[parts[-1]] = value
  return config


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), sort_keys=True, default=str)


def _positive_int(config, key):
  value = config
  for part in key.split("."):
    value = value[part]
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ConfigError(f"config.{key} must be a positive integer, got {value!r}. "
                      f"Set --config.{key}=N with N >= 1.")


def _choice(config, key, choices):
  value = config
  for part in key.split("."):
    value = value[part]
  if value not in choices:
    raise ConfigError(f"config.{key}={value!r} is not one of {tuple(choices)}.")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the values that would otherwise fail deep inside a jitted function."""
  from mmd_jax.diffusion import process, samplers, schedules  # local: keep config import light
  for key in ("training.batch_size", "training.num_steps", "training.log_every",
              "training.checkpoint_every", "training.eval_every"):
    _positive_int(config, key)
  _choice(config, "model.prediction", process.PREDICTIONS)
  _choice(config, "diffusion.loss_weighting", process.LOSS_WEIGHTINGS)
  _choice(config, "diffusion.schedule.kind", schedules.SCHEDULE_KINDS)
  if not 0.0 <= config.diffusion.cond_drop_prob < 1.0:
    raise ConfigError("config.diffusion.cond_drop_prob must be in [0, 1), got "
                      f"{config.diffusion.cond_drop_prob}.")
  if not 0.0 <= config.optim.ema_decay < 1.0:
    raise ConfigError(f"config.optim.ema_decay must be in [0, 1), got {config.optim.ema_decay}.")
  if config.optim.learning_rate <= 0:
    raise ConfigError(f"config.optim.learning_rate must be > 0, got {config.optim.learning_rate}.")
  for key in ("eval.periodic", "eval.final"):
    for spec in parse_sampler_specs(config[key], key=key):
      if spec["sampler"] not in samplers.names(student=False):
        raise ConfigError(f"config.{key}: unknown sampler {spec['sampler']!r}; choose one of "
                          f"{samplers.names(student=False)}.")
  if "specs" in config.eval:  # --mode=eval's specs: syntax here, samplers per run at eval time
    parse_sampler_specs(config.eval.specs, key="eval.specs")


def parse_sampler_specs(text: str, *, key: str = "eval") -> list[dict]:
  """Parses "ancestral:8,ddim:8:1.5" into [{sampler, num_steps, guidance}, ...].

  STEPS is a positive integer, GUIDANCE (default 0) a finite number >= 0; anything else is a
  ConfigError naming the item and the fix.
  """
  specs = []
  for item in (text or "").split(","):
    item = item.strip()
    if not item:
      continue
    parts = item.split(":")
    try:
      if len(parts) not in (2, 3):
        raise ValueError
      spec = {"sampler": parts[0], "num_steps": int(parts[1]),
              "guidance": float(parts[2]) if len(parts) == 3 else 0.0}
    except ValueError:
      raise ConfigError(f"config.{key}: cannot parse {item!r}; write SAMPLER:STEPS[:GUIDANCE], "
                        "e.g. 'ancestral:32' or 'ddim:8:1.5'.") from None
    if spec["num_steps"] < 1:
      raise ConfigError(f"config.{key}: {item!r} needs a positive integer step count, got "
                        f"{spec['num_steps']}; write e.g. '{parts[0]}:8'.")
    if not math.isfinite(spec["guidance"]) or spec["guidance"] < 0:
      raise ConfigError(f"config.{key}: {item!r} has guidance {parts[2]!r}; guidance must be a "
                        f"finite number >= 0 (0 = unguided), e.g. '{parts[0]}:{parts[1]}:1.5'.")
    specs.append(spec)
  return specs
