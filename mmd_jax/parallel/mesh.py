"""Device mesh from config, logical-axis shardings, and global batch assembly.

The mesh has axes ("data", "fsdp", "tensor"); one size may be -1 and is filled from the device
count. The batch is split over ("data", "fsdp"); parameters are placed by logical axis rules
(model parameters carry logical names through nn.with_logical_partitioning).
"""
from __future__ import annotations

import math

import flax.linen as nn
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


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, num_devices=len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divisible(*, batch_size: int, mesh: Mesh, what: str = "training.batch_size"):
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if batch_size % shards:
    raise MeshError(
        f"config.{what}={batch_size} does not divide over the {shards} batch shards "
        f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}). Use a multiple of "
        f"{shards}, e.g. {max(shards, batch_size // shards * shards)}.")
  if batch_size % jax.process_count():
    raise MeshError(f"config.{what}={batch_size} does not divide over "
                    f"{jax.process_count()} processes.")


def logical_shardings(abstract_boxed_tree, *, mesh: Mesh, rules):
  """NamedShardings for a tree whose leaves may be nn.Partitioned boxes (others replicate)."""
  specs = nn.get_partition_spec(abstract_boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def global_batch(local_batch: dict, *, mesh: Mesh) -> dict:
  """Assembles the global batch from this process's rows, in the mesh's device order."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
