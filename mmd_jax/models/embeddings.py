"""Building blocks shared by the denoisers: logical axis names, logSNR embedding.

Logical axis names
------------------
Every parameter of :mod:`mmd_jax.models.unet` and :mod:`mmd_jax.models.mlp` is
created through :func:`partitioned` so it carries one of the names below per
dimension. Mesh sharding is decided later by mapping names to mesh axes with
``flax.linen.logical_to_mesh_sharding`` (see :func:`default_logical_rules`).

==============  ============================================================
name            dimension
==============  ============================================================
conv_height     spatial height of a convolution kernel
conv_width      spatial width of a convolution kernel
conv_in         input channels of a convolution kernel
conv_out        output channels of a convolution (kernel and bias)
embed           model width entering/leaving a dense layer (conditioning
                vector, attention channels, MLP residual stream)
mlp             hidden / output features of a dense layer
vocab           rows of the class-embedding table (num_classes + 1)
qkv             the size-3 query/key/value axis of the attention projection
heads           attention heads
head_dim        features per attention head
norm            GroupNorm / LayerNorm scale and bias
data            raw data features of the MLP denoiser's input/output layer
==============  ============================================================
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

LOGICAL_AXIS_NAMES: tuple[str, ...] = (
    "conv_height",
    "conv_width",
    "conv_in",
    "conv_out",
    "embed",
    "mlp",
    "vocab",
    "qkv",
    "heads",
    "head_dim",
    "norm",
    "data",
)


def default_logical_rules(
    fsdp_axis: str | None = "fsdp", tensor_axis: str | None = "tensor"
) -> tuple[tuple[str, str | None], ...]:
  """(logical name, mesh axis or None) pairs for ``nn.logical_to_mesh_sharding``.

  Output-feature axes (``conv_out``, ``mlp``, ``heads``) are split over the
  tensor-parallel mesh axis; input-feature axes (``conv_in``, ``embed``) --
  the other large dimension of every kernel -- over the FSDP axis. No
  parameter uses two names mapped to the same mesh axis. Everything else
  (small or awkwardly sized: 3x3 spatial dims, qkv=3, norms, class table)
  is replicated. Note a dimension is only shardable if its size is
  divisible by the mesh-axis size.
  """
  rules = {name: None for name in LOGICAL_AXIS_NAMES}
  rules.update(
      conv_out=tensor_axis,
      mlp=tensor_axis,
      heads=tensor_axis,
      conv_in=fsdp_axis,
      embed=fsdp_axis,
  )
  return tuple(rules.items())


def partitioned(init: Callable, names: Sequence[str]) -> Callable:
  """Wraps an initializer so the param is boxed with logical axis ``names``."""
  unknown = [n for n in names if n not in LOGICAL_AXIS_NAMES]
  if unknown:
    raise ValueError(f"unknown logical axis names {unknown}; add them to LOGICAL_AXIS_NAMES")
  return nn.with_logical_partitioning(init, tuple(names))


def logsnr_embedding(logsnr: jax.Array, *, dim: int, min_period: float = 1.0,
                     max_period: float = 1e4) -> jax.Array:
  """Sinusoidal features of logSNR, f32[B] -> f32[B, dim].

  Same construction as the Transformer / DDPM timestep embedding (Vaswani et
  al. 2017; Ho et al. 2020) but applied directly to logSNR (Kingma et al.
  2021, "Variational Diffusion Models"): ``[sin(2 pi l / p_k), cos(2 pi l / p_k)]``
  with periods ``p_k`` geometrically spaced in ``[min_period, max_period]``.
  With logSNR in roughly [-20, 20] the shortest period (1 logSNR unit)
  resolves fine structure and the longest ones are near-linear in logSNR.
  """
  if dim % 2:
    raise ValueError(f"logsnr embedding dim must be even, got {dim}")
  half = dim // 2
  logsnr = jnp.asarray(logsnr, jnp.float32)
  periods = jnp.exp(jnp.linspace(math.log(min_period), math.log(max_period), half))
  angles = (2.0 * math.pi) * logsnr[:, None] / periods[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def check_label(label, *, num_classes: int, batch: int):
  """Validates ``label`` against ``num_classes`` (static checks only)."""
  if num_classes and label is None:
    raise ValueError(
        f"model has num_classes={num_classes} so `label` (i32[B]) is required; pass "
        f"label=jnp.full((B,), {num_classes}) for the null (unconditional) class")
  if num_classes and tuple(jnp.shape(label)) != (batch,):
    raise ValueError(f"label must have shape ({batch},), got {jnp.shape(label)}")


class ConditioningEmbedding(nn.Module):
  """logSNR features -> 2-layer MLP (+ class embedding) -> f32[B, dim].

  The class table has ``num_classes + 1`` rows; row ``num_classes`` is the
  null class used for classifier-free guidance dropout.
  """

  dim: int
  num_classes: int = 0
  freq_dim: int = 128
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, logsnr, label):
    h = logsnr_embedding(logsnr, dim=self.freq_dim)
    h = nn.Dense(self.dim, dtype=self.dtype, name="dense_0",
                 kernel_init=partitioned(nn.initializers.lecun_normal(), ("embed", "mlp")),
                 bias_init=partitioned(nn.initializers.zeros, ("mlp",)))(h)
    h = nn.swish(h)
    h = nn.Dense(self.dim, dtype=self.dtype, name="dense_1",
                 kernel_init=partitioned(nn.initializers.lecun_normal(), ("mlp", "embed")),
                 bias_init=partitioned(nn.initializers.zeros, ("embed",)))(h)
    if self.num_classes:
      emb = nn.Embed(self.num_classes + 1, self.dim, dtype=self.dtype, name="class_embed",
                     embedding_init=partitioned(nn.initializers.normal(1.0),
                                                ("vocab", "embed")))
      h = h + emb(label)
    return h
