"""Text-to-image at 512x512 in pixel space: a ~1.1B-parameter "simple diffusion" UNet conditioned
on text-encoder embeddings (no autoencoder, no upsampler).

Model:     UNet (Hoogeboom et al. 2023, "simple diffusion", pixel space at 512x512): base 64
           channels, multipliers (1, 2, 4, 8, 16, 32) (512 -> 16 pixels, 2048 channels at 16x16),
           2 residual blocks per level, self- and cross-attention at 32x32 and 16x16; text
           enters as embeddings f32[B, 128, 4096] (e.g. a frozen T5-XXL encoder's output, computed
           offline), pooled into the conditioning vector and cross-attended (model.text_dim,
           model.text_len). v-prediction, logSNR schedule shifted by 2 log(64/512) (simple
           diffusion's resolution shift). bfloat16 compute, float32 parameters, remat per block.
           Parameter count: see `--mode=print_sharding` (1.1e9 with these settings).
Batch:     global 1024 (training.batch_size).
Command:   python -m mmd_jax.main --config=configs/t2i512.py --workdir=gs://BUCKET/t2i512 \
               --mode=aot --topology=v5p:4x4x4      (memory / FLOPs; see README's AOT table)
Data:      needs a TFDS data set of {image: uint8[512, 512, 3], text: f32[128, 4096]} prepared as
           array_record (data.name); neither that pipeline nor the teacher step's use of
           batch['text'] exists yet (mmd_jax/parallel/aot.py feeds the text for the compile), so
           this config is for sizing with --mode=aot / --mode=print_sharding today.
Hardware:  TPU v5p-128 (v5p:4x4x4), mesh data=-1 x fsdp=64.
Runtime:   not measured (no TPU); the AOT compile reports the compiler's estimate.
Result:    none yet: a sizing config for pod-scale text-to-image teachers.

Arguments (`--config=configs/t2i512.py:ARG`, comma-separated):
  runlocal    a tiny CPU version (8x8 images, text f32[4, 8], small UNet)
  steps=N     override the number of training steps
"""
import ml_collections

from mmd_jax import config_lib


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      name="t2i_embeddings_512", data_dir="", split="train", spec_path="",
      image_shape=(512, 512, 3), num_classes=0))

  c.model = ml_collections.ConfigDict(dict(
      kind="unet", prediction="v", base_channels=64, channel_mult=(1, 2, 4, 8, 16, 32),
      num_res_blocks=2, attn_resolutions=(32, 16), head_dim=128, dropout=0.0, dtype="bfloat16",
      remat=True, text_dim=4096, text_len=128))

  c.diffusion = ml_collections.ConfigDict(dict(
      schedule=ml_collections.ConfigDict(dict(kind="shifted_cosine", logsnr_min=-15.0,
                                              logsnr_max=15.0, resolution=512, shift_base=64)),
      loss_weighting="v", sigmoid_bias=0.0, cond_drop_prob=0.1, clip_x=1.0))

  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, warmup_steps=10_000, schedule="constant", b1=0.9, b2=0.99, eps=1e-8,
      weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999))

  c.training = ml_collections.ConfigDict(dict(
      batch_size=1024, num_steps=1_000_000, log_every=100, checkpoint_every=5000,
      eval_every=50_000, max_to_keep=3))

  c.eval = ml_collections.ConfigDict(dict(
      periodic="", final="", num_samples=0, batch_size=1024, grid_per_class=0, use_ema=True))

  c.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=64, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1, rules="",
      fallback_rules="", strict=False, fsdp_fill=True))

  if args.get("runlocal"):
    c.data.update(image_shape=(8, 8, 1))
    c.model.update(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                   head_dim=16, dtype="float32", remat=False, text_dim=8, text_len=4)
    c.diffusion.schedule.update(resolution=8, shift_base=8)
    c.training.update(batch_size=16, num_steps=2, log_every=1, checkpoint_every=2, eval_every=2)
    c.eval.update(batch_size=16)
    c.mesh.update(data=-1, fsdp=2)
  if "steps" in args:
    c.training.num_steps = int(args["steps"])
  return c
