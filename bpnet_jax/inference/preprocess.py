"""Image geometry and preprocessing for inference: resize, pad, and map coordinates back.

Coordinates follow the half-pixel convention of OpenCV's resize: network-input pixel x is
original pixel (x + 0.5) / fx - 0.5 - pad_left (the original omitted the half-pixel terms).
Multi-scale inference resamples each scale's output maps onto the largest scale's grid
(`merge_params`, `merge_maps`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from bpnet_jax.errors import InferenceError
from bpnet_jax.model import OUTPUT_STRIDE

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")



@dataclasses.dataclass(frozen=True)
class Geometry:
  """Where an original image sits in the network input.

  scale (fy, fx): network-input pixels per padded-original pixel; offset (left, top): pixels
  added to the original's left/top (pad_image_input); size (h, w): the resized content;
  padded (H, W): the network input, `size` padded bottom/right to a multiple of the stride.
  """
  scale: tuple[float, float]
  offset: tuple[int, int]
  size: tuple[int, int]
  padded: tuple[int, int]

  def to_original(self, xy: np.ndarray) -> np.ndarray:
    """(..., 2) network-input pixels (x, y) -> original-image pixels."""
    xy = np.asarray(xy, np.float64)
    x = (xy[..., 0] + 0.5) / self.scale[1] - 0.5 - self.offset[0]
    y = (xy[..., 1] + 0.5) / self.scale[0] - 0.5 - self.offset[1]
    return np.stack([x, y], -1)

  def to_input(self, xy: np.ndarray) -> np.ndarray:
    """(..., 2) original-image pixels (x, y) -> network-input pixels."""
    xy = np.asarray(xy, np.float64)
    x = (xy[..., 0] + 0.5 + self.offset[0]) * self.scale[1] - 0.5
    y = (xy[..., 1] + 0.5 + self.offset[1]) * self.scale[0] - 0.5
    return np.stack([x, y], -1)


def pad_value(image_scale, image_offset) -> np.ndarray:
  """(3,) uint8 pixel value that normalises to ~0 (128 for the default x/256 - 0.5)."""
  return np.clip(np.round(np.asarray(image_scale) * np.asarray(image_offset)), 0, 255
                 ).astype(np.uint8)


def preprocess(image: np.ndarray, input_shape: Sequence[float], mode: str,
               fill: np.ndarray | Sequence[int] = (128, 128, 128),
               multiple: int = OUTPUT_STRIDE) -> tuple[np.ndarray, Geometry]:
  """Resizes (and pads) an (H, W, 3) uint8 image for the network.

  Modes (as the original): 'adjust_network_input' scales uniformly so the image covers
  input_shape (the network input takes the image's aspect ratio); 'pad_image_input' pads the
  image to input_shape's aspect ratio (centred, `fill`) and resizes to input_shape; 'None'
  resizes to input_shape, each axis on its own. input_shape may be fractional (scaled for
  multi-scale inference). Returns the (H, W, 3) uint8 network input and its Geometry.
  """
  h0, w0 = image.shape[:2]
  in_h, in_w = float(input_shape[0]), float(input_shape[1])
  fill = np.asarray(fill, np.uint8)
  left = top = 0
  if mode == "adjust_network_input":
    s = in_h / h0 if w0 / h0 > in_w / in_h else in_w / w0
    out_h, out_w = max(1, round(h0 * s)), max(1, round(w0 * s))
  elif mode == "pad_image_input":
    ar = in_w / in_h
    if w0 / h0 > ar:        # wider than the target: pad the height
      pad = int(w0 / ar - h0)
      top = int(pad / 2)
      image = _pad(image, top, pad - top, 0, 0, fill)
    elif w0 / h0 < ar:
      pad = int(h0 * ar - w0)
      left = int(pad / 2)
      image = _pad(image, 0, 0, left, pad - left, fill)
    out_h, out_w = max(1, round(in_h)), max(1, round(in_w))
  elif mode == "None":
    out_h, out_w = max(1, round(in_h)), max(1, round(in_w))
  else:
    raise InferenceError(f"keep_aspect_ratio_mode {mode!r}: expected 'adjust_network_input', "
                         "'pad_image_input' or 'None'")
  ph, pw = image.shape[:2]
  if (out_h, out_w) != (ph, pw):
    image = cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_CUBIC)
  big_h, big_w = -(-out_h // multiple) * multiple, -(-out_w // multiple) * multiple
  image = _pad(image, 0, big_h - out_h, 0, big_w - out_w, fill)
  return image, Geometry((out_h / ph, out_w / pw), (left, top), (out_h, out_w), (big_h, big_w))


def _pad(image, top, bottom, left, right, fill):
  if not (top or bottom or left or right):
    return image
  out = np.empty((image.shape[0] + top + bottom, image.shape[1] + left + right, 3), np.uint8)
  out[...] = fill
  out[top:top + image.shape[0], left:left + image.shape[1]] = image
  return out


def read_image(path: str) -> np.ndarray:
  """(H, W, 3) uint8 RGB; InferenceError if the file is missing or not a readable image."""
  if not os.path.isfile(path):
    raise InferenceError(f"{path}: no such file")
  data = np.fromfile(path, np.uint8)
  bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
  if bgr is None:
    raise InferenceError(f"{path}: not a readable image")
  return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# ----------------------------------------------------------------------------------------------
# Multi-scale merging.

def merge_params(geoms: Sequence[Geometry], grid_shape: tuple[int, int], ref: int,
                 stride: int = OUTPUT_STRIDE) -> np.ndarray:
  """(S, 4) (scale_y, scale_x, translate_y, translate_x) of `jax.image.scale_and_translate`
  resampling each scale's output grid onto the reference scale's output grid.

  Output cell R of the reference grid is original pixel y = (stride R + stride/2) / fy_ref -
  0.5 - top_ref, which is cell r = ((y + 0.5 + top_s) fy_s - stride/2) / stride of scale s.
  """
  g0 = geoms[ref]
  out = []
  for g in geoms:
    row = []
    for axis, off_axis in ((0, 1), (1, 0)):
      a = g.scale[axis] / g0.scale[axis]
      b = ((stride / 2 / g0.scale[axis] - g0.offset[off_axis] + g.offset[off_axis])
           * g.scale[axis] - stride / 2) / stride
      k = 1.0 / a                              # r + 0.5 = (R + 0.5 - t) / k
      row.append((k, 0.5 - k * (b + 0.5)))
    out.append((row[0][0], row[1][0], row[0][1], row[1][1]))
  return np.asarray(out, np.float32)


def merge_maps(maps, params, grid_shape):
  """Mean over scales of maps resampled (bicubic) onto the reference grid. maps: tuple of
  (1, h_s, w_s, C) arrays."""
  total = 0.0
  for m, p in zip(maps, params):
    total = total + jax.image.scale_and_translate(
        m.astype(jnp.float32), (m.shape[0],) + tuple(grid_shape) + (m.shape[-1],), (1, 2),
        p[:2], p[2:], method="cubic", antialias=False)
  return total / len(maps)


@functools.lru_cache(maxsize=1)
def merge_maps_jit():
  """`merge_maps` jitted (grid shape static), for maps computed off the JAX device."""
  return jax.jit(merge_maps, static_argnums=2)


