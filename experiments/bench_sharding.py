"""Per-device state memory vs device count (1, 2, 4, 8 fake CPU devices) for three layouts.

    python experiments/bench_sharding.py                                   # shapes only, instant
    python experiments/bench_sharding.py --config=configs/imagenet64.py:runlocal --compiled

Layouts: replicated (mesh data=n), FSDP (fsdp=n), FSDP+tensor (fsdp=n/2, tensor=2). The state is
the config's whole train state: the teacher's (params, Adam, EMA), or for a config with a distill
section the distillation state (student, Adam, EMA, auxiliary and its Adam) plus the frozen
teacher argument. By default the numbers are the sums of the shard sizes chosen by
mmd_jax.parallel.sharding; --compiled instead reads compiled.memory_analysis() of the born-sharded
init (jit with out_shardings) on n fake devices, which checks that XLA allocates what the table
says (teacher configs; use a small config, each layout is one compile).
"""
import argparse
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import ml_collections  # noqa: E402

from mmd_jax import config_lib  # noqa: E402
from mmd_jax.tools import cli, report  # noqa: E402

LAYOUTS = {"replicated": lambda n: (n, 1, 1), "fsdp": lambda n: (1, n, 1),
           "fsdp+tensor": lambda n: (1, n // 2, 2) if n >= 2 else None}


def _mesh_config(config, shape):
  m = ml_collections.ConfigDict(config.mesh.to_dict())
  m.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
  c = ml_collections.ConfigDict(config.to_dict())
  c.mesh = m
  return c


def analytic(config, shape) -> int:
  axis_sizes = dict(zip(("data", "fsdp", "tensor"), shape))
  groups = cli.state_decisions(_mesh_config(config, shape), axis_sizes=axis_sizes)
  return sum(r["per_device_bytes"] for r in report.memory_rows(groups, axis_sizes=axis_sizes))


def compiled(config, shape) -> int:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from mmd_jax import runs  # pylint: disable=g-import-not-at-top
  from mmd_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from mmd_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  if config.get("distill") is not None:
    raise SystemExit("--compiled measures teacher configs; drop the distill section.")
  c = _mesh_config(config, shape)
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:shape[0] * shape[1] * shape[2]])
  # The teacher run's model, optimizer and state shardings (shapes from config.data.image_shape
  # when given, else from the prepared data set).
  run = runs.build(c, kind="teacher", mesh=mesh, need_data=False)
  spec = run.spec
  init = jax.jit(lambda r: nn.unbox(state_lib._boxed_state(  # pylint: disable=protected-access
      run.model, run.tx, r, spec.data_shape, spec.num_classes, spec.text_shape)),
                 out_shardings=run.state_shardings)
  return int(init.lower(jax.random.PRNGKey(0)).compile().memory_analysis().output_size_in_bytes)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/imagenet64_distill.py")
  parser.add_argument("--compiled", action="store_true")
  args = parser.parse_args()
  path, _, arg = args.config.partition(":")
  config = config_lib.load_config_file(path, arg)
  measure = compiled if args.compiled else analytic
  counts = (1, 2, 4, 8)
  print(f"{args.config}: per-device state bytes "
        f"({'compiled init, memory_analysis' if args.compiled else 'sum of shard sizes'})")
  print(f"{'layout':<14}" + "".join(f"{f'{n} dev':>14}" for n in counts) + f"{'8 vs 1':>10}")
  for name, shape_of in LAYOUTS.items():
    values = []
    for n in counts:
      shape = shape_of(n)
      values.append(None if shape is None else measure(config, shape))
    base = values[0] if values[0] else analytic(config, (1, 1, 1))
    cells = "".join(f"{report.fmt_bytes(v) if v else '-':>14}" for v in values)
    print(f"{name:<14}{cells}{base / values[-1]:>9.2f}x", flush=True)


if __name__ == "__main__":
  main()
