"""A student run: a k-step student distilled from a trained teacher by a registered variant
(mmd_jax/distill/steps.py: VARIANTS).

The teacher is named by config.distill.teacher, a work directory (its latest checkpoint) or one
Orbax step directory (`.../checkpoints/<step>`). Its architecture comes from the config saved
beside its parameters and must equal the distillation config's model section. The teacher is never
written into the student's checkpoints; its path, step and fingerprint are recorded instead
(`teacher_record`), and a resumed student must have the same teacher.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging

from mmd_jax import config_lib
from mmd_jax.data import pipeline
from mmd_jax.diffusion import conditioning, samplers
from mmd_jax.distill import moment_matching as mm
from mmd_jax.distill import preconditioners, steps as distill_steps
from mmd_jax.parallel import mesh as mesh_lib
from mmd_jax.runs import base, common
from mmd_jax.training import checkpoint as ckpt_lib
from mmd_jax.training import optim, state as state_lib


class TeacherError(ValueError):
  """A teacher (or init_from student) that is missing or does not fit the distillation config."""


@dataclasses.dataclass
class Teacher:
  params: Any            # EMA parameters (unboxed), sharded like the student's
  opt_state: Any         # the teacher's optimizer state (Adam second moments for Lambda)
  config: ml_collections.ConfigDict  # the teacher's own saved config
  path: str
  step: int
  fingerprint: str

  def record(self) -> dict:
    return {"path": self.path, "step": self.step, "fingerprint": self.fingerprint}


def model_mismatch(teacher_model: dict, model: dict) -> list[str]:
  ignore = ("dropout", "remat", "dtype")
  keys = sorted(set(teacher_model) | set(model))
  norm = lambda v: list(v) if isinstance(v, tuple) else v
  return [f"model.{k}: teacher has {norm(teacher_model.get(k))!r}, config has "
          f"{norm(model.get(k))!r}" for k in keys
          if k not in ignore and norm(teacher_model.get(k)) != norm(model.get(k))]


def validate(config) -> None:
  """The distillation section's values, as ConfigErrors (before anything slow)."""
  dcfg = config.distill
  try:
    distill_steps.validate_config(dcfg)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  for key in ("batch_size", "num_steps"):
    if int(dcfg[key]) < 1:
      raise config_lib.ConfigError(f"config.distill.{key} must be a positive integer, got "
                                   f"{dcfg[key]}.")
  if dcfg.get("dropout") == "shared" and not distill_steps.variant(dcfg.variant).USES_AUX:
    raise config_lib.ConfigError(f"config.distill.dropout='shared' shares the auxiliary's dropout "
                                 f"mask with the teacher; the {dcfg.variant} variant has no "
                                 "auxiliary. Use 'independent' or 'off'.")
  if dcfg.variant == "parameter_space" and int(dcfg.batch_size) % 2:
    raise config_lib.ConfigError(f"config.distill.batch_size={dcfg.batch_size} must be even: the "
                                 "parameter-space variant splits it into two halves.")


