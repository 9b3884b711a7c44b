"""Spatial augmentation as pure JAX functions (jit + vmap, on the accelerator).

One 3x3 matrix M maps source-image pixels to network-input pixels; the image and the mask are
warped with it (bilinear, each output pixel sampled at M^-1 of its centre) and the keypoints are
transformed by it, so all three agree. Coordinates use the pixel-centre convention (integer (x, y)
= centre of that pixel) throughout; see `targets.py`.

Modes (the original's, with its parameters):
  person_centric    the main person (record row 0) is centred and scaled so its bbox height is
                    about target_person_scale * input width; random shift (source pixels, before
                    scaling), rotation, flips about the person, optional extra zoom.
  standard          the image's centred max(w, h) square window is fitted to the input
                    (letterboxed), then rotated / shifted / zoomed in normalised coordinates.
  standard_with_fixed_aspect_ratio   the whole image is stretched to the input instead.
A left-right flip also swaps left/right joints (the skeleton's flip pairs).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from bpnet_jax import targets as targets_lib
from bpnet_jax.data.records import LABELED_BELOW
from bpnet_jax.skeleton import Skeleton

IMAGE_FILL = 127.0     # outside the source image (the original's value)
MASK_FILL = 255.0      # outside the source image counts as valid


@dataclasses.dataclass(frozen=True)
class AugParams:
  """Static augmentation settings (hashable: a jit static argument)."""
  mode: str = "person_centric"
  flip_lr_prob: float = 0.0
  flip_tb_prob: float = 0.0
  rotate_deg_min: float = 0.0
  rotate_deg_max: float = 0.0
  zoom_prob: float = 0.0
  zoom_ratio_min: float = 1.0
  zoom_ratio_max: float = 1.0
  translate_min_x: float = 0.0
  translate_max_x: float = 0.0
  translate_min_y: float = 0.0
  translate_max_y: float = 0.0
  use_translate_ratio: bool = False
  translate_ratio_min: float = 0.0
  translate_ratio_max: float = 0.0
  target_person_scale: float = 0.6

  @classmethod
  def from_config(cls, aug_config, enabled: bool = True) -> "AugParams":
    """From `config.dataloader.augmentation_config`; enabled=False keeps only the mode."""
    if not enabled:
      return cls(mode=aug_config.spatial_augmentation_mode,
                 target_person_scale=float(aug_config.spatial_aug_params.target_person_scale))
    p = aug_config.spatial_aug_params
    return cls(mode=aug_config.spatial_augmentation_mode,
               **{f.name: type(f.default)(p[f.name]) for f in dataclasses.fields(cls)
                  if f.name != "mode"})


def draw(key, p: AugParams, src_hw) -> dict:
  """Random draws for one sample: flip_lr, flip_tb (bool), tx, ty (source px), zoom, theta (rad)."""
  k = jax.random.split(key, 7)
  src_h, src_w = jnp.asarray(src_hw[0], jnp.float32), jnp.asarray(src_hw[1], jnp.float32)
  if p.use_translate_ratio:
    tx = jax.random.uniform(k[2], (), minval=p.translate_ratio_min,
                            maxval=p.translate_ratio_max) * src_w
    ty = jax.random.uniform(k[3], (), minval=p.translate_ratio_min,
                            maxval=p.translate_ratio_max) * src_h
  else:   # Whole pixels, both ends inclusive (the original's random_integers).
    tx = jax.random.randint(k[2], (), int(np.floor(p.translate_min_x)),
                            int(np.floor(p.translate_max_x)) + 1).astype(jnp.float32)
    ty = jax.random.randint(k[3], (), int(np.floor(p.translate_min_y)),
                            int(np.floor(p.translate_max_y)) + 1).astype(jnp.float32)
  zoom = jnp.where(jax.random.uniform(k[4]) < p.zoom_prob,
                   jax.random.uniform(k[5], (), minval=p.zoom_ratio_min, maxval=p.zoom_ratio_max),
                   1.0)
  theta = jnp.deg2rad(jax.random.uniform(k[6], (), minval=p.rotate_deg_min,
                                         maxval=p.rotate_deg_max))
  return dict(flip_lr=jax.random.uniform(k[0]) < p.flip_lr_prob,
              flip_tb=jax.random.uniform(k[1]) < p.flip_tb_prob, tx=tx, ty=ty, zoom=zoom,
              theta=theta)


def identity_draw() -> dict:
  return dict(flip_lr=jnp.bool_(False), flip_tb=jnp.bool_(False), tx=jnp.float32(0),
              ty=jnp.float32(0), zoom=jnp.float32(1), theta=jnp.float32(0))


def _mm(a, b):
  """a @ b in full float32: coordinates must not go through a TF32/bf16 dot on accelerators."""
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _t(x, y):
  return jnp.array([[1.0, 0.0, x], [0.0, 1.0, y], [0.0, 0.0, 1.0]])


def person_centric_matrix(center, scale, d: dict, out_hw, target_person_scale: float):
  """M = T(W//2, H//2) . F . Z . R . T(-(c + t)) with Z = target / (scale / W * zoom)."""
  out_h, out_w = out_hw
  zoom = target_person_scale / (scale / out_w * d["zoom"] + 1e-5)
  c, s = jnp.cos(d["theta"]), jnp.sin(d["theta"])
  rot = jnp.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
  z = jnp.diag(jnp.array([zoom, zoom, 1.0]))
  f = jnp.diag(jnp.array([jnp.where(d["flip_lr"], -1.0, 1.0),
                          jnp.where(d["flip_tb"], -1.0, 1.0), 1.0]))
  m = _mm(_mm(_mm(_t(out_w // 2, out_h // 2), f), z), rot)
  return _mm(m, _t(-(center[0] + d["tx"]), -(center[1] + d["ty"])))


def _affine_from_points(src, dst):
  """3x3 matrix of the affine map taking three src points (3, 2) to dst (3, 2)."""
  a = jnp.concatenate([src, jnp.ones((3, 1))], axis=1)          # (3, 3)
  m = jnp.linalg.solve(a, dst).T                                  # (2, 3)
  return jnp.concatenate([m, jnp.array([[0.0, 0.0, 1.0]])], axis=0)


def standard_matrix(src_hw, d: dict, out_hw, fixed_aspect: bool):
  """The original's quad -> rect transform, in continuous coordinates (pixel i spans [i, i+1)).

  Use `to_pixel_centres` before applying it to pixel-centre coordinates.
  """
  src_h, src_w = jnp.asarray(src_hw[0], jnp.float32), jnp.asarray(src_hw[1], jnp.float32)
  out_h, out_w = out_hw
  if fixed_aspect:
    x0, x1, y0, y1 = 0.0, 1.0, 0.0, 1.0
    x0, x1, y0, y1 = (jnp.float32(v) for v in (x0, x1, y0, y1))
  else:
    r = src_w / src_h
    wide = r > 1
    x0 = jnp.where(wide, 0.0, 0.5 - 0.5 / r)
    x1 = jnp.where(wide, 1.0, 0.5 + 0.5 / r)
    y0 = jnp.where(wide, 0.5 - 0.5 * r, 0.0)
    y1 = jnp.where(wide, 0.5 + 0.5 * r, 1.0)
  quad = jnp.stack([jnp.stack([x0, y0]), jnp.stack([x0, y1]), jnp.stack([x1, y1]),
                    jnp.stack([x1, y0])])                         # TL, BL, BR, TR
  c, s = jnp.cos(d["theta"]), jnp.sin(d["theta"])
  rot = jnp.array([[c, -s], [s, c]])
  quad = (_mm(quad - 0.5, rot) - jnp.stack([d["tx"] / src_w, d["ty"] / src_h])) / d["zoom"] + 0.5
  quad = jnp.where(d["flip_lr"], quad[::-1], quad)                # TR, BR, BL, TL
  quad = jnp.where(d["flip_tb"], quad[jnp.array([1, 0, 3, 2])], quad)
  quad = quad * jnp.stack([src_w, src_h])
  tl, tr, br = quad[0], quad[3], quad[2]
  dst = jnp.array([[0.0, 0.0], [out_w, 0.0], [out_w, out_h]], jnp.float32)
  return _affine_from_points(jnp.stack([tl, tr, br]), dst)


def to_pixel_centres(m):
  """Re-expresses a continuous-coordinate matrix for pixel-centre coordinates."""
  return _mm(_mm(_t(-0.5, -0.5), m), _t(0.5, 0.5))


def sample_matrix(d: dict, p: AugParams, src_hw, out_hw, center, scale):
  """The 3x3 source->input matrix (pixel-centre convention) for draws d."""
  if p.mode == "person_centric":
    return person_centric_matrix(center, scale, d, out_hw, p.target_person_scale)
  return to_pixel_centres(standard_matrix(
      src_hw, d, out_hw, fixed_aspect=p.mode == "standard_with_fixed_aspect_ratio"))


def affine_inverse(m):
  """Closed-form inverse of a 3x3 affine matrix [[A, t], [0, 0, 1]]: [[A^-1, -A^-1 t], [0, 0, 1]].

  A 2x2 inverse by its adjugate is a handful of multiplies, where `jnp.linalg.inv` runs an LU
  factorisation with pivoting inside the step.
  """
  a, b, c, d = m[0, 0], m[0, 1], m[1, 0], m[1, 1]
  det = a * d - b * c
  ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
  tx, ty = m[0, 2], m[1, 2]
  return jnp.array([[ia, ib, -(ia * tx + ib * ty)],
                    [ic, id_, -(ic * tx + id_ * ty)],
                    [0.0, 0.0, 1.0]], dtype=m.dtype)


def _bilinear(fetch, src_hw, m, out_hw, fill: float):
  """Bilinear resampling by m into out_hw: output pixel (x, y) samples the source at m^-1 (x, y, 1).

  fetch(x, y) -> (H, W, C) float32 values of integer source pixels (x, y int32 (H, W), any range:
  fetch clips, taps outside the valid top-left src_hw (h, w) are replaced by `fill` here, so
  edges blend with it). Returns float32 (H, W, C).
  """
  out_h, out_w = out_hw
  inv = affine_inverse(m)
  ys, xs = jnp.meshgrid(jnp.arange(out_h, dtype=jnp.float32),
                        jnp.arange(out_w, dtype=jnp.float32), indexing="ij")
  sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
  sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
  x0, y0 = jnp.floor(sx), jnp.floor(sy)
  fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  h, w = src_hw[0], src_hw[1]

  def tap(x, y):
    ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    return jnp.where(ok[..., None], fetch(x, y), fill)

  return ((1 - fy) * ((1 - fx) * tap(x0, y0) + fx * tap(x0 + 1, y0))
          + fy * ((1 - fx) * tap(x0, y0 + 1) + fx * tap(x0 + 1, y0 + 1)))


def warp(image, src_hw, m, out_hw, fill: float):
  """Bilinear warp of image (Hc, Wc, C) -- valid in its top-left src_hw -- by m into out_hw.

  Output pixel (x, y) samples the source at m^-1 (x, y, 1); taps outside the valid source area
  take `fill`, so edges blend with it. Returns float32 (H, W, C).
  """
  hc, wc, ch = image.shape
  flat = image.reshape(hc * wc, ch)

  def fetch(x, y):
    return flat[jnp.clip(y, 0, hc - 1) * wc + jnp.clip(x, 0, wc - 1)].astype(jnp.float32)

  return _bilinear(fetch, src_hw, m, out_hw, fill)


def warp_bits(bits, src_hw, m, out_hw, fill: float):
  """`warp` of a binary mask sent as bits: (Hc, ceil(Wc / 8)) uint8 rows of `np.packbits`.

  Pixel x of a row is bit 7 - x % 8 of byte x // 8 (the first pixel in the high bit); a set bit
  reads as 255 (valid), a clear one as 0, so the result equals `warp` of the unpacked 0/255 mask.
  Returns float32 (H, W, 1).
  """
  hc, nb = bits.shape
  flat = bits.reshape(hc * nb)

  def fetch(x, y):
    x = jnp.clip(x, 0, nb * 8 - 1)
    byte = flat[jnp.clip(y, 0, hc - 1) * nb + x // 8]
    bit = (byte >> (7 - x % 8).astype(jnp.uint8)) & 1
    return (bit.astype(jnp.float32) * 255.0)[..., None]

  return _bilinear(fetch, src_hw, m, out_hw, fill)


def fold_turn(m, rotated, size):
  """The canvas -> input matrix: m (source -> input) after the host's 90-degree turn, if any.

  The host turns a portrait image 90 degrees clockwise onto a landscape canvas
  (`input_pipeline.DecodeAndPad`, cv2.ROTATE_90_CLOCKWISE: canvas (x', y') = (h - 1 - y, x) for
  source pixel (x, y) of an h x w image) and keeps joints, centres and scales in the source frame.
  Returns m . S with S the canvas -> source map (x = y', y = h - 1 - x') when rotated, else m:
  warping the canvas by it takes the same bilinear taps as warping the unturned image by m, so
  the network input is the same and the labels (from m) are unchanged. Written out rather than
  as a matrix product, so no backend rounds it (a TF32 dot would).
  """
  h1 = jnp.asarray(size[0], m.dtype) - 1
  turned = jnp.stack([-m[:, 1], m[:, 0], m[:, 1] * h1 + m[:, 2]], axis=1)
  return jnp.where(jnp.asarray(rotated) > 0, turned, m)


def transform_joints(joints, visibility, m, flip_lr, skeleton: Skeleton):
  """Applies m to (P, J, 2) joints; a left-right flip also swaps left/right joints."""
  xy = _mm(joints, m[:2, :2].T) + m[:2, 2]
  perm = jnp.asarray(skeleton.flip_permutation)
  xy = jnp.where(flip_lr, xy[:, perm], xy)
  visibility = jnp.where(flip_lr, visibility[:, perm], visibility)
  return xy, visibility


@dataclasses.dataclass(frozen=True)
class LabelParams:
  """Static label / normalisation settings (hashable)."""
  input_hw: tuple
  target_hw: tuple
  sigma: float
  ortho_dist_thresh: float
  image_scale: tuple = (256.0, 256.0, 256.0)
  image_offset: tuple = (0.5, 0.5, 0.5)
  mask_scale: float = 255.0
  mask_offset: float = 0.0

  @property
  def stride(self) -> int:
    return self.input_hw[0] // self.target_hw[0]

  @classmethod
  def from_config(cls, config) -> "LabelParams":
    d = config.dataloader
    n = d.normalization_params
    return cls(input_hw=(d.image_config.height, d.image_config.width),
               target_hw=tuple(d.pose_config.target_shape),
               sigma=float(d.label_processor_config.heatmap_gaussian_sigma),
               ortho_dist_thresh=float(d.label_processor_config.paf_ortho_dist_thresh),
               image_scale=tuple(float(v) for v in n.image_scale),
               image_offset=tuple(float(v) for v in n.image_offset),
               mask_scale=float(n.mask_scale[0]), mask_offset=float(n.mask_offset[0]))


def preprocess_sample(key, sample: dict, aug: AugParams, lab: LabelParams, skeleton: Skeleton,
                      draws: Optional[dict] = None) -> dict:
  """One host sample -> network input, labels and loss mask.

  sample: image (Hc, Wc, 3) uint8 canvas, size (2,) int (h, w of the image in the frame of its
  joints), joints (P, J, 2), visibility (P, J), centers (P, 2), scales (P,), num_people (), and
  the mask as either mask (Hc, Wc) uint8 (0 = ignore .. 255 = valid) or mask_bits
  (Hc, ceil(Wc / 8)) uint8 (`warp_bits`). Optional: rotated () uint8 (1: the canvas holds the
  image turned 90 degrees clockwise, valid in its top-left (w, h); `fold_turn`),
  has_mask () uint8 (0: no mask was sent; every pixel is valid), valid () uint8/bool (0 for a
  sample the host could not read, whose loss mask is then all zeros: the warp's MASK_FILL would
  otherwise count its surroundings as "no person").
  Returns image (H, W, 3) float32 normalised, labels (h, w, C), mask (h, w, 1), and the
  transformed joints / valid flags (P, J) per joint (for tests and visualisation).
  """
  size = sample["size"]
  d = draw(key, aug, size) if draws is None else draws
  m = sample_matrix(d, aug, size, lab.input_hw, sample["centers"][0], sample["scales"][0])
  # The canvas's frame: the source's, or its 90-degree turn (then valid in (w, h)).
  rotated = sample.get("rotated", jnp.uint8(0))
  m_canvas = fold_turn(m, rotated, size)
  canvas_hw = jnp.where(jnp.asarray(rotated) > 0, jnp.asarray(size)[::-1], jnp.asarray(size))
  image = warp(sample["image"], canvas_hw, m_canvas, lab.input_hw, IMAGE_FILL)
  if "mask_bits" in sample:
    mask = warp_bits(sample["mask_bits"], canvas_hw, m_canvas, lab.input_hw, MASK_FILL)
  else:
    mask = warp(sample["mask"][..., None], canvas_hw, m_canvas, lab.input_hw, MASK_FILL)
  if "has_mask" in sample:
    mask = jnp.where(jnp.asarray(sample["has_mask"]) > 0, mask, MASK_FILL)
  joints, vis = transform_joints(sample["joints"], sample["visibility"], m, d["flip_lr"],
                                 skeleton)
  real = jnp.arange(joints.shape[0]) < sample["num_people"]
  valid = (vis < LABELED_BELOW) & real[:, None]
  labels = targets_lib.make_labels(joints, valid, skeleton, lab.target_hw, lab.stride, lab.sigma,
                                   lab.ortho_dist_thresh)
  mask = targets_lib.downsample_mask(mask / lab.mask_scale - lab.mask_offset, lab.stride)
  if "valid" in sample:
    # Exactly 0 (not a scaled value), so each loss term of an ignored sample is exactly 0.
    mask = jnp.where(jnp.asarray(sample["valid"]) > 0, mask, jnp.zeros_like(mask))
  image = image / jnp.asarray(lab.image_scale) - jnp.asarray(lab.image_offset)
  return dict(image=image, labels=labels, mask=mask, joints=joints, valid=valid, matrix=m)


# The host batch's keys the device step reads (see `preprocess_sample`). OPTIONAL_FIELDS may be
# absent (hand-made batches): a missing "valid" means every sample was read, a missing "rotated"
# that none was turned, a missing "has_mask" that the mask is sent for every sample. The mask
# comes as one of MASK_FIELDS.
SAMPLE_FIELDS = ("image", "mask", "mask_bits", "has_mask", "rotated", "size", "joints",
                 "visibility", "centers", "scales", "num_people", "valid")
MASK_FIELDS = ("mask", "mask_bits")
OPTIONAL_FIELDS = ("valid", "rotated", "has_mask") + MASK_FIELDS


def sample_fields(batch: dict) -> dict:
  """The SAMPLE_FIELDS of a host batch (KeyError for a missing required one or no mask)."""
  if not any(k in batch for k in MASK_FIELDS):
    raise KeyError(f"the batch has no mask: one of {MASK_FIELDS} is needed")
  return {k: batch[k] for k in SAMPLE_FIELDS if k in batch or k not in OPTIONAL_FIELDS}


def preprocess_batch(key, batch: dict, aug: AugParams, lab: LabelParams, skeleton: Skeleton,
                     augment: bool = True) -> dict:
  """vmap of `preprocess_sample` over a host batch: {'image', 'labels', 'mask'} (B, ...).

  augment=False applies the mode's identity transform (for validation and evaluation).
  """
  def one(k, sample):
    out = preprocess_sample(k, sample, aug, lab, skeleton,
                            draws=None if augment else identity_draw())
    return {name: out[name] for name in ("image", "labels", "mask")}
  keys = jax.random.split(key, batch["image"].shape[0])
  return jax.vmap(one)(keys, sample_fields(batch))


def make_device_preprocess(aug: AugParams, lab: LabelParams, skeleton: Skeleton,
                           augment: bool = True):
  """jit(preprocess_batch): (key, host batch) -> dict of batched device arrays."""
  return jax.jit(lambda key, batch: preprocess_batch(key, batch, aug, lab, skeleton, augment))
