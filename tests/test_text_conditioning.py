"""Text conditioning end to end: the offline digits_text data set, condition dropout, guidance
against the null (zero) text, teacher training and distillation with text through the loops
(configs/t2i512.py:test), and text-shape mismatches that fail before compiling."""
import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmd_jax import config_lib, loop, runs
from mmd_jax.data import pipeline, sources
from mmd_jax.diffusion import conditioning, samplers
from mmd_jax.diffusion.schedules import schedule_from_config
from mmd_jax.distill import steps as distill_steps
from mmd_jax.evaluation import periodic, sampling
from mmd_jax.models import build as model_build
from mmd_jax.parallel import mesh as mesh_lib
from mmd_jax.runs import student as teacher_lib
from mmd_jax.training import state as state_lib
from mmd_jax.training import steps as teacher_steps
from tests import helpers

T2I = os.path.join(helpers.REPO, "configs", "t2i512.py")
TEXT = (sources.TEXT_LEN, sources.TEXT_DIM)


@pytest.fixture(scope="module")
def text_data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds_text"))
  sources.ensure_digits_text_prepared(d)
  return d


def _config(data_dir, **overrides):
  config = config_lib.load_config_file(T2I, "test")
  config.data.data_dir = str(data_dir)
  return config_lib.apply_overrides(config, overrides)


def _state_tree(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                         "state"))


@pytest.fixture(scope="module")
def text_teacher(text_data_dir, tmp_path_factory):
  """configs/t2i512.py:test trained through the loop: 4 steps, checkpoints at 2 and 4. No
  evaluation (a sampler compile): the samplers with text are checked in the guidance test."""
  workdir = str(tmp_path_factory.mktemp("t2i_teacher"))
  return workdir, loop.train_and_evaluate(_config(text_data_dir, **{"eval.num_samples": 0}),
                                          workdir)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def test_digits_text_builds_offline_and_yields_text_of_the_configured_shape(text_data_dir,
                                                                             tmp_path):
  config = _config(text_data_dir)
  assert (config.model.text_len, config.model.text_dim) == TEXT == (4, 8)
  info = pipeline.dataset_info(config.data)
  assert info["text_shape"] == TEXT and info["image_shape"] == (8, 8, 1)
  assert info["num_classes"] == 10 and info["num_examples"] == 1797
  batch = next(pipeline.make_train_iterator(config.data, global_batch_size=8, seed=0,
                                            shard_index=0, shard_count=1))
  assert set(batch) == {"image", "label", "text"}
  assert batch["text"].shape == (8,) + TEXT and batch["text"].dtype == np.float32

  # Every caption embeds its own digit's word (plus small noise) and is never the null text.
  text, labels = pipeline.load_eval_text(config.data)
  _, eval_labels = pipeline.load_eval_arrays(config.data)
  np.testing.assert_array_equal(labels, eval_labels)  # the same records, in the same order
  table = sources.token_embeddings()
  words = np.stack([table[w] for w in sources.DIGIT_WORDS])
  dist = np.linalg.norm(text[:, :, None, :] - words[None, None], axis=-1).min(axis=1)
  np.testing.assert_array_equal(dist.argmin(axis=1), labels)
  assert np.abs(text).sum(axis=(1, 2)).min() > 1.0
  caption, emb = sources.caption_embedding(5, 3)
  assert "three" in caption and np.array_equal(emb, sources.caption_embedding(5, 3)[1])

  # A user's prepared {image, label, text} data set goes through the same path by name.
  shutil.copytree(os.path.join(text_data_dir, "mmd_digits_text", "1.0.0"),
                  tmp_path / "my_t2i" / "2.0.0")
  user = ml_collections.ConfigDict(dict(name="my_t2i", data_dir=str(tmp_path), split="train"))
  assert pipeline.dataset_info(user)["text_shape"] == TEXT
  assert "tensorflow" not in sys.modules


# ----------------------------------------------------------------------------------------------
# Condition dropout and guidance
# ----------------------------------------------------------------------------------------------

def test_condition_dropout_nulls_label_and_text_together():
  rng = jax.random.PRNGKey(3)
  label = jnp.arange(64, dtype=jnp.int32) % 10
  text = jnp.ones((64,) + TEXT, jnp.float32)
  new_label, new_text = conditioning.drop(rng=rng, label=label, text=text, num_classes=10,
                                          prob=0.5)
  dropped = np.asarray(new_label == 10)
  assert 10 < dropped.sum() < 54
  np.testing.assert_array_equal(np.asarray(new_text).sum(axis=(1, 2)) == 0, dropped)
  np.testing.assert_array_equal(np.asarray(new_text)[~dropped], 1.0)
  # Class-only models get the draw they had before text existed (bit-for-bit unchanged runs).
  np.testing.assert_array_equal(new_label, teacher_steps.drop_labels(
      rng=rng, label=label, num_classes=10, prob=0.5))
  # A text-only model (no classes) drops the same examples' text from the same key.
  _, text_only = conditioning.drop(rng=rng, label=label, text=text, num_classes=0, prob=0.5)
  np.testing.assert_array_equal(text_only, new_text)
  assert conditioning.drop(rng=rng, label=label, text=text, num_classes=10, prob=0.0)[1] is text


