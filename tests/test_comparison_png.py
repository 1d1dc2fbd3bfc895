"""comparison.png (pipeline.write_comparison): every row of samples is labelled in a text column
on its left; comparison.md and comparison.json are as before. Fake rows, no training."""
import json
import os

import numpy as np
from PIL import Image

from mmd_jax import pipeline
from mmd_jax.evaluation import images as images_lib

GREY = 128  # samples of value 0.0; text is black (0) on white (255), so the two never mix


def _fake_rows(root):
  rows = []
  for i, (method, sampler, steps) in enumerate([("teacher ancestral", "ancestral", 256),
                                                ("teacher ddim", "ddim", 8),
                                                ("student alternating", "student", 2)]):
    row = dict(step=10, sampler=sampler, num_steps=steps, guidance=0.0, fd_pixels=0.25 + i,
               class_acc=0.9, num_samples=40, tag="final", method=method,
               stage_dir=str(root / f"stage{i}"))
    path = pipeline._sample_row_path(row, row["stage_dir"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, np.zeros((10, 8, 8, 1), np.float32))
    rows.append(row)
  return rows


def _bands(mask):
  """(start, stop) of each run of True."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
  return list(zip(edges[::2], edges[1::2]))


def test_every_row_is_labelled_in_a_column_left_of_the_samples(tmp_path):
  rows = _fake_rows(tmp_path)
  pipeline.write_comparison(rows, workdir=str(tmp_path))
  img = np.asarray(Image.open(tmp_path / "comparison.png"))
  assert img.ndim == 2
  samples = img == GREY
  x0 = np.flatnonzero(samples.any(axis=0))[0]
  first, last = _bands(samples.any(axis=0))[0]
  scale = (last - first) // 8  # an 8-pixel sample, enlarged
  assert scale >= 4
  assert img.shape[1] - x0 == 10 * 9 * scale  # ten samples of 8 + 1 pixels of padding
  assert x0 >= 200  # room for "student alternating" and "256 steps  fd_pixels ...  class_acc ..."
  bands = _bands(samples[:, x0:].any(axis=1))
  assert len(bands) == len(rows)
  for top, bottom in bands:
    assert bottom - top >= 2 * 11 * 2  # two lines of the 11-pixel font, doubled
    text = img[top:bottom, :x0] == 0
    assert text.sum() > 200
    assert len(_bands(text.any(axis=1))) >= 2  # two lines: method; steps and metrics
  assert (img[:bands[0][0], :] == 0).sum() > 100  # the title and the column headings


def test_markdown_and_json_are_unchanged(tmp_path):
  rows = _fake_rows(tmp_path)
  pipeline.write_comparison(rows, workdir=str(tmp_path))
  assert (tmp_path / "comparison.md").read_text() == (
      "Digits comparison (stand-in metrics on pixels, not FID; EMA parameters).\n\n"
      + pipeline.comparison_markdown(rows) + "\n")
  assert json.loads((tmp_path / "comparison.json").read_text()) == rows


def test_labels_of_a_row_and_missing_samples(tmp_path):
  rows = _fake_rows(tmp_path)
  assert pipeline._row_label(dict(rows[0], guidance=1.5)) == [
      "teacher ancestral", "256 steps  guidance 1.5  fd_pixels 0.250  class_acc 0.900"]
  os.remove(pipeline._sample_row_path(rows[1], rows[1]["stage_dir"]))
  pipeline.write_comparison_png(rows, path=str(tmp_path / "two.png"))
  img = np.asarray(Image.open(tmp_path / "two.png"))
  assert len(_bands((img == GREY).any(axis=1))) == 2


def test_labelled_rows_keeps_colour_and_enlarges_to_fit_the_text():
  strips = [np.full((3, 4, 4, 3), 0.0, np.float32)] * 2
  out = images_lib.labelled_rows(strips, [["a"], ["b", "c", "d"]], text_scale=1)
  assert out.dtype == np.uint8 and out.shape[-1] == 3
  bands = _bands((out[..., 0] == GREY).any(axis=1))
  assert len(bands) == 2
  for top, bottom in bands:  # as tall as three 11-pixel lines, in whole multiples of 4 pixels
    assert bottom - top >= 3 * 11 and (bottom - top) % 4 == 0
