"""Stand-in sample-quality metrics for small image sets such as the 8x8 digits. NOT FID.

- fd_pixels: the Frechet distance between Gaussian fits of the samples and of the real images,
  in pixel space (the FID formula without the Inception network).
- class_acc: the accuracy of a classifier trained on the real images at assigning
  class-conditional samples to the class they were asked for.
"""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from mmd_jax.evaluation import fid

STAND_IN_LABEL = "stand-in metrics on pixels, not FID"


def _gaussian_fit(flat: np.ndarray):
  stats = fid.update_stats(fid.init_stats(dim=flat.shape[1]), flat)
  return fid.stats_to_mu_sigma(stats)


class PixelReference:
  """Gaussian fit and classifier of the real images, built once per run."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, *, seed: int = 0):
    flat = np.asarray(images, np.float64).reshape(len(images), -1)
    self.mu, self.sigma = _gaussian_fit(flat)
    x_tr, x_te, y_tr, y_te = train_test_split(flat, labels, test_size=0.2, random_state=seed,
                                              stratify=labels)
    held_out = LogisticRegression(max_iter=2000, C=1.0).fit(x_tr, y_tr)
    self.classifier_heldout_acc = float(held_out.score(x_te, y_te))
    self.classifier = LogisticRegression(max_iter=2000, C=1.0).fit(flat, labels)

  def fd_pixels(self, samples: np.ndarray) -> float:
    flat = np.asarray(samples, np.float64).reshape(len(samples), -1)
    mu, sigma = _gaussian_fit(flat)
    return float(fid.frechet_distance(mu1=mu, sigma1=sigma, mu2=self.mu, sigma2=self.sigma))

  def class_acc(self, samples: np.ndarray, labels: np.ndarray) -> float:
    flat = np.asarray(samples, np.float64).reshape(len(samples), -1)
    return float(np.mean(self.classifier.predict(flat) == np.asarray(labels)))

  def evaluate(self, samples, labels) -> dict:
    out = {"fd_pixels": self.fd_pixels(samples)}
    if labels is not None:
      out["class_acc"] = self.class_acc(samples, labels)
    return out
