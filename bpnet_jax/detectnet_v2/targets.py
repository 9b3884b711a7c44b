"""DetectNet_v2 ground-truth targets (coverage, box regression, normalised coverage, loss mask).

Pure JAX: `make_targets` builds the targets of ONE image from a fixed-size, padded box array, so
every shape is static; `jax.vmap` batches it and `jax.jit` compiles it for the device.

Spaces and units
  Input space: network-input pixels (after augmentation), continuous, x right, y down; pixel
    column i covers [i, i + 1). Boxes are (x1, y1, x2, y2) in this space.
  Output space: input space divided by the stride per axis (stride_x = input_w / output_w,
    stride_y = input_h / output_h; 16 for the shipped models). Output cell (r, c) covers the
    output-space square [c, c + 1) x [r, r + 1). Coverage geometry is computed here.
  Reference point of cell (r, c): input point (stride_x * c + offset, stride_y * r + offset)
    (offset 0.5). Box targets are distances from it to the four box edges, divided by `scale`
    (35): L = (px - x1) / s, T = (py - y1) / s, R = (x2 - px) / s, B = (y2 - py) / s.

Shapes (H, W = output grid, C = number of target classes, N = max_boxes padding)
  make_targets(boxes (N, 4) f32, class_ids (N,) i32, valid (N,) bool, dontcare (N,) bool)
    -> cov (H, W, C) in [0, 1] (multiples of 1/16), bbox (H, W, 4C) with channel 4c + k =
       class c, coordinate k (0 L, 1 T, 2 R, 3 B), cov_norm (H, W, C) = cov / max(4 csx csy, 1),
       loss_mask (H, W, C) in {0, 1}.

Per box (output space): centre cx = x1 + cov_center_x (x2 - x1); half extent to the nearer edge
sx; coverage radii csx = max(cov_radius_x sx, 0.1), enlarged to `bbox_min_radius` keeping the
aspect ratio; deadzone radii dsx = max((1 - d) csx + d sx, csx). Per cell, 4 x 4 supersamples give
the coverage fraction f (inside the coverage ellipse) and the deadzone fraction a. Boxes of a class
are composited in ascending y2 order: a box whose deadzone covers a cell at least as much as the
current winner's coverage clears it, then writes it if its own coverage is at least the (possibly
cleared) current one. The deadzone therefore erases farther objects around a nearer one; erased
cells are background, not ignored.

Ordering: implemented as a stable argsort on y2 followed by a `lax.scan` over the N sorted boxes
that carries, per cell and class, the current winner's coverage and index. A vectorised "last
writer wins" is not equivalent: whether a later box takes a cell depends on the coverage of the
box holding it at that moment, which depends on the whole history, so the rule is a sequential
fold. The scan costs N steps on an (H, W, C) state (a few 4H x 4W elementwise ops each); values
(bbox, cov_norm) are gathered once from the final winner index.

Don't-care boxes (port addition, opt-in with `dontcare_mask`): valid boxes flagged `dontcare`
are never drawn. With `dontcare_mask` on, every output cell with at least one of its 4 x 4
supersample points inside such a box gets loss mask 0 for the box's class (or for every class when
its class id is not a target class, e.g. -1), except, with `dontcare_preserve_ground_truth`, where
that class has nonzero coverage. With it off they are plain background, as in the original.

Differences from the original
  - Compositing ties (equal y2): boxes keep their input order (stable sort); the original's
    `std::sort` leaves the order unspecified.
  - Box targets are the exact linear formula above. The original builds each map as a linear
    function from its values at two box edges with the squared edge length clamped to >= 0.01
    output cells^2, which distorts the slopes of boxes thinner than 0.1 cell (1.6 px); fixed
    (encoder and `decode_boxes` are exact inverses for every box).
  - Boxes with x2 <= x1 or y2 <= y1, class ids outside [0, C) and padding rows are not drawn
    (the original drops empty boxes upstream; the 0.1 radius floor would otherwise draw a blob).
  - Don't-care masking is new (the original's undocumented `loss_mask_label_filter` is not
    ported); off by default, so targets equal the original's.
  - The half-cell asymmetry is kept: coverage of cell (r, c) integrates its whole square while
    the regression reference point is its top-left corner + offset (the decoder agrees).
  - Boxes left unclipped after augmentation (an original quirk) are not handled here: targets are
    built for the boxes given; clipping and the min-size filter belong to the augmentation step.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

SUPERSAMPLE = 4          # 4 x 4 sample points per output cell, as the original kernel
MIN_COV_RADIUS = 0.1     # floor of the coverage radii, output cells
DEFAULT_STRIDE = 16
DEFAULT_SCALE = 35.0     # objective_set.bbox.scale
DEFAULT_OFFSET = 0.5     # objective_set.bbox.offset, input pixels
_CLASS_KEYS = ("cov_center_x", "cov_center_y", "cov_radius_x", "cov_radius_y", "bbox_min_radius")


def default_rasterizer_config(class_names: Sequence[str] = ("car", "pedestrian")) -> dict:
  """The shipped KITTI `bbox_rasterizer_config` (plus the port's don't-care switches)."""
  return {
      # Per target class; all values in [0, 1]. Centre as a fraction of the box, radius as a
      # fraction of the half extent, min radius in output cells (1.0 = 16 input px).
      "target_class_config": {
          name: {"cov_center_x": 0.5, "cov_center_y": 0.5, "cov_radius_x": 0.4,
                 "cov_radius_y": 0.4, "bbox_min_radius": 1.0}
          for name in class_names},
      # Deadzone: interpolates from the coverage radius (0) to the half extent (1).
      "deadzone_radius": 0.67,
      # Port additions: zero the loss mask under don't-care boxes (off = the original), and
      # keep it 1 where the class has coverage.
      "dontcare_mask": False,
      "dontcare_preserve_ground_truth": True,
  }


@flax.struct.dataclass
class TargetParams:
  """Rasterizer parameters. Arrays are pytree leaves; shapes and encoding constants are static.

  cov_center_x/y, cov_radius_x/y, bbox_min_radius: (C,) float32 in target-class order;
  deadzone_radius: () float32. output_shape (H, W) cells; input_shape (H_in, W_in) pixels.
  """
  cov_center_x: jax.Array
  cov_center_y: jax.Array
  cov_radius_x: jax.Array
  cov_radius_y: jax.Array
  bbox_min_radius: jax.Array
  deadzone_radius: jax.Array
  output_shape: tuple = flax.struct.field(pytree_node=False, default=(1, 1))
  input_shape: tuple = flax.struct.field(pytree_node=False, default=(16, 16))
  scale: float = flax.struct.field(pytree_node=False, default=DEFAULT_SCALE)
  offset: float = flax.struct.field(pytree_node=False, default=DEFAULT_OFFSET)
  class_names: tuple = flax.struct.field(pytree_node=False, default=())
  dontcare_mask: bool = flax.struct.field(pytree_node=False, default=False)
  dontcare_preserve_ground_truth: bool = flax.struct.field(pytree_node=False, default=True)

  @property
  def num_classes(self) -> int:
    return int(self.cov_center_x.shape[0])

  @property
  def stride_x(self) -> float:
    return self.input_shape[1] / self.output_shape[1]

  @property
  def stride_y(self) -> float:
    return self.input_shape[0] / self.output_shape[0]

  @classmethod
  def from_config(cls, bbox_rasterizer_config: Mapping, class_names: Sequence[str],
                  output_shape: Sequence[int], *, input_shape: Sequence[int] | None = None,
                  scale: float = DEFAULT_SCALE, offset: float = DEFAULT_OFFSET) -> TargetParams:
    """Builds the parameters for `class_names` (the output channel order).

    output_shape: (H, W) output cells. input_shape: (H_in, W_in) network-input pixels; default
    16 x output_shape. scale, offset: `objective_set.bbox` (35, 0.5 input px).
    Raises ValueError on a missing class or a value outside [0, 1].
    """
    cfg = bbox_rasterizer_config
    per_class = cfg["target_class_config"]
    class_names = tuple(class_names)
    if not class_names:
      raise ValueError("class_names is empty")
    cols = {k: [] for k in _CLASS_KEYS}
    for name in class_names:
      if name not in per_class:
        raise ValueError(f"bbox_rasterizer_config.target_class_config has no entry for class "
                         f"{name!r} (has {sorted(per_class)})")
      for k in _CLASS_KEYS:
        v = float(per_class[name][k])
        if not 0.0 <= v <= 1.0:
          raise ValueError(f"target_class_config[{name!r}].{k} = {v} is outside [0, 1]")
        cols[k].append(v)
    d = float(cfg["deadzone_radius"])
    if not 0.0 <= d <= 1.0:
      raise ValueError(f"deadzone_radius = {d} is outside [0, 1]")
    out_h, out_w = (int(s) for s in output_shape)
    if out_h <= 0 or out_w <= 0:
      raise ValueError(f"output_shape must be positive, got {tuple(output_shape)}")
    if input_shape is None:
      input_shape = (out_h * DEFAULT_STRIDE, out_w * DEFAULT_STRIDE)
    in_h, in_w = (int(s) for s in input_shape)
    if scale <= 0:
      raise ValueError(f"bbox scale must be > 0, got {scale}")
    arr = {k: jnp.asarray(v, jnp.float32) for k, v in cols.items()}
    return cls(**arr, deadzone_radius=jnp.asarray(d, jnp.float32),
               output_shape=(out_h, out_w), input_shape=(in_h, in_w), scale=float(scale),
               offset=float(offset), class_names=class_names,
               dontcare_mask=bool(cfg.get("dontcare_mask", False)),
               dontcare_preserve_ground_truth=bool(
                   cfg.get("dontcare_preserve_ground_truth", True)))


# ------------------------------------------------------------------------------------------
# Box encoding


def reference_points(params: TargetParams) -> jax.Array:
  """(H, W, 2) input-pixel (x, y) regression reference points of the output cells."""
  h, w = params.output_shape
  xs = jnp.arange(w, dtype=jnp.float32) * params.stride_x + params.offset
  ys = jnp.arange(h, dtype=jnp.float32) * params.stride_y + params.offset
  return jnp.stack(jnp.broadcast_arrays(xs[None, :], ys[:, None]), axis=-1)


def encode_boxes(boxes, points, scale: float = DEFAULT_SCALE) -> jax.Array:
  """LTRB targets of boxes seen from reference points.

  boxes (..., 4) input-pixel (x1, y1, x2, y2); points (..., 2) input-pixel (x, y); the two
  broadcast. Returns (..., 4): ((px - x1), (py - y1), (x2 - px), (y2 - py)) / scale.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  points = jnp.asarray(points, jnp.float32)
  px, py = points[..., 0], points[..., 1]
  return jnp.stack([px - boxes[..., 0], py - boxes[..., 1],
                    boxes[..., 2] - px, boxes[..., 3] - py], axis=-1) / scale


