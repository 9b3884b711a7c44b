"""Training targets (heatmaps, PAFs, background, loss mask) as pure JAX functions.

Coordinates are input pixels in the pixel-centre convention: integer (x, y) is the centre of
pixel column x, row y (COCO's keypoint convention). Label cell (r, c) at stride s covers input
pixels [s*c, s*c + s) and samples the point (s*c + (s-1)/2, s*r + (s-1)/2): its centre. Heatmaps
and PAFs use that same grid (the original sampled PAFs at block corners).

One sample is built from a padded person array, so shapes are static and `jax.vmap` batches it:
  joints (P, J, 2) float32 input-pixel (x, y); valid (P, J) bool (labelled joints of real people;
  padding rows are all False). The result is (h, w, skeleton.num_channels) in the skeleton's
  layout: PAF, joint heatmaps, background.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bpnet_jax.skeleton import Skeleton

HEATMAP_FLOOR = 1e-3   # heatmap values below this are zeroed, as the original


def cell_centres(size: int, stride: int) -> jax.Array:
  """(size,) input-pixel coordinates of the label cells' centres."""
  return jnp.arange(size, dtype=jnp.float32) * stride + (stride - 1) / 2.0


def heatmaps(joints, valid, target_shape, stride: int, sigma: float) -> jax.Array:
  """(h, w, J) Gaussian joint heatmaps, max over people. sigma in input pixels."""
  h, w = target_shape
  ys, xs = cell_centres(h, stride), cell_centres(w, stride)
  gx = jnp.exp(-jnp.square(xs[None, None, :] - joints[..., 0:1]) / (2 * sigma ** 2))  # (P,J,w)
  gy = jnp.exp(-jnp.square(ys[None, None, :] - joints[..., 1:2]) / (2 * sigma ** 2))  # (P,J,h)
  g = gy[..., :, None] * gx[..., None, :]                                            # (P,J,h,w)
  g = jnp.where(valid[..., None, None], g, 0.0).max(axis=0)                          # (J,h,w)
  g = jnp.where(g < HEATMAP_FLOOR, 0.0, g)
  return jnp.moveaxis(g, 0, -1)


def pafs(joints, valid, skeleton: Skeleton, target_shape, stride: int,
         ortho_dist_thresh: float) -> jax.Array:
  """(h, w, 2L) part affinity fields: the unit limb vector near each limb, averaged over people.

  A cell belongs to limb (p1 -> p2) when its centre is within T = ortho_dist_thresh * stride
  input pixels of the limb's line and inside the limb's bounding box grown by T. Where several
  people's limbs cover a cell, their unit vectors are averaged (the original let the last one
  overwrite). Zero-length limbs are skipped.
  """
  h, w = target_shape
  t = ortho_dist_thresh * stride
  limbs = jnp.asarray(skeleton.limbs, jnp.int32)                      # (L, 2)
  p1, p2 = joints[:, limbs[:, 0]], joints[:, limbs[:, 1]]              # (P, L, 2)
  ok = valid[:, limbs[:, 0]] & valid[:, limbs[:, 1]]                   # (P, L)
  v = p2 - p1
  length = jnp.linalg.norm(v, axis=-1)
  ok = ok & (length > 1e-6)
  u = v / jnp.where(length > 1e-6, length, 1.0)[..., None]             # (P, L, 2)
  ys, xs = cell_centres(h, stride), cell_centres(w, stride)
  dx = xs[None, None, None, :] - p1[..., 0, None, None]                # (P, L, 1, w)
  dy = ys[None, None, :, None] - p1[..., 1, None, None]                # (P, L, h, 1)
  dist = jnp.abs(dy * u[..., 0, None, None] - dx * u[..., 1, None, None])   # (P, L, h, w)
  lo, hi = jnp.minimum(p1, p2) - t, jnp.maximum(p1, p2) + t
  in_x = (xs >= lo[..., 0, None]) & (xs <= hi[..., 0, None])           # (P, L, w)
  in_y = (ys >= lo[..., 1, None]) & (ys <= hi[..., 1, None])           # (P, L, h)
  on = (dist <= t) & in_y[..., :, None] & in_x[..., None, :] & ok[..., None, None]
  on = on.astype(jnp.float32)
  count = on.sum(0)                                                    # (L, h, w)
  vec = jnp.einsum("plhw,plc->lhwc", on, u) / jnp.maximum(count, 1.0)[..., None]
  return jnp.moveaxis(vec, 0, 2).reshape(h, w, 2 * skeleton.num_limbs)


def make_labels(joints, valid, skeleton: Skeleton, target_shape, stride: int, sigma: float,
                ortho_dist_thresh: float) -> jax.Array:
  """(h, w, num_channels) labels: [PAF (2L) | heatmaps (J) | background]."""
  hm = heatmaps(joints, valid, target_shape, stride, sigma)
  bkg = jnp.clip(1.0 - hm.max(axis=-1, keepdims=True), 0.0, 1.0)
  paf = pafs(joints, valid, skeleton, target_shape, stride, ortho_dist_thresh)
  return jnp.concatenate([paf, hm, bkg], axis=-1)


def downsample_mask(mask, stride: int) -> jax.Array:
  """(H, W) or (H, W, 1) mask in [0, 1] -> (H/s, W/s, 1): the mean over each stride block."""
  mask = mask.reshape(mask.shape[0], mask.shape[1])
  h, w = mask.shape[0] // stride, mask.shape[1] // stride
  return mask[:h * stride, :w * stride].reshape(h, stride, w, stride).mean(axis=(1, 3))[..., None]