def _random_params(model):
  """Random parameters of every leaf (fan-in scaled), from shapes only: no init compile, and no
  zero-initialised output layer that would make the output independent of the text."""
  boxed = jax.eval_shape(lambda r: state_lib.init_params(
      model, rng=r, data_shape=(8, 8, 1), num_classes=0, text_shape=TEXT), jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)

  def fill(s):
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 16
    return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), jnp.float32)

  return jax.tree_util.tree_map(fill, nn.unbox(boxed))


def test_guided_teacher_with_text_and_null_text_is_the_unconditional_branch(text_data_dir):
  config = _config(text_data_dir)
  model = model_build.build_model(config.model, data_shape=(8, 8, 1), num_classes=0)
  predict = distill_steps.make_x_predictor(model, config.model.prediction)
  params = _random_params(model)
  schedule = schedule_from_config(config.diffusion.schedule)
  w = 1.5
  text = jnp.asarray(np.stack([sources.caption_embedding(i, i % 10)[1] for i in range(4)]))
  null = conditioning.null_text_like(text)
  # z_1 and logSNR(t = 1) as the one-step student sampler draws them from `key`.
  key = jax.random.PRNGKey(1)
  z = jax.random.normal(jax.random.split(key)[0], (4, 8, 8, 1), jnp.float32)
  logsnr = jnp.full((4,), float(schedule.logsnr(1.0)))
  twice = lambda a: jnp.concatenate([a, a])
  one_step = ml_collections.ConfigDict(dict(variant="alternating", num_student_steps=1, eta=1.0,
                                            spacing="uniform_t"))

  @jax.jit
  def run(params):
    fn = lambda z, l, lab, t: predict(params, z, l, lab, text=t)
    guided = conditioning.guided(fn, guidance=w, null_label=None)
    # Network calls: [text; null] unguided and guided (one batch each), the k = 1 student.
    cond, uncond = jnp.split(fn(twice(z), twice(logsnr), None, jnp.concatenate([text, null])), 2)
    g_text, g_null = jnp.split(guided(twice(z), twice(logsnr), None,
                                      jnp.concatenate([text, null])), 2)
    student = distill_steps.make_student_sampler(config=one_step, denoise=predict,
                                                 schedule=schedule)
    teacher = samplers.make_sample_fn(denoise=predict, schedule=schedule, num_classes=0,
                                      data_shape=(8, 8, 1), clip=None)
    return dict(cond=cond, uncond=uncond, guided=g_text, guided_null=g_null,
                student=student(params, key, shape=(4, 8, 8, 1), text=text),
                teacher_sampler=teacher(params, key, jnp.zeros((4,), jnp.int32), text,
                                        sampler="ancestral", num_steps=1, guidance=w))

  out = jax.tree_util.tree_map(np.asarray, run(params))
  assert np.abs(out["cond"] - out["uncond"]).max() > 1e-2  # the text matters
  np.testing.assert_allclose(out["guided"], (1 + w) * out["cond"] - w * out["uncond"],
                             rtol=1e-4, atol=1e-5)
  assert np.abs(out["guided"] - out["cond"]).max() > 1e-2  # guided differs from unguided
  # Null text: guidance changes nothing, the output is the unconditional branch.
  np.testing.assert_allclose(out["guided_null"], out["uncond"], rtol=1e-4, atol=1e-5)
  # One-step samplers return their denoiser at z_1: the student's g(z_1, text), the evaluation
  # sampler's guided g^w(z_1, text).
  np.testing.assert_allclose(out["student"], out["cond"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["teacher_sampler"], out["guided"], rtol=1e-4, atol=1e-5)


def test_evaluation_conditions_each_sample_on_a_real_caption_of_its_class(text_data_dir):
  text, labels = pipeline.load_eval_text(_config(text_data_dir).data)
  seen = []

  def fake_sample_fn(params, rng, labels, text=None, *, sampler, num_steps, guidance):
    seen.append((np.asarray(labels), np.asarray(text), guidance))
    return jnp.zeros((labels.shape[0], 8, 8, 1))

  x, sample_labels = sampling.generate(
      fake_sample_fn, None, rng=jax.random.PRNGKey(0), num=50, batch_size=20, num_classes=10,
      sampler="ancestral", num_steps=2, guidance=1.0,
      text_fn=periodic.caption_fn(text, labels, num_classes=10))
  assert x.shape == (50, 8, 8, 1) and len(seen) == 3 and seen[0][2] == 1.0
  got = np.concatenate([t for _, t, _ in seen])[:50]
  np.testing.assert_array_equal(sample_labels, np.arange(50) % 10)
  # Sample i gets caption number i // 10 of its class, in record order.
  for i, (c, t) in enumerate(zip(sample_labels, got)):
    np.testing.assert_array_equal(t, text[np.flatnonzero(labels == c)[i // 10]])


# ----------------------------------------------------------------------------------------------
# Loops: teacher training and distillation with text
# ----------------------------------------------------------------------------------------------

def test_teacher_trains_on_text_and_changes_its_text_parameters(text_teacher):
  workdir, out = text_teacher
  first, last = _state_tree(workdir, 2)["params"], _state_tree(workdir, 4)["params"]
  for name in ("text_pool", "mid_attn"):  # the pooled text projection and cross-attention
    assert name in last
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(first["text_pool"]),
                                                   jax.tree_util.tree_leaves(last["text_pool"]))]
  assert any(moved)
  assert "cross_kv_kernel" in last["mid_attn"]
  assert not np.array_equal(first["mid_attn"]["cross_kv_kernel"],
                            last["mid_attn"]["cross_kv_kernel"])
  assert not out["preempted"] and int(out["state"].step) == 4


def test_alternating_distillation_of_the_guided_text_teacher_changes_the_student(
    text_teacher, text_data_dir, tmp_path):
  teacher_dir, _ = text_teacher
  # No evaluation: the student sampler with text is checked in the guidance test above.
  config = _config(text_data_dir, **{"distill.teacher": teacher_dir, "eval.num_samples": 0})
  assert config.distill.variant == "alternating" and config.distill.guidance == 1.0
  workdir = str(tmp_path / "student")
  out = loop.distill_and_evaluate(config, workdir)
  saved = _state_tree(workdir, 2)
  teacher = jax.tree_util.tree_leaves(out["teacher"].params)
  for part in ("params", "aux_params"):  # both start as copies of the teacher's EMA parameters
    leaves = jax.tree_util.tree_leaves(saved[part])
    assert len(leaves) == len(teacher)
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(leaves, teacher)), part


def test_text_shape_mismatches_fail_before_compiling_and_name_both_shapes(text_teacher,
                                                                          text_data_dir,
                                                                          tmp_path):
  teacher_dir, _ = text_teacher
  with pytest.raises(config_lib.ConfigError,
                     match=r"takes text f32\[B, 4, 16\] but data set 'digits_text' has text "
                           r"f32\[B, 4, 8\]; set --config.model.text_len=4 "
                           r"--config.model.text_dim=8"):
    loop.train_and_evaluate(_config(text_data_dir, **{"model.text_dim": 16}),
                            str(tmp_path / "a"))
  with pytest.raises(config_lib.ConfigError, match=r"takes no text but .* has text f32\[B, 4, 8\]"):
    loop.train_and_evaluate(_config(text_data_dir, **{"model.text_dim": 0}), str(tmp_path / "b"))
  # A text-conditioned step given a batch without text says so while tracing.
  config = _config(text_data_dir)
  student_tx, aux_tx = distill_steps.make_optimizers(config.distill)
  step = distill_steps.make_distill_step(
      config=config.distill, denoise=None, schedule=None, student_tx=student_tx, aux_tx=aux_tx,
      data_key="image", use_text=True)
  with pytest.raises(ValueError, match=r"text-conditioned but the batch has keys \['image', "
                                       r"'label'\]; use a data set with a 'text' feature"):
    step(None, None, {"image": np.zeros((2, 8, 8, 1)), "label": np.zeros((2,))}, None)
  # A teacher trained on text f32[B, 4, 8] against a config whose model takes f32[B, 4, 16].
  # (data.image_shape: shapes from the config, so the run is built without reading the data.)
  config = _config(text_data_dir, **{"model.text_dim": 16, "distill.teacher": teacher_dir,
                                     "data.image_shape": (8, 8, 1)})
  run = runs.build(config, kind="student", mesh=mesh_lib.make_mesh(config.mesh), need_data=False)
  with pytest.raises(teacher_lib.TeacherError,
                     match=r"the teacher takes text f32\[B, 4, 8\] but the config's model has "
                           r"text f32\[B, 4, 16\]"):
    run.load_teacher()
