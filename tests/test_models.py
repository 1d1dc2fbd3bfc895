"""Tests for the UNet / MLP denoisers (tiny shapes, few compiles)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmd_jax.models.embeddings import (
    LOGICAL_AXIS_NAMES,
    default_logical_rules,
    logsnr_embedding,
)
from mmd_jax.models.mlp import MLPDenoiser, build_mlp
from mmd_jax.models.unet import GroupNorm, UNet, build_unet, count_params, group_count

B = 2
# Tiny shapes run in microseconds; XLA:CPU optimisation dominates test time, so turn it off.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _jit(fn, **kw):
  return jax.jit(fn, compiler_options=_FAST_COMPILE, **kw)
TINY = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
            head_dim=8, num_classes=3, dropout=0.5)


def _perturb(params, scale=0.2):
  """Unboxes and adds noise so zero-initialised layers no longer hide the conditioning.

    Noise comes from numpy: per-leaf jax.random calls would each need a compile.
    """
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), x.dtype),
      nn.unbox(params))


def _init(model, *args):
  return _jit(lambda *a: model.init(jax.random.key(0), *a, train=False))(*args)


def _check_logical_boxes(params):
  leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), type(leaf)
    assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)
    assert set(leaf.names) <= set(LOGICAL_AXIS_NAMES), leaf.names
    assert leaf.value.dtype == jnp.float32


@pytest.fixture(scope="module")
def tiny_unet():
  model = UNet(**TINY)
  z = jax.random.normal(jax.random.key(0), (B, 8, 8, 1))
  logsnr = jnp.array([-3.0, 4.0])
  label = jnp.array([0, 3], jnp.int32)  # 3 = null class
  variables = _init(model, z, logsnr, label)
  apply = _jit(lambda m, p, z, s, y, rng, train: m.apply({"params": p}, z, s, y, train=train,
                                                            rngs={"dropout": rng}),
                  static_argnums=(0, 6))
  return model, variables["params"], z, logsnr, label, apply


def test_unet_shape_zero_init_and_logical_names(tiny_unet):
  model, params, z, logsnr, label, apply = tiny_unet
  _check_logical_boxes(params)
  out = apply(model, nn.unbox(params), z, logsnr, label, jax.random.key(1), False)
  assert out.shape == z.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)  # zero-initialised output conv


def test_unet_conditioning_and_dropout(tiny_unet):
  model, params, z, logsnr, label, apply = tiny_unet
  p = _perturb(params)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  base = apply(model, p, z, logsnr, label, k1, False)
  assert float(jnp.abs(base).max()) > 1e-3
  other_label = apply(model, p, z, logsnr, jnp.array([1, 2], jnp.int32), k1, False)
  assert float(jnp.abs(other_label - base).max()) > 1e-3
  other_logsnr = apply(model, p, z, logsnr + 1.0, label, k1, False)
  assert float(jnp.abs(other_logsnr - base).max()) > 1e-3
  # Dropout: eval ignores the rng, train depends on it.
  np.testing.assert_array_equal(apply(model, p, z, logsnr, label, k2, False), base)
  t1 = apply(model, p, z, logsnr, label, k1, True)
  t2 = apply(model, p, z, logsnr, label, k2, True)
  assert float(jnp.abs(t1 - t2).max()) > 1e-3


def test_unet_remat_and_bf16_match(tiny_unet):
  model, params, z, logsnr, label, apply = tiny_unet
  p = _perturb(params)
  key = jax.random.key(3)
  ref = apply(model, p, z, logsnr, label, key, False)
  remat = UNet(**TINY, remat=True)
  np.testing.assert_allclose(apply(remat, p, z, logsnr, label, key, False), ref, rtol=1e-5,
                             atol=1e-5)

  bf16 = UNet(**TINY, dtype=jnp.bfloat16)
  bf16_params = jax.eval_shape(
      lambda: bf16.init(jax.random.key(0), z, logsnr, label, train=False))["params"]
  _check_logical_boxes(bf16_params)  # params stay float32
  out = apply(bf16, p, z, logsnr, label, key, False)
  assert out.dtype == jnp.float32
  err = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
  assert 0 < err < 0.1, err


def test_unet_bad_inputs_raise_before_compile():
  model = UNet(**TINY)
  z = jnp.zeros((B, 8, 8, 1))
  with pytest.raises(ValueError, match="label"):
    model.init(jax.random.key(0), z, jnp.zeros((B,)), None, train=False)
  with pytest.raises(ValueError, match="logsnr"):
    model.init(jax.random.key(0), z, jnp.zeros((B + 1,)), jnp.zeros((B,), jnp.int32), train=False)
  with pytest.raises(ValueError, match="head_dim"):
    UNet(**{**TINY, "head_dim": 5}).init(jax.random.key(0), z, jnp.zeros((B,)),
                                         jnp.zeros((B,), jnp.int32), train=False)
  with pytest.raises(ValueError, match="divisible"):
    model.init(jax.random.key(0), jnp.zeros((B, 9, 9, 1)), jnp.zeros((B,)),
               jnp.zeros((B,), jnp.int32), train=False)


def test_group_norm_matches_flax_reference():
  assert [group_count(c) for c in (16, 24, 48, 64, 96, 3)] == [16, 24, 24, 32, 32, 3]
  x = 3.0 * jax.random.normal(jax.random.key(0), (2, 4, 4, 48)) + 1.5
  ours = GroupNorm(num_groups=32)
  ref = nn.GroupNorm(num_groups=group_count(48), epsilon=1e-5)
  y, y_ref = _jit(lambda x: (ours.apply(ours.init(jax.random.key(0), x), x),
                             ref.apply(ref.init(jax.random.key(0), x), x)))(x)
  np.testing.assert_allclose(y, y_ref, atol=2e-5)


def test_param_counts_and_build_unet_eval_shape():
  cfg = ml_collections.ConfigDict(dict(
      base_channels=64, channel_mult=(1, 2), num_res_blocks=2, attn_resolutions=(16,),
      head_dim=64, dropout=0.1, dtype="float32", remat=False))
  model = build_unet(cfg, image_shape=(32, 32, 3), num_classes=10)
  assert model.out_channels == 3 and model.num_classes == 10
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32),
      train=False))
  n = count_params(shapes["params"])
  assert 3.5e6 < n < 5e6, n
  cfg.dtype = "float16"
  with pytest.raises(ValueError, match="dtype"):
    build_unet(cfg, image_shape=(32, 32, 3), num_classes=10)


def test_default_rules_give_valid_mesh_shardings(tiny_unet):
  _, params, *_ = tiny_unet
  rules = default_logical_rules()
  assert {name for name, _ in rules} == set(LOGICAL_AXIS_NAMES)
  leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for leaf in leaves:
    axes = [ax for ax in nn.logical_to_mesh_axes(leaf.names, rules) if ax is not None]
    assert len(axes) == len(set(axes)), leaf.names  # no mesh axis used twice
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tensor"))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(params), mesh, rules)
  assert len(jax.tree_util.tree_leaves(shardings)) == len(leaves)


def test_logsnr_embedding():
  e = logsnr_embedding(jnp.array([-5.0, 0.0, 5.0]), dim=16)
  assert e.shape == (3, 16)
  np.testing.assert_allclose(jnp.sum(e[:, :8] ** 2 + e[:, 8:] ** 2, -1), 8.0, rtol=1e-5)


def test_mlp_denoiser():
  cfg = ml_collections.ConfigDict(dict(hidden=32, depth=2, dropout=0.5))
  model = build_mlp(cfg, dim=3, num_classes=4)
  assert isinstance(model, MLPDenoiser)
  z = jax.random.normal(jax.random.key(0), (B, 3))
  logsnr = jnp.array([-1.0, 2.0])
  label = jnp.array([0, 4], jnp.int32)
  params = _init(model, z, logsnr, label)["params"]
  _check_logical_boxes(params)
  apply = _jit(lambda p, y, rng, train: model.apply(
      {"params": p}, z, logsnr, y, train=train, rngs={"dropout": jax.random.key(rng)}),
      static_argnums=3)
  out = apply(nn.unbox(params), label, 0, False)
  assert out.shape == z.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)
  p = _perturb(params)
  run = lambda y, train=False, rng=0: apply(p, y, rng, train)
  assert float(jnp.abs(run(label) - run(jnp.array([1, 2], jnp.int32))).max()) > 1e-3
  assert float(jnp.abs(run(label, True, 1) - run(label, True, 2)).max()) > 1e-3
  np.testing.assert_array_equal(run(label, False, 1), run(label, False, 2))
  with pytest.raises(ValueError, match="label"):
    model.apply({"params": p}, z, logsnr, None, train=False)
  uncond = MLPDenoiser(hidden=16, depth=1)
  v = jax.eval_shape(lambda: uncond.init(jax.random.key(0), z, logsnr, train=False))
  assert jax.eval_shape(lambda v: uncond.apply(v, z, logsnr, train=False), v).shape == z.shape
