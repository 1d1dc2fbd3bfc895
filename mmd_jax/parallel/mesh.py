"""Device mesh from config, logical-axis shardings, and global batch assembly.

The mesh has axes ("data", "fsdp", "tensor"); one size may be -1 and is filled from the device
count. The batch is split over ("data", "fsdp"); parameters are placed by logical axis rules
(model parameters carry logical names through nn.with_logical_partitioning; see
mmd_jax.parallel.sharding for the rules, the fallback and the notes).

Multislice: `config.mesh.dcn_data`, `dcn_fsdp`, `dcn_tensor` (default 1) split each axis between
the slow cross-slice network (DCN, outer factor) and the in-slice network (ICI, inner factor):
mesh axis size = dcn_X * X, where data/fsdp/tensor are the per-slice (ICI) sizes and one of them
may be -1 (filled from the devices per slice). The usual layout is dcn_data = number of slices
(pure data parallelism across slices, FSDP and tensor parallelism inside a slice). Devices are
grouped into slices by their `slice_index` (TPU multislice), else by process, else (fake CPU
devices in one process) in consecutive blocks, which is only good for tests.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


class MeshError(ValueError):
  """A mesh or batch layout that does not fit the devices, with the numbers."""


def mesh_shape(mesh_config, *, num_devices: int) -> tuple[int, ...]:
  """Resolves the sizes of ("data", "fsdp", "tensor"), filling at most one -1."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise MeshError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"Mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise MeshError(
          f"Mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {known}, which does "
          f"not divide the {num_devices} devices. Choose sizes whose product divides "
          f"{num_devices}.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise MeshError(
        f"Mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
        f"{num_devices} are available. Set the sizes so that data*fsdp*tensor = {num_devices}, "
        "or set one of them to -1.")
  return tuple(sizes)


DCN_KEYS = tuple(f"dcn_{a}" for a in MESH_AXES)


def _get(mesh_config, key, default):
  return mesh_config.get(key, default) if hasattr(mesh_config, "get") else default


def dcn_shape(mesh_config) -> tuple[int, ...]:
  sizes = tuple(int(_get(mesh_config, k, 1)) for k in DCN_KEYS)
  if any(s < 1 for s in sizes):
    raise MeshError(f"config.mesh.dcn_* must be >= 1, got {dict(zip(DCN_KEYS, sizes))}.")
  return sizes


def hybrid_mesh_shape(mesh_config, *, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(ici_shape, dcn_shape): per-slice sizes and cross-slice sizes of (data, fsdp, tensor)."""
  dcn = dcn_shape(mesh_config)
  slices = math.prod(dcn)
  if num_devices % slices:
    raise MeshError(f"config.mesh dcn sizes {dict(zip(DCN_KEYS, dcn))} ask for {slices} slices, "
                    f"which does not divide the {num_devices} devices.")
  try:
    ici = mesh_shape(mesh_config, num_devices=num_devices // slices)
  except MeshError as e:
    if slices == 1:
      raise
    raise MeshError(f"{e} (per slice: {num_devices} devices / {slices} slices from "
                    f"config.mesh.dcn_*)") from None
  return ici, dcn


def _slice_groups(devices, slices: int):
  """Devices grouped into `slices` granules: by slice_index, else process, else blocks."""
  for key in ("slice_index", "process_index"):
    if all(hasattr(d, key) for d in devices):
      ids = sorted({getattr(d, key) for d in devices})
      if len(ids) == slices:
        return [[d for d in devices if getattr(d, key) == i] for i in ids]
  per = len(devices) // slices
  return [list(devices[i * per:(i + 1) * per]) for i in range(slices)]


def device_array(mesh_config, devices) -> np.ndarray:
  """The devices arranged as the (data, fsdp, tensor) mesh, topology-aware on TPU."""
  devices = list(devices)
  ici, dcn = hybrid_mesh_shape(mesh_config, num_devices=len(devices))
  on_tpu = devices[0].platform == "tpu"

  def arrange(shape, group):
    if on_tpu:
      from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
      return mesh_utils.create_device_mesh(shape, group, allow_split_physical_axes=True)
    return np.asarray(group, dtype=object).reshape(shape)

  if math.prod(dcn) == 1:
    return arrange(ici, devices)
  groups = _slice_groups(devices, math.prod(dcn))
  blocks = np.empty(dcn + ici, dtype=object)
  for g, index in zip(groups, np.ndindex(*dcn)):
    blocks[index] = arrange(ici, g)
  # (dcn_0, dcn_1, dcn_2, ici_0, ici_1, ici_2) -> (dcn_0 * ici_0, ...): slices are the outer factor.
  n = len(ici)
  order = [k for i in range(n) for k in (i, n + i)]
  return blocks.transpose(order).reshape([d * i for d, i in zip(dcn, ici)])


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(device_array(mesh_config, devices), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divisible(*, batch_size: int, mesh: Mesh, what: str = "training.batch_size",
                          num_processes: int | None = None):
  """The batch must split evenly over the batch shards and over the processes that read it."""
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  procs = jax.process_count() if num_processes is None else int(num_processes)
  if batch_size % shards:
    raise MeshError(
        f"config.{what}={batch_size} does not divide over the {shards} batch shards "
        f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}). Use a multiple of "
        f"{shards}, e.g. {max(shards, batch_size // shards * shards)}.")
  if batch_size % procs:
    raise MeshError(f"config.{what}={batch_size} does not divide over "
                    f"{procs} processes.")
  if shards % procs:
    raise MeshError(
        f"The mesh has {shards} batch shards (data={mesh.shape['data']} x "
        f"fsdp={mesh.shape['fsdp']}) for {procs} processes; each process reads its own rows, so "
        f"data*fsdp must be a multiple of {procs} (move devices from the tensor axis, "
        f"tensor={mesh.shape['tensor']}, to data or fsdp).")


def global_batch(local_batch: dict, *, mesh: Mesh) -> dict:
  """Assembles the global batch from this process's rows, in the mesh's device order."""
  sharding = batch_sharding(mesh)
  procs = jax.process_count()
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(
        sharding, v, (v.shape[0] * procs,) + v.shape[1:])
  return out
