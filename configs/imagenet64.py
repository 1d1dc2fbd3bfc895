"""Class-conditional ImageNet 64x64 teacher: a ~388M-parameter UNet of the "simple diffusion" family.

Model:     UNet (Hoogeboom et al. 2023, "simple diffusion"; capacity at 16x16 and 8x8):
           base 256 channels, multipliers (1, 2, 2, 4), 3 residual blocks per level, attention
           at 16x16 and 8x8, v-prediction, shifted-cosine logSNR schedule; 388.3M parameters.
           bfloat16 compute with float32 parameters; every block rematerialised.
Batch:     global 2048 (training.batch_size), AdamW, EMA 0.9999.
Command:   python -m mmd_jax.main --config=configs/imagenet64.py --workdir=gs://BUCKET/imagenet64
           (on every host of the slice; jax.distributed starts by itself on a TPU pod)
Data:      TFDS imagenet_resized/64x64 prepared as array_record under data.data_dir (see
           mmd_jax/data/pipeline.py); nothing is downloaded at run time.
Hardware:  TPU v5p-128 (v5p:4x4x4, 64 chips) or v5e-256 (v5e:16x16); mesh data=-1 x fsdp=16.
           Check fit first: --mode=aot --topology=v5p:4x4x4 (numbers in the README's AOT table).
Runtime:   not measured here (no TPU). AOT (--mode=aot, XLA's TPU compiler on the 2-core CPU
           machine): v5p:4x4x4 fits, peak 3.5 GiB of 95 GiB per chip, compiler estimate
           0.097 s/step (60% MFU); the compile took 1483 s CPU (2682 s wall on the shared machine).
Result:    a teacher for configs/imagenet64_distill.py. The moment-matching paper's ImageNet 64
           teachers are ~400M-parameter UNets; FID is not reproduced in this repository.

Arguments (`--config=configs/imagenet64.py:ARG`, comma-separated):
  runlocal    a tiny CPU version (8x8 images, small UNet, 2 steps) to smoke-test the code paths
              with `--mode=print_sharding` / `--mode=aot` or the test suite; it reads digits.
  steps=N     override the number of training steps
"""
import ml_collections

from mmd_jax import config_lib
from mmd_jax.evaluation import eval_fields


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      name="imagenet_resized/64x64", data_dir="", split="train", spec_path="",
      image_shape=(64, 64, 3), num_classes=1000, in_memory_max_mb=512))

  c.model = ml_collections.ConfigDict(dict(
      kind="unet", prediction="v", base_channels=256, channel_mult=(1, 2, 2, 4),
      num_res_blocks=3, attn_resolutions=(16, 8), head_dim=64, dropout=0.1, dtype="bfloat16",
      remat=True))

  c.diffusion = ml_collections.ConfigDict(dict(
      schedule=ml_collections.ConfigDict(dict(kind="shifted_cosine", logsnr_min=-15.0,
                                              logsnr_max=15.0, resolution=64, shift_base=64)),
      loss_weighting="v", sigmoid_bias=0.0, cond_drop_prob=0.1, clip_x=1.0))

  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, warmup_steps=10_000, schedule="constant", b1=0.9, b2=0.99, eps=1e-8,
      weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999))

  c.training = ml_collections.ConfigDict(dict(
      batch_size=2048, num_steps=500_000, log_every=100, checkpoint_every=5000,
      eval_every=50_000, max_to_keep=3))

  c.eval = ml_collections.ConfigDict(dict(
      periodic="ddim:64", final="ddim:64,ancestral:256,ddim:64:1.5",
      num_samples=10_000, batch_size=2048, grid_per_class=2, use_ema=True))
  # --mode=eval (FID / IS / precision-recall; fields: mmd_jax/evaluation/eval_fields.py). For
  # numbers comparable with the literature: eval.num_samples=50000 and the ADM reference .npz.
  c.eval.update(eval_fields.defaults())

  # data x fsdp x tensor, per slice; dcn_* > 1 for multislice (see mmd_jax/parallel/mesh.py).
  # rules: 'name=axis,...' overrides of the model's logical rules; fallback_rules for leaves
  # without logical names; strict: refuse (instead of replicate) dims that do not divide.
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=16, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1, rules="",
      fallback_rules="", strict=False, fsdp_fill=True))

  if args.get("runlocal"):
    runlocal(c)
  if "steps" in args:
    c.training.num_steps = int(args["steps"])
  return c


def runlocal(c):
  """Shrinks a pod config to seconds on CPU (digits data, 8x8, tiny UNet)."""
  c.data.update(name="digits", image_shape=(8, 8, 1), num_classes=10)
  c.model.update(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                 head_dim=16, dropout=0.0, dtype="float32", remat=False)
  c.diffusion.schedule.update(resolution=8, shift_base=8)
  c.optim.update(warmup_steps=2, ema_decay=0.99)
  c.training.update(batch_size=16, num_steps=2, log_every=1, checkpoint_every=2, eval_every=2)
  c.eval.update(periodic="", final="ddim:2", num_samples=40, batch_size=40, grid_per_class=2)
  c.mesh.update(data=-1, fsdp=2, tensor=1)
