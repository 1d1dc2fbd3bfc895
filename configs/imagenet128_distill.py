"""Moment-matching distillation of the ImageNet 128x128 teacher (configs/imagenet128.py) into an
8-step student (Salimans, Mensink, Heek, Hoogeboom, NeurIPS 2024).

Variants: --config.distill.variant=alternating (Algorithm 2, student + auxiliary denoiser; the
          default) or --config.distill.variant=parameter_space (Algorithm 3, no auxiliary; teacher
          gradient on one half-batch, JVP on the other, preconditioned).
Model:    the teacher's architecture (440.9M parameters); student, auxiliary and teacher are all
          this UNet, bfloat16 compute, float32 parameters, remat per block.
Batch:    global 2048 (distill.batch_size), k = 8 student steps, Adam(b1=0) lr 1e-4 (the
          distill section mirrors mmd_jax.distill.moment_matching.default_config()).
Command:  python -m mmd_jax.main --config=configs/imagenet128_distill.py --mode=distill \
              --workdir=gs://BUCKET/imagenet128_mm8 --config.distill.teacher=gs://BUCKET/imagenet128
Hardware: TPU v5p-128 (v5p:4x4x4) or v5e-256 (v5e:16x16), mesh data=-1 x fsdp=32. Memory and
          FLOPs per step: --mode=aot --topology=v5p:4x4x4 (the README's AOT table).
Runtime:  not measured here (no TPU). AOT of the alternating step (--mode=aot; README table):
          v5p:4x4x4 (mesh 2x32x1) fits, peak 10.5 GiB of 95 GiB per chip, 9.42e13 FLOPs per chip,
          compiler estimate 0.341 s/step (60% MFU); compile 1818 s CPU.
Result:   the paper reports single-digit-step FIDs on ImageNet 128 close to or better than the
          teacher's; not reproduced in this repository.

Arguments (`--config=configs/imagenet128_distill.py:ARG`, comma-separated):
  runlocal        a tiny CPU version (digits, 8x8, small UNet, 2 steps)
  parameter_space same as --config.distill.variant=parameter_space
  steps=N         override distill.num_steps
"""
import os

import ml_collections

from mmd_jax import config_lib

TEACHER_CONFIG = "imagenet128.py"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Same distillation settings as imagenet64_distill.py, on the 128x128 teacher."""
  here = os.path.dirname(os.path.abspath(__file__))
  return config_lib.load_module(os.path.join(here, "imagenet64_distill.py")).get_config(
      arg, teacher_config=TEACHER_CONFIG)
