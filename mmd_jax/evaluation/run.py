"""evaluate_checkpoint(config, workdir): FID / IS / precision-recall of a run's latest checkpoint.

    python -m mmd_jax.main --config=configs/digits.py --mode=eval --workdir=DIR [--config.eval.*]

DIR is one run: a teacher (`--mode=train`; sampled with config.eval.specs, default eval.final) or
a distilled student (`--mode=distill`, recognised by the teacher record in its saved config;
sampled with its own k-step sampler). The model, diffusion and distillation settings come from
the checkpoint's saved config; the evaluation, mesh and data directory from `config`.

One feature pass per spec gives the Fréchet distance against config.eval.fid_reference, the
Inception Score and improved precision/recall (against real images of the data set). Without
Inception weights (config.eval.inception_npz) the labelled STAND-IN network is used and every
number is named `standin_*`, never FID; on the digits the pixel stand-ins fd_pixels / class_acc
are added. Sampling is sharded and resumable (mmd_jax.evaluation.sharded_eval; state under
DIR/eval/). Each finished spec appends a row to DIR/eval_results.jsonl.

The notebook experiments/colab/evaluate.ipynb calls the same functions (load_run, sample_images,
evaluate_checkpoint, discover_runs).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import time
import warnings
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from mmd_jax import config_lib, io_utils, runs
from mmd_jax.data import pipeline
from mmd_jax.evaluation import eval_fields, fid, pixel_metrics
from mmd_jax.evaluation import precision_recall as pr_lib
from mmd_jax.evaluation import sharded_eval
from mmd_jax.parallel import distributed
from mmd_jax.parallel import mesh as mesh_lib
from mmd_jax.runs import common as runs_common
from mmd_jax.training import checkpoint as ckpt_lib
from mmd_jax.training import logging_lib

STANDIN_NOTICE = ("No Inception weights (config.eval.inception_npz is empty): using the STAND-IN "
                  "feature extractor; its numbers are NOT FID (keys standin_*).")


class EvalError(config_lib.ConfigError):
  """A bad evaluation request (missing file, unusable spec), with what to do about it."""


# ----------------------------------------------------------------------------------------------
# Configs and runs
# ----------------------------------------------------------------------------------------------

def _has_checkpoints(workdir: str) -> bool:
  return epath.Path(workdir, "checkpoints").exists()


def discover_runs(workdir: str) -> list[tuple[str, str]]:
  """[(name, run directory)]: `workdir` itself if it holds checkpoints, else a pipeline's
  teacher/ and students/<variant>_k<k>/ (the teacher first)."""
  if _has_checkpoints(workdir):
    return [(os.path.basename(workdir.rstrip("/")) or "run", workdir)]
  runs = []
  teacher = os.path.join(workdir, "teacher")
  if _has_checkpoints(teacher):
    runs.append(("teacher", teacher))
  students = epath.Path(workdir, "students")
  if students.exists():
    for d in sorted(students.iterdir(), key=lambda p: p.name):
      if _has_checkpoints(os.fspath(d)):
        runs.append((f"student {d.name}", os.path.join(workdir, "students", d.name)))
  return runs


def _no_checkpoint(workdir: str) -> ckpt_lib.CheckpointError:
  hint = ""
  if epath.Path(workdir, "teacher").exists():
    hint = (f" It looks like a pipeline directory: evaluate {workdir}/teacher or "
            f"{workdir}/students/<variant>_k<k>.")
  return ckpt_lib.CheckpointError(
      f"No checkpoint in {workdir}/checkpoints: --mode=eval needs a trained run (--mode=train or "
      f"--mode=distill) as --workdir.{hint}")


def effective_config(config, saved: dict, overrides: dict | None = None):
  """The saved run config with the caller's eval and mesh sections and data directory."""
  eff = ml_collections.ConfigDict({k: v for k, v in saved.items() if k != "teacher_record"})
  ev = eval_fields.defaults()
  ev.update(saved.get("eval", {}))
  if config is not None:
    ev.update(config.eval.to_dict())
    eff.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
    if config.data.get("data_dir"):
      eff.data.data_dir = config.data.data_dir
  eff.eval = ml_collections.ConfigDict(ev)
  if overrides:
    eff = config_lib.apply_overrides(eff, overrides)
  return eff