def decode_boxes(ltrb, points, scale: float = DEFAULT_SCALE,
                 clip_size: Sequence[float] | None = None) -> jax.Array:
  """Exact inverse of `encode_boxes`: (..., 4) LTRB at (..., 2) points -> input-pixel boxes.

  x1 = px - s L, y1 = py - s T, x2 = px + s R, y2 = py + s B. With clip_size = (W_in, H_in),
  clips as the original's training-time decoder: x1 to [0, W], y1 to [0, H], x2 to [x1, W],
  y2 to [y1, H] (so a reversed box collapses to zero width/height at x1/y1).
  """
  ltrb = jnp.asarray(ltrb, jnp.float32) * scale
  points = jnp.asarray(points, jnp.float32)
  px, py = points[..., 0], points[..., 1]
  x1, y1 = px - ltrb[..., 0], py - ltrb[..., 1]
  x2, y2 = px + ltrb[..., 2], py + ltrb[..., 3]
  if clip_size is not None:
    w, h = float(clip_size[0]), float(clip_size[1])
    x1 = jnp.clip(x1, 0.0, w)
    y1 = jnp.clip(y1, 0.0, h)
    x2 = jnp.clip(x2, x1, w)
    y2 = jnp.clip(y2, y1, h)
  return jnp.stack([x1, y1, x2, y2], axis=-1)


