"""The config fields of `--mode=eval` (mmd_jax.evaluation.run), with their defaults.

A config file adds them with `c.eval.update(eval_fields.defaults())` (no jax import here).
Fields missing from a config (or from a checkpoint's saved config) take these defaults.

  specs              SAMPLER:STEPS[:GUIDANCE],... to evaluate. Empty: a teacher run uses
                     eval.final; a student run its own k-step sampler. A student may name
                     `student:K` to run its sampler with K steps.
  inception_npz      converted FID Inception weights (experiments/convert_inception_weights.py).
                     Empty: the labelled STAND-IN extractor (numbers are not FID).
  fid_reference      reference statistics .npz (mu, sigma; experiments/compute_fid_reference.py,
                     pytorch-fid or ADM files). Empty: computed from the config's data set
                     (first eval.reference_examples records) and cached under WORKDIR/eval/.
  reference_examples real images for that reference and for precision/recall.
  precision_recall   improved precision/recall (k=3) against real features of the data set.
  inception_score    Inception Score from the same feature pass (10 splits, fewer if N < 10).
  standin_dim        feature width of the stand-in extractor (recorded in its protocol).
  save_every         batches between saves of the resumable evaluation state.
  seed               base seed of the evaluation samples (per-batch keys are folded from it).
"""
from __future__ import annotations


def defaults() -> dict:
  return dict(specs="", inception_npz="", fid_reference="", reference_examples=10_000,
              precision_recall=True, inception_score=True, standin_dim=2048, save_every=10,
              seed=0)
