"""Tests for mmd_jax.evaluation.fid / precision_recall and the Inception port."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from mmd_jax.evaluation import fid
from mmd_jax.evaluation import precision_recall as pr
from mmd_jax.models import inception


# --------------------------------------------------------------------------
# Fréchet distance and statistics


def _rotation(dim, seed):
  return scipy.stats.special_ortho_group.rvs(dim, random_state=seed)


@pytest.mark.parametrize("rotate", [False, True])
def test_frechet_distance_matches_closed_form_for_commuting_covariances(rotate):
  rng = np.random.default_rng(0)
  dim = 24
  a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  q = _rotation(dim, 1) if rotate else np.eye(dim)
  s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid.frechet_distance(mu1=mu1, sigma1=s1, mu2=mu2, sigma2=s2)
  np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)) + 3.0
  mu, sigma = fid.stats_to_mu_sigma(fid.update_stats(fid.init_stats(dim=32), feats))
  d = fid.frechet_distance(mu1=mu, sigma1=sigma, mu2=mu, sigma2=sigma)
  assert abs(d) < 1e-8 * np.trace(sigma)
  other = fid.frechet_distance(mu1=mu + 0.5, sigma1=sigma, mu2=mu, sigma2=sigma)
  np.testing.assert_allclose(other, 32 * 0.25, rtol=1e-8)


def test_frechet_distance_falls_back_to_eps_when_sqrtm_is_not_finite(monkeypatch):
  real_sqrtm = scipy.linalg.sqrtm
  calls = []

  def flaky_sqrtm(m):
    calls.append(m.copy())
    return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

  monkeypatch.setattr(fid.scipy.linalg, "sqrtm", flaky_sqrtm)
  s = np.diag([1.0, 4.0])
  with pytest.warns(UserWarning, match="singular"):
    d = fid.frechet_distance(mu1=np.zeros(2), sigma1=s, mu2=np.zeros(2), sigma2=s, eps=1e-2)
  np.testing.assert_allclose(calls[1], (s + 1e-2 * np.eye(2)) @ (s + 1e-2 * np.eye(2)))
  # sqrtm((S + eps I)^2) = S + eps I, so d = 2 tr S - 2 (tr S + D eps) = -2 D eps.
  np.testing.assert_allclose(d, -2 * 1e-2 * 2, rtol=1e-6)


def test_frechet_distance_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="same feature extractor"):
    fid.frechet_distance(mu1=np.zeros(3), sigma1=np.eye(3), mu2=np.zeros(4), sigma2=np.eye(4))


def test_float64_stats_merged_across_hosts_equal_one_shot():
  rng = np.random.default_rng(2)
  feats = (rng.normal(size=(300, 16)) * 0.3 + 5.0).astype(np.float32)
  hosts = []
  for shard in np.array_split(feats, 3):       # 3 "hosts", several batches each
    st = fid.init_stats(dim=16)
    for batch in np.array_split(shard, 4):
      st = fid.update_stats(st, batch)
    hosts.append(st)
  merged = fid.merge_stats(*hosts)
  one_shot = fid.update_stats(fid.init_stats(dim=16), feats)
  assert merged.count == one_shot.count == 300
  mu_m, sig_m = fid.stats_to_mu_sigma(merged)
  mu_1, sig_1 = fid.stats_to_mu_sigma(one_shot)
  f64 = feats.astype(np.float64)
  np.testing.assert_allclose(mu_m, mu_1, rtol=1e-13)
  np.testing.assert_allclose(sig_m, sig_1, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(mu_m, f64.mean(0), rtol=1e-12)
  np.testing.assert_allclose(sig_m, np.cov(f64, rowvar=False), rtol=1e-8, atol=1e-12)
  assert mu_m.dtype == sig_m.dtype == np.float64
  with pytest.raises(ValueError, match="different dims"):
    fid.merge_stats(hosts[0], fid.init_stats(dim=3))


def test_reference_stats_npz_round_trip_and_foreign_layouts(tmp_path):
  rng = np.random.default_rng(3)
  mu, a = rng.normal(size=5), rng.normal(size=(5, 5))
  sigma = a @ a.T
  path = tmp_path / "ref.npz"
  fid.save_reference_stats(path, mu=mu, sigma=sigma, protocol=fid.PROTOCOL, count=77)
  ref = fid.load_reference_stats(path, expected_protocol=fid.PROTOCOL)
  np.testing.assert_array_equal(ref.mu, mu)
  np.testing.assert_array_equal(ref.sigma, sigma)
  assert ref.protocol == fid.PROTOCOL and ref.count == 77
  standin = fid.standin_protocol(seed=0, feature_dim=5)
  with pytest.raises(ValueError, match="protocol"):
    fid.load_reference_stats(path, expected_protocol=standin)

  # pytorch-fid / TTUR layout (float32 mu/sigma only) and ADM VIRTUAL_* layout.
  np.savez(tmp_path / "ptfid.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
  np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu,
           sigma=sigma, mu_s=np.zeros(3), sigma_s=np.eye(3))
  for name in ("ptfid.npz", "adm.npz"):
    ext = fid.load_reference_stats(tmp_path / name, expected_protocol=fid.PROTOCOL)
    assert ext.protocol is None and ext.mu.dtype == np.float64
    np.testing.assert_allclose(ext.sigma, sigma, rtol=1e-6)
  np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
  with pytest.raises(ValueError, match="arr_0"):
    fid.load_reference_stats(tmp_path / "images.npz")


def test_quantize_to_uint8_rounds_to_nearest_and_clips():
  x = np.array([-1.5, -1.0, -0.999, 0.0, 1.0 / 255, 0.999, 1.0, 2.0], np.float32)
  np.testing.assert_array_equal(fid.quantize_to_uint8(x), [0, 0, 0, 128, 128, 255, 255, 255])
  with pytest.raises(ValueError, match="float"):
    fid.quantize_to_uint8(np.zeros(3, np.uint8))


def test_inception_score_extremes():
  n, c = 40, 10
  uniform = np.zeros((n, c))
  mean, std = fid.inception_score(logits=uniform, num_splits=4)
  np.testing.assert_allclose([mean, std], [1.0, 0.0], atol=1e-12)
  confident = np.full((n, c), -1e4)                 # each image certain of one class,
  confident[np.arange(n), np.arange(n) % c] = 0.0   # classes uniform in every split
  mean, _ = fid.inception_score(logits=confident, num_splits=4)
  np.testing.assert_allclose(mean, c, rtol=1e-9)


# --------------------------------------------------------------------------
# Precision / recall


def _brute_pr(real, fake, k):
  def radii(x):
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, k]

  def frac(q, r, rr):
    d = ((q[:, None] - r[None]) ** 2).sum(-1)
    return float((d <= rr[None]).any(1).mean())

  return frac(fake, real, radii(real)), frac(real, fake, radii(fake))


def test_precision_recall_matches_brute_force_with_padded_blocks():
  rng = np.random.default_rng(4)
  real = rng.normal(size=(45, 6)).astype(np.float32)
  fake = (rng.normal(size=(37, 6)) * 0.9 + 0.8).astype(np.float32)
  got = pr.precision_recall(real_features=real, fake_features=fake, k=3, block_size=16)
  want = _brute_pr(real.astype(np.float64), fake.astype(np.float64), 3)
  np.testing.assert_allclose(got, want, atol=1e-12)
  assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0
  np.testing.assert_allclose(pr.knn_sq_radii(real, k=3, block_size=16),
                             np.sort(((real[:, None] - real[None]) ** 2).sum(-1), 1)[:, 3],
                             rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# Resize and Inception


def _numpy_bilinear_align_corners_false(img, out_h, out_w):
  """Direct per-pixel formula (torch F.interpolate bilinear, align_corners=False)."""
  in_h, in_w = img.shape[:2]
  out = np.zeros((out_h, out_w) + img.shape[2:])

  def src(i, n_in, n_out):
    s = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = min(int(np.floor(s)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    return i0, i1, s - i0

  for y in range(out_h):
    y0, y1, ly = src(y, in_h, out_h)
    for x in range(out_w):
      x0, x1, lx = src(x, in_w, out_w)
      out[y, x] = ((1 - ly) * ((1 - lx) * img[y0, x0] + lx * img[y0, x1])
                   + ly * ((1 - lx) * img[y1, x0] + lx * img[y1, x1]))
  return out


@pytest.mark.parametrize("in_hw,out_hw", [((7, 5), (19, 23)), ((40, 33), (29, 12))])
def test_resize_matches_numpy_align_corners_false(in_hw, out_hw):
  rng = np.random.default_rng(5)
  img = rng.uniform(size=(2,) + in_hw + (3,)).astype(np.float32)
  got = np.asarray(inception.resize_bilinear(jnp.asarray(img), height=out_hw[0], width=out_hw[1]))
  want = np.stack([_numpy_bilinear_align_corners_false(im.astype(np.float64), *out_hw)
                   for im in img])
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_preprocess_uint8_range_and_identity_size():
  x = np.random.default_rng(8).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
  y = np.asarray(inception.preprocess_uint8(jnp.asarray(x)))
  np.testing.assert_allclose(y, 2.0 * x / 255.0 - 1.0, atol=1e-6)


def test_avg_pool_excludes_padding_and_max_pool_pads_with_minus_inf():
  ones = jnp.ones((1, 4, 4, 2))
  np.testing.assert_allclose(np.asarray(inception._avg_pool_3x3_same(ones)), 1.0)
  neg = -jnp.ones((1, 3, 3, 1))
  mx = inception.nn.max_pool(neg, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
  np.testing.assert_allclose(np.asarray(mx), -1.0)


def test_inception_forward_shapes_and_npz_round_trip(tmp_path):
  variables = inception.init_inception_params(seed=0)
  flat = {k: np.asarray(v) for k, v in inception.variables_to_flat(variables).items()}
  assert len(flat) == 472  # 94 conv+BN (1 kernel, 2 params, 2 stats) + fc kernel, bias

  # torch-layout state dict (as in pt_inception-2015-12-05) -> converter -> same arrays.
  state = {}
  for key, v in flat.items():
    coll, *mod, leaf = key.split("/")
    name = ".".join(mod)
    torch_leaf = {("params", "kernel"): "weight", ("params", "scale"): "weight",
                  ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
                  ("batch_stats", "var"): "running_var"}[(coll, leaf)]
    if leaf == "kernel":
      v = v.T if mod == ["fc"] else v.transpose(3, 2, 0, 1)
    state[f"{name}.{torch_leaf}"] = v
    if leaf == "mean":
      state[f"{name}.num_batches_tracked"] = np.array(0)
  converted = inception.convert_torch_state_dict(state)
  assert converted.keys() == flat.keys()
  for k in flat:
    np.testing.assert_array_equal(converted[k], flat[k])
  path = str(tmp_path / "inception.npz")
  inception.save_inception_npz(path, converted)
  loaded = inception.load_inception_params(path)
  for k, v in inception.variables_to_flat(loaded).items():
    np.testing.assert_array_equal(np.asarray(v), flat[k])

  bad = dict(state)
  del bad["Mixed_7c.branch_pool.conv.weight"]
  with pytest.raises(ValueError, match="missing"):
    inception.convert_torch_state_dict(bad)

  fn = inception.make_inception_feature_fn(loaded)
  images = np.random.default_rng(6).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  pool, logits = fn(images)
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
  pool = np.asarray(pool)
  assert np.isfinite(pool).all() and (pool >= 0).all()
  assert np.abs(pool[0] - pool[1]).max() > 1e-3  # depends on the image
  with pytest.raises(ValueError, match="uint8"):
    fn(images.astype(np.float32))


def test_feature_extractor_requires_weights_or_labelled_standin(tmp_path):
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
    fid.make_feature_extractor(inception_npz=str(tmp_path / "missing.npz"))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ext = fid.make_feature_extractor(inception_npz=None, allow_standin=True, standin_dim=64)
  assert ext.is_standin and ext.protocol.startswith("STAND-IN, not FID")
  assert ext.protocol != fid.PROTOCOL and ext.dim == 64
  rng = np.random.default_rng(7)
  images = rng.uniform(-1, 1, (5, 16, 16, 3)).astype(np.float32)
  out = fid.compute_statistics(extractor=ext, batches=[images[:3], images[3:]],
                               batch_size=3, keep_logits=True, keep_features=True)
  assert out["stats"].count == 5 and out["features"].shape == (5, 64)
  assert out["logits"].shape == (5, 1008)
  # Padding must not leak into the statistics: the last batch (2 of 3) is padded.
  f_tail, _ = ext.fn(fid.quantize_to_uint8(images[2:]))
  np.testing.assert_allclose(out["features"][2:], np.asarray(f_tail), rtol=1e-5, atol=1e-6)
  mu, _ = fid.stats_to_mu_sigma(out["stats"])
  np.testing.assert_allclose(mu, out["features"].astype(np.float64).mean(0), rtol=1e-6)
  assert out["features"].std(0).max() > 0  # features depend on the image