@dataclasses.dataclass
class LoadedRun:
  """A run's latest checkpoint, restored onto the mesh, with its sampler."""
  kind: str                # "teacher" or "student"
  workdir: str
  step: int
  config: ml_collections.ConfigDict   # effective config (see effective_config)
  params: Any
  param_shardings: Any
  fingerprint: str
  mesh: Any
  sample_fn: Callable      # unsharded sample(params, rng, labels, *, sampler, num_steps, guidance)
  specs: list              # resolve_specs of config.eval.specs
  num_classes: int          # the model's (0: labels are ignored)
  eval_classes: int         # the data set's: samples are class-balanced over these
  data_shape: tuple
  run: Any = None           # the runs.Run it was restored with
  _sharded: dict = dataclasses.field(default_factory=dict)

  def sharded_sampler(self, spec: dict):
    key = (spec["sampler"], int(spec["num_steps"]), float(spec["guidance"]))
    if key not in self._sharded:
      self._sharded[key] = sharded_eval.make_sharded_sampler(
          self.sample_fn, mesh=self.mesh, param_shardings=self.param_shardings,
          sampler=key[0], num_steps=key[1], guidance=key[2])
    return self._sharded[key]


def _check_eval_fields(cfg) -> None:
  for key in ("num_samples", "batch_size", "save_every", "reference_examples", "standin_dim"):
    v = cfg.eval[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise config_lib.ConfigError(f"config.eval.{key} must be a positive integer, got {v!r}.")
  for key in ("inception_npz", "fid_reference"):
    path = cfg.eval[key]
    if path and not epath.Path(path).exists():
      what = ("Convert pytorch-fid's pt_inception weights with "
              "experiments/convert_inception_weights.py, or leave it empty for the labelled "
              "STAND-IN extractor (not FID)." if key == "inception_npz" else
              "Compute one with experiments/compute_fid_reference.py, or leave it empty to "
              "compute the reference from the config's data set.")
      raise EvalError(f"config.eval.{key}={path!r} does not exist. {what}")


def load_run(config, workdir: str, *, overrides: dict | None = None, mesh=None) -> LoadedRun:
  """Restores the latest checkpoint of the teacher or student run in `workdir`.

  config: the command line's config (its eval/mesh sections and data_dir are used), or None for
  the run's saved config; overrides: dotted keys applied last (e.g. {"eval.num_samples": 8}).
  """
  if not _has_checkpoints(workdir):
    raise _no_checkpoint(workdir)
  ckpt, _, step = runs_common.open_checkpoint(
      workdir, error=lambda m: _no_checkpoint(workdir), missing="")
  try:
    saved = ckpt.saved_config(step)
    cfg = effective_config(config, saved, overrides)
    _check_eval_fields(cfg)
    if int(cfg.model.get("text_dim", 0) or 0) > 0:
      raise EvalError("--mode=eval does not evaluate text-conditioned models yet (the run's "
                      "model.text_dim > 0): it needs prompts.")
    mesh = mesh_lib.make_mesh(cfg.mesh) if mesh is None else mesh
    run = runs.build(cfg, kind=runs.kind_of(cfg, saved), mesh=mesh)
    if not run.spec.is_image:
      raise EvalError(f"--mode=eval evaluates image models; data.name={cfg.data.name!r} is not "
                      "images (use experiments/gmm_benchmark.py for mixtures).")
    specs = resolve_specs(cfg, run=run, workdir=workdir)
    mesh_lib.check_batch_divisible(batch_size=int(cfg.eval.batch_size), mesh=mesh,
                                   what="eval.batch_size")
    state, _ = run.restore(ckpt, step)
  finally:
    ckpt.close()
  ema = bool(cfg.eval.get("use_ema", True))
  params = state.ema_params if ema else state.params
  shardings = run.state_shardings
  return LoadedRun(kind=run.kind, workdir=workdir, step=int(step), config=cfg, params=params,
                   param_shardings=shardings.ema_params if ema else shardings.params,
                   fingerprint=runs_common.fingerprint(params), mesh=mesh,
                   sample_fn=run.sample_fn(), specs=specs, num_classes=run.spec.num_classes,
                   eval_classes=run.spec.eval_classes, data_shape=run.spec.data_shape, run=run)


def resolve_specs(cfg, *, run, workdir: str, text: str | None = None) -> list[dict]:
  """The specs to evaluate: `text` or config.eval.specs, every sampler resolved through the
  registry (diffusion.samplers: a teacher takes ancestral / ddim, a student also its own
  'student' sampler); empty means eval.final for a teacher and its own k-step sampler for a
  student. A user error for anything the run cannot sample."""
  text = cfg.eval.specs if text is None else text
  if run.kind == "student" and not text:
    return [run.own_spec()]
  specs = config_lib.parse_sampler_specs(text or cfg.eval.get("final", ""), key="eval.specs")
  if not specs:
    raise EvalError("Nothing to evaluate: set --config.eval.specs=SAMPLER:STEPS[,...].")
  try:
    return run.check_specs(specs, key="eval.specs")
  except config_lib.ConfigError as e:
    raise EvalError(f"{e} ({workdir} is a {run.kind} run.)") from None


def sample_images(run: LoadedRun, *, labels, spec: dict, seed: int | None = None) -> np.ndarray:
  """Samples for the given labels (one process), in eval-sized batches with the evaluation's
  keys: the first samples of a class-balanced evaluation are the same images."""
  bsz = int(run.config.eval.batch_size)
  seed = int(run.config.eval.seed) if seed is None else int(seed)
  labels = np.asarray(labels, np.int32)
  sampler = run.sharded_sampler(spec)
  batch_sh = mesh_lib.batch_sharding(run.mesh)
  out = []
  for b, start in enumerate(range(0, len(labels), bsz)):
    part = labels[start:start + bsz]
    padded = np.concatenate([part, np.zeros(bsz - len(part), np.int32)])
    keys = sharded_eval.batch_keys(seed=seed, batch_index=b)
    x = sampler(run.params, keys, sharded_eval.to_global(padded, batch_sh))
    out.append(np.asarray(jax.device_get(x))[:len(part)])
  return np.concatenate(out)


# ----------------------------------------------------------------------------------------------
# Feature extractor and references
# ----------------------------------------------------------------------------------------------

def make_extractor(cfg) -> fid.FeatureExtractor:
  path = cfg.eval.inception_npz
  if path:
    if not os.path.exists(path):
      raise EvalError(f"config.eval.inception_npz={path!r} must be a local file.")
    return fid.make_feature_extractor(inception_npz=path)
  logging.warning(STANDIN_NOTICE)
  print(STANDIN_NOTICE, flush=True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return fid.make_feature_extractor(inception_npz=None, allow_standin=True,
                                      standin_dim=int(cfg.eval.standin_dim))


def protocol_version(protocol: str) -> str:
  if protocol.startswith(fid.STANDIN_PROTOCOL_PREFIX):
    m = re.search(r"stand-in (v\d+)", protocol)
    return f"mmd_jax-standin-{m.group(1) if m else 'v?'} (NOT FID)"
  return protocol.split(":")[0]


@dataclasses.dataclass
class Reference:
  mu: np.ndarray
  sigma: np.ndarray
  source: str              # file name, or "data:<name>/<split>[:N]"
  real_features: np.ndarray | None   # for precision/recall


def _data_reference(cfg, workdir, extractor, mesh, *, need_features: bool):
  n = int(cfg.eval.reference_examples)
  key = json.dumps({"protocol": extractor.protocol, "data": cfg.data.name,
                    "split": cfg.data.get("split", "train"), "n": n}, sort_keys=True)
  path = epath.Path(workdir, "eval", f"reference_{hashlib.sha256(key.encode()).hexdigest()[:10]}"
                    ".npz")
  source = f"data:{cfg.data.name}/{cfg.data.get('split', 'train')}"
  d = io_utils.read_npz_or_none(path, what="reference statistics", missing_ok=True)
  usable = d is not None and {"mu", "sigma", "count"} <= set(d) and (
      not need_features or "features" in d)
  # Every process must read it, or every one computes it (feature_pass is a collective).
  if distributed.all_agree(usable):
    return Reference(d["mu"], d["sigma"], f"{source}:{int(d['count'])} ({path})",
                     d.get("features"))
  images, _ = pipeline.load_eval_arrays(cfg.data, max_examples=n)
  t0 = time.time()
  stats, feats = sharded_eval.feature_pass(images=images, extractor=extractor, mesh=mesh,
                                           batch_size=int(cfg.eval.batch_size),
                                           keep_features=True)
  mu, sigma = fid.stats_to_mu_sigma(stats)
  logging.info("reference statistics of %d real images in %.1f s -> %s", stats.count,
               time.time() - t0, path)
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    sharded_eval.write_npz(path, dict(
        mu=mu, sigma=sigma, protocol=np.array(extractor.protocol),
        count=np.array(stats.count, np.int64), features=feats))
  return Reference(mu, sigma, f"{source}:{stats.count} ({path})", feats)


def load_reference(cfg, workdir, extractor, mesh, *, need_features: bool) -> Reference:
  path = cfg.eval.fid_reference
  if path:
    try:
      ref = fid.load_reference_stats(io_path(path))
    except ValueError as e:
      raise EvalError(f"config.eval.fid_reference: {e}") from None
    usable = ref.protocol == extractor.protocol or (ref.protocol is None and
                                                    not extractor.is_standin)
    if usable and ref.mu.shape[0] != extractor.dim:
      raise EvalError(f"config.eval.fid_reference={path!r} has {ref.mu.shape[0]}-d statistics; "
                      f"the feature extractor gives {extractor.dim}-d features.")
    if usable:
      real = (_data_reference(cfg, workdir, extractor, mesh, need_features=True).real_features
              if need_features else None)
      return Reference(ref.mu, ref.sigma, path, real)
    if not extractor.is_standin:
      raise EvalError(f"config.eval.fid_reference={path!r} was computed under protocol "
                      f"{ref.protocol!r}, not {extractor.protocol!r}; recompute it with "
                      "experiments/compute_fid_reference.py and the same Inception weights.")
    msg = (f"config.eval.fid_reference={path!r} holds statistics of another protocol "
           f"({ref.protocol or 'Inception, foreign file'}); the STAND-IN reference is computed "
           "from the data set instead.")
    logging.warning(msg)
    print(msg, flush=True)
  return _data_reference(cfg, workdir, extractor, mesh, need_features=need_features)


def io_path(path: str):
  """np.load accepts file objects: gs:// references are read through epath."""
  if "://" in path:
    return io.BytesIO(epath.Path(path).read_bytes())
  return path


class LinearClassifier:
  """predict() of a fitted sklearn LogisticRegression from its coefficients (argmax of
  X coef^T + intercept), so the fit can be cached in an .npz."""

  def __init__(self, coef, intercept, classes):
    self.coef, self.intercept, self.classes = (np.asarray(coef, np.float64),
                                               np.asarray(intercept, np.float64),
                                               np.asarray(classes))

  def predict(self, x):
    scores = np.asarray(x, np.float64) @ self.coef.T + self.intercept
    if scores.shape[1] == 1:
      return self.classes[(scores[:, 0] > 0).astype(int)]
    return self.classes[np.argmax(scores, axis=1)]


@dataclasses.dataclass
class PixelReference:
  """The digits pixel stand-ins' reference: Gaussian fit of the real pixels and the classifier
  of mmd_jax.evaluation.pixel_metrics (logistic regression on all real images, same settings)."""
  mu: np.ndarray
  sigma: np.ndarray
  classifier: LinearClassifier


def pixel_reference(cfg, workdir) -> PixelReference:
  """Fitted once on the whole split, then read from WORKDIR/eval/pixel_reference_<hash>.npz."""
  key = json.dumps({"data": cfg.data.name, "split": cfg.data.get("split", "train"),
                    "seed": int(cfg.seed), "version": 1}, sort_keys=True)
  path = epath.Path(workdir, "eval",
                    f"pixel_reference_{hashlib.sha256(key.encode()).hexdigest()[:10]}.npz")
  d = io_utils.read_npz_or_none(path, what="pixel reference", missing_ok=True)
  usable = d is not None and {"mu", "sigma", "coef", "intercept", "classes"} <= set(d)
  if distributed.all_agree(usable):  # the same reference on every process
    return PixelReference(d["mu"], d["sigma"], LinearClassifier(d["coef"], d["intercept"],
                                                                d["classes"]))
  from sklearn.linear_model import LogisticRegression
  real_x, real_y = pipeline.load_eval_arrays(cfg.data)
  flat = np.asarray(real_x, np.float64).reshape(len(real_x), -1)
  mu, sigma = fid.stats_to_mu_sigma(fid.update_stats(fid.init_stats(dim=flat.shape[1]), flat))
  clf = LogisticRegression(max_iter=2000, C=1.0).fit(flat, real_y)
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    sharded_eval.write_npz(path, dict(mu=mu, sigma=sigma, coef=clf.coef_,
                                       intercept=clf.intercept_, classes=clf.classes_))
  return PixelReference(mu, sigma, LinearClassifier(clf.coef_, clf.intercept_, clf.classes_))


# ----------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------

def metric_names(protocol: str) -> dict:
  standin = protocol.startswith(fid.STANDIN_PROTOCOL_PREFIX)
  p = "standin_" if standin else ""
  return {"fd": "standin_fd" if standin else "fid", "is": f"{p}inception_score",
          "is_std": f"{p}inception_score_std", "precision": f"{p}precision",
          "recall": f"{p}recall"}


def evaluate_checkpoint(config, workdir: str, *, run: LoadedRun | None = None,
                        specs: str | list | None = None, max_batches: int | None = None,
                        on_batch: Callable[[int], Any] | None = None,
                        print_table: bool = True) -> list[dict]:
  """Evaluates the latest checkpoint in `workdir` (or the given loaded `run`) on each spec.

  specs: SAMPLER:STEPS[:GUIDANCE] text, or a list from resolve_specs; default config.eval.specs.
  Returns the rows appended to WORKDIR/eval_results.jsonl (finished specs only). max_batches /
  on_batch: see sharded_eval.evaluate_samples (an evaluation stopped early resumes on rerun).
  """
  run = load_run(config, workdir) if run is None else run
  cfg = run.config
  if specs is None or isinstance(specs, str):
    spec_list = run.specs if specs is None else resolve_specs(
        cfg, run=run.run, workdir=run.workdir, text=specs)
  else:
    spec_list = [dict(s) for s in specs]
  extractor = make_extractor(cfg)
  names = metric_names(extractor.protocol)
  want_pr = bool(cfg.eval.precision_recall)
  ref = load_reference(cfg, workdir, extractor, run.mesh, need_features=want_pr)
  pixel = pixel_reference(cfg, workdir) if cfg.data.name == "digits" else None
  rows = []
  for s in spec_list:
    t0 = time.time()
    spec = dict(s, num_samples=int(cfg.eval.num_samples), batch_size=int(cfg.eval.batch_size),
                seed=int(cfg.eval.seed), num_classes=run.eval_classes, checkpoint_step=run.step,
                fingerprint=run.fingerprint, kind=run.kind,
                use_ema=bool(cfg.eval.get("use_ema", True)))
    res = sharded_eval.evaluate_samples(
        spec=spec, sampler=run.sharded_sampler(s), params=run.params, mesh=run.mesh,
        extractor=extractor, eval_root=os.path.join(workdir, "eval"),
        classifier=pixel.classifier if pixel and run.eval_classes > 0 else None,
        pixel_stats=pixel is not None, keep_features=want_pr,
        keep_logits=bool(cfg.eval.inception_score), save_every=int(cfg.eval.save_every),
        max_batches=max_batches, on_batch=on_batch)
    if not res.complete:
      logging.warning("evaluation of %s stopped after %d of %d batches (state in %s); rerun to "
                      "resume.", s, res.batches_done, res.num_batches, res.eval_dir)
      continue
    mu, sigma = fid.stats_to_mu_sigma(res.stats)
    row = {"step": run.step, "sampler": s["sampler"], "num_steps": s["num_steps"],
           "guidance": s["guidance"], "run": run.kind, "tag": "eval",
           "num_samples": res.stats.count,
           names["fd"]: fid.frechet_distance(mu1=mu, sigma1=sigma, mu2=ref.mu, sigma2=ref.sigma),
           "protocol": extractor.protocol, "protocol_version": protocol_version(
               extractor.protocol), "reference": ref.source}
    if res.logits is not None:
      is_mean, is_std = fid.inception_score(logits=res.logits,
                                            num_splits=min(10, len(res.logits)))
      row.update({names["is"]: is_mean, names["is_std"]: is_std})
    if want_pr and ref.real_features is not None and len(res.features) > 3:
      real = ref.real_features[:len(res.features)]
      precision, recall = pr_lib.precision_recall(real_features=real,
                                                  fake_features=res.features)
      row.update({names["precision"]: precision, names["recall"]: recall})
    if res.pixel_stats is not None:
      pmu, psigma = fid.stats_to_mu_sigma(res.pixel_stats)
      row["fd_pixels"] = fid.frechet_distance(mu1=pmu, sigma1=psigma, mu2=pixel.mu,
                                              sigma2=pixel.sigma)
      if res.class_acc is not None:
        row["class_acc"] = res.class_acc
      row["pixel_metric_kind"] = pixel_metrics.STAND_IN_LABEL
    row.update(eval_dir=res.eval_dir, resumed_from_batch=res.resumed_from,
               seconds=round(time.time() - t0, 2))
    logging_lib.append_jsonl(os.path.join(workdir, "eval_results.jsonl"), row)
    rows.append(row)
  if print_table and rows and jax.process_index() == 0:
    print(results_table(rows), flush=True)
  return rows


def results_table(rows) -> str:
  """Markdown table of result rows, with the protocol line above it."""
  keys = [k for k in ("fid", "standin_fd", "inception_score", "standin_inception_score",
                      "precision", "standin_precision", "recall", "standin_recall",
                      "fd_pixels", "class_acc") if any(k in r for r in rows)]
  lines = [f"protocol: {rows[0]['protocol_version']} -- {rows[0]['protocol']}", "",
           "| run | step | sampler | steps | guidance | " + " | ".join(keys) + " |",
           "|" + "---|" * (5 + len(keys))]
  for r in rows:
    vals = [f"{r[k]:.4f}" if k in r else "-" for k in keys]
    lines.append(f"| {r['run']} | {r['step']} | {r['sampler']} | {r['num_steps']} | "
                 f"{r['guidance']:g} | " + " | ".join(vals) + " |")
  return "\n".join(lines)
