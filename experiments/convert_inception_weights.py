"""Convert pytorch-fid's FID Inception weights (.pth) to mmd_jax's .npz.

Get ``pt_inception-2015-12-05-6726825d.pth`` from the "FID weights" release
(tag ``fid_weights``) of the GitHub repository ``mseitzer/pytorch-fid``; it is
the 2015 TensorFlow Inception graph ported to torch. Then, in an environment
with torch (e.g. ``pip install torch``)::

    python experiments/convert_inception_weights.py \
        --input pt_inception-2015-12-05-6726825d.pth --output inception_fid.npz

The .npz holds flat float32 arrays (``params/Mixed_5b/branch1x1/conv/kernel``,
``batch_stats/.../bn/mean``, ``params/fc/kernel`` ...; conv OIHW -> HWIO) and
loads with ``mmd_jax.models.inception.load_inception_params`` (no pickle, no
torch). torch is imported only here. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmd_jax.models import inception  # noqa: E402


def load_torch_state_dict(path: str) -> dict:
  """The .pth state dict as numpy arrays (weights_only: no arbitrary pickle)."""
  try:
    import torch
  except ImportError:
    raise SystemExit("The converter needs torch: pip install torch (CPU build is "
                     "enough). Only this script imports it.") from None
  state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state, dict) and "state_dict" in state and not any(
      k.endswith(".weight") for k in state):
    state = state["state_dict"]
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


def convert(input_path: str, output_path: str) -> int:
  """Convert ``input_path`` (.pth) to ``output_path`` (.npz); returns #arrays."""
  flat = inception.convert_torch_state_dict(load_torch_state_dict(input_path))
  inception.save_inception_npz(output_path, flat)
  return len(flat)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True,
                      help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid)")
  parser.add_argument("--output", required=True, help="output .npz path")
  args = parser.parse_args(argv)
  if not os.path.exists(args.input):
    raise SystemExit(f"{args.input} not found; see this script's docstring for "
                     f"where to get pt_inception-2015-12-05-6726825d.pth.")
  n = convert(args.input, args.output)
  print(f"wrote {n} arrays to {args.output}")


if __name__ == "__main__":
  main()
