"""Class-conditional ImageNet 128x128 teacher: a ~441M-parameter UNet of the "simple diffusion" family.

Model:     UNet (Hoogeboom et al. 2023, "simple diffusion": one more level than at 64x64, few
           channels at full resolution, capacity at 16x16 and 8x8): base 128 channels,
           multipliers (1, 2, 4, 6, 8), 3 residual blocks per level, attention at 16x16 and 8x8,
           v-prediction, logSNR schedule shifted by 2 log(64/128); 440.9M parameters.
           bfloat16 compute with float32 parameters; every block rematerialised.
Batch:     global 2048 (training.batch_size), AdamW, EMA 0.9999.
Command:   python -m mmd_jax.main --config=configs/imagenet128.py --workdir=gs://BUCKET/imagenet128
           (on every host of the slice; jax.distributed starts by itself on a TPU pod)
Data:      a TFDS data set of 128x128 ImageNet images (center crop + resize, uint8, with
           labels) prepared as array_record under data.data_dir under the name in data.name; the
           input pipeline does not resize (mmd_jax/data/pipeline.py), so prepare it beforehand.
Hardware:  TPU v5p-128 (v5p:4x4x4, 64 chips) or v5e-256 (v5e:16x16); mesh data=-1 x fsdp=32.
           Check fit first: --mode=aot --topology=v5p:4x4x4 (numbers in the README's AOT table).
Runtime:   not measured here (no TPU). AOT (--mode=aot --topology=v5p:4x4x4; README table): fits,
           peak 5.8 GiB of 95 GiB per chip (mesh 2x32x1), 4.14e13 FLOPs per chip, compiler
           estimate 0.150 s/step (60% MFU); compile 1133 s CPU (640 s wall).
Result:    a teacher for configs/imagenet128_distill.py; FID is not reproduced in this
           repository.

Arguments (`--config=configs/imagenet128.py:ARG`, comma-separated):
  runlocal    a tiny CPU version (8x8 images, small UNet, 2 steps) to smoke-test the code paths
              with `--mode=print_sharding` / `--mode=aot` or the test suite; it reads digits.
  steps=N     override the number of training steps
"""
import os

import ml_collections

from mmd_jax import config_lib

BASE_CONFIG = "imagenet64.py"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The ImageNet 64 teacher config (imagenet64.py) with the 128x128 data, UNet and mesh."""
  args = config_lib.parse_arg(arg)
  base = config_lib.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                             BASE_CONFIG))
  # The pod config first: runlocal must shrink the 128x128 settings, not be overridden by them.
  c = base.get_config("")
  c.data.update(name="imagenet128", image_shape=(128, 128, 3))
  c.model.update(base_channels=128, channel_mult=(1, 2, 4, 6, 8))
  c.diffusion.schedule.update(resolution=128)
  c.mesh.update(fsdp=32)
  if args.get("runlocal"):
    base.runlocal(c)
  if "steps" in args:
    c.training.num_steps = int(args["steps"])
  return c
