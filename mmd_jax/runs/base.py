"""The parts every run provides; runs.teacher.TeacherRun and runs.student.StudentRun fill them in.

    run = runs.build(config, kind="teacher" | "student", mesh=mesh)
    state = run.init_state(frozen)   or   state, data_state = run.restore(ckpt, step)
    for program in run.programs(): program.jitted(state, frozen, batch, rng)

A run holds: the config, its data shapes (common.DataSpec), model, schedule and x-predictor, the
mesh and sharding options, the boxed abstract state and its shardings, the frozen inputs' shardings
(teacher parameters, preconditioner), the step programs, the sampler (registry names) and the
evaluation specs. It is built from the config alone; frozen inputs that need a checkpoint (a
student's teacher) are loaded by run.load_frozen().
"""
from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np

from mmd_jax import config_lib
from mmd_jax.diffusion import process, samplers
from mmd_jax.diffusion.schedules import schedule_from_config
from mmd_jax.models import build as model_build
from mmd_jax.parallel import mesh as mesh_lib
from mmd_jax.runs import common


class Run:
  kind: str = ""
  batch_key: str = ""       # the config key of the global batch size, for error messages
  rng_offset: int = 0       # the step's base key is PRNGKey(config.seed + rng_offset)

  def __init__(self, config, *, mesh, need_data: bool = True):
    self.config = config
    self.spec = common.data_spec(config, need_data=need_data)
    self.model = model_build.build_model(config.model, data_shape=self.spec.data_shape,
                                         num_classes=self.spec.num_classes)
    self.schedule = schedule_from_config(config.diffusion.schedule)
    self.denoise = process.x_predictor(self.model, config.model.prediction)
    self.mesh = mesh
    self.options = common.sharding_options(config.mesh)
    self.abstract_state = self._abstract_state()
    self.state_shardings = None if mesh is None else common.shardings(
        self.abstract_state, mesh=mesh, options=self.options)

  # ----- what subclasses define -----
  @property
  def batch_size(self) -> int:
    raise NotImplementedError

  @property
  def num_steps(self) -> int:
    raise NotImplementedError

  @property
  def settings(self) -> dict | None:
    """The sampler settings of the run's own sampler (samplers.student_settings), or None."""
    return None

  def _abstract_state(self):
    raise NotImplementedError

  def abstract_frozen(self) -> dict:
    """Boxed abstract trees of the frozen inputs of the step ({} for none)."""
    return {}

  def frozen_shardings(self) -> dict:
    return {}

  def programs(self) -> list[common.StepProgram]:
    raise NotImplementedError

  def program_index(self, step: int) -> int:
    """Which program runs at `step` (0-based): programs are dispatched by step parity."""
    return step % len(self._phases())

  def _phases(self) -> tuple:
    return (None,)

  # ----- shared -----
  @property
  def base_rng(self):
    return jax.random.PRNGKey(int(self.config.seed) + self.rng_offset)

  @property
  def batch_keys(self) -> tuple[str, ...]:
    """The batch entries the step reads: the loop passes these and AOT lowers with these."""
    keys = (self.spec.data_key,)
    if self.spec.num_classes > 0:
      keys += ("label",)
    if self.spec.text_shape is not None:
      keys += ("text",)
    return keys

  def config_dict(self) -> dict:
    """The config as saved in every checkpoint (a student adds its teacher's record)."""
    return json.loads(config_lib.to_json(self.config))

  def check_mesh(self) -> None:
    mesh_lib.check_batch_divisible(batch_size=self.batch_size, mesh=self.mesh,
                                   what=self.batch_key)

  def restore(self, ckpt, step: int):
    """(state, data-iterator state) of checkpoint `step`, in the run's shardings."""
    return common.restore(ckpt, step, abstract_boxed=self.abstract_state,
                          shardings_tree=self.state_shardings)

  def abstract_args(self) -> tuple:
    """(state, frozen, batch, rng) as sharded ShapeDtypeStructs: what AOT lowers."""
    state = common.with_shardings(self.abstract_state, self.state_shardings)
    frozen = common.with_shardings(self.abstract_frozen(), self.frozen_shardings())
    batch = common.abstract_batch(batch_size=self.batch_size, spec=self.spec, mesh=self.mesh)
    batch = {k: batch[k] for k in self.batch_keys}
    return state, frozen, batch, common.abstract_rng(self.mesh)

  def global_batch(self, local_batch: dict) -> dict:
    """This process's rows of the batch entries the step reads, as one global batch."""
    return mesh_lib.global_batch({k: local_batch[k] for k in self.batch_keys}, mesh=self.mesh)

  def num_params(self) -> int:
    params = nn.unbox(self.abstract_state.params)
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))

  def sample_fn(self):
    """sample(params, rng, labels, text=None, *, sampler, num_steps, guidance) (jitted)."""
    return samplers.make_sample_fn(denoise=self.denoise, schedule=self.schedule,
                                   num_classes=self.spec.num_classes,
                                   data_shape=self.spec.data_shape,
                                   clip=self.sample_clip(),
                                   settings=self.settings)

  def sample_clip(self) -> float | None:
    """The clip of x_hat in the run's samplers (diffusion.clip_x; a student's may differ)."""
    clip = self.config.diffusion.get("clip_x")
    return None if clip is None else float(clip)

  def sampler_names(self) -> tuple[str, ...]:
    return samplers.names(student=self.settings is not None)

  def check_specs(self, specs: list[dict], *, key: str) -> list[dict]:
    """specs with every sampler resolved through the registry; a ConfigError otherwise."""
    allowed = self.sampler_names()
    for s in specs:
      if s["sampler"] not in allowed:
        raise config_lib.ConfigError(
            f"config.{key}: sampler {s['sampler']!r} cannot sample this {self.kind} run; choose "
            f"one of {allowed}.")
      if s["guidance"] and self.spec.num_classes == 0 and self.spec.text_shape is None:
        raise config_lib.ConfigError(f"config.{key}: guidance needs a class- or "
                                     "text-conditional model.")
    return specs

  def nonfinite_message(self, state, scalars: dict, *, step: int) -> str | None:
    """A message naming the step when the state or the logged metrics (at `step`) are not
    finite, else None. The in-step guard (training/steps.py, distill/steps.py) records the first
    step whose loss, gradients or update were not finite (its update was not applied) in
    state.nonfinite_step."""
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
      return f"Non-finite (or exploding) loss or update at step {bad}; it was not applied"
    bad_keys = [k for k, v in scalars.items() if not np.isfinite(v)]
    return f"Non-finite {bad_keys} by step {step}" if bad_keys else None

  def state_part_names(self) -> list[str]:
    """The parts of the state that hold arrays (params, opt_state, ...; not the counters)."""
    state = self.abstract_state
    return [f.name for f in dataclasses.fields(state)
            if f.name not in ("step", "nonfinite_step")
            and jax.tree_util.tree_leaves(getattr(state, f.name))]
