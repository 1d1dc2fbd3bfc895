"""Multi-host start-up: jax.distributed.initialize whenever the run spans several processes.

`initialize()` runs jax.distributed.initialize in exactly these cases:
  explicit     coordinator_address, num_processes and process_id are given (command line flags
               --coordinator_address=HOST:PORT --num_processes=N --process_id=I), e.g. GPU hosts
               or two local CPU processes;
  TPU pod      TPU_WORKER_HOSTNAMES lists several hosts, or MEGASCALE_NUM_SLICES > 1 (multislice):
               jax.distributed.initialize() without arguments, JAX reads the TPU metadata;
  cluster      SLURM_NTASKS > 1 or OMPI_COMM_WORLD_SIZE > 1: initialize() without arguments
               (JAX's cluster detection).
Otherwise the run is one process and nothing happens. It must run before anything touches a JAX
backend (jax.devices(), an array): main.py calls it first, and train_and_evaluate calls it again
(a no-op once initialized) so that library users on a pod get the same behaviour.

Failure is loud, and never a silent single-host run. A bad argument, or an error that JAX reports
as a Python exception, raises DistributedInitError naming the coordinator, process and timeout;
nothing here catches it. A start-up that does not finish within `timeout_s` (the coordinator or a
peer never answers) cannot be turned into an exception: JAX's C++ client terminates the process
itself (SIGABRT, exit 134) when its own initialization timeout expires, before Python sees an
error. So JAX gets `timeout_s + TIMEOUT_GRACE_S`, and a watchdog thread started next to it
prints our one-line DistributedInitError message at `timeout_s` (to stderr, flushed) and ends
the process with exit status 2 (os._exit), like every other user error of the command line.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Mapping

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mmd_jax.parallel.mesh import MeshError

DEFAULT_TIMEOUT_S = 300
# Extra seconds JAX's own initialization timeout gets over ours, so that our watchdog fires (with
# our message and exit status 2) before JAX's client aborts the process.
TIMEOUT_GRACE_S = 15
# Exit status of a start-up timeout: that of every user error of the command line (main.py).
TIMEOUT_EXIT_CODE = 2


class DistributedInitError(MeshError):
  """jax.distributed could not be started (bad flags, unreachable coordinator, timeout)."""


def detect(environ: Mapping[str, str] | None = None) -> str | None:
  """Why this process is part of a multi-process run without explicit flags, or None."""
  env = os.environ if environ is None else environ
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return f"TPU pod: TPU_WORKER_HOSTNAMES lists {len(hosts)} hosts"
  if _int(env.get("MEGASCALE_NUM_SLICES")) > 1:
    return f"TPU multislice: MEGASCALE_NUM_SLICES={env['MEGASCALE_NUM_SLICES']}"
  for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if _int(env.get(key)) > 1:
      return f"cluster: {key}={env[key]}"
  return None


def _int(value) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    return 0


def check_explicit(*, coordinator_address, num_processes, process_id) -> None:
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise DistributedInitError(
        f"Multi-process start-up needs --coordinator_address, --num_processes and --process_id "
        f"together; missing {missing} (got {given}).")
  host, sep, port = str(coordinator_address).rpartition(":")
  if not sep or not host or not port.isdigit():
    raise DistributedInitError(f"--coordinator_address={coordinator_address!r} must be "
                               "HOST:PORT, e.g. 10.0.0.2:8476 or 127.0.0.1:12345.")
  if int(num_processes) < 1 or not 0 <= int(process_id) < int(num_processes):
    raise DistributedInitError(f"--process_id={process_id} must be in [0, --num_processes="
                               f"{num_processes}).")


def is_initialized() -> bool:
  return bool(jax.distributed.is_initialized())


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = DEFAULT_TIMEOUT_S,
               environ: Mapping[str, str] | None = None) -> bool:
  """Starts jax.distributed when the run spans several processes (see the module docstring).

  Returns True if this process is (now) part of a distributed run. Raises DistributedInitError;
  a start-up that does not finish within `timeout_s` prints timeout_message(...) to stderr and
  exits the process with status 2 (JAX would abort it; see the module docstring).
  """
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  if is_initialized():
    return True
  if explicit:
    check_explicit(coordinator_address=coordinator_address, num_processes=num_processes,
                   process_id=process_id)
    if int(num_processes) == 1:
      return False
    kwargs = dict(coordinator_address=str(coordinator_address),
                  num_processes=int(num_processes), process_id=int(process_id))
    why = f"explicit flags, coordinator {coordinator_address}, process {process_id}/{num_processes}"
  else:
    why = detect(environ)
    if why is None:
      return False
    kwargs = {}
  timeout_s = int(timeout_s)
  if timeout_s < 1:
    raise DistributedInitError(f"--distributed_timeout_s={timeout_s} must be >= 1 second.")
  logging.info("jax.distributed.initialize (%s), timeout %d s", why, timeout_s)
  watchdog = _start_watchdog(timeout_s, timeout_message(why, timeout_s))
  try:
    jax.distributed.initialize(initialization_timeout=timeout_s + TIMEOUT_GRACE_S, **kwargs)
  except Exception as e:  # re-raised with the context a user needs; never swallowed
    raise DistributedInitError(
        f"jax.distributed.initialize failed ({why}; timeout {timeout_s} s): "
        f"{type(e).__name__}: {str(e)[:800]}. Check that every process was started with the "
        "same coordinator and process count, that the coordinator (process 0) is reachable, "
        "and that nothing used JAX before start-up.") from e
  finally:
    watchdog.cancel()
  log_topology()
  return True


def timeout_message(why: str, timeout_s: int) -> str:
  """The one line printed when start-up does not finish within timeout_s."""
  return (f"mmd_jax error (DistributedInitError): jax.distributed.initialize did not finish "
          f"within {timeout_s} s ({why}). Start every process with the same "
          "--coordinator_address and --num_processes and distinct --process_id values, make "
          "sure the coordinator (process 0) is reachable from every host, or raise "
          "--distributed_timeout_s.")


def _start_watchdog(timeout_s: int, message: str) -> threading.Timer:
  """A daemon timer that, unless cancelled within timeout_s, prints `message` and exits with
  TIMEOUT_EXIT_CODE. JAX's client would otherwise abort the process (SIGABRT) from C++ when its
  own initialization timeout expires; the blocking connect releases the GIL, so the timer runs."""

  def fire():
    try:
      logging.flush()
    except Exception:  # noqa: BLE001 -- best effort; the message below is what matters
      pass
    print(message, file=sys.stderr, flush=True)
    os._exit(TIMEOUT_EXIT_CODE)  # pylint: disable=protected-access

  timer = threading.Timer(timeout_s, fire)
  timer.daemon = True
  timer.start()
  return timer


def agree(value: int) -> int:
  """Process 0's integer on every process (one process: `value` itself).

  For choices made from files (the step to restore, whether a cache is usable) that must be the
  same everywhere: each is followed by collectives that every process has to enter, and a host
  that saw another file (a write in flight, a cache it cannot read) would otherwise skip them
  and hang the others."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.asarray(int(value), np.int32)))


def all_agree(flag: bool) -> bool:
  """True on every process iff `flag` is True on every process (an all-gather): e.g. "this cache
  file is readable here", where a process that cannot read it must not be the only one to
  recompute it through collectives."""
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray(int(bool(flag)), np.int32))
  return bool(np.all(np.asarray(flags)))


def log_topology() -> dict:
  """Logs (and returns) this process's index and the local / global device counts."""
  info = dict(process_index=jax.process_index(), process_count=jax.process_count(),
              local_devices=jax.local_device_count(), global_devices=jax.device_count(),
              platform=jax.devices()[0].platform)
  logging.info("process %(process_index)d/%(process_count)d: %(local_devices)d local / "
               "%(global_devices)d global %(platform)s devices", info)
  return info
