"""Compute FID reference statistics (mu, sigma .npz) of a data set.

Images come from a config's data set (``mmd_jax.data.load_eval_arrays``:
digits, or a TFDS data set prepared under data_dir) or from an .npz with
uint8 NHWC images under ``arr_0`` (the ADM sample/reference-batch layout)::

    python experiments/compute_fid_reference.py --config configs/digits.py \
        --inception_npz inception_fid.npz --output digits_fid_ref.npz
    python experiments/compute_fid_reference.py --images_npz batch.npz \
        --inception_npz inception_fid.npz --output ref.npz

The output holds ``mu``, ``sigma`` (float64), ``protocol`` and ``count``
(see ``mmd_jax.evaluation.fid``). Without Inception weights, ``--allow_standin``
uses the labelled STAND-IN network; its files are rejected where FID
statistics are expected. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmd_jax.evaluation import fid  # noqa: E402


def _config_data(config_path: str, arg: str):
  spec = importlib.util.spec_from_file_location("fid_ref_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg).data


def load_images(*, config: str | None, config_arg: str = "", images_npz: str | None,
                max_examples: int | None) -> np.ndarray:
  """uint8 [N,H,W,C] images from a config's data set or an ``arr_0`` .npz."""
  if (config is None) == (images_npz is None):
    raise SystemExit("pass exactly one of --config or --images_npz.")
  if images_npz is not None:
    with np.load(images_npz, allow_pickle=False) as data:
      if "arr_0" not in data.files:
        raise SystemExit(f"{images_npz} has no 'arr_0' image array (keys {data.files}).")
      images = data["arr_0"][:max_examples]
    if images.dtype != np.uint8 or images.ndim != 4:
      raise SystemExit(f"{images_npz}: arr_0 must be uint8 [N,H,W,C], got "
                       f"{images.dtype} {images.shape}.")
    return images
  from mmd_jax.data import pipeline
  images, _ = pipeline.load_eval_arrays(_config_data(config, config_arg),
                                        max_examples=max_examples)
  if images.ndim != 4:
    raise SystemExit(f"the config's data set is not images (shape {images.shape}).")
  return fid.quantize_to_uint8(images)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", help="configs/<name>.py; its config.data is read")
  parser.add_argument("--config_arg", default="", help="argument to get_config")
  parser.add_argument("--images_npz", help=".npz with uint8 NHWC images under arr_0")
  parser.add_argument("--inception_npz", help="converted Inception weights (.npz)")
  parser.add_argument("--allow_standin", action="store_true",
                      help="without weights, use the STAND-IN net (not FID)")
  parser.add_argument("--output", required=True, help="output statistics .npz")
  parser.add_argument("--batch_size", type=int, default=100)
  parser.add_argument("--max_examples", type=int, default=None)
  args = parser.parse_args(argv)
  if args.batch_size < 1:
    raise SystemExit(f"--batch_size must be >= 1, got {args.batch_size}.")

  images = load_images(config=args.config, config_arg=args.config_arg,
                       images_npz=args.images_npz, max_examples=args.max_examples)
  extractor = fid.make_feature_extractor(inception_npz=args.inception_npz,
                                         allow_standin=args.allow_standin)
  batches = (images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size))
  out = fid.compute_statistics(extractor=extractor, batches=batches,
                               batch_size=args.batch_size)
  mu, sigma = fid.stats_to_mu_sigma(out["stats"])
  fid.save_reference_stats(args.output, mu=mu, sigma=sigma, protocol=extractor.protocol,
                           count=out["stats"].count)
  print(f"wrote {args.output}: {out['stats'].count} images, protocol: {extractor.protocol}")


if __name__ == "__main__":
  main()
