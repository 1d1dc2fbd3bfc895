"""Parity of the Flax FID Inception with pytorch-fid (needs torch; opt-in).

Run in the parity environment only::

    /opt/venv-parity/bin/python -m pytest tests/test_inception_parity.py -m torch_parity

Both networks get the same RANDOM weights (nothing is downloaded): a
torchvision Inception3 with pytorch-fid's FIDInception* blocks, exactly as
``pytorch_fid.inception.fid_inception_v3`` builds it minus the weight
download, is randomised, saved as a .pth state dict, converted with
experiments/convert_inception_weights.py and loaded into Flax. pytorch-fid's
``InceptionV3([3])`` (its resize and normalisation included) runs in float64
on images in [0, 1]; Flax runs in float32 on the same uint8 images.
"""

import importlib.util
import os
import types

import numpy as np
import pytest

from mmd_jax.models import inception

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERTER = os.path.join(ROOT, "experiments", "convert_inception_weights.py")
TOLERANCE = 1e-4

pytestmark = pytest.mark.torch_parity


def _torch():
  # Imported inside the tests so that collection works without torch.
  import torch
  import torchvision
  from pytorch_fid import inception as pfi
  torch.set_num_threads(2)
  return torch, torchvision, pfi


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _random_fid_inception(torch, torchvision, pfi):
  """pytorch-fid's FID Inception structure with random weights, no download."""
  torch.manual_seed(0)
  net = torchvision.models.inception_v3(weights=None, aux_logits=False,
                                        num_classes=1008, init_weights=False)
  net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = pfi.FIDInceptionE_1(1280)
  net.Mixed_7c = pfi.FIDInceptionE_2(2048)
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.Conv2d):
        torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    for bn in bns:
      assert bn.eps == 1e-3
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.normal_(0.0, 0.2)
      bn.momentum = None  # cumulative average: one batch sets the running stats
    net.fc.weight.normal_(0.0, 0.02)
    net.fc.bias.normal_(0.0, 0.1)
    # Calibrate running stats on one batch so activations are O(1), then perturb
    # them so that mean/var conversion errors cannot cancel.
    net.train()
    net(torch.rand(4, 3, 299, 299) * 2 - 1)
    net.eval()
    for bn in bns:
      bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.7, 1.3))
      bn.running_mean.add_(torch.randn_like(bn.running_mean) * 0.1 * bn.running_var.sqrt())
  return net


def _images():
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (1, 37, 53, 3))
  yy, xx = np.mgrid[0:37, 0:53]
  smooth = np.stack([128 + 100 * np.sin(xx / 5.0), 128 + 100 * np.cos(yy / 7.0),
                     (xx * yy) % 256], -1)[None]
  blocks = np.kron(rng.integers(0, 256, (1, 5, 7, 3)), np.ones((1, 8, 8, 1)))[:, :37, :53]
  return np.concatenate([noise, smooth, blocks]).clip(0, 255).astype(np.uint8)


def _load_converter():
  spec = importlib.util.spec_from_file_location("convert_inception_weights", CONVERTER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _no_download(*args, **kwargs):
  raise AssertionError("the parity test must not download weights")


def test_resize_matches_torch_interpolate():
  torch, _, _ = _torch()
  rng = np.random.default_rng(1)
  for (h, w), (oh, ow) in [((37, 53), (299, 299)), ((512, 400), (299, 299)), ((8, 9), (13, 5))]:
    img = rng.uniform(size=(2, h, w, 3))
    want = torch.nn.functional.interpolate(
        torch.from_numpy(img).permute(0, 3, 1, 2), size=(oh, ow), mode="bilinear",
        align_corners=False).permute(0, 2, 3, 1).numpy()
    got = np.asarray(inception.resize_bilinear(img.astype(np.float32), height=oh, width=ow))
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_flax_inception_matches_pytorch_fid(tmp_path, monkeypatch):
  torch, torchvision, pfi = _torch()
  monkeypatch.setattr(pfi, "load_state_dict_from_url", _no_download)
  monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
  net = _random_fid_inception(torch, torchvision, pfi)
  pth, npz = str(tmp_path / "random_inception.pth"), str(tmp_path / "random_inception.npz")
  torch.save(net.state_dict(), pth)
  _load_converter().main(["--input", pth, "--output", npz])

  # pytorch-fid's own wrapper (resize + 2x-1 + blocks 0..3) around the random net.
  monkeypatch.setattr(pfi, "fid_inception_v3", lambda: net)
  ref_model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).double().eval()
  net.double()
  images = _images()

  def torch_features():
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
    with torch.no_grad():
      feats = ref_model(x)[0][:, :, 0, 0]
      return feats.numpy(), net.fc(feats).numpy()

  want_pool, want_logits = torch_features()
  pool, logits = inception.make_inception_feature_fn(
      inception.load_inception_params(npz))(images)
  pool_err, logit_err = _rel_err(pool, want_pool), _rel_err(logits, want_logits)
  print(f"\nparity (Flax f32 vs pytorch-fid f64): pool3 rel err {pool_err:.3e}, "
        f"logits rel err {logit_err:.3e}, per-image max rel err "
        f"{max(_rel_err(p, q) for p, q in zip(pool, want_pool)):.3e}")
  assert pool.shape == want_pool.shape == (3, 2048)
  assert pool_err < TOLERANCE and logit_err < TOLERANCE
  assert np.std(want_pool, axis=0).mean() > 1e-2 * np.abs(want_pool).mean()

  # The tolerance discriminates the FID-specific pooling: torchvision's plain
  # InceptionA / InceptionE forwards (padding counted / avg pool in Mixed_7c)
  # must be far outside it.
  tv = torchvision.models.inception
  for block, cls in [("Mixed_5b", tv.InceptionA), ("Mixed_7c", tv.InceptionE)]:
    module = getattr(net, block)
    module.forward = types.MethodType(cls.forward, module)
    try:
      variant_err = _rel_err(pool, torch_features()[0])
    finally:
      del module.forward
    print(f"torchvision {cls.__name__} pooling in {block}: rel err {variant_err:.3e}")
    assert variant_err > 10 * TOLERANCE
