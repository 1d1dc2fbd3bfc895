"""Config files, argument parsing, overrides, validation and the sweep launcher."""
import glob
import os

import pytest

from mmd_jax import config_lib
from tests import helpers


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(helpers.REPO, "configs", "*.py"))))
def test_every_config_loads_validates_and_documents_itself(path):
  module = config_lib.load_module(path)
  doc = module.__doc__ or ""
  for word in ("Command:", "Hardware:", "Runtime:", "Result:"):
    assert word in doc, f"{path} docstring lacks {word!r}"
  config = module.get_config("")
  if "training" in config:
    config_lib.validate(config)
  config_lib.validate(module.get_config("runlocal")) if "training" in config else None


def test_parse_arg_and_overrides():
  assert config_lib.parse_arg("runlocal,steps=8") == {"runlocal": True, "steps": "8"}
  config = config_lib.load_config_file(helpers.DIGITS, "test,steps=9")
  assert config.training.num_steps == 9
  changed = config_lib.apply_overrides(config, {"optim.learning_rate": 0.5})
  assert changed.optim.learning_rate == 0.5 and config.optim.learning_rate != 0.5
  with pytest.raises(config_lib.ConfigError, match="optim.bogus"):
    config_lib.apply_overrides(config, {"optim.bogus": 1})


@pytest.mark.parametrize("key,value,match", [
    ("model.prediction", "score", "model.prediction"),
    ("optim.ema_decay", 1.5, "ema_decay"),
    ("training.log_every", 0, "training.log_every"),
    ("eval.periodic", "euler:8", "unknown sampler"),
])
def test_validation_names_the_field(key, value, match):
  config = config_lib.apply_overrides(config_lib.load_config_file(helpers.DIGITS, "test"),
                                      {key: value})
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(config)


def test_sampler_specs():
  assert config_lib.parse_sampler_specs("ancestral:8, ddim:4:1.5") == [
      {"sampler": "ancestral", "num_steps": 8, "guidance": 0.0},
      {"sampler": "ddim", "num_steps": 4, "guidance": 1.5}]
  with pytest.raises(config_lib.ConfigError, match="positive"):
    config_lib.parse_sampler_specs("ancestral:0")


def test_sweep_launcher_builds_one_command_per_member(tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "sweep", os.path.join(helpers.REPO, "experiments", "sweep.py"))
  sweep = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sweep)
  cmds = sweep.commands(f"{helpers.DIGITS}:runlocal", str(tmp_path))
  members = config_lib.load_module(helpers.DIGITS).sweep()
  assert len(cmds) == len(members)
  workdirs = {c[4] for c in cmds}
  assert len(workdirs) == len(members)
  assert all(c[4].startswith(f"--workdir={tmp_path}") for c in cmds)
  assert any("--config.optim.learning_rate=0.001" in c for c in cmds)
