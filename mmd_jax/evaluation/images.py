"""Sample grids as PNG files, optionally with text labels (Pillow's built-in bitmap font)."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 in [0, 255]."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(images, *, rows: int, pad: int = 1) -> np.ndarray:
  """Tiles [N, H, W, C] images (N = rows * cols) into one uint8 array, row by row."""
  images = to_uint8(images)
  n, h, w, c = images.shape
  cols = n // rows
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(rows * cols):
    r, q = divmod(i, cols)
    out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = (
        images[i])
  return out


def save_png(array: np.ndarray, path: str, *, scale: int = 1) -> None:
  img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  from etils import epath
  with epath.Path(path).open("wb") as f:
    img.save(f, format="PNG")


def _text_block(lines, *, scale: int) -> Image.Image:
  """Black lines of text on white in Pillow's built-in bitmap font (6x11 pixels a character, no
  font file needed), enlarged `scale` times with nearest-neighbour so the pixels stay sharp."""
  font = ImageFont.load_default_imagefont()
  line_h = font.getbbox("Ag")[3] + 3
  width = max([font.getbbox(line)[2] for line in lines] + [1])
  block = Image.new("L", (width, max(1, line_h * len(lines) - 3)), 255)
  draw = ImageDraw.Draw(block)
  for i, line in enumerate(lines):
    draw.text((0, i * line_h), line, fill=0, font=font)
  return block.resize((block.width * scale, block.height * scale), Image.NEAREST)


def labelled_rows(strips, labels, *, title: str = "", column_labels=(), text_scale: int = 2,
                  min_scale: int = 1, pad: int = 1) -> np.ndarray:
  """One row of images per strip, with its label written in a column to the left.

  strips: [N, H, W, C] arrays in [-1, 1], all of one shape; labels: one list of text lines per
  strip; title: a line above everything; column_labels: text centred above each of the N image
  columns (e.g. the class). The images are enlarged by a whole factor (at least min_scale) so
  that each row is as tall as its label. Returns uint8 [height, width, C], white background."""
  strips = [np.asarray(s) for s in strips]
  if len(strips) != len(labels) or not strips or len({s.shape for s in strips}) != 1:
    raise ValueError("labelled_rows needs one label per strip and strips of one shape.")
  n, h, w, c = strips[0].shape
  margin = 4 * text_scale
  blocks = [_text_block(list(lines), scale=text_scale) for lines in labels]
  tallest = max(b.height for b in blocks)
  scale = max(min_scale, math.ceil((tallest + margin) / (h + pad)))
  tiles = grid(np.concatenate(strips), rows=len(strips), pad=pad)
  tiles = np.repeat(np.repeat(tiles, scale, axis=0), scale, axis=1)

  heads = [_text_block([str(t)], scale=text_scale) for t in column_labels]
  title_block = _text_block([title], scale=text_scale) if title else None
  head_h = (title_block.height + margin if title_block else 0) + (
      max(b.height for b in heads) + margin // 2 if heads else 0)
  top = head_h + (margin if head_h else 0)
  left = max(b.width for b in blocks) + 2 * margin
  canvas = Image.new("L", (left + tiles.shape[1], top + tiles.shape[0]), 255)
  draw = ImageDraw.Draw(canvas)
  y = margin
  if title_block:
    canvas.paste(title_block, (margin, y))
    y += title_block.height + margin
  for q, block in enumerate(heads[:n]):
    centre = left + (pad + q * (w + pad)) * scale + w * scale // 2
    canvas.paste(block, (centre - block.width // 2, y))
  for i, block in enumerate(blocks):
    row_top = top + (pad + i * (h + pad)) * scale
    canvas.paste(block, (margin, row_top + (h * scale - block.height) // 2))
    if i:  # a faint rule between rows, across the label column
      rule_y = row_top - (pad * scale + 1) // 2
      draw.line([(margin // 2, rule_y), (left - margin // 2, rule_y)], fill=200)
  out = np.repeat(np.asarray(canvas)[..., None], c, axis=-1)
  out[top:, left:] = tiles
  return out
