"""Text-to-image at 512x512 in pixel space: a ~1.1B-parameter "simple diffusion" UNet conditioned
on text-encoder embeddings (no autoencoder, no upsampler).

Model:     UNet (Hoogeboom et al. 2023, "simple diffusion", pixel space at 512x512): base 64
           channels, multipliers (1, 2, 4, 8, 16, 32) (512 -> 16 pixels, 2048 channels at 16x16),
           2 residual blocks per level, self- and cross-attention at 32x32 and 16x16; text
           enters as embeddings f32[B, 128, 4096] (e.g. a frozen T5-XXL encoder's output, computed
           offline), pooled into the conditioning vector and cross-attended (model.text_dim,
           model.text_len). No class input (model.class_conditional=False). v-prediction, logSNR
           schedule shifted by 2 log(64/512) (simple diffusion's resolution shift). bfloat16
           compute, float32 parameters, remat per block. Parameter count: see
           `--mode=print_sharding` (1.1e9 with these settings).
Text:      the teacher step reads batch['text'] and drops it to the null text (all zeros) with
           probability diffusion.cond_drop_prob = 0.1 per example (jointly with the label for a
           model that also has classes); samplers guide with
           g(c) + w (g(c) - g(null text)) (eval specs SAMPLER:STEPS:w), and distillation
           (--mode=distill, distill.guidance = w) distils the guided teacher into an unguided
           student conditioned on the same text (mmd_jax/diffusion/conditioning.py).
Batch:     global 1024 (training.batch_size).
Command:   python -m mmd_jax.main --config=configs/t2i512.py --workdir=gs://BUCKET/t2i512 \
               --mode=aot --topology=v5p:4x4x4      (memory / FLOPs; see README's AOT table)
           python -m mmd_jax.main --config=configs/t2i512.py --workdir=gs://BUCKET/t2i512 \
               --config.data.data_dir=gs://BUCKET/tfds                              (training)
Data:      a TFDS data set {image: uint8[512, 512, 3], text: f32[128, 4096]} (text: the text
           encoder's outputs, padded to 128 tokens; never all zeros, zeros are the null text),
           prepared as array_record under data.data_dir with the name data.name
           ("t2i_embeddings_512"); read by the same grain pipeline as every data set
           (mmd_jax/data/pipeline.py), no TensorFlow needed. Mismatched text shapes between data
           and model.text_len / text_dim stop the run before compiling, naming both.
Hardware:  TPU v5p-128 (v5p:4x4x4), mesh data=-1 x fsdp=64.
Runtime:   not measured (no TPU). AOT of the teacher step (--mode=aot --topology=v5p:4x4x4;
           README table): fits, peak 24.5 GiB of 95 GiB per chip (mesh 1x64x1), 1.06e14 FLOPs
           per chip, compiler estimate 0.434 s/step (53% MFU); compile 1909 s CPU.
Result:    none yet at 512x512: a sizing config for pod-scale text-to-image teachers. The
           `runlocal` version below is trained and distilled end to end on CPU.

Arguments (`--config=configs/t2i512.py:ARG`, comma-separated):
  runlocal    a tiny CPU version of the whole text-to-image path: 8x8 digits with synthetic caption
              embeddings f32[4, 8] (data.name=digits_text, built offline on first use; a stand-in
              for a text encoder's output, see mmd_jax/data/sources.py), a 0.20M-parameter
              text-only UNet, and a distill section (alternating, k = 4, guidance 1):
                python -m mmd_jax.main --config=configs/t2i512.py:runlocal --mode=train \
                    --workdir=/tmp/t2i_local/teacher
                python -m mmd_jax.main --config=configs/t2i512.py:runlocal --mode=distill \
                    --workdir=/tmp/t2i_local/student \
                    --config.distill.teacher=/tmp/t2i_local/teacher
              Hardware: CPU (measured on the project's shared 2-core machine, load average ~8).
              Runtime: teacher 1500 steps at batch 32 (56 s compile) with a two-spec final
              evaluation 4.4 min wall (2.8 min CPU); the three-spec evaluation alone 1.5 min;
              student (alternating, k = 4, 400 steps at batch 32) with its evaluation 3.5 min wall
              (1.9 min CPU).
              Result (500 samples each, conditioned on real captions; stand-in metrics on pixels,
              not FID; class_acc = how often the digits classifier recognises the class named by
              the caption, which is all the model sees):
                teacher ancestral 32 steps, w = 0   fd_pixels 0.568  class_acc 0.968
                teacher ancestral 32 steps, w = 1   fd_pixels 1.064  class_acc 1.000
                teacher ancestral  4 steps, w = 1   fd_pixels 1.855  class_acc 1.000
                student 4 steps (teacher at w = 1)  fd_pixels 1.305  class_acc 0.998
  test        like runlocal but seconds long (smallest UNet, 4 steps, tiny evaluation), for
              tests/test_text_conditioning.py
  steps=N     override the number of training steps (distill.num_steps with --mode=distill
              stays as set)
"""
import ml_collections