class StudentRun(base.Run):
  kind = "student"
  batch_key = "distill.batch_size"
  rng_offset = 11

  def __init__(self, config, *, mesh, need_data: bool = True):
    validate(config)
    self.dcfg = config.distill
    self.variant = distill_steps.variant(self.dcfg.variant)
    self.student_tx, self.aux_tx = distill_steps.make_optimizers(self.dcfg)
    self.teacher: Teacher | None = None
    self.init_record: dict | None = None
    super().__init__(config, mesh=mesh, need_data=need_data)
    self._teacher_shardings = None if mesh is None else common.shardings(
        self._boxed_params, mesh=mesh, options=self.options, log=False)

  # ----- shapes and shardings -----
  @property
  def batch_size(self) -> int:
    return int(self.dcfg.batch_size)

  @property
  def num_steps(self) -> int:
    return int(self.dcfg.num_steps)

  @property
  def settings(self) -> dict:
    return samplers.student_settings(self.dcfg)

  def _init(self, params):
    return distill_steps.init_distill_state(config=self.dcfg, init_params=params,
                                            student_tx=self.student_tx, aux_tx=self.aux_tx)

  def _abstract_state(self):
    self._boxed_params = jax.eval_shape(lambda r: state_lib.init_params(
        self.model, rng=r, data_shape=self.spec.data_shape, num_classes=self.spec.num_classes,
        text_shape=self.spec.text_shape), jax.random.PRNGKey(0))
    return jax.eval_shape(self._init, self._boxed_params)

  def _uses_precond(self) -> bool:
    return self.dcfg.variant == "parameter_space" and self.dcfg.preconditioner != "identity"

  def abstract_frozen(self) -> dict:
    out = {"teacher": self._boxed_params}
    if self._uses_precond():
      out["precond"] = self._boxed_params
    return out

  def frozen_shardings(self) -> dict:
    out = {"teacher": self._teacher_shardings}
    if self._uses_precond():
      out["precond"] = self._teacher_shardings
    return out

  # ----- the teacher, the initial state, the frozen inputs -----
  def load_teacher(self) -> Teacher:
    """Restores the teacher's EMA parameters and optimizer state onto the mesh (once)."""
    if self.teacher is not None:
      return self.teacher
    path = self.dcfg.teacher
    if not path:
      raise TeacherError("No teacher given: set --config.distill.teacher=WORKDIR (a teacher "
                         "work directory) or WORKDIR/checkpoints/STEP.")
    ckpt, workdir, step = common.open_checkpoint(
        path, error=lambda m: TeacherError(f"distill.teacher={path!r}: {m}"),
        missing=f"train the teacher first (python -m mmd_jax.main --mode=train "
        f"--workdir={common.locate(path)[0]} ...).")
    try:
      saved = ml_collections.ConfigDict(ckpt.saved_config(step))
      diffs = model_mismatch(saved.model.to_dict(), self.config.model.to_dict())
      text_diff = conditioning.text_shape_error(
          want=conditioning.model_text_shape(saved.model),
          have=conditioning.model_text_shape(self.config.model), want_what="the teacher",
          have_what="the config's model")
      if text_diff:
        diffs.insert(0, text_diff)
      if saved.data.name != self.config.data.name:
        diffs.append(f"data.name: teacher has {saved.data.name!r}, config has "
                     f"{self.config.data.name!r}")
      if diffs:
        raise TeacherError(
            f"The teacher at {workdir}/checkpoints/{step} does not match the distillation "
            "config:\n  " + "\n  ".join(diffs) + "\nSet the config's model section to the "
            "teacher's (the student has the teacher's architecture), or point distill.teacher "
            "elsewhere.")
      planned = int(saved.training.num_steps)
      if common.locate(path)[1] is None and step < planned:
        raise TeacherError(
            f"The teacher at {workdir} is not finished: its latest checkpoint is step {step} of "
            f"its training.num_steps={planned}. Finish it first (rerun its --mode=train command, "
            f"or the pipeline, which resumes it), or distil from that step on purpose with "
            f"--config.distill.teacher={workdir}/checkpoints/{step}.")
      tx = optim.make_optimizer(saved.optim, total_steps=int(saved.training.num_steps))
      abstract = state_lib.abstract_state(self.model, tx, data_shape=self.spec.data_shape,
                                          num_classes=self.spec.num_classes,
                                          text_shape=self.spec.text_shape)
      shardings = common.shardings(abstract, mesh=self.mesh, options=self.options, log=False)
      state, _ = common.restore(ckpt, step, abstract_boxed=abstract, shardings_tree=shardings)
    finally:
      ckpt.close()
    self.teacher = Teacher(params=state.ema_params, opt_state=state.opt_state, config=saved,
                           path=workdir, step=int(step),
                           fingerprint=common.fingerprint(state.ema_params))
    logging.info("teacher %s step %d fingerprint %s", workdir, step, self.teacher.fingerprint)
    return self.teacher

  def load_frozen(self) -> dict:
    """{'teacher': its EMA parameters[, 'precond': Lambda]} for the step."""
    teacher = self.load_teacher()
    frozen = {"teacher": teacher.params}
    if self._uses_precond():
      frozen["precond"] = self._preconditioner(teacher)
    return frozen

  def config_dict(self) -> dict:
    d = super().config_dict()
    d["teacher_record"] = self.load_teacher().record()
    if self.init_record:
      d["init_record"] = self.init_record
    return d

  def check_resume(self, saved: dict) -> None:
    """Refuses a checkpoint of a student of another teacher; keeps its init_record."""
    teacher = self.load_teacher()
    saved_teacher = saved.get("teacher_record", {})
    if saved.get("init_record"):
      self.init_record = saved["init_record"]
    if saved_teacher.get("fingerprint") != teacher.fingerprint:
      raise ckpt_lib.CheckpointError(
          f"This work directory holds a student distilled from a different teacher "
          f"(fingerprint {saved_teacher.get('fingerprint')} at {saved_teacher.get('path')}, now "
          f"{teacher.fingerprint} at {teacher.path}). Use a new --workdir.")

  def init_state(self, frozen):
    """Student, EMA and (alternating) auxiliary from the teacher's EMA parameters, or from an
    earlier student's (distill.init_from), born sharded."""
    init_params = frozen["teacher"]
    if self.dcfg.get("init_from"):
      init_params, self.init_record = self._load_init_from()
      logging.info("student and auxiliary start from the %s k=%d student at %s (step %d)",
                   self.init_record["variant"], self.init_record["num_student_steps"],
                   self.init_record["path"], self.init_record["step"])
    return jax.jit(lambda p: nn.unbox(self._init(p)), out_shardings=self.state_shardings,
                   compiler_options=state_lib.FAST_COMPILE)(init_params)

  def _load_init_from(self):
    """(EMA parameters, record) of a student distilled from the same teacher (distill.init_from).

    Progressive initialisation: a k = 1 student started from a trained k = 2 student instead of
    from the teacher, whose t = 1 prediction is close to the data mean for every z_1 (on the 16-D
    GMM benchmark the teacher-initialised k = 1 student collapsed onto one mode; see the README).
    """
    path = self.dcfg.init_from
    what = f"distill.init_from={path!r}"
    teacher = self.load_teacher()
    ckpt, workdir, step = common.open_checkpoint(
        path, error=lambda m: TeacherError(f"{what}: {m}"),
        missing="distil that student first (--mode=distill), or leave distill.init_from empty.")
    try:
      saved = ml_collections.ConfigDict(ckpt.saved_config(step))
      record = saved.get("teacher_record")
      if record is None:
        raise TeacherError(f"{what}: {workdir} is not a distilled student (its saved config has "
                           "no teacher record). Name the work directory of a --mode=distill run.")
      if record.get("fingerprint") != teacher.fingerprint:
        raise TeacherError(
            f"{what}: that student was distilled from another teacher (fingerprint "
            f"{record.get('fingerprint')} at {record.get('path')}); this run's teacher is "
            f"{teacher.fingerprint} at {teacher.path}. Name a student of this teacher.")
      source = StudentRun(_with_distill(self.config, saved.distill), mesh=self.mesh,
                          need_data=False)
      state, _ = source.restore(ckpt, step)
    finally:
      ckpt.close()
    return state.ema_params, {"path": workdir, "step": int(step),
                              "variant": str(saved.distill.variant),
                              "num_student_steps": int(saved.distill.num_student_steps),
                              "fingerprint": common.fingerprint(state.ema_params)}

  def _preconditioner(self, teacher: Teacher):
    """Lambda of the parameter-space variant, sharded like the teacher."""
    dcfg = self.dcfg
    if dcfg.preconditioner == "adam":
      return preconditioners.adam_preconditioner(teacher.opt_state, eps=float(dcfg.precond_eps))
    n = int(dcfg.precond_batches) * max(1, int(dcfg.batch_size) // 2)
    mesh_lib.check_batch_divisible(batch_size=n, mesh=self.mesh,
                                   what="distill.precond_batches * distill.batch_size / 2")
    it = pipeline.make_train_iterator(
        self.config.data, global_batch_size=n, seed=int(self.config.seed) + 7,
        shard_index=jax.process_index(), shard_count=jax.process_count())
    batch = self.global_batch(next(it))
    repl = mesh_lib.replicated(self.mesh)
    fn = jax.jit(lambda params, b, rng: preconditioners.squared_grad_preconditioner(
        denoise=self.denoise, teacher_params=params, batch=b, rng=rng, config=dcfg,
        schedule=self.schedule, data_key=self.spec.data_key,
        use_text=self.spec.text_shape is not None,
        null_label=self.spec.num_classes if self.spec.num_classes > 0 else None,
        cond_drop_prob=float(self.config.diffusion.cond_drop_prob)),
                 in_shardings=(self._teacher_shardings, mesh_lib.batch_sharding(self.mesh), repl),
                 out_shardings=self._teacher_shardings)
    t0 = time.time()
    precond = fn(teacher.params, batch, jax.random.PRNGKey(int(self.config.seed) + 5))
    logging.info("squared-gradient preconditioner from %d real examples in %.1f s", n,
                 time.time() - t0)
    return precond

  # ----- step programs -----
  def _phases(self) -> tuple:
    return distill_steps.step_phases(self.dcfg)

  def program_index(self, step: int) -> int:
    """By step parity, or by round for progressive distillation (distill_steps.program_index)."""
    return distill_steps.program_index(self.dcfg, step)

  def programs(self) -> list[common.StepProgram]:
    programs = []
    null_label = self.spec.num_classes if self.spec.num_classes > 0 else None
    for phase in self._phases():
      step = distill_steps.make_distill_step(
          config=self.dcfg, denoise=self.denoise, schedule=self.schedule,
          student_tx=self.student_tx, aux_tx=self.aux_tx, data_key=self.spec.data_key,
          null_label=null_label, use_text=self.spec.text_shape is not None, phase=phase,
          clip_x=self.train_clip())

      def fn(state, frozen, batch, rng, step=step):
        extra = (frozen["precond"],) if "precond" in frozen else ()
        return step(state, frozen["teacher"], batch, rng, *extra)

      name = f"distill/{self.dcfg.variant}" + (f"/{phase}" if phase else "")
      programs.append(common.jit_program(name, fn, state_shardings=self.state_shardings,
                                         frozen_shardings=self.frozen_shardings(),
                                         mesh=self.mesh))
    return programs

  def train_clip(self) -> float | None:
    """The clip of x_tilde in the training draws of z_s: diffusion.clip_x with
    distill.clipping='both', else None (unclipped)."""
    clip = self.config.diffusion.get("clip_x")
    return float(clip) if clip and mm.clipping(self.dcfg) == "both" else None

  def sample_clip(self) -> float | None:
    """The clip of x_hat in the student's samplers: diffusion.clip_x with distill.clipping
    'both' or 'sampler', else None (the samplers then see what the training draws saw)."""
    clip = self.config.diffusion.get("clip_x")
    return float(clip) if clip and mm.clipping(self.dcfg) in ("both", "sampler") else None

  # ----- evaluation -----
  def own_spec(self) -> dict:
    return {"sampler": distill_steps.sampler_name(self.dcfg),
            "num_steps": int(self.dcfg.num_student_steps),
            "guidance": 0.0}

  def periodic_specs(self) -> list[dict]:
    return [self.own_spec()]

  def final_specs(self) -> list[dict]:
    return [self.own_spec()]

  def eval_params(self, state, *, final: bool):
    del final
    return state.ema_params

  def progress_text(self, scalars: dict) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in scalars.items() if "loss" in k)

  def fix_hint(self) -> str:
    return "Lower distill.optim.learning_rate."

  def log_summary(self) -> str:
    return (f"student ({self.dcfg.variant}, k={self.dcfg.num_student_steps}) of "
            f"{self.num_params() / 1e6:.2f}M parameters")


def _with_distill(config, distill_section):
  """config with its distill section replaced (for restoring another student's state)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.distill = ml_collections.ConfigDict(distill_section.to_dict())
  return c
