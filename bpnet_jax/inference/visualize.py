"""Drawing people on images: one colour per limb, joints as dots."""

from __future__ import annotations

import colorsys

import cv2
import numpy as np

from bpnet_jax.skeleton import Skeleton


def limb_colours(num_limbs: int) -> np.ndarray:
  """(L, 3) uint8 RGB colours spread around the hue circle, one per limb."""
  return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(k / num_limbs, 0.9, 1.0)]
                   for k in range(num_limbs)], np.uint8)


def draw_people(image: np.ndarray, people: list[dict], skeleton: Skeleton) -> np.ndarray:
  """A copy of an (H, W, 3) uint8 RGB image with each person's limbs and joints drawn.

  A joint is drawn when its score is > 0 (found), so joints on the image border are drawn too.
  Line width and dot size follow the image size.
  """
  out = np.ascontiguousarray(image.copy())
  size = max(out.shape[:2])
  thick = max(1, round(size / 300))
  radius = max(2, round(size / 160))
  colours = limb_colours(skeleton.num_limbs)
  shift = 4   # sub-pixel precision of the drawing calls: coordinates are floats
  scale = 1 << shift
  for p in people:
    kp = np.asarray(p["keypoints"])
    found = kp[:, 2] > 0
    pts = np.round(kp[:, :2] * scale).astype(np.int64)
    for k, (a, b) in enumerate(skeleton.limbs):
      if found[a] and found[b]:
        cv2.line(out, tuple(map(int, pts[a])), tuple(map(int, pts[b])),
                 tuple(int(c) for c in colours[k]), thick, cv2.LINE_AA, shift)
    for j in np.flatnonzero(found):
      cv2.circle(out, tuple(map(int, pts[j])), radius * scale, (255, 255, 255), -1, cv2.LINE_AA,
                 shift)
      cv2.circle(out, tuple(map(int, pts[j])), radius * scale, (0, 0, 0), 1, cv2.LINE_AA, shift)
  return out
