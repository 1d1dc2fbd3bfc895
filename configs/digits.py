"""Class-conditional diffusion teacher on scikit-learn's bundled 8x8 digits (the default).

Command:   python -m mmd_jax.main --config=configs/digits.py --workdir=/tmp/mmd_digits
Hardware:  any CPU (measured on 2 cores); no download, the digits ship with scikit-learn.
Runtime:   on 2 CPU cores with nothing else running: the whole default pipeline (teacher stage
           about 6 min, then the k = 8 student about 2.3 min) in under 10 min (README,
           "Results", with the profile).
Result:    ancestral 256 steps: class_acc >= 0.9 (see README for the measured table);
           fd_pixels / class_acc are stand-in metrics on 8x8 digits, not FID.

Arguments (`--config=configs/digits.py:ARG`, comma-separated):
  runlocal    a one-minute smoke run (300 steps, smaller evaluation)
  test        a seconds-long run for the test suite (tiny UNet, few steps)
  wide        the default until 2026-12-07 (32 channels, students 800 steps, k = 8 and 2,
              periodic evaluation at step 1500), with which the README's older digits tables
              were measured
  steps=N     override the number of training steps
"""
import ml_collections

from mmd_jax import config_lib
from mmd_jax.distill import moment_matching
from mmd_jax.evaluation import eval_fields


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(name="digits", data_dir="", split="train", spec_path="",
                                         in_memory_max_mb=512))

  # Sized for a 10-minute quickstart (2026-12-07, README "Results"): 24 channels (0.41M
  # parameters) give a 256-step teacher of fd_pixels / class_acc 0.248 / 0.984 against 0.240 /
  # 0.980 at 32 channels (0.72M, the default until then) in 0.8x the training time; the teacher
  # needs its 3000 steps (2000: 0.464 / 0.962).
  c.model = ml_collections.ConfigDict(dict(
      kind="unet", prediction="v", base_channels=24, channel_mult=(1, 2), num_res_blocks=1,
      attn_resolutions=(4,), head_dim=24, dropout=0.1, dtype="float32", remat=False))

  c.diffusion = ml_collections.ConfigDict(dict(
      schedule=ml_collections.ConfigDict(dict(kind="cosine", logsnr_min=-15.0, logsnr_max=15.0,
                                              resolution=8, shift_base=64)),
      loss_weighting="v", sigmoid_bias=0.0, cond_drop_prob=0.1, clip_x=1.0))

  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=2e-3, warmup_steps=200, schedule="cosine", b1=0.9, b2=0.99, eps=1e-8,
      weight_decay=0.0, grad_clip=1.0, ema_decay=0.999))

  c.training = ml_collections.ConfigDict(dict(
      batch_size=64, num_steps=3000, log_every=100, checkpoint_every=500, eval_every=3000,
      max_to_keep=3))

  c.eval = ml_collections.ConfigDict(dict(
      periodic="ancestral:32", final="ancestral:8,ancestral:32,ancestral:256,ddim:8",
      num_samples=1000, batch_size=500, grid_per_class=10, use_ema=True))
  # --mode=eval (FID / IS / precision-recall of a checkpoint); fields: evaluation/eval_fields.py.
  # The stand-in extractor is 256-d here: 1000 digits cannot fill a 2048-d covariance anyway.
  c.eval.update(eval_fields.defaults())
  c.eval.update(standin_dim=256, reference_examples=2000)

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  # Distillation (--mode=distill, and the pipeline's students). Fields: moment_matching docstring.
  c.distill = moment_matching.default_config()
  # 600 steps: the k = 8 student is within 1.02x of the 256-step teacher's fd_pixels (800 steps,
  # the default until 2026-12-07, gave 1.07x); a k = 2 student still gains from more steps.
  c.distill.update(teacher="", batch_size=64, num_steps=600, ema_decay=0.99)
  c.distill.optim.update(learning_rate=2e-4, warmup_steps=50)

  # --mode=pipeline (the default): teacher, then these students, then a comparison table.
  # VARIANT:K[:from=VARIANT:K]; 'alternating:1:from=alternating:2' starts the k = 1 student from
  # the trained k = 2 student (distill.init_from) instead of from the teacher.
  c.mode = "pipeline"
  # One student keeps the quickstart under 10 minutes; add ',alternating:2' for a 2-step one
  # (about 2.3 min more).
  c.pipeline = ml_collections.ConfigDict(dict(students="alternating:8"))

  if args.get("wide"):
    c.model.update(base_channels=32, head_dim=32)
    c.training.eval_every = 1500
    c.distill.num_steps = 800
    c.pipeline.students = "alternating:8,alternating:2"
  if args.get("runlocal"):
    c.training.update(num_steps=300, log_every=50, checkpoint_every=150, eval_every=300)
    c.eval.update(final="ancestral:8,ancestral:32,ddim:8", num_samples=500)
    c.distill.update(num_steps=200)
  if args.get("test"):
    c.model.update(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, head_dim=16)
    c.training.update(batch_size=16, num_steps=6, log_every=2, checkpoint_every=3, eval_every=6)
    c.optim.update(warmup_steps=2)
    c.eval.update(periodic="ancestral:2", final="ancestral:2", num_samples=40, batch_size=40,
                  grid_per_class=2)
    c.distill.update(batch_size=16, num_steps=4)
  if "steps" in args:
    c.training.num_steps = int(args["steps"])
  return c


def sweep():
  """Learning-rate and prediction sweep; run with experiments/sweep.py."""
  return [{"optim.learning_rate": lr, "model.prediction": pred}
          for lr in (1e-3, 2e-3) for pred in ("v", "eps")]
