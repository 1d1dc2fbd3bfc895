"""The PyTorch peer of experiments/bench_train_step.py: one diffusers UNet2DModel training step.

Runs in its own interpreter (normally a venv with the optional `bench` extra:
torch==2.13.0 and diffusers), called by bench_train_step.py as

    /opt/venv-bench/bin/python experiments/bench_peer_torch.py --shape=cifar32 --steps=8 --warmup=2

and prints one JSON line with the measured numbers on stdout (last line).

Two shapes, the two of bench_train_step.py (`--shape`):

cifar32: mirrors the 32x32 config of the bench (32x32x3, batch 32): block_out_channels=(64, 128),
layers_per_block=2 (the up path has 3 resnets per level, as ours), attention at the 16x16 level
only, plus the middle block's attention (also at 16x16, as ours). For a 32x32 input, block 0 of
the down path runs at 32x32 and ends with the stride-2 downsample, block 1 runs at 16x16 (the last
block has no downsample), so attention at 16x16 is down_block_types=("DownBlock2D",
"AttnDownBlock2D"); the up path starts at the lowest resolution, so up_block_types=
("AttnUpBlock2D", "UpBlock2D"). attention_head_dim=64 (2 heads at 128 channels, as ours).

digits: configs/digits.py's model and batch (8x8x1, batch 64, 10 classes): ours has base_channels
24, channel_mult (1, 2), num_res_blocks=1, attention at 4x4 (the second level) + the middle
block, head_dim 24, dropout 0.1. The nearest diffusers configuration has those widths and one
block per level: block_out_channels=(24, 48), layers_per_block=1 (2 resnets per level on the up
path, as ours), the same block types (8x8, then attention at 4x4), attention_head_dim=24 (2 heads
at 48 channels, as ours), norm_num_groups=24 (our GroupNorm uses the largest divisor of the
channels that is <= 32: 24 groups at both 24 and 48 channels, the same). Until 2026-12-07 the
digits config had base_channels 32 (and this peer (32, 64), head_dim 32, 32 groups).
Ours predicts v and weighs the loss for v; the peer keeps its eps-MSE: the same network and the
same arithmetic up to a few elementwise operations on [64, 8, 8, 1] arrays.

Both shapes: class conditioning with num_class_embeds=10 added to the time embedding (ours: 11
rows, the extra one for the null label of classifier-free guidance; its dropout of labels is
elementwise and not in the peer); resnet_time_scale_shift="scale_shift" is diffusers' AdaGN, as
in our ResBlock; the time embedding is 4x the first block's channels, as ours (emb_mult=4).
Differences that remain (they make the peer do somewhat MORE arithmetic and hold more parameters
than ours): diffusers downsamples with a stride-2 3x3 conv and upsamples with nearest + a 3x3 conv
at the upper resolution (ours: average pool and nearest neighbour, no conv); its time
embedding's MLP reads sinusoidal features of the integer timestep (block_out_channels[0] wide;
ours: 128 features of logSNR). Parameter counts and FLOPs (torch.utils.flop_counter) are reported
next to ours; at diffusers 0.42.1: digits 0.43M parameters and 3.5 GFLOP per step against our
0.41M and 2.5 (XLA's cost analysis; 0.76M and 6.2 against 0.72M and 4.4 at the earlier 32
channels; the resampling convs are much of the difference), 32x32 4.31M and 278.7 GFLOP against
4.14M and 257.5.

Training step: DDPM eps-MSE (Ho et al. 2020) at uniform integer timesteps of a cosine schedule
(Nichol & Dhariwal 2021), global-norm clipping at 1, Adam, and an EMA of the weights (ours does
clipping + AdamW + EMA too; both are negligible next to the network).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time


# Per shape: the data and batch of bench_train_step.make_config, and the UNet's widths.
SHAPES = {
    "cifar32": dict(size=32, channels=3, batch=32, block_out_channels=(64, 128),
                    layers_per_block=2, attention_head_dim=64, norm_num_groups=32),
    "digits": dict(size=8, channels=1, batch=64, block_out_channels=(24, 48),
                   layers_per_block=1, attention_head_dim=24, norm_num_groups=24),
}


def build_model(*, shape: str, num_classes: int, sample_size: int, channels: int,
                dropout: float):
  from diffusers import UNet2DModel
  s = SHAPES[shape]
  return UNet2DModel(
      sample_size=sample_size, in_channels=channels, out_channels=channels,
      block_out_channels=s["block_out_channels"], layers_per_block=s["layers_per_block"],
      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
      up_block_types=("AttnUpBlock2D", "UpBlock2D"),
      attention_head_dim=s["attention_head_dim"], norm_num_groups=s["norm_num_groups"],
      num_class_embeds=num_classes, resnet_time_scale_shift="scale_shift", dropout=dropout)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="cifar32", choices=sorted(SHAPES))
  p.add_argument("--batch", type=int, default=0, help="0: the shape's")
  p.add_argument("--size", type=int, default=0, help="0: the shape's")
  p.add_argument("--channels", type=int, default=0, help="0: the shape's")
  p.add_argument("--num_classes", type=int, default=10)
  p.add_argument("--dropout", type=float, default=0.1)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--steps", type=int, default=8)
  args = p.parse_args(argv)
  for k in ("batch", "size", "channels"):
    setattr(args, k, getattr(args, k) or SHAPES[args.shape][k])

  import torch
  import diffusers
  from torch.utils.flop_counter import FlopCounterMode

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  t0 = time.perf_counter()
  model = build_model(shape=args.shape, num_classes=args.num_classes, sample_size=args.size,
                      channels=args.channels, dropout=args.dropout)
  model.train()
  n_params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.Adam(model.parameters(), lr=2e-4)
  ema = [q.detach().clone() for q in model.parameters()]
  build_s = time.perf_counter() - t0

  t_grid = torch.arange(1000, dtype=torch.float64) / 1000
  alpha_bar = (torch.cos((t_grid + 0.008) / 1.008 * math.pi / 2) ** 2).float()
  b = args.batch
  x = torch.rand(b, args.channels, args.size, args.size) * 2 - 1
  y = torch.randint(0, args.num_classes, (b,))

  def step():
    t = torch.randint(0, 1000, (b,))
    eps = torch.randn_like(x)
    ab = alpha_bar[t].view(b, 1, 1, 1)
    z = ab.sqrt() * x + (1 - ab).sqrt() * eps
    out = model(z, t, class_labels=y).sample
    loss = torch.nn.functional.mse_loss(out, eps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, [q.detach() for q in model.parameters()], 1 - 0.999)
    return float(loss.detach())

  with FlopCounterMode(display=False) as counter:
    step()  # also the first warm-up step
  flops = int(counter.get_total_flops())
  for _ in range(max(0, args.warmup - 1)):
    step()
  walls, cpus, faults = [], [], []
  for _ in range(args.steps):
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0, w0 = time.process_time(), time.perf_counter()
    step()
    walls.append(time.perf_counter() - w0)
    cpus.append(time.process_time() - c0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0.ru_minflt)
  out = {
      "torch": torch.__version__, "diffusers": diffusers.__version__,
      "shape": args.shape, "data_shape": [args.size, args.size, args.channels],
      "threads": torch.get_num_threads(), "params": n_params, "batch": b,
      "build_s": build_s, "flops_per_step": flops,
      "step_wall_s": statistics.median(walls), "step_cpu_s": statistics.median(cpus),
      "step_walls": walls, "step_cpus": cpus, "minor_faults_per_step": statistics.median(faults),
      "loadavg": os.getloadavg(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
  }
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
