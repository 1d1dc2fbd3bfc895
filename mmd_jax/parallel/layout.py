"""Born-sharded states and sharded jits for the teacher, the distillation steps and samplers.

Teacher:
    abstract, sh = teacher_layout(model=..., tx=..., data_shape=..., num_classes=..., mesh=mesh,
                                  model_config=config.model, mesh_config=config.mesh)
    state = state_lib.create_train_state(model, tx, rng=..., ..., shardings=sh)
    step = jit_teacher_step(step_fn, state_shardings=sh, mesh=mesh)

Distillation (student, auxiliary, their optimizer states, EMA and nu EMA all sharded like the
teacher's parameters; the frozen teacher is a sharded argument of the step, never a constant):
    lay = distill_layout(distill_config=config.distill, model=..., student_tx=tx, aux_tx=tx,
                         data_shape=..., num_classes=..., mesh=mesh, model_config=config.model,
                         mesh_config=config.mesh)
    teacher = jax.device_put(teacher_params, lay.teacher)   # or restore into lay.teacher
    state = init_distill_state_sharded(lay, distill_config=..., student_tx=tx, aux_tx=tx)(teacher)
    step = jit_distill_step(step_fn, layout=lay, mesh=mesh, with_precond=...)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax

from mmd_jax.models import build as model_build
from mmd_jax.parallel import mesh as mesh_lib
from mmd_jax.parallel import sharding as sharding_lib
from mmd_jax.training import state as state_lib


def param_layout(*, model, data_shape, num_classes: int, mesh, model_config=None,
                 mesh_config=None, text_shape=None):
  """(boxed abstract parameters, their NamedShardings)."""
  boxed = jax.eval_shape(lambda r: state_lib.init_params(model, rng=r, data_shape=data_shape,
                                                         num_classes=num_classes,
                                                         text_shape=text_shape),
                         jax.random.PRNGKey(0))
  rules = model_build.logical_rules(model_config, mesh_config)
  return boxed, sharding_lib.tree_shardings(boxed, mesh=mesh, model_rules=rules,
                                            mesh_config=mesh_config)


def teacher_layout(*, model, tx, data_shape, num_classes: int, mesh, model_config=None,
                   mesh_config=None, text_shape=None):
  """(boxed abstract TrainState, its NamedShardings) for the teacher's training."""
  abstract = state_lib.abstract_state(model, tx, data_shape=data_shape, num_classes=num_classes,
                                      text_shape=text_shape)
  rules = model_build.logical_rules(model_config, mesh_config)
  return abstract, state_lib.state_shardings(abstract, mesh=mesh, rules=rules,
                                             mesh_config=mesh_config)


@dataclasses.dataclass
class DistillLayout:
  abstract_state: Any   # boxed abstract DistillState
  state: Any            # its NamedShardings
  abstract_teacher: Any # boxed abstract teacher parameters
  teacher: Any          # their NamedShardings (also those of a preconditioner)


def distill_layout(*, distill_config, model, student_tx, aux_tx=None, data_shape,
                   num_classes: int, mesh, model_config=None, mesh_config=None,
                   text_shape=None) -> DistillLayout:
  """Shardings of the distillation state and of the teacher (student = teacher architecture)."""
  from mmd_jax.distill import steps as distill_steps  # pylint: disable=g-import-not-at-top
  boxed, teacher_sh = param_layout(model=model, data_shape=data_shape, num_classes=num_classes,
                                   mesh=mesh, model_config=model_config, mesh_config=mesh_config,
                                   text_shape=text_shape)
  abstract = jax.eval_shape(
      lambda p: distill_steps.init_distill_state(config=distill_config, init_params=p,
                                                 student_tx=student_tx, aux_tx=aux_tx), boxed)
  rules = model_build.logical_rules(model_config, mesh_config)
  state_sh = sharding_lib.tree_shardings(abstract, mesh=mesh, model_rules=rules,
                                         mesh_config=mesh_config, log=False)
  return DistillLayout(abstract, state_sh, boxed, teacher_sh)


def init_distill_state_sharded(layout: DistillLayout, *, distill_config, student_tx,
                               aux_tx=None) -> Callable:
  """init(init_params) -> DistillState created directly into the layout's shardings; init_params
  (normally the teacher's EMA parameters) are sharded like the teacher."""
  from mmd_jax.distill import steps as distill_steps  # pylint: disable=g-import-not-at-top

  def init(init_params):
    return nn.unbox(distill_steps.init_distill_state(
        config=distill_config, init_params=init_params, student_tx=student_tx, aux_tx=aux_tx))

  return jax.jit(init, in_shardings=(layout.teacher,), out_shardings=layout.state)


def unboxed(abstract_boxed):
  return nn.unbox(abstract_boxed)


def jit_teacher_step(step_fn, *, state_shardings, mesh, donate: bool = True,
                     compiler_options=None):
  """step(state, batch, rng) -> (state, metrics), state donated, batch split over data x fsdp."""
  return jax.jit(step_fn,
                 in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh),
                               mesh_lib.replicated(mesh)),
                 out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
                 donate_argnums=(0,) if donate else (), compiler_options=compiler_options)


def jit_distill_step(step_fn, *, layout: DistillLayout, mesh, with_precond: bool = False,
                     donate: bool = True, compiler_options=None):
  """step(state, teacher_params, batch, rng[, precond]) -> (state, metrics): the teacher (and the
  preconditioner) are sharded arguments like the student's parameters; the state is donated."""
  repl = mesh_lib.replicated(mesh)
  ins = (layout.state, layout.teacher, mesh_lib.batch_sharding(mesh), repl)
  if with_precond:
    ins = ins + (layout.teacher,)
  return jax.jit(step_fn, in_shardings=ins, out_shardings=(layout.state, repl),
                 donate_argnums=(0,) if donate else (), compiler_options=compiler_options)


def jit_sampler(sample_fn, *, params_shardings, mesh, shape, with_label: bool):
  """sample(params, rng[, label]) -> x for a fixed `shape`, from a sampler
  `sample_fn(params, rng, *, shape, label=None)` (e.g. distill.steps.make_student_sampler):
  parameters sharded like training, samples and labels split over the batch axes."""
  repl, batch = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
  if with_label:
    fn = lambda params, rng, label: sample_fn(params, rng, shape=shape, label=label)
    ins = (params_shardings, repl, batch)
  else:
    fn = lambda params, rng: sample_fn(params, rng, shape=shape)
    ins = (params_shardings, repl)
  return jax.jit(fn, in_shardings=ins, out_shardings=batch)
