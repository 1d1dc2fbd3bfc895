"""UNet denoiser for images (NHWC), ADM-style.

Architecture after Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs", ADM)
and Hoogeboom et al. 2023 ("simple diffusion"): a conv stem, per resolution
level ``num_res_blocks`` residual blocks (+ self-attention at the resolutions
in ``attn_resolutions``), 2x average-pool downsampling, a middle
res/attn/res block, and a mirrored up path with ``num_res_blocks + 1`` blocks
per level that each consume one skip activation, nearest-neighbour
upsampling, and a zero-initialised output conv.

Conditioning: sinusoidal logSNR features -> MLP, plus a class embedding
(``num_classes + 1`` rows, the last being the CFG null class), give one vector
per example that modulates every residual block through adaptive GroupNorm
(``GN(h) * (1 + scale) + shift``, ADM's "AdaGN").

Every parameter is boxed with logical axis names (see
:mod:`mmd_jax.models.embeddings`), so ``model.init`` returns
``nn.LogicallyPartitioned`` leaves; use ``nn.unbox`` / ``flax.linen.meta.unbox``
to get raw arrays.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmd_jax.models.embeddings import (
    LOGICAL_AXIS_NAMES,
    ConditioningEmbedding,
    check_label,
    default_logical_rules,
    partitioned,
)

__all__ = [
    "LOGICAL_AXIS_NAMES",
    "UNet",
    "build_unet",
    "count_params",
    "default_logical_rules",
    "group_count",
]

_zeros = nn.initializers.zeros
# ADM/PyTorch-style fan-in uniform init for convs and dense layers.
_fan_in = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def group_count(channels: int, max_groups: int = 32) -> int:
  """Largest divisor of ``channels`` that is <= ``max_groups``."""
  for g in range(min(max_groups, channels), 0, -1):
    if channels % g == 0:
      return g
  return 1


def count_params(params) -> int:
  """Number of scalars in a (possibly boxed) param tree; works on eval_shape output."""
  leaves = jax.tree_util.tree_leaves(nn.unbox(params))
  return int(sum(np.prod(x.shape) for x in leaves))


class GroupNorm(nn.Module):
  """GroupNorm (Wu & He 2018) over NHWC with statistics in float32.

  Optionally applies an adaptive per-example ``(1 + scale), shift``
  modulation (ADM's AdaGN) in the same elementwise pass.

  Implementation note (CPU speed): statistics are computed from per-channel
  sums of x and x^2 over the spatial axis (a contiguous column reduction),
  then summed within groups on the tiny [B, C] arrays, so XLA never reduces
  over a strided (spatial, channel-in-group) window; normalisation, affine
  and modulation are folded into one multiply-add per element. In isolation
  (one 8 MB activation, XLA:CPU) forward+backward is ~7x faster than a
  two-pass reshape-to-groups GroupNorm; in a whole training step the gain
  over flax.linen.GroupNorm is only a few percent.
  Var = E[x^2] - E[x]^2 in float32 (clamped at 0); its relative error is
  ~1e-7 * (mean/std)^2, negligible for the O(1) activations here.
  """

  num_groups: int = 32
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, scale_shift=None):
    b, h, w, c = x.shape
    g = group_count(c, self.num_groups)
    gamma = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), (c,), jnp.float32)
    beta = self.param("bias", partitioned(_zeros, ("norm",)), (c,), jnp.float32)
    xf = x.reshape(b, h * w, c).astype(jnp.float32)
    count = h * w * (c // g)
    mean = jnp.sum(xf, axis=1).reshape(b, g, c // g).sum(-1) / count
    meansq = jnp.sum(jnp.square(xf), axis=1).reshape(b, g, c // g).sum(-1) / count
    inv = jax.lax.rsqrt(jnp.maximum(meansq - jnp.square(mean), 0.0) + self.eps)
    per_channel = lambda t: jnp.repeat(t, c // g, axis=1)  # [B, G] -> [B, C]
    a = per_channel(inv) * gamma
    bb = beta - per_channel(mean) * a
    if scale_shift is not None:
      s, t = scale_shift
      a = a * (1.0 + s)
      bb = bb * (1.0 + s) + t
    y = xf * a[:, None, :] + bb[:, None, :]
    return y.reshape(b, h, w, c).astype(self.dtype)


class Conv(nn.Module):
  """NHWC convolution with a logically partitioned HWIO kernel."""

  features: int
  kernel_size: int = 3
  zero_init: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    init = _zeros if self.zero_init else _fan_in
    kernel = self.param("kernel",
                        partitioned(init, ("conv_height", "conv_width", "conv_in", "conv_out")),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", partitioned(_zeros, ("conv_out",)), (self.features,), jnp.float32)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    if k == 1:
      y = jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0])
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(1, 1), padding="SAME",
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.astype(self.dtype)


def _dense(features, names, *, zero_init=False, dtype=jnp.float32, name=None):
  return nn.Dense(
      features, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=partitioned(_zeros if zero_init else _fan_in, names),
      bias_init=partitioned(_zeros, names[-1:]))


class ResBlock(nn.Module):
  """GN-swish-conv, AdaGN(cond)-swish-dropout-conv(zero init), + skip."""

  out_channels: int
  num_groups: int = 32
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cond):
    c = self.out_channels
    h = nn.swish(GroupNorm(self.num_groups, dtype=self.dtype, name="norm_0")(x))
    h = Conv(c, 3, dtype=self.dtype, name="conv_0")(h)
    ss = _dense(2 * c, ("embed", "mlp"), dtype=jnp.float32, name="cond_proj")(cond)
    scale, shift = jnp.split(ss, 2, axis=-1)
    h = nn.swish(GroupNorm(self.num_groups, dtype=self.dtype, name="norm_1")(h, (scale, shift)))
    h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
    h = Conv(c, 3, zero_init=True, dtype=self.dtype, name="conv_1")(h)
    if x.shape[-1] != c:
      x = Conv(c, 1, dtype=self.dtype, name="skip")(x)
    return x.astype(self.dtype) + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over all spatial positions, residual; with ``text``
  (f32[B, L, D_text]) also residual cross-attention from the positions to the text tokens
  (queries from the image, keys/values from the text; Saharia et al. 2022, Imagen)."""

  head_dim: int = 64
  num_heads: int = 0  # > 0 overrides head_dim
  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, text=None):
    x = self._self_attention(x)
    if text is not None:
      x = self._cross_attention(x, text)
    return x

  def _heads(self, c):
    heads = self.num_heads or max(1, c // self.head_dim)
    if c % heads:
      raise ValueError(f"attention channels {c} not divisible by num_heads {heads}")
    return heads, c // heads

  def _cross_attention(self, x, text):
    b, hh, ww, c = x.shape
    heads, d = self._heads(c)
    h = GroupNorm(self.num_groups, dtype=self.dtype, name="cross_norm")(x).reshape(b, hh * ww, c)
    w_q = self.param("cross_q_kernel", partitioned(_fan_in, ("embed", "heads", "head_dim")),
                     (c, heads, d), jnp.float32)
    w_kv = self.param("cross_kv_kernel",
                      partitioned(_fan_in, ("embed", "qkv", "heads", "head_dim")),
                      (text.shape[-1], 2, heads, d), jnp.float32)
    b_kv = self.param("cross_kv_bias", partitioned(_zeros, ("qkv", "heads", "head_dim")),
                      (2, heads, d), jnp.float32)
    q = jnp.einsum("bsc,chd->bshd", h, w_q.astype(self.dtype))
    kv = (jnp.einsum("blc,cthd->tblhd", text.astype(self.dtype), w_kv.astype(self.dtype))
          + b_kv[:, None, None].astype(self.dtype))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * (1.0 / math.sqrt(d)), kv[0],
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, kv[1])
    w_out = self.param("cross_out_kernel", partitioned(_zeros, ("heads", "head_dim", "embed")),
                       (heads, d, c), jnp.float32)
    b_out = self.param("cross_out_bias", partitioned(_zeros, ("embed",)), (c,), jnp.float32)
    out = jnp.einsum("bqhd,hdc->bqc", out, w_out.astype(self.dtype)) + b_out.astype(self.dtype)
    return x + out.reshape(b, hh, ww, c)

  def _self_attention(self, x):
    b, hh, ww, c = x.shape
    heads, d = self._heads(c)
    h = GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x).reshape(b, hh * ww, c)
    w_qkv = self.param("qkv_kernel", partitioned(_fan_in, ("embed", "qkv", "heads", "head_dim")),
                       (c, 3, heads, d), jnp.float32)
    b_qkv = self.param("qkv_bias", partitioned(_zeros, ("qkv", "heads", "head_dim")),
                       (3, heads, d), jnp.float32)
    qkv = (jnp.einsum("bsc,cthd->tbshd", h, w_qkv.astype(self.dtype))
           + b_qkv[:, None, None].astype(self.dtype))
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * (1.0 / math.sqrt(d)), k,
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    w_out = self.param("out_kernel", partitioned(_zeros, ("heads", "head_dim", "embed")),
                       (heads, d, c), jnp.float32)
    b_out = self.param("out_bias", partitioned(_zeros, ("embed",)), (c,), jnp.float32)
    out = jnp.einsum("bqhd,hdc->bqc", out, w_out.astype(self.dtype)) + b_out.astype(self.dtype)
    return x.astype(self.dtype) + out.reshape(b, hh, ww, c)


