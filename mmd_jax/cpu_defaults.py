"""Two environment settings that make XLA:CPU faster and change results only by float rounding.

  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution
      XLA's own convolution kernels instead of YNNPACK's (YNNPACK's weight-gradient kernel is the
      slowest part of a UNet training step on a CPU);
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1
      malloc on transparent huge pages (hundreds of thousands of page faults per step fewer).

The command line (`python -m mmd_jax.main`) calls `apply_for_command_line` before anything else
runs. When the backend will be the CPU and the user has not set them, it adds both and starts the
interpreter again in the same process (os.execve: same pid, working directory and arguments),
because glibc reads GLIBC_TUNABLES only when a process starts. A user's own setting that names
the same flag or tunable wins; `MMD_JAX_CPU_DEFAULTS=0` turns the whole thing off.

Importing this module (or anything in mmd_jax) changes nothing. A notebook may call
`apply_in_process()` before its first JAX computation: it sets XLA_FLAGS only, since
GLIBC_TUNABLES cannot take effect in a running process.

`python -m mmd_jax.cpu_defaults` applies the command line's logic to itself and prints what the
process ends up with (the tests use it).
"""
from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import json
import mmap
import os
import sys

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
XLA_SETTING = f"--{YNN_FLAG}=-individual_convolution"
HUGETLB_TUNABLE = "glibc.malloc.hugetlb"
GLIBC_SETTING = f"{HUGETLB_TUNABLE}=1"
OPT_OUT = "MMD_JAX_CPU_DEFAULTS"
# Set in the re-executed interpreter's environment, so that it never re-executes again.
REEXEC_MARKER = "MMD_JAX_CPU_DEFAULTS_REEXEC"

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips show up as PCI devices of this vendor
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")
_AMD_DEVICES = ("/dev/kfd",)


def opted_out(environ=os.environ) -> bool:
  return environ.get(OPT_OUT, "").strip().lower() in ("0", "false", "no", "off")


def _tpu_chip_visible() -> bool:
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def _gpu_plugins(environ) -> list[str]:
  """Names of the installed PJRT plugins other than libtpu (CUDA, ROCm, others)."""
  names = [e.value for e in importlib.metadata.entry_points(group="jax_plugins")]
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None:
    for path in spec.submodule_search_locations or ():
      names += sorted(os.listdir(path)) if os.path.isdir(path) else []
  if environ.get("PJRT_NAMES_AND_LIBRARY_PATHS"):
    names.append("PJRT_NAMES_AND_LIBRARY_PATHS")
  return [n for n in names if not n.startswith(("_", "."))]


def accelerator_would_be_chosen(environ=os.environ) -> bool:
  """With JAX_PLATFORMS unset, whether JAX would pick a TPU or GPU over the CPU. Probes files
  only: no backend (and no plugin) is initialised, so it is safe before XLA_FLAGS is final."""
  libtpu = importlib.util.find_spec("libtpu") is not None or bool(environ.get("TPU_LIBRARY_PATH"))
  if libtpu and _tpu_chip_visible():
    return True
  for name in _gpu_plugins(environ):
    if "cuda" in name.lower():
      if any(os.path.exists(d) for d in _NVIDIA_DEVICES):
        return True
    elif "rocm" in name.lower():
      if any(os.path.exists(d) for d in _AMD_DEVICES):
        return True
    else:  # a plugin we cannot judge: assume it wins, and leave the environment alone
      return True
  return False


def backend_is_cpu(environ=os.environ) -> bool:
  """Whether JAX's default backend will be the CPU, decided without initialising one."""
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:  # the first entry has the highest priority
    return platforms.split(",")[0].strip() == "cpu"
  name = environ.get("JAX_PLATFORM_NAME", "").strip().lower()
  if name:
    return name == "cpu"
  return not accelerator_would_be_chosen(environ)


def _xla_knows_flag() -> bool:
  """Whether the installed jaxlib defines the flag: XLA aborts the process on an unknown flag in
  XLA_FLAGS, and experimental flags come and go between releases."""
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    return False
  needle = YNN_FLAG.encode()
  for directory in spec.submodule_search_locations:
    libs = sorted(glob.glob(os.path.join(directory, "*.so")), key=os.path.getsize, reverse=True)
    for lib in libs:
      try:
        with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
          if m.find(needle) >= 0:
            return True
      except (OSError, ValueError):  # ValueError: an empty file cannot be mapped
        continue
  return False


def _appended(value: str, setting: str, sep: str) -> str:
  return f"{value}{sep}{setting}" if value.strip() else setting


