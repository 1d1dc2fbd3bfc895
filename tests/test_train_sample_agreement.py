"""Training and sampling agree (paper-fidelity issue): the dropout options of distillation and the
clipping of x_tilde in the training draws of z_s, against direct computations."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmd_jax import runs

from mmd_jax.diffusion import process
from mmd_jax.diffusion.schedules import Schedule
from mmd_jax.distill import common
from mmd_jax.distill import moment_matching as mm
from mmd_jax.distill import steps
from mmd_jax.models import mlp

SCHEDULE = Schedule()


def _dropout_mlp():
  model = mlp.MLPDenoiser(hidden=16, depth=1, mlp_mult=2, num_classes=2, dropout=0.5)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.zeros((1,)),
                      jnp.zeros((1,), jnp.int32), train=False)["params"]
  # Random everywhere (the model's own init zeroes the residual output layers).
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(treedef, [
      0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  return model, params


def _first_student_grad_norm(dropout):
  model, params = _dropout_mlp()
  config = mm.default_config()
  config.update(num_student_steps=4, update_schedule="both", dropout=dropout)
  student_tx, aux_tx = steps.make_optimizers(config)
  state = steps.init_distill_state(config=config, init_params=params, student_tx=student_tx,
                                   aux_tx=aux_tx)
  step = jax.jit(steps.make_distill_step(config=config, denoise=process.x_predictor(model, "v"),
                                         schedule=SCHEDULE, student_tx=student_tx,
                                         aux_tx=aux_tx, null_label=2))
  batch = {"x": jax.random.normal(jax.random.PRNGKey(2), (8, 2)),
           "label": jnp.arange(8, dtype=jnp.int32) % 2}
  _, metrics = step(state, params, batch, jax.random.PRNGKey(3))
  return float(metrics["student_grad_norm"])


def test_dropout_modes_first_student_gradient():
  """Auxiliary = teacher at initialisation: the student's gradient w (g_aux - g_teacher) dJ is
  0 (up to float32 rounding of differently fused programs) when the teacher sees the
  auxiliary's dropout mask ('shared') or nobody drops out ('off'), and pure dropout noise
  otherwise ('independent', the dropout rate here is 0.5)."""
  noise = _first_student_grad_norm("independent")
  assert noise > 1e-2
  for mode in ("shared", "off"):
    assert _first_student_grad_norm(mode) < 1e-5 * noise, mode


def test_clipped_training_draw_is_the_posterior_of_the_clipped_x_tilde():
  """With clip, z_s ~ q(z_s | z_t, clip(x_tilde)) with the draw's own keys; x_tilde itself (what
  the loss sees) is unclipped; without clip the draw is unchanged."""
  model, params = _dropout_mlp()
  config = mm.default_config()
  config.update(num_student_steps=2, eta=0.7, dropout="off")
  denoise = process.x_predictor(model, "v")
  x = 3.0 * jax.random.normal(jax.random.PRNGKey(4), (16, 2))
  label = jnp.zeros((16,), jnp.int32)
  key = jax.random.PRNGKey(5)
  plain, _ = common.draw(key, config=config, schedule=SCHEDULE, denoise=denoise, params=params,
                         x=x, label=label)
  clipped, _ = common.draw(key, config=config, schedule=SCHEDULE, denoise=denoise,
                           params=params, x=x, label=label, clip=0.2)
  assert float(jnp.abs(plain["x_tilde"]).max()) > 0.2  # the clip is active
  np.testing.assert_array_equal(clipped["x_tilde"], plain["x_tilde"])
  # The draw's keys (common.draw): k_time, k_eps, k_zs, k_drop = split(key, 4).
  k_zs = jax.random.split(key, 4)[2]
  want = mm.sample_z_s(rng=k_zs, z_t=plain["z_t"], x_tilde=jnp.clip(plain["x_tilde"], -0.2, 0.2),
                       logsnr_s=plain["logsnr_s"], logsnr_t=plain["logsnr_t"], eta=0.7)
  np.testing.assert_allclose(clipped["z_s"], want, rtol=1e-6, atol=1e-6)
  assert not np.allclose(clipped["z_s"], plain["z_s"])
  # The posterior mean, written out (eta scales the posterior std; Kingma et al. 2021, VDM):
  # E[z_s] = r (alpha_s / alpha_t) z_t + (1 - r) alpha_s clip(x_tilde), r = SNR_t / SNR_s.
  ls, lt = plain["logsnr_s"][:, None], plain["logsnr_t"][:, None]
  alpha = lambda l: jnp.sqrt(jax.nn.sigmoid(l))
  r = jnp.exp(lt - ls)
  mean = r * alpha(ls) / alpha(lt) * plain["z_t"] + (1 - r) * alpha(ls) * jnp.clip(
      plain["x_tilde"], -0.2, 0.2)
  noise_part = clipped["z_s"] - mean
  std = 0.7 * jnp.sqrt((1 - r) * jax.nn.sigmoid(-ls))
  assert float(jnp.abs(noise_part).max()) <= float(6 * std.max()) + 1e-5


@pytest.mark.parametrize("clipping, train, sample", [("neither", None, None), ("both", 1.0, 1.0),
                                                     ("sampler", None, 1.0)])
def test_student_run_clips_training_draws_and_samplers_alike(clipping, train, sample):
  """The run passes one clip to the training draws of z_s and to the student's samplers ('neither'
  and 'both' agree; 'sampler' is the old mismatch, kept as an option)."""
  config = _runlocal_student()
  config.distill.clipping = clipping
  run = runs.build(config, kind="student", mesh=None, need_data=False)
  assert run.train_clip() == train and run.sample_clip() == sample


@pytest.mark.parametrize("saved, mode", [({"clip_train_draws": True}, "both"),
                                         ({"clip_train_draws": False}, "sampler"),
                                         ({}, "sampler")])
def test_configs_saved_before_the_clipping_option_keep_their_behaviour(saved, mode):
  """A student saved by older code evaluates with the clipping it was trained and sampled with."""
  config = _runlocal_student()
  del config.distill["clipping"]
  config.distill.update(saved)
  assert mm.clipping(config.distill) == mode
  run = runs.build(config, kind="student", mesh=None, need_data=False)
  assert run.sample_clip() == 1.0
  assert run.train_clip() == (1.0 if mode == "both" else None)


def _runlocal_student():
  from mmd_jax import config_lib
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "imagenet64_distill.py")
  config = config_lib.load_config_file(path, "runlocal")
  assert config.diffusion.clip_x == 1.0
  return config
