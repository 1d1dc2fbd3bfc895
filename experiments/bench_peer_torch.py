"""The PyTorch peer of experiments/bench_train_step.py: one diffusers UNet2DModel training step.

Runs in its own interpreter (normally a venv with the optional `bench` extra:
torch==2.13.0 and diffusers), called by bench_train_step.py as

    /opt/venv-bench/bin/python experiments/bench_peer_torch.py --steps=8 --warmup=2

and prints one JSON line with the measured numbers on stdout (last line).

The model mirrors the 32x32 config of the bench: block_out_channels=(64, 128),
layers_per_block=2 (the up path has 3 resnets per level, as ours), attention at the 16x16 level
only, plus the middle block's attention (also at 16x16, as ours). For a 32x32 input, block 0 of
the down path runs at 32x32 and ends with the stride-2 downsample, block 1 runs at 16x16 (the last
block has no downsample), so attention at 16x16 is down_block_types=("DownBlock2D",
"AttnDownBlock2D"); the up path starts at the lowest resolution, so up_block_types=
("AttnUpBlock2D", "UpBlock2D"). Class conditioning: num_class_embeds=10 (added to the time
embedding); resnet_time_scale_shift="scale_shift" is diffusers' AdaGN, as in our ResBlock.
Differences that remain (they make the peer do somewhat MORE arithmetic than ours): diffusers
downsamples with a stride-2 3x3 conv and upsamples with nearest + a 3x3 conv at the upper
resolution (ours: average pool and nearest neighbour, no conv); FLOPs are counted with
torch.utils.flop_counter and reported next to ours.

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


def build_model(*, num_classes: int, sample_size: int, channels: int, dropout: float):
  from diffusers import UNet2DModel
  return UNet2DModel(
      sample_size=sample_size, in_channels=channels, out_channels=channels,
      block_out_channels=(64, 128), layers_per_block=2,
      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
      up_block_types=("AttnUpBlock2D", "UpBlock2D"),
      attention_head_dim=64, norm_num_groups=32, num_class_embeds=num_classes,
      resnet_time_scale_shift="scale_shift", dropout=dropout)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--channels", type=int, default=3)
  p.add_argument("--num_classes", type=int, default=10)
  p.add_argument("--dropout", type=float, default=0.1)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--steps", type=int, default=8)
  args = p.parse_args(argv)

  import torch
  import diffusers
  from torch.utils.flop_counter import FlopCounterMode

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  t0 = time.perf_counter()
  model = build_model(num_classes=args.num_classes, sample_size=args.size,
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
    return float(loss)

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
      "threads": torch.get_num_threads(), "params": n_params, "batch": b,
      "build_s": build_s, "flops_per_step": flops,
      "step_wall_s": statistics.median(walls), "step_cpu_s": statistics.median(cpus),
      "step_walls": walls, "step_cpus": cpus, "minor_faults_per_step": statistics.median(faults),
      "loadavg": os.getloadavg(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
  }
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
