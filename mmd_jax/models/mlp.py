"""Residual MLP denoiser for low-dimensional data (e.g. 2-D Gaussian mixtures).

z f32[B, D] -> Dense(hidden) -> depth x [LayerNorm, AdaLN(cond), swish,
Dense(mlp_mult * hidden), swish, dropout, Dense(hidden, zero init), +residual]
-> LayerNorm, swish, Dense(D, zero init). The conditioning vector is the same
logSNR-MLP (+ class embedding) as the UNet's, applied through per-block
``(1 + scale), shift`` modulation (adaptive LayerNorm, as in DiT, Peebles &
Xie 2023). All params carry logical axis names (see
:mod:`mmd_jax.models.embeddings`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmd_jax.models.embeddings import ConditioningEmbedding, check_label, partitioned

__all__ = ["MLPDenoiser", "build_mlp"]

_zeros = nn.initializers.zeros
_fan_in = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _dense(features, names, *, zero_init=False, dtype=jnp.float32, name=None):
  return nn.Dense(
      features, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=partitioned(_zeros if zero_init else _fan_in, names),
      bias_init=partitioned(_zeros, names[-1:]))


def _layer_norm(name, dtype):
  return nn.LayerNorm(dtype=dtype, param_dtype=jnp.float32, name=name,
                      scale_init=partitioned(nn.initializers.ones, ("norm",)),
                      bias_init=partitioned(_zeros, ("norm",)))


class MLPBlock(nn.Module):
  hidden: int
  mlp_mult: int = 2
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cond):
    scale, shift = jnp.split(
        _dense(2 * self.hidden, ("embed", "mlp"), name="cond_proj")(cond), 2, -1)
    h = _layer_norm("norm", jnp.float32)(x)
    h = nn.swish(h * (1.0 + scale) + shift).astype(self.dtype)
    h = nn.swish(_dense(self.mlp_mult * self.hidden, ("embed", "mlp"), dtype=self.dtype,
                        name="dense_0")(h))
    h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
    h = _dense(self.hidden, ("mlp", "embed"), zero_init=True, dtype=self.dtype, name="dense_1")(h)
    return x + h.astype(x.dtype)


class MLPDenoiser(nn.Module):
  """Residual MLP denoiser.

  Attributes:
    hidden: residual stream width (also the conditioning width).
    depth: number of residual blocks.
    num_classes: 0 = unconditional; else class table of num_classes + 1 rows
      (last row = classifier-free-guidance null class).
    mlp_mult: hidden expansion inside each block.
    dropout: dropout rate (train mode only; rng stream "dropout").
    dtype: compute dtype of the dense layers (params and the residual
      stream stay float32).
  """

  hidden: int = 256
  depth: int = 4
  num_classes: int = 0
  mlp_mult: int = 2
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, logsnr, label=None, *, train: bool):
    if z.ndim != 2:
      raise ValueError(f"MLPDenoiser expects z of shape [B, D], got {z.shape}")
    b, d = z.shape
    if jnp.shape(logsnr) != (b,):
      raise ValueError(f"logsnr must have shape ({b},), got {jnp.shape(logsnr)}")
    check_label(label, num_classes=self.num_classes, batch=b)
    cond = nn.swish(
        ConditioningEmbedding(self.hidden, self.num_classes, name="cond_embed")(logsnr, label))
    h = _dense(self.hidden, ("data", "embed"), name="dense_in")(z.astype(jnp.float32))
    for i in range(self.depth):
      h = MLPBlock(self.hidden, self.mlp_mult, self.dropout, deterministic=not train,
                   dtype=self.dtype, name=f"block_{i}")(h, cond)
    h = nn.swish(_layer_norm("norm_out", jnp.float32)(h))
    return _dense(d, ("embed", "data"), zero_init=True, name="dense_out")(h).astype(jnp.float32)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_mlp(model_config, *, dim: int, num_classes: int) -> MLPDenoiser:
  """Builds an :class:`MLPDenoiser` from an ml_collections ConfigDict.

  Fields read from ``model_config``:
    hidden (int): residual width, e.g. 256.
    depth (int): number of residual blocks, e.g. 4.
    mlp_mult (int, optional, default 2): block expansion factor.
    dropout (float, optional, default 0.0).
    dtype (str, optional, default "float32"): "float32" or "bfloat16".

  Args:
    dim: data dimension D (the output has the same shape as z).
    num_classes: 0 for unconditional.
  """
  cfg = model_config
  get = lambda k, d: cfg.get(k, d) if hasattr(cfg, "get") else getattr(cfg, k, d)
  dtype_name = get("dtype", "float32")
  if dtype_name not in _DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {dtype_name!r}")
  if int(dim) <= 0:
    raise ValueError(f"dim must be a positive data dimension, got {dim}")
  # The output width is taken from z at call time; `dim` is validated for a uniform factory API.
  return MLPDenoiser(
      hidden=int(cfg.hidden),
      depth=int(cfg.depth),
      num_classes=int(num_classes),
      mlp_mult=int(get("mlp_mult", 2)),
      dropout=float(get("dropout", 0.0)),
      dtype=_DTYPES[dtype_name],
  )
