"""Sample grids as PNG files."""
from __future__ import annotations

import numpy as np
from PIL import Image


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
