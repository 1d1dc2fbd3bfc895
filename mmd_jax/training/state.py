"""Train state of a diffusion model, created born-sharded on the mesh.

The state is initialised by a jitted function whose out_shardings come from the parameters'
logical axis names (jax.eval_shape -> shardings -> jit(init, out_shardings)), so the full
parameters never exist on one host.
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax



@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  nonfinite_step: jax.Array  # first step (1-based) whose loss was not finite, -1 if none


def dummy_inputs(*, data_shape, num_classes: int):
  z = jnp.zeros((1,) + tuple(data_shape), jnp.float32)
  logsnr = jnp.zeros((1,), jnp.float32)
  label = jnp.zeros((1,), jnp.int32) if num_classes > 0 else None
  return z, logsnr, label


def init_params(model: nn.Module, *, rng, data_shape, num_classes: int, text_shape=None):
  """Boxed (logically annotated) parameters of `model`; text_shape (tokens, width) for a model
  conditioned on text-encoder embeddings (model(..., text=f32[B, tokens, width]))."""
  z, logsnr, label = dummy_inputs(data_shape=data_shape, num_classes=num_classes)
  kw = {"text": jnp.zeros((1,) + tuple(text_shape), jnp.float32)} if text_shape else {}
  return model.init({"params": rng, "dropout": rng}, z, logsnr, label, train=False,
                    **kw)["params"]


def _boxed_state(model, tx, rng, data_shape, num_classes, text_shape=None):
  params = init_params(model, rng=rng, data_shape=data_shape, num_classes=num_classes,
                       text_shape=text_shape)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params, nonfinite_step=jnp.full((), -1, jnp.int32))


def abstract_state(model, tx, *, data_shape, num_classes, text_shape=None):
  """The state's shapes with logical boxes, without allocating anything."""
  return jax.eval_shape(
      lambda rng: _boxed_state(model, tx, rng, data_shape, num_classes, text_shape),
      jax.random.PRNGKey(0))


FAST_COMPILE = {"xla_backend_optimization_level": 0}


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, *, rng, data_shape,
                       num_classes: int, shardings, text_shape=None):
  """Initialises the state directly into `shardings` (born sharded); text_shape (tokens, width)
  for a text-conditioned model, as in init_params.

  It runs once, and its per-parameter random initialisers compile several times faster at XLA
  optimisation level 0, so it is compiled that way.
  """
  init = jax.jit(lambda r: nn.unbox(_boxed_state(model, tx, r, data_shape, num_classes,
                                                 text_shape)),
                 out_shardings=shardings, compiler_options=FAST_COMPILE)
  return init(rng)