from mmd_jax import config_lib
from mmd_jax.distill import moment_matching
from mmd_jax.evaluation import eval_fields


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      name="t2i_embeddings_512", data_dir="", split="train", spec_path="",
      image_shape=(512, 512, 3), num_classes=0, in_memory_max_mb=512))

  c.model = ml_collections.ConfigDict(dict(
      kind="unet", prediction="v", base_channels=64, channel_mult=(1, 2, 4, 8, 16, 32),
      num_res_blocks=2, attn_resolutions=(32, 16), head_dim=128, dropout=0.0, dtype="bfloat16",
      remat=True, text_dim=4096, text_len=128, class_conditional=False))

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
  # Fields of --mode=eval (mmd_jax/evaluation/eval_fields.py); that mode does not yet take
  # text-conditioned checkpoints: it stops with a message saying so.
  c.eval.update(eval_fields.defaults())

  c.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=64, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1, rules="",
      fallback_rules="", strict=False, fsdp_fill=True))

  if args.get("runlocal") or args.get("test"):
    # 8x8 digits with synthetic caption embeddings (TFDS "mmd_digits_text", built offline on
    # first use); its labels only score the samples (class_acc), the model sees the text only.
    c.data.update(name="digits_text", image_shape=(8, 8, 1), num_classes=0)
    c.model.update(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                   head_dim=16, dtype="float32", remat=False, text_dim=8, text_len=4)
    c.diffusion.schedule.update(resolution=8, shift_base=8)
    c.optim.update(learning_rate=2e-3, warmup_steps=100, schedule="cosine", ema_decay=0.995)
    c.training.update(batch_size=32, num_steps=1500, log_every=100, checkpoint_every=500,
                      eval_every=1500)
    c.eval.update(periodic="", final="ancestral:4:1,ancestral:32,ancestral:32:1", num_samples=500,
                  batch_size=250, grid_per_class=10)
    c.mesh.update(data=-1, fsdp=1)
    c.distill = moment_matching.default_config()
    c.distill.update(teacher="", num_student_steps=4, guidance=1.0, batch_size=32, num_steps=400,
                     ema_decay=0.99, precond_batches=4)
    c.distill.optim.update(learning_rate=2e-4, warmup_steps=50)
  if args.get("test"):
    # The smallest UNet with every text path: conv_in, middle res / self- and cross-attention /
    # res, one up block, conv_out (few layers: fast compiles).
    c.model.update(channel_mult=(1,), num_res_blocks=0, attn_resolutions=(), num_groups=8)
    c.training.update(batch_size=16, num_steps=4, log_every=2, checkpoint_every=2, eval_every=4)
    c.optim.update(warmup_steps=2)
    c.eval.update(final="ancestral:2:1", num_samples=40, batch_size=40, grid_per_class=2)
    c.distill.update(batch_size=16, num_steps=2, num_student_steps=2, precond_batches=2)
    c.distill.optim.update(warmup_steps=1)
  if "steps" in args:
    c.training.num_steps = int(args["steps"])
  return c
