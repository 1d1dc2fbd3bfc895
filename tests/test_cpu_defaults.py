"""mmd_jax/cpu_defaults.py: the command line's CPU settings (XLA's own convolutions, malloc on huge
pages), the re-execution that applies GLIBC_TUNABLES, and that importing the package changes
nothing. No training: `python -m mmd_jax.cpu_defaults ARGS` runs the command line's logic and
prints the environment it ends with."""
import json
import os
import subprocess
import sys

import pytest

from mmd_jax import cpu_defaults
from tests import helpers

_OURS = ("JAX_PLATFORMS", "JAX_PLATFORM_NAME", "XLA_FLAGS", "GLIBC_TUNABLES",
         cpu_defaults.OPT_OUT, cpu_defaults.REEXEC_MARKER)


def _env(**values):
  env = {k: v for k, v in os.environ.items() if k not in _OURS}
  env.update({k: v for k, v in values.items() if v is not None})
  return env


def _probe(cwd, *args, **env):
  """Runs the command-line logic in a fresh interpreter: (final environment, stderr lines)."""
  proc = subprocess.run([sys.executable, "-m", "mmd_jax.cpu_defaults", *args], cwd=cwd,
                        env=_env(**env), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr.splitlines()


def _starts(lines):
  return [l for l in lines if l.startswith("start pid=")]


def test_applied_when_unset_by_one_reexec_keeping_pid_cwd_and_arguments(tmp_path):
  args = ["--config=configs/digits.py:test", "--workdir=with space", "positional", "--"]
  out, err = _probe(tmp_path, *args, JAX_PLATFORMS="cpu")
  assert out["env"] == {"XLA_FLAGS": cpu_defaults.XLA_SETTING,
                        "GLIBC_TUNABLES": cpu_defaults.GLIBC_SETTING,
                        cpu_defaults.REEXEC_MARKER: None}
  starts = _starts(err)
  assert len(starts) == 2 and len(set(starts)) == 1  # started again once, in the same process
  assert starts[0] == f"start pid={out['pid']}"
  assert out["argv"] == args and out["cwd"] == str(tmp_path)
  said = [l for l in err if "CPU defaults" in l]
  assert len(said) == 1 and "MMD_JAX_CPU_DEFAULTS=0" in said[0]


def test_unset_platforms_on_this_cpu_machine_counts_as_cpu(tmp_path):
  # libtpu may be installed here (the test extra), but no TPU chip is attached.
  if cpu_defaults.accelerator_would_be_chosen(os.environ):
    pytest.skip("this machine has an accelerator JAX would choose")
  out, _ = _probe(tmp_path)
  assert out["env"]["XLA_FLAGS"] == cpu_defaults.XLA_SETTING


def test_appends_to_the_users_other_settings(tmp_path):
  out, _ = _probe(tmp_path, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                  GLIBC_TUNABLES="glibc.malloc.arena_max=2")
  assert out["env"]["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                     + cpu_defaults.XLA_SETTING)
  assert out["env"]["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + cpu_defaults.GLIBC_SETTING


def test_the_users_own_settings_win(tmp_path):
  mine = dict(XLA_FLAGS=f"--{cpu_defaults.YNN_FLAG}=", GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
  out, err = _probe(tmp_path, JAX_PLATFORMS="cpu", **mine)
  assert out["env"] == {**mine, cpu_defaults.REEXEC_MARKER: None}
  assert len(_starts(err)) == 1 and not any("CPU defaults" in l for l in err)


def test_only_the_xla_flag_missing_is_set_without_restarting(tmp_path):
  out, err = _probe(tmp_path, JAX_PLATFORMS="cpu", GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
  assert out["env"]["XLA_FLAGS"] == cpu_defaults.XLA_SETTING
  assert out["env"]["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
  assert len(_starts(err)) == 1


@pytest.mark.parametrize("env", [{"MMD_JAX_CPU_DEFAULTS": "0", "JAX_PLATFORMS": "cpu"},
                                 {"JAX_PLATFORMS": "cuda"}, {"JAX_PLATFORMS": "tpu"},
                                 {"JAX_PLATFORMS": "tpu,cpu"}, {"JAX_PLATFORM_NAME": "gpu"}])
def test_opt_out_and_accelerators_leave_everything_alone(tmp_path, env):
  out, err = _probe(tmp_path, **env)
  assert out["env"] == {"XLA_FLAGS": None, "GLIBC_TUNABLES": None,
                        cpu_defaults.REEXEC_MARKER: None}
  assert len(_starts(err)) == 1


def test_the_reexecuted_interpreter_never_restarts_again(tmp_path):
  # The marker says "already restarted": even with nothing set, no second restart happens.
  out, err = _probe(tmp_path, JAX_PLATFORMS="cpu", **{cpu_defaults.REEXEC_MARKER: "1"})
  assert len(_starts(err)) == 1
  assert out["env"] == {"XLA_FLAGS": None, "GLIBC_TUNABLES": None,
                        cpu_defaults.REEXEC_MARKER: None}


def test_backend_decision_without_a_backend(monkeypatch, tmp_path):
  assert cpu_defaults.backend_is_cpu({"JAX_PLATFORMS": "cpu"})
  assert cpu_defaults.backend_is_cpu({"JAX_PLATFORMS": "CPU,tpu"})
  assert not cpu_defaults.backend_is_cpu({"JAX_PLATFORMS": "cuda,cpu"})
  monkeypatch.setattr(cpu_defaults, "_gpu_plugins", lambda environ: [])
  monkeypatch.setattr(cpu_defaults, "_tpu_chip_visible", lambda: True)
  assert not cpu_defaults.backend_is_cpu({"TPU_LIBRARY_PATH": "/opt/libtpu.so"})
  monkeypatch.setattr(cpu_defaults, "_tpu_chip_visible", lambda: False)
  assert cpu_defaults.backend_is_cpu({"TPU_LIBRARY_PATH": "/opt/libtpu.so"})
  # A CUDA plugin counts only with an NVIDIA device node; an unknown plugin always counts.
  node = tmp_path / "nvidia0"
  monkeypatch.setattr(cpu_defaults, "_NVIDIA_DEVICES", (str(node),))
  monkeypatch.setattr(cpu_defaults, "_gpu_plugins", lambda environ: ["jax_cuda12_plugin"])
  assert cpu_defaults.backend_is_cpu({})
  node.write_text("")
  assert not cpu_defaults.backend_is_cpu({})
  monkeypatch.setattr(cpu_defaults, "_gpu_plugins", lambda environ: ["jax_plugins.metal"])
  assert not cpu_defaults.backend_is_cpu({})


def test_the_installed_jaxlib_knows_the_flag():
  assert cpu_defaults._xla_knows_flag()


def test_importing_the_package_changes_nothing():
  code = ("import os\n"
          "names = ('XLA_FLAGS', 'GLIBC_TUNABLES', 'MMD_JAX_CPU_DEFAULTS_REEXEC')\n"
          "before = {k: os.environ.get(k) for k in names}\n"
          "import mmd_jax, mmd_jax.main, mmd_jax.loop, mmd_jax.cpu_defaults\n"
          "print(before == {k: os.environ.get(k) for k in names}, before)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, capture_output=True,
                        text=True, timeout=300, env=_env(JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("True {'XLA_FLAGS': None, 'GLIBC_TUNABLES': None"), proc.stdout
  assert "CPU defaults" not in proc.stderr


def test_apply_in_process_sets_the_xla_flag_only_and_only_before_jax_starts():
  code = ("import os\n"
          "from mmd_jax import cpu_defaults\n"
          "print(cpu_defaults.apply_in_process() is not None, os.environ.get('XLA_FLAGS'),"
          " os.environ.get('GLIBC_TUNABLES'))\n"
          "import jax.numpy as jnp\n"
          "jnp.ones(2).block_until_ready()\n"
          "del os.environ['XLA_FLAGS']\n"
          "print(cpu_defaults.apply_in_process(), os.environ.get('XLA_FLAGS'))\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, capture_output=True,
                        text=True, timeout=300, env=_env(JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [f"True {cpu_defaults.XLA_SETTING} None", "None None"]
  assert "too late" in proc.stderr


def test_command_line_restarts_once_and_still_parses_its_flags(tmp_path):
  # A bad --config.KEY is reported by the restarted interpreter (absl flags parsed there) with
  # exit code 2, which reaches the caller through the same process.
  proc = subprocess.run(
      [sys.executable, "-m", "mmd_jax.main", f"--config={helpers.DIGITS}:test",
       f"--workdir={tmp_path}", "--config.model.bogus=1"],
      cwd=helpers.REPO, capture_output=True, text=True, timeout=300, env=_env(JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.splitlines()
  assert len([l for l in lines if "CPU defaults" in l]) == 1
  assert len([l for l in lines if "Unknown config key 'model.bogus'" in l]) == 1
