"""The run object: AOT lowers exactly the programs the loop runs, and every registry entry
(distillation variants, samplers) runs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmd_jax import loop
from mmd_jax.diffusion import process, samplers
from mmd_jax.diffusion.schedules import Schedule
from mmd_jax.distill import moment_matching as mm
from mmd_jax.distill import steps
from mmd_jax.models import mlp
from mmd_jax.tools import aot
from tests import helpers


def _aot_hashes(config, kind):
  """The program hashes --mode=aot would compile for `config`, on this machine's 8 devices."""
  return [aot.runs_common.program_hash(p.lowered)
          for p in aot.lower_programs(config, jax.devices(), kind=kind)]


def test_aot_lowers_the_teacher_program_the_loop_ran(trained, data_dir):
  _, out = trained
  assert len(out["program_hashes"]) == 1
  assert _aot_hashes(helpers.tiny_digits_config(data_dir), "teacher") == out["program_hashes"]


@pytest.mark.parametrize("overrides, programs", [
    ({"distill.variant": "alternating", "distill.update_schedule": "both"}, 1),
    ({"distill.variant": "alternating", "distill.update_schedule": "alternate"}, 2),
    ({"distill.variant": "parameter_space", "distill.preconditioner": "adam"}, 1),
    ({"distill.variant": "progressive", "distill.num_student_steps": 2,
      "distill.teacher_steps": 8}, 2),
    ({"distill.variant": "consistency", "distill.num_student_steps": 2,
      "distill.teacher_steps": 8, "distill.target_network": "ema"}, 1),
], ids=["alternating-both", "alternating-alternate-host", "parameter_space", "progressive",
        "consistency"])
def test_aot_lowers_the_student_programs_the_loop_ran(trained, data_dir, tmp_path, overrides,
                                                      programs):
  config = helpers.tiny_digits_config(data_dir, **{
      "distill.teacher": str(trained[0]), "distill.num_steps": programs,
      "eval.num_samples": 0, **overrides})
  out = loop.distill_and_evaluate(config, str(tmp_path / "student"))
  assert len(out["program_hashes"]) == programs and int(out["state"].step) == programs
  assert _aot_hashes(config, "student") == out["program_hashes"]


# ----------------------------------------------------------------------------------------------
# Registries: every entry runs
# ----------------------------------------------------------------------------------------------

def _tiny_mlp(num_classes=2):
  model = mlp.MLPDenoiser(hidden=8, depth=1, mlp_mult=1, num_classes=num_classes)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.zeros((1,)),
                      jnp.zeros((1,), jnp.int32), train=False)["params"]
  return model, jax.tree_util.tree_map(jnp.asarray, params)


@pytest.mark.parametrize("name", sorted(steps.VARIANTS))
def test_every_registered_variant_takes_a_step(name):
  model, params = _tiny_mlp()
  config = mm.default_config()
  config.update(variant=name, num_student_steps=2, batch_size=4, num_steps=2,
                preconditioner="identity")
  student_tx, aux_tx = steps.make_optimizers(config)
  state = steps.init_distill_state(config=config, init_params=params, student_tx=student_tx,
                                   aux_tx=aux_tx)
  batch = {"x": jnp.asarray(np.random.default_rng(0).standard_normal((4, 2)), jnp.float32),
           "label": jnp.array([0, 1, 0, 1], jnp.int32)}
  phases = steps.step_phases(config)
  programs = [jax.jit(steps.make_distill_step(
      config=config, denoise=process.x_predictor(model, "v"), schedule=Schedule(),
      student_tx=student_tx, aux_tx=aux_tx, null_label=2, phase=phase)) for phase in phases]
  # Two rounds: an alternating student's first gradient is exactly 0 (auxiliary = teacher).
  for i in range(2 * len(phases)):
    state, metrics = programs[i % len(phases)](state, params, batch, jax.random.PRNGKey(1))
  assert int(state.step) == 2 * len(phases)
  assert all(np.isfinite(float(v)) for v in metrics.values())
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(state.params),
                                                    jax.tree_util.tree_leaves(params))]
  assert any(moved)


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_every_registered_sampler_samples(name):
  model, params = _tiny_mlp()
  settings = samplers.student_settings(mm.default_config())
  sample = samplers.make_sample_fn(denoise=process.x_predictor(model, "v"), schedule=Schedule(),
                                   num_classes=2, data_shape=(2,), clip=1.0, settings=settings)
  x = sample(params, jax.random.PRNGKey(0), jnp.array([0, 1, 0], jnp.int32), sampler=name,
             num_steps=3, guidance=0.5)
  assert x.shape == (3, 2) and np.all(np.isfinite(np.asarray(x)))
  assert np.abs(np.asarray(x)).max() <= 1.0  # clip is applied by every sampler
  assert name in samplers.names(student=True)
  if name in samplers.STUDENT_ONLY:
    assert name not in samplers.names(student=False)
    with pytest.raises(ValueError, match="needs a distilled student"):
      samplers.make_sample_fn(denoise=process.x_predictor(model, "v"), schedule=Schedule(),
                              num_classes=2, data_shape=(2,), clip=None)(
          params, jax.random.PRNGKey(0), jnp.array([0], jnp.int32), sampler=name, num_steps=1)
