"""A teacher run: a diffusion model trained by denoising (training.steps.make_teacher_step)."""
from __future__ import annotations

import jax

from mmd_jax import config_lib
from mmd_jax.runs import base, common
from mmd_jax.training import optim, state as state_lib, steps


class TeacherRun(base.Run):
  kind = "teacher"
  batch_key = "training.batch_size"
  rng_offset = 1

  def __init__(self, config, *, mesh, need_data: bool = True):
    self.tx = optim.make_optimizer(config.optim, total_steps=int(config.training.num_steps))
    super().__init__(config, mesh=mesh, need_data=need_data)

  @property
  def batch_size(self) -> int:
    return int(self.config.training.batch_size)

  @property
  def num_steps(self) -> int:
    return int(self.config.training.num_steps)

  def _abstract_state(self):
    return state_lib.abstract_state(self.model, self.tx, data_shape=self.spec.data_shape,
                                    num_classes=self.spec.num_classes,
                                    text_shape=self.spec.text_shape)

  def init_state(self, frozen=None):
    """The initial TrainState, born sharded (seeded by config.seed)."""
    del frozen
    return state_lib.create_train_state(
        self.model, self.tx, rng=jax.random.PRNGKey(self.config.seed),
        data_shape=self.spec.data_shape, num_classes=self.spec.num_classes,
        shardings=self.state_shardings, text_shape=self.spec.text_shape)

  def load_frozen(self) -> dict:
    return {}

  def programs(self) -> list[common.StepProgram]:
    c = self.config
    fn = steps.make_teacher_step(
        model=self.model, tx=self.tx, schedule=self.schedule, prediction=c.model.prediction,
        loss_weighting=c.diffusion.loss_weighting, sigmoid_bias=float(c.diffusion.sigmoid_bias),
        num_classes=self.spec.num_classes, cond_drop_prob=float(c.diffusion.cond_drop_prob),
        ema_decay=float(c.optim.ema_decay), data_key=self.spec.data_key,
        use_text=self.spec.text_shape is not None)
    return [common.jit_program("teacher", lambda state, frozen, batch, rng: fn(state, batch, rng),
                               state_shardings=self.state_shardings, frozen_shardings={},
                               mesh=self.mesh)]

  def periodic_specs(self) -> list[dict]:
    return self.check_specs(config_lib.parse_sampler_specs(self.config.eval.periodic,
                                                           key="eval.periodic"),
                            key="eval.periodic")

  def final_specs(self) -> list[dict]:
    return self.check_specs(config_lib.parse_sampler_specs(self.config.eval.final,
                                                           key="eval.final"), key="eval.final")

  def eval_params(self, state, *, final: bool):
    """EMA parameters for periodic evaluations; eval.use_ema chooses for the final one."""
    return state.params if final and not self.config.eval.use_ema else state.ema_params

  def progress_text(self, scalars: dict) -> str:
    return f"loss {scalars['loss']:.4f}"

  def fix_hint(self) -> str:
    return "Lower optim.learning_rate or check the data."

  def log_summary(self) -> str:
    return f"model {self.config.model.kind}: {self.num_params() / 1e6:.2f}M parameters"