def changes(environ=os.environ, *, glibc: bool = True) -> dict[str, str]:
  """The variables to set (name -> new value), given the user's environment; {} when opted out,
  when the backend is not the CPU, or when the user already names both settings."""
  if opted_out(environ) or not backend_is_cpu(environ):
    return {}
  out = {}
  flags = environ.get("XLA_FLAGS", "")
  if YNN_FLAG not in flags and _xla_knows_flag():
    out["XLA_FLAGS"] = _appended(flags, XLA_SETTING, " ")
  tunables = environ.get("GLIBC_TUNABLES", "")
  if glibc and sys.platform.startswith("linux") and HUGETLB_TUNABLE not in tunables:
    out["GLIBC_TUNABLES"] = _appended(tunables, GLIBC_SETTING, ":")
  return out


def describe(new: dict[str, str]) -> str:
  settings = {"XLA_FLAGS": XLA_SETTING, "GLIBC_TUNABLES": GLIBC_SETTING}
  parts = [f"{k} += {settings[k]}" for k in new]
  return (f"mmd_jax: CPU defaults: {', '.join(parts)} (faster steps, same results up to float "
          f"rounding; {OPT_OUT}=0 turns this off; README 'CPU defaults')")


def _reexec_argv(argv, module: str | None) -> list[str]:
  """The command line that starts this program again. Interpreter options (-u, -X ...) are kept
  when sys.orig_argv shows the program was started as `python [OPTIONS] -m MODULE ARGS` (or, with
  module=None, as `python [OPTIONS] SCRIPT ARGS`, argv[0] being the script)."""
  tail = ["-m", module, *argv[1:]] if module is not None else list(argv)
  orig = list(getattr(sys, "orig_argv", []))
  if len(orig) > len(tail) and orig[len(orig) - len(tail):] == tail:
    return [sys.executable, *orig[1:]]
  return [sys.executable, *tail]


def apply_for_command_line(argv, *, module: str | None = "mmd_jax.main") -> None:
  """For `python -m MODULE` (or, with module=None, a script `python SCRIPT`; argv = sys.argv):
  sets the CPU defaults the user has not set. XLA_FLAGS alone is set in this process;
  GLIBC_TUNABLES needs a new one, so then the interpreter is executed again with the same
  arguments (same pid: signals and exit codes reach the new program). Call it before JAX
  initialises a backend, i.e. before any computation."""
  if os.environ.pop(REEXEC_MARKER, None) is not None:
    return  # this is the re-executed interpreter
  new = changes(os.environ)
  if not new:
    return
  print(describe(new), file=sys.stderr, flush=True)
  if "GLIBC_TUNABLES" in new:
    env = dict(os.environ, **new, **{REEXEC_MARKER: "1"})
    sys.stdout.flush()
    try:
      os.execve(sys.executable, _reexec_argv(argv, module), env)
    except OSError as e:
      print(f"mmd_jax: cannot restart the interpreter ({e}); GLIBC_TUNABLES not applied.",
            file=sys.stderr, flush=True)
  if "XLA_FLAGS" in new:
    os.environ["XLA_FLAGS"] = new["XLA_FLAGS"]


def apply_in_process() -> str | None:
  """For a notebook or a script that imports mmd_jax: sets the XLA flag (not GLIBC_TUNABLES,
  which only a new process can pick up; export it before starting Python to get it too) when the
  backend will be the CPU and XLA_FLAGS does not name the flag. Call it before the first JAX
  computation. Returns the line describing what was set, or None."""
  jax, bridge = sys.modules.get("jax"), sys.modules.get("jax._src.xla_bridge")
  if bridge is not None:
    if bridge.backends_are_initialized():
      print("mmd_jax: cpu_defaults.apply_in_process() comes too late: JAX has started its "
            "backend already. Call it before the first computation.", file=sys.stderr)
      return None
  environ = dict(os.environ)
  platforms = getattr(getattr(jax, "config", None), "jax_platforms", None)
  if isinstance(platforms, str) and platforms:  # set with jax.config.update
    environ["JAX_PLATFORMS"] = platforms
  new = changes(environ, glibc=False)
  if not new:
    return None
  os.environ["XLA_FLAGS"] = new["XLA_FLAGS"]
  return describe(new)


if __name__ == "__main__":
  print(f"start pid={os.getpid()}", file=sys.stderr, flush=True)
  apply_for_command_line(sys.argv, module="mmd_jax.cpu_defaults")
  print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "cwd": os.getcwd(),
                    "env": {k: os.environ.get(k) for k in
                            ("XLA_FLAGS", "GLIBC_TUNABLES", REEXEC_MARKER)}}), flush=True)