def _downsample(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _upsample(x):
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


class UNet(nn.Module):
  """ADM-style UNet denoiser; see the module docstring.

  Attributes:
    out_channels: output channels; 0/None -> same as the input.
    base_channels: channels at full resolution.
    channel_mult: per-level channel multipliers; len = number of levels
      (the input is downsampled ``len - 1`` times; H, W must be divisible
      by ``2 ** (len - 1)``).
    num_res_blocks: residual blocks per level on the down path (the up path
      has one more per level).
    attn_resolutions: spatial sizes (height) at which self-attention follows
      each residual block; the middle block always has attention.
    head_dim: channels per attention head (used when ``num_heads`` is 0).
    num_heads: fixed number of heads (> 0 overrides ``head_dim``).
    dropout: dropout rate inside residual blocks (train mode only; rng
      stream "dropout").
    num_classes: 0 = unconditional; else class table of num_classes + 1
      rows, the last being the classifier-free-guidance null class.
    num_groups: max GroupNorm groups; clipped to a divisor of each channel count.
    emb_mult: conditioning vector width = emb_mult * base_channels.
    dtype: compute dtype (params are always float32).
    remat: rematerialise each residual/attention block in the backward pass.
    text_dim: width of text-encoder embeddings given as ``text=f32[B, L, text_dim]``
      (0 = no text input). Text conditions the model twice: its mean over tokens,
      projected, is added to the conditioning vector, and every attention block
      cross-attends to the tokens. The null text for classifier-free guidance is all zeros.
  """

  out_channels: int | None = 0
  base_channels: int = 64
  channel_mult: Sequence[int] = (1, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  head_dim: int = 64
  num_heads: int = 0
  dropout: float = 0.0
  num_classes: int = 0
  num_groups: int = 32
  emb_mult: int = 4
  dtype: Any = jnp.float32
  remat: bool = False
  text_dim: int = 0

  def _check(self, z, logsnr, label):
    if z.ndim != 4:
      raise ValueError(f"UNet expects z of shape [B, H, W, C], got {z.shape}")
    b, h, w, _ = z.shape
    f = 2 ** (len(self.channel_mult) - 1)
    if h % f or w % f:
      raise ValueError(f"image size {h}x{w} must be divisible by 2**(len(channel_mult)-1)={f}")
    if jnp.shape(logsnr) != (b,):
      raise ValueError(f"logsnr must have shape ({b},), got {jnp.shape(logsnr)}")
    check_label(label, num_classes=self.num_classes, batch=b)
    attn_ch = {self.channel_mult[-1] * self.base_channels}  # middle block
    attn_ch |= {m * self.base_channels for i, m in enumerate(self.channel_mult)
                if h // 2 ** i in self.attn_resolutions}
    for c in sorted(attn_ch):
      if self.num_heads and c % self.num_heads:
        raise ValueError(f"attention at {c} channels needs num_heads dividing it, got "
                         f"{self.num_heads}")
      if not self.num_heads and c % self.head_dim:
        raise ValueError(f"attention at {c} channels needs head_dim dividing it, got head_dim="
                         f"{self.head_dim}; change head_dim or base_channels/channel_mult")

  @nn.compact
  def __call__(self, z, logsnr, label=None, *, train: bool, text=None):
    self._check(z, logsnr, label)
    if self.text_dim and (text is None or text.ndim != 3 or text.shape[0] != z.shape[0]
                          or text.shape[-1] != self.text_dim):
      raise ValueError(f"this UNet has text_dim={self.text_dim}: pass text=f32[B, L, "
                       f"{self.text_dim}] (zeros for the null text), got "
                       f"{None if text is None else jnp.shape(text)}")
    if text is not None and not self.text_dim:
      raise ValueError("text= given to a UNet built with text_dim=0 (set model.text_dim)")
    dt = self.dtype
    out_ch = self.out_channels or z.shape[-1]
    cond = ConditioningEmbedding(self.emb_mult * self.base_channels, self.num_classes,
                                 name="cond_embed")(logsnr, label)
    if text is not None:
      cond = cond + _dense(self.emb_mult * self.base_channels, ("embed", "mlp"),
                           name="text_pool")(jnp.mean(text.astype(jnp.float32), axis=1))
    cond = nn.swish(cond)  # cond is consumed only through linear projections

    res_cls = nn.remat(ResBlock) if self.remat else ResBlock
    attn_cls = nn.remat(AttentionBlock) if self.remat else AttentionBlock

    def res(ch, name):
      return res_cls(ch, self.num_groups, self.dropout, deterministic=not train, dtype=dt,
                     name=name)

    def attn(name):
      return attn_cls(self.head_dim, self.num_heads, self.num_groups, dtype=dt, name=name)

    h = Conv(self.base_channels, 3, dtype=dt, name="conv_in")(z)
    skips = [h]
    levels = len(self.channel_mult)
    for i, mult in enumerate(self.channel_mult):
      for j in range(self.num_res_blocks):
        h = res(mult * self.base_channels, f"down_{i}_res_{j}")(h, cond)
        if h.shape[1] in self.attn_resolutions:
          h = attn(f"down_{i}_attn_{j}")(h, text)
        skips.append(h)
      if i < levels - 1:
        h = _downsample(h)
        skips.append(h)

    mid_ch = self.channel_mult[-1] * self.base_channels
    h = res(mid_ch, "mid_res_0")(h, cond)
    h = attn("mid_attn")(h, text)
    h = res(mid_ch, "mid_res_1")(h, cond)

    for i, mult in reversed(list(enumerate(self.channel_mult))):
      for j in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = res(mult * self.base_channels, f"up_{i}_res_{j}")(h, cond)
        if h.shape[1] in self.attn_resolutions:
          h = attn(f"up_{i}_attn_{j}")(h, text)
      if i > 0:
        h = _upsample(h)
    assert not skips

    h = nn.swish(GroupNorm(self.num_groups, dtype=dt, name="norm_out")(h))
    h = Conv(out_ch, 3, zero_init=True, dtype=dt, name="conv_out")(h)
    return h.astype(jnp.float32)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_unet(model_config, *, image_shape: Sequence[int], num_classes: int) -> UNet:
  """Builds a :class:`UNet` from an ml_collections ConfigDict.

  Fields read from ``model_config`` (all required unless marked optional):
    base_channels (int): channels at full resolution, e.g. 64.
    channel_mult (tuple[int]): per-level multipliers, e.g. (1, 2).
    num_res_blocks (int): residual blocks per level (down path), e.g. 2.
    attn_resolutions (tuple[int]): spatial sizes with attention, e.g. (16,).
    head_dim (int, optional, default 64): channels per attention head.
    num_heads (int, optional, default 0): fixed head count; overrides head_dim.
    dropout (float, optional, default 0.0).
    dtype (str, optional, default "float32"): "float32" or "bfloat16" compute.
    remat (bool, optional, default False): rematerialise blocks.
    num_groups (int, optional, default 32): max GroupNorm groups.
    emb_mult (int, optional, default 4): conditioning width / base_channels.
    text_dim (int, optional, default 0): width of text-encoder embeddings passed as
      ``text=`` (0: no text conditioning).

  Args:
    image_shape: (H, W, C) of one image; output channels = C.
    num_classes: 0 for unconditional.
  """
  cfg = model_config
  if len(image_shape) != 3:
    raise ValueError(f"image_shape must be (H, W, C), got {image_shape}")
  get = lambda k, d: cfg.get(k, d) if hasattr(cfg, "get") else getattr(cfg, k, d)
  dtype_name = get("dtype", "float32")
  if dtype_name not in _DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {dtype_name!r}")
  h, w, c = image_shape
  mult = tuple(int(m) for m in cfg.channel_mult)
  f = 2 ** (len(mult) - 1)
  if h % f or w % f:
    raise ValueError(f"image size {h}x{w} not divisible by {f}; shorten model.channel_mult={mult}")
  return UNet(
      out_channels=int(c),
      base_channels=int(cfg.base_channels),
      channel_mult=mult,
      num_res_blocks=int(cfg.num_res_blocks),
      attn_resolutions=tuple(int(r) for r in cfg.attn_resolutions),
      head_dim=int(get("head_dim", 64)),
      num_heads=int(get("num_heads", 0)),
      dropout=float(get("dropout", 0.0)),
      num_classes=int(num_classes),
      num_groups=int(get("num_groups", 32)),
      emb_mult=int(get("emb_mult", 4)),
      dtype=_DTYPES[dtype_name],
      remat=bool(get("remat", False)),
      text_dim=int(get("text_dim", 0)),
  )