def decode_bbox_map(bbox, params: TargetParams, clip: bool = True) -> jax.Array:
  """(..., H, W, 4C) bbox map -> (..., H, W, C, 4) input-pixel boxes, one per cell and class.

  clip: clip to the network input (params.input_shape) as the original's decoder.
  """
  bbox = jnp.asarray(bbox, jnp.float32)
  ltrb = bbox.reshape(bbox.shape[:-1] + (bbox.shape[-1] // 4, 4))
  pts = reference_points(params)[:, :, None, :]          # (H, W, 1, 2), broadcast over C
  clip_size = (params.input_shape[1], params.input_shape[0]) if clip else None
  return decode_boxes(ltrb, pts, params.scale, clip_size)


# ------------------------------------------------------------------------------------------
# Coverage geometry and rasterization


def box_geometry(boxes, class_ids, params: TargetParams) -> dict:
  """Per-box ellipse geometry in output space (the per-box steps of the module docstring).

  boxes (N, 4) input pixels; class_ids (N,) (clamped into range for the parameter lookup).
  Returns {"box": (N, 4) output-space box, "center": (N, 2) (cx, cy), "cov_radius": (N, 2)
  (csx, csy), "deadzone_radius": (N, 2) (dsx, dsy), "inv_area": (N,) 1 / max(4 csx csy, 1)};
  all in output cells.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  cls = jnp.clip(jnp.asarray(class_ids, jnp.int32), 0, params.num_classes - 1)
  x1, x2 = boxes[:, 0] / params.stride_x, boxes[:, 2] / params.stride_x
  y1, y2 = boxes[:, 1] / params.stride_y, boxes[:, 3] / params.stride_y
  ccx, ccy = params.cov_center_x[cls], params.cov_center_y[cls]
  cx, cy = x1 + ccx * (x2 - x1), y1 + ccy * (y2 - y1)
  # Half extent towards the nearer edge, so an off-centre ellipse stays inside the box.
  sx = jnp.where(ccx < 0.5, cx - x1, x2 - cx)
  sy = jnp.where(ccy < 0.5, cy - y1, y2 - cy)
  csx = jnp.maximum(params.cov_radius_x[cls] * sx, MIN_COV_RADIUS)
  csy = jnp.maximum(params.cov_radius_y[cls] * sy, MIN_COV_RADIUS)
  # Small objects: grow to the minimum radius, x first then y, keeping the aspect ratio.
  r_min = params.bbox_min_radius[cls]
  small = csx < r_min
  csx, csy = jnp.where(small, r_min, csx), jnp.where(small, r_min * csy / csx, csy)
  small = csy < r_min
  csx, csy = jnp.where(small, r_min * csx / csy, csx), jnp.where(small, r_min, csy)
  d = params.deadzone_radius
  dsx = jnp.maximum((1.0 - d) * csx + d * sx, csx)
  dsy = jnp.maximum((1.0 - d) * csy + d * sy, csy)
  inv_area = 1.0 / jnp.maximum(4.0 * csx * csy, 1.0)
  return {"box": jnp.stack([x1, y1, x2, y2], -1), "center": jnp.stack([cx, cy], -1),
          "cov_radius": jnp.stack([csx, csy], -1), "deadzone_radius": jnp.stack([dsx, dsy], -1),
          "inv_area": inv_area}


def _sample_coords(n: int) -> jax.Array:
  """(SUPERSAMPLE n,) output-space supersample coordinates c + (i + 0.5) / 4 (exact in f32)."""
  return (jnp.arange(n * SUPERSAMPLE, dtype=jnp.float32) + 0.5) / SUPERSAMPLE


def _cell_fraction(inside, shape) -> jax.Array:
  """(4H, 4W) bool samples -> (H, W) fraction of each cell's 16 samples that are True."""
  h, w = shape
  s = SUPERSAMPLE
  return inside.reshape(h, s, w, s).astype(jnp.float32).sum(axis=(1, 3)) / (s * s)


def ellipse_fraction(center, radius, shape) -> jax.Array:
  """(H, W) fraction of each cell's 4 x 4 samples strictly inside an axis-aligned ellipse.

  center (2,) and radius (2,) in output cells (x, y); shape (H, W).
  """
  h, w = shape
  dx = (_sample_coords(w) - center[0]) / radius[0]
  dy = (_sample_coords(h) - center[1]) / radius[1]
  inside = jnp.square(dy)[:, None] + jnp.square(dx)[None, :] < 1.0
  return _cell_fraction(inside, shape)


def _rasterize(geom, draw, cls, shape, num_classes):
  """Deadzone compositing in ascending y2 order. Returns (cov (H, W, C), winner (H, W, C)).

  winner is the index (into the unsorted box array) of the box whose values a cell holds, or -1.
  """
  h, w = shape
  y2 = geom["box"][:, 3]
  # Stable: ties keep input order. Boxes not drawn sort last and are skipped in the body anyway.
  order = jnp.argsort(jnp.where(draw, y2, jnp.inf), stable=True)
  channels = jnp.arange(num_classes)

  def body(carry, k):
    max_cov, winner = carry
    a = ellipse_fraction(geom["center"][k], geom["deadzone_radius"][k], shape)
    f = ellipse_fraction(geom["center"][k], geom["cov_radius"][k], shape)
    on = draw[k] & (channels == cls[k])                      # (C,): this box's class only
    m = jnp.sum(jnp.where(on, max_cov, 0.0), axis=-1)        # (H, W) state of that class
    win = jnp.sum(jnp.where(on, winner, 0), axis=-1)
    clear = (a > 0.0) & (a >= m)
    m = jnp.where(clear, 0.0, m)
    win = jnp.where(clear, -1, win)
    write = (f > 0.0) & (f >= m)
    m = jnp.where(write, f, m)
    win = jnp.where(write, k, win)
    max_cov = jnp.where(on, m[..., None], max_cov)
    winner = jnp.where(on, win[..., None], winner)
    return (max_cov, winner), None

  init = (jnp.zeros((h, w, num_classes), jnp.float32),
          jnp.full((h, w, num_classes), -1, jnp.int32))
  (cov, winner), _ = lax.scan(body, init, order)
  return cov, winner


def _dontcare_cells(boxes_out, shape) -> jax.Array:
  """(N, H, W) bool: cells with at least one 4 x 4 sample point inside each output-space box."""
  h, w = shape
  xs, ys = _sample_coords(w), _sample_coords(h)
  in_x = (xs >= boxes_out[:, 0:1]) & (xs < boxes_out[:, 2:3])           # (N, 4W)
  in_y = (ys >= boxes_out[:, 1:2]) & (ys < boxes_out[:, 3:4])           # (N, 4H)
  any_x = in_x.reshape(-1, w, SUPERSAMPLE).any(-1)
  any_y = in_y.reshape(-1, h, SUPERSAMPLE).any(-1)
  return any_y[:, :, None] & any_x[:, None, :]


def make_targets(boxes, class_ids, valid, dontcare, params: TargetParams) -> dict:
  """Targets of one image.

  boxes (N, 4) float32 input-pixel (x1, y1, x2, y2); class_ids (N,) int32 target-class index;
  valid (N,) bool (False = padding); dontcare (N,) bool (don't-care boxes: never drawn; they
  zero the loss mask when params.dontcare_mask is on).
  Returns {"cov": (H, W, C), "bbox": (H, W, 4C), "cov_norm": (H, W, C), "loss_mask": (H, W, C)},
  float32, at output resolution (bbox values in units of input px / scale).
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  class_ids = jnp.asarray(class_ids, jnp.int32)
  valid = jnp.asarray(valid, bool)
  dontcare = jnp.asarray(dontcare, bool)
  shape = params.output_shape
  c = params.num_classes
  geom = box_geometry(boxes, class_ids, params)
  in_range = (class_ids >= 0) & (class_ids < c)
  nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  draw = valid & ~dontcare & in_range & nonempty
  cov, winner = _rasterize(geom, draw, class_ids, shape, c)

  has = winner >= 0
  idx = jnp.maximum(winner, 0)                                       # (H, W, C)
  cov_norm = jnp.where(has, cov * geom["inv_area"][idx], 0.0)
  pts = reference_points(params)[:, :, None, :]                      # (H, W, 1, 2)
  bbox = encode_boxes(boxes[idx], pts, params.scale)                 # (H, W, C, 4)
  bbox = jnp.where(has[..., None], bbox, 0.0).reshape(shape + (4 * c,))

  loss_mask = jnp.ones(shape + (c,), jnp.float32)
  if params.dontcare_mask:
    dc = valid & dontcare & nonempty
    # A don't-care box of a target class masks that class; any other id masks every class.
    per_class = (class_ids[:, None] == jnp.arange(c)) | ~in_range[:, None]
    per_class = (per_class & dc[:, None]).astype(jnp.float32)         # (N, C)
    cells = _dontcare_cells(geom["box"], shape).astype(jnp.float32)   # (N, H, W)
    masked = jnp.einsum("nhw,nc->hwc", cells, per_class) > 0
    if params.dontcare_preserve_ground_truth:
      masked = masked & (cov <= 0.0)
    loss_mask = jnp.where(masked, 0.0, loss_mask)
  return {"cov": cov, "bbox": bbox, "cov_norm": cov_norm, "loss_mask": loss_mask}


def make_batch_targets(boxes, class_ids, valid, dontcare, params: TargetParams) -> dict:
  """`make_targets` vmapped over a leading batch axis: (B, N, ...) -> (B, H, W, ...)."""
  return jax.vmap(make_targets, in_axes=(0, 0, 0, 0, None))(boxes, class_ids, valid, dontcare,
                                                            params)
