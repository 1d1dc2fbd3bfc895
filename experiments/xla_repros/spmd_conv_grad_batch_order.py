"""XLA SPMD partitioner: a conv's input gradient comes back with its batch shards permuted.

    python experiments/xla_repros/spmd_conv_grad_batch_order.py [--mesh=2,2,2]

Exits 1 while the bug is present (it prints the errors), 0 once XLA gives the single-device result.
Found bisecting the UNet's sharding parity test (tests/test_sharding.py). Seen with jax 0.10.2 and
0.11.2 on XLA:CPU (fake devices), with Shardy and with GSPMD, at backend optimisation levels 0 and
default. The wrong collective is emitted by the SPMD partitioner, which is not CPU-specific, so TPU
and GPU are presumably affected too (not checked: this needs 8 devices).

The program (four ops, explicit input shardings, no sharding constraints):

    c = concatenate([x, x], channels) * g0   x: batch over (data, fsdp), channels over tensor
    y = conv3x3(c, w) * g1                   w: HWIO, in over fsdp, out over tensor
    loss = sum(conv3x3(y, w_out) * r)        w_out: in over fsdp; g0, g1 over fsdp

on a (data, fsdp, tensor) mesh with all three axes > 1. The gradient of x is the single-device
gradient with batch shards 1 and 2 exchanged (its shards permuted between the
(data, fsdp) and (fsdp, data) orders); the gradient of g0 (which pairs x with that gradient)
is wrong too. In the partitioned HLO (--xla_dump_hlo_pass_re=spmd) a collective-permute
(pairs {2,4},{4,2},{3,5},{5,3}) moves the conv's output cotangent from the (data, fsdp) batch order
to the (fsdp, data) order before the transposed conv, and nothing moves the result back. With
data = 1 or fsdp = 1 the two orders coincide, which is why 2-axis meshes are exact. Of the other
meshes tried, (4, 2, 2) fails the same way; (2, 4, 2) and (2, 2, 4) are exact for this program.

How mmd_jax avoids it: mmd_jax.parallel.sharding.avoid_xla_conv_grad_bug (conv_out is not split
over tensor when data, fsdp and tensor are all > 1).
tests/test_sharding.py::test_xla_conv_grad_bug_is_still_there asserts this program still fails;
when it passes, drop that workaround.
"""
import os
import sys

if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=16")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _loss(x, g0, w, g1, w_out, r):
  c = jnp.concatenate([x, x], axis=-1) * g0
  y = _conv(c, w) * g1
  return jnp.sum(_conv(y, w_out) * r)


SPECS = (P(("data", "fsdp"), None, None, "tensor"), P("fsdp"), P(None, None, "fsdp", "tensor"),
         P("fsdp"), P(None, None, "fsdp"), P(("data", "fsdp")))
NAMES = ("x", "g0", "w", "g1", "w_out")


def run(mesh_shape=(2, 2, 2), *, shardy=True, batch=8, channels=16) -> dict:
  """Relative errors (max |sharded - single device| / max |single device|) of every gradient,
  and 'x_reordered': the error of x's gradient against the reference with its batch shards
  permuted from the (data, fsdp) to the (fsdp, data) order (~1e-7 when that is all that is
  wrong)."""
  n = int(np.prod(mesh_shape))
  mesh = Mesh(np.asarray(jax.devices()[:n]).reshape(mesh_shape), ("data", "fsdp", "tensor"))
  rng = np.random.default_rng(0)
  c = channels
  args = (rng.standard_normal((batch, 8, 8, c)),
          1 + 0.1 * rng.standard_normal(2 * c),
          rng.standard_normal((3, 3, 2 * c, c)) / 17,
          1 + 0.1 * rng.standard_normal(c),
          rng.standard_normal((3, 3, c, 1)) / 12,
          rng.standard_normal((batch, 8, 8, 1)))
  args = tuple(np.asarray(a, np.float32) for a in args)
  grad = jax.grad(_loss, argnums=tuple(range(len(NAMES))))
  previous = jax.config.jax_use_shardy_partitioner
  jax.config.update("jax_use_shardy_partitioner", shardy)
  try:
    ref = jax.jit(grad)(*args)
    shardings = tuple(NamedSharding(mesh, s) for s in SPECS)
    out = jax.jit(grad, in_shardings=shardings)(
        *[jax.device_put(a, s) for a, s in zip(args, shardings)])
  finally:
    jax.config.update("jax_use_shardy_partitioner", previous)
  ref, out = [np.asarray(a) for a in ref], [np.asarray(a) for a in out]
  errors = {k: float(np.abs(a - b).max() / np.abs(a).max()) for k, a, b in zip(NAMES, ref, out)}
  data, fsdp = mesh_shape[:2]
  shards = np.argsort(np.arange(batch).reshape(data, fsdp, -1).transpose(1, 0, 2).ravel())
  errors["x_reordered"] = float(np.abs(ref[0][shards] - out[0]).max() / np.abs(ref[0]).max())
  return errors


def main(argv):
  mesh_shape = (2, 2, 2)
  for a in argv[1:]:
    if a.startswith("--mesh="):
      mesh_shape = tuple(int(s) for s in a.split("=", 1)[1].split(","))
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, mesh (data, fsdp, tensor) = "
        f"{mesh_shape}")
  bad = False
  for shardy in (True, False):
    errors = run(mesh_shape, shardy=shardy)
    wrong = max(errors[k] for k in NAMES) > 1e-4
    bad |= wrong
    print(f"{'Shardy' if shardy else 'GSPMD '}: " + "  ".join(
        f"{k} {v:.1e}" for k, v in errors.items()) + ("  WRONG" if wrong else "  ok"))
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
