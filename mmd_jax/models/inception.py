"""InceptionV3, FID variant (the 2015 TensorFlow graph), in Flax linen (NHWC).

Architecture: Szegedy et al. 2016, "Rethinking the Inception Architecture for
Computer Vision", in the form of the ``inception-2015-12-05`` TensorFlow graph
that the original FID code (Heusel et al. 2017) used, as re-expressed by
pytorch-fid. It differs from the torchvision InceptionV3 in two ways:

* every 3x3/stride-1 average pool inside the mixed blocks (5b-5d, 6b-6e, 7b)
  excludes the zero padding from the average (TF "SAME" pooling);
* the pool branch of the last block (Mixed_7c) is a 3x3/stride-1 *max* pool.

Every conv is ``conv(no bias) -> BatchNorm(eps=1e-3, running stats) -> ReLU``.
The model returns the 2048-d features after the final global average pool
(pytorch-fid block 3, TF ``pool_3``) and the 1008 logits of the ``fc`` layer
(for the Inception Score).

Weights
-------
Nothing is downloaded at run time. Get pytorch-fid's weight file
``pt_inception-2015-12-05-6726825d.pth`` yourself: it is the asset of the
"FID weights" release (tag ``fid_weights``) of the GitHub repository
``mseitzer/pytorch-fid``. Convert it once, in an environment that has torch::

    python experiments/convert_inception_weights.py \
        --input pt_inception-2015-12-05-6726825d.pth --output inception_fid.npz

and load the result with :func:`load_inception_params` (no pickle).

Input protocol (pytorch-fid's): uint8 NHWC images -> float in [0, 1] (/255)
-> bilinear resize to 299x299 with ``align_corners=False`` and no
anti-aliasing (``torch.nn.functional.interpolate(mode='bilinear')``) ->
``2x - 1``. :func:`preprocess_uint8` does exactly that; the resize is a pair of
interpolation matrices (:func:`bilinear_resize_matrix`), because
``jax.image.resize`` anti-aliases when downsampling.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmd_jax import io_utils

__all__ = [
    "INCEPTION_INPUT_SIZE",
    "INCEPTION_NPZ_FORMAT",
    "NUM_LOGITS",
    "POOL_FEATURES",
    "InceptionV3",
    "bilinear_resize_matrix",
    "resize_bilinear",
    "preprocess_uint8",
    "init_inception_params",
    "convert_torch_state_dict",
    "variables_to_flat",
    "flat_to_variables",
    "load_inception_params",
    "save_inception_npz",
    "make_inception_feature_fn",
    "StandInFeatureNet",
    "make_standin_feature_fn",
]

INCEPTION_INPUT_SIZE = 299
POOL_FEATURES = 2048
NUM_LOGITS = 1008
BN_EPSILON = 1e-3
# Stored in every converted .npz under the key "__format__".
INCEPTION_NPZ_FORMAT = "mmd_jax-inception-fid-v1 (pt_inception-2015-12-05 layout)"
_FORMAT_KEY = "__format__"

_HIGHEST = jax.lax.Precision.HIGHEST


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class ConvBN(nn.Module):
  """conv (no bias) -> BatchNorm(eps=1e-3, running averages) -> ReLU.

  Submodule names ``conv`` / ``bn`` mirror pytorch's ``BasicConv2d``.
  """
  features: int
  kernel: int | tuple[int, int]
  strides: int | tuple[int, int] = 1
  padding: int | tuple[int, int] = 0
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON,
                     name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  # TF "SAME" average pooling: padded zeros are not counted in the mean.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (35x35)."""
  pool_features: int
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    cb = functools.partial(ConvBN, precision=self.precision)
    b1 = cb(64, 1, name="branch1x1")(x)
    b5 = cb(48, 1, name="branch5x5_1")(x)
    b5 = cb(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = cb(64, 1, name="branch3x3dbl_1")(x)
    b3 = cb(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = cb(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = cb(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a, grid reduction 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    cb = functools.partial(ConvBN, precision=self.precision)
    b3 = cb(384, 3, strides=2, name="branch3x3")(x)
    bd = cb(64, 1, name="branch3x3dbl_1")(x)
    bd = cb(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = cb(96, 3, strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b-6e (17x17), factorised 7x7 convolutions (1x7 and 7x1)."""
  channels_7x7: int
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    cb = functools.partial(ConvBN, precision=self.precision)
    c7 = self.channels_7x7
    b1 = cb(192, 1, name="branch1x1")(x)
    b7 = cb(c7, 1, name="branch7x7_1")(x)
    b7 = cb(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = cb(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = cb(c7, 1, name="branch7x7dbl_1")(x)
    bd = cb(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = cb(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = cb(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = cb(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = cb(192, 1, name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a, grid reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    cb = functools.partial(ConvBN, precision=self.precision)
    b3 = cb(192, 1, name="branch3x3_1")(x)
    b3 = cb(320, 3, strides=2, name="branch3x3_2")(b3)
    b7 = cb(192, 1, name="branch7x7x3_1")(x)
    b7 = cb(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = cb(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = cb(192, 3, strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b/7c (8x8), expanded filter bank outputs.

  ``pool="avg"`` (Mixed_7b, padding excluded) or ``pool="max"`` (Mixed_7c:
  the 2015 graph uses a max pool in this block's pool branch).
  """
  pool: str
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    cb = functools.partial(ConvBN, precision=self.precision)
    b1 = cb(320, 1, name="branch1x1")(x)
    b3 = cb(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        cb(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        cb(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
    ], axis=-1)
    bd = cb(448, 1, name="branch3x3dbl_1")(x)
    bd = cb(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        cb(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        cb(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
    ], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3_same(x)
    elif self.pool == "max":
      # Padding with -inf (lax.reduce_window's init value), as torch does.
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}.")
    bp = cb(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """FID InceptionV3. Input f32[B,H,W,3] in [-1, 1] (299x299 for the protocol).

  Returns ``(pool, logits)``: f32[B,2048] features after the global average
  pool and f32[B,1008] logits. Names follow the torch state dict
  (``Conv2d_1a_3x3``, ``Mixed_5b`` ... ``Mixed_7c``, ``fc``). Inference only:
  BatchNorm always uses its running statistics (collection ``batch_stats``).
  """
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    p = self.precision
    x = ConvBN(32, 3, strides=2, precision=p, name="Conv2d_1a_3x3")(x)
    x = ConvBN(32, 3, precision=p, name="Conv2d_2a_3x3")(x)
    x = ConvBN(64, 3, padding=1, precision=p, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = ConvBN(80, 1, precision=p, name="Conv2d_3b_1x1")(x)
    x = ConvBN(192, 3, precision=p, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, precision=p, name="Mixed_5b")(x)
    x = InceptionA(64, precision=p, name="Mixed_5c")(x)
    x = InceptionA(64, precision=p, name="Mixed_5d")(x)
    x = InceptionB(precision=p, name="Mixed_6a")(x)
    x = InceptionC(128, precision=p, name="Mixed_6b")(x)
    x = InceptionC(160, precision=p, name="Mixed_6c")(x)
    x = InceptionC(160, precision=p, name="Mixed_6d")(x)
    x = InceptionC(192, precision=p, name="Mixed_6e")(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)
    x = InceptionE("avg", precision=p, name="Mixed_7b")(x)
    x = InceptionE("max", precision=p, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_LOGITS, precision=p, name="fc")(pool)
    return pool, logits


# --------------------------------------------------------------------------
# Resize / preprocessing


def bilinear_resize_matrix(*, in_size: int, out_size: int) -> np.ndarray:
  """f32[out_size, in_size] matrix of 1-D bilinear interpolation.

  Same sampling as torch ``F.interpolate(mode='bilinear',
  align_corners=False)`` without anti-aliasing: output pixel ``i`` samples
  the input at ``src = (i + 0.5) * in/out - 0.5``, clamped below at 0, from
  pixels ``floor(src)`` and ``floor(src) + 1`` (the latter clamped to the
  border).
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"resize sizes must be >= 1, got in={in_size}, out={out_size}.")
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = np.clip(src - i0, 0.0, 1.0)
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), 1.0 - w1)
  np.add.at(m, (rows, i1), w1)
  return m.astype(np.float32)


def resize_bilinear(images: jax.Array, *, height: int, width: int) -> jax.Array:
  """Bilinear resize of f32[B,H,W,C] (align_corners=False, no anti-aliasing)."""
  _, h, w, _ = images.shape
  if (h, w) == (height, width):
    return images
  mh = jnp.asarray(bilinear_resize_matrix(in_size=h, out_size=height))
  mw = jnp.asarray(bilinear_resize_matrix(in_size=w, out_size=width))
  x = jnp.einsum("oh,bhwc->bowc", mh, images, precision=_HIGHEST)
  return jnp.einsum("pw,bowc->bopc", mw, x, precision=_HIGHEST)


def _check_uint8_images(images: Any) -> None:
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
        f"Inception expects uint8 NHWC RGB images [B,H,W,3], got shape "
        f"{tuple(images.shape)}; tile grayscale to 3 channels first.")
  if images.dtype != np.uint8:
    raise ValueError(
        f"Inception expects uint8 images (the FID protocol quantises first), "
        f"got dtype {images.dtype}; use mmd_jax.evaluation.fid.quantize_to_uint8 "
        f"on images in [-1, 1].")


def preprocess_uint8(images: jax.Array, *,
                     size: int = INCEPTION_INPUT_SIZE) -> jax.Array:
  """uint8[B,H,W,3] -> f32[B,size,size,3] in [-1, 1], as pytorch-fid does."""
  x = images.astype(jnp.float32) / 255.0
  x = resize_bilinear(x, height=size, width=size)
  return 2.0 * x - 1.0


# --------------------------------------------------------------------------
# Parameters: random init, torch conversion, .npz I/O


def _random_variables(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, Any]:
  # Legacy RandomState: its streams are frozen across numpy versions.
  rng = np.random.RandomState(seed)
  flat = {}
  for key in sorted(shapes):
    shape, leaf = shapes[key], key.rsplit("/", 1)[-1]
    if leaf == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    elif leaf in ("scale", "var"):
      value = np.ones(shape)
    else:
      value = np.zeros(shape)
    flat[key] = jnp.asarray(value, jnp.float32)
  return flat_to_variables(flat)


def init_inception_params(*, seed: int = 0) -> dict[str, Any]:
  """Random ``{"params", "batch_stats"}`` (for tests; features are meaningless).

  He-normal conv/fc kernels, BatchNorm scale 1, bias 0, mean 0, var 1, so
  activations stay O(1) through the depth. Drawn with numpy from the shapes
  of ``jax.eval_shape(model.init)``: jitting ``model.init`` itself takes tens
  of seconds on CPU.
  """
  return _random_variables(_expected_shapes(), seed)


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> dict[str, tuple[int, ...]]:
  shapes = jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32))
  return {k: tuple(v.shape) for k, v in variables_to_flat(shapes).items()}


def variables_to_flat(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Nested variables -> ``{"params/Mixed_5b/branch1x1/conv/kernel": array}``."""
  flat = {}

  def visit(prefix, node):
    if isinstance(node, Mapping):
      for k, v in node.items():
        visit(f"{prefix}/{k}" if prefix else str(k), v)
    else:
      flat[prefix] = node

  visit("", variables)
  return flat


def flat_to_variables(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of :func:`variables_to_flat`."""
  out: dict[str, Any] = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def convert_torch_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """pytorch-fid ``pt_inception-2015-12-05`` state dict -> flat Flax arrays.

  ``state_dict`` maps torch names (``Mixed_5b.branch1x1.conv.weight``, ...) to
  numpy arrays (call ``.numpy()`` on the tensors first). Conv weights go
  OIHW -> HWIO, BatchNorm weight/bias/running_mean/running_var go to
  params scale/bias and batch_stats mean/var, fc weight [out,in] is
  transposed. ``num_batches_tracked`` and ``AuxLogits.*`` (absent from the
  FID file, present in torchvision checkpoints) are ignored. Raises
  ValueError on missing, unexpected or mis-shaped entries.
  """
  bn_map = {"weight": ("params", "scale"), "bias": ("params", "bias"),
            "running_mean": ("batch_stats", "mean"),
            "running_var": ("batch_stats", "var")}
  flat: dict[str, np.ndarray] = {}
  unexpected = []
  for name, value in state_dict.items():
    arr = np.asarray(value)
    parts = name.split(".")
    if parts[-1] == "num_batches_tracked" or parts[0] == "AuxLogits":
      continue
    if parts[0] == "fc" and len(parts) == 2:
      if parts[1] == "weight":
        flat["params/fc/kernel"] = arr.T
      elif parts[1] == "bias":
        flat["params/fc/bias"] = arr
      else:
        unexpected.append(name)
    elif len(parts) >= 3 and parts[-2] == "conv" and parts[-1] == "weight":
      flat["params/" + "/".join(parts[:-1]) + "/kernel"] = arr.transpose(2, 3, 1, 0)
    elif len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in bn_map:
      coll, leaf = bn_map[parts[-1]]
      flat[f"{coll}/" + "/".join(parts[:-1]) + f"/{leaf}"] = arr
    else:
      unexpected.append(name)
  _validate_flat(flat, unexpected=unexpected, source="torch state dict")
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in flat.items()}


def _validate_flat(flat: Mapping[str, Any], *, unexpected=(), source: str) -> None:
  expected = _expected_shapes()
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(unexpected) | (set(flat) - set(expected)))
  bad = [f"{k}: {tuple(np.shape(flat[k]))} != {expected[k]}"
         for k in sorted(set(flat) & set(expected))
         if tuple(np.shape(flat[k])) != expected[k]]
  if missing or unexpected or bad:
    raise ValueError(
        f"{source} does not match the FID InceptionV3 (pt_inception-2015-12-05) "
        f"layout: {len(missing)} missing {missing[:5]}, {len(unexpected)} "
        f"unexpected {unexpected[:5]}, {len(bad)} mis-shaped {bad[:5]}. Use "
        f"pytorch-fid's pt_inception-2015-12-05-6726825d.pth converted by "
        f"experiments/convert_inception_weights.py.")


def load_inception_params(npz_path: str) -> dict[str, Any]:
  """Load ``{"params", "batch_stats"}`` from a converted .npz (no pickle).

  Produce the file with ``experiments/convert_inception_weights.py`` (see the
  module docstring for where the weights come from).
  """
  try:
    with np.load(npz_path, allow_pickle=False) as data:
      flat = {k: np.asarray(data[k]) for k in data.files}
  except FileNotFoundError:
    raise FileNotFoundError(
        f"Inception weights {npz_path!r} not found. Download pytorch-fid's "
        f"pt_inception-2015-12-05-6726825d.pth (GitHub mseitzer/pytorch-fid, "
        f"release 'FID weights') and convert it with "
        f"experiments/convert_inception_weights.py.") from None
  fmt = flat.pop(_FORMAT_KEY, None)
  if fmt is not None and str(fmt) != INCEPTION_NPZ_FORMAT:
    raise ValueError(f"{npz_path}: format {str(fmt)!r}, expected "
                     f"{INCEPTION_NPZ_FORMAT!r}; re-run the converter.")
  _validate_flat(flat, source=npz_path)
  return flat_to_variables({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


def save_inception_npz(path: str, flat: Mapping[str, np.ndarray]) -> None:
  """Write flat arrays (from :func:`convert_torch_state_dict`) to .npz."""
  _validate_flat(flat, source="arrays to save")
  io_utils.write_npz_atomic(path, {_FORMAT_KEY: np.array(INCEPTION_NPZ_FORMAT),
                                  **{k: np.asarray(v, np.float32) for k, v in flat.items()}})


# --------------------------------------------------------------------------
# Feature functions: uint8 images -> (pool features, logits)


def make_inception_feature_fn(
    variables: Mapping[str, Any]) -> Callable[[Any], tuple[jax.Array, jax.Array]]:
  """Jitted ``uint8[B,H,W,3] -> (f32[B,2048] pool, f32[B,1008] logits)``.

  Applies :func:`preprocess_uint8` (pytorch-fid protocol) then the network.
  Compiles once per input shape: keep the batch shape fixed (pad the last
  batch).
  """
  model = InceptionV3()

  @jax.jit
  def forward(variables, images):
    return model.apply(variables, preprocess_uint8(images))

  def feature_fn(images):
    _check_uint8_images(images)
    return forward(variables, images)

  return feature_fn


class StandInFeatureNet(nn.Module):
  """STAND-IN feature net (NOT Inception, NOT FID): fixed random convolutions.

  Four random 3x3/stride-2 convs with ReLU, global mean and max pools, a
  random projection (+ReLU) to ``feature_dim`` features and a random linear
  head with ``num_logits`` outputs. He-normal weights from
  ``np.random.RandomState(seed)`` (stable across numpy versions), zero
  biases, so numbers are reproducible but only comparable with other
  stand-in numbers of the same seed and dim.
  """
  feature_dim: int = POOL_FEATURES
  num_logits: int = NUM_LOGITS

  @nn.compact
  def __call__(self, x):
    for i, ch in enumerate((32, 64, 128, 256)):
      x = nn.relu(nn.Conv(ch, (3, 3), strides=(2, 2), precision=_HIGHEST,
                          name=f"conv{i}")(x))
    pooled = jnp.concatenate([jnp.mean(x, axis=(1, 2)), jnp.max(x, axis=(1, 2))], -1)
    feats = nn.relu(nn.Dense(self.feature_dim, precision=_HIGHEST, name="proj")(pooled))
    return feats, nn.Dense(self.num_logits, precision=_HIGHEST, name="head")(feats)


STANDIN_INPUT_SIZE = 64


def make_standin_feature_fn(
    *, seed: int = 0, feature_dim: int = POOL_FEATURES
) -> Callable[[Any], tuple[jax.Array, jax.Array]]:
  """Jitted stand-in ``uint8[B,H,W,3] -> (f32[B,feature_dim], f32[B,1008])``.

  Same preprocessing as the real protocol but resized to 64x64. For running
  pipelines without Inception weights only: label its outputs with
  ``mmd_jax.evaluation.fid.standin_protocol(...)``.
  """
  model = StandInFeatureNet(feature_dim=feature_dim)
  dummy = jax.ShapeDtypeStruct((1, STANDIN_INPUT_SIZE, STANDIN_INPUT_SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)
  variables = _random_variables(
      {k: tuple(v.shape) for k, v in variables_to_flat(shapes).items()}, seed)

  @jax.jit
  def forward(variables, images):
    return model.apply(variables, preprocess_uint8(images, size=STANDIN_INPUT_SIZE))

  def feature_fn(images):
    _check_uint8_images(images)
    return forward(variables, images)

  return feature_fn
