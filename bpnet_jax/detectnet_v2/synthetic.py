"""A procedural KITTI-format detection dataset for DetectNet_v2 tests and demos.

Scenes: a textured background (sky/ground gradient, low-frequency colour noise, building blocks
above a horizon, lane marks below it, sensor noise) with 1-6 objects of three classes of distinct
shape: 'Car' (a body with a cabin, dark windows and two wheels; wide), 'Pedestrian' (head, torso
ellipse, arms and legs; tall and narrow) and 'Cyclist' (two wheel rings, a frame and a leaning
rider; about square). Object heights are log-uniform from about 5% to 75% of the image height
(small and large objects), nearer (larger) objects stand lower and are drawn later, so they occlude
farther ones; objects may leave the image at the sides. Some images have 'DontCare' regions: a
patch of tiny distant objects near the horizon, labelled as one region.

Labels are KITTI's 15 fields per object: type (capitalised as in KITTI, so the converter's
lower-casing is exercised), truncation = fraction of the object's drawn pixels outside the image,
occlusion = 0 (>= 90% of its in-image pixels visible), 1 (>= 50%), 2 (>= 10%; objects less visible
than that, and slivers under 2 px at the border, get no label), alpha, the box (left, top, right,
bottom: the tight extent of the object's drawn pixels inside the image, occluded ones included like
KITTI's boxes; x2 = last column + 1, in continuous pixel coordinates), a plausible 3-D size (m),
location (m, a pinhole camera with focal length = image width) and rotation_y. DontCare lines use
KITTI's values: -1 -1 -10 <box> -1 -1 -1 -1000 -1000 -1000 -10.

Output (deterministic from the seed: the same seed gives the same bytes):
  DIR/images/NNNNNN.png (or .jpg)   8-bit BGR
  DIR/labels/NNNNNN.txt
  DIR/dataset_convert_spec.json     a DatasetExportConfig for detectnet_v2.convert (random mode,
                                    2 folds, val_split = 100 * val_fraction: fold 0 is the first
                                    int(val_split / 100 * N) images by name; root '.', which
                                    load_convert_spec resolves against the spec file)

Differences from the original: none; TAO has no synthetic data generator.
"""

from __future__ import annotations

import collections
import json
import math
import os

import cv2
import numpy as np

from bpnet_jax import fileio

CLASSES = ("Car", "Pedestrian", "Cyclist")
CLASS_PROBS = (0.5, 0.3, 0.2)
ASPECT = {"Car": (1.5, 2.4), "Pedestrian": (0.3, 0.45), "Cyclist": (0.75, 1.0)}   # width/height
SIZE_3D = {"Car": (1.5, 1.65, 3.9), "Pedestrian": (1.75, 0.6, 0.8),                 # h, w, l (m)
           "Cyclist": (1.7, 0.6, 1.8)}
DONTCARE_FIELDS = (-1.0, -1, -10.0)                     # truncation, occlusion, alpha
DONTCARE_3D = (-1.0, -1.0, -1.0, -1000.0, -1000.0, -1000.0, -10.0)
SPEC_NAME = "dataset_convert_spec.json"


class _Painter:
  """Draws one object into a local colour canvas and its silhouette mask at the same time."""

  def __init__(self, h: int, w: int):
    self.canvas = np.zeros((h, w, 3), np.uint8)
    self.mask = np.zeros((h, w), np.uint8)

  def _both(self, fn, colour, *args, **kw):
    fn(self.canvas, *args, color=colour, **kw)
    fn(self.mask, *args, color=255, **kw)

  def poly(self, pts, colour):
    self._both(cv2.fillPoly, colour, [np.round(np.asarray(pts)).astype(np.int32)])

  def circle(self, centre, radius, colour, thickness=-1):
    c = tuple(int(round(v)) for v in centre)
    self._both(cv2.circle, colour, c, max(1, int(round(radius))), thickness=thickness)

  def line(self, a, b, colour, thickness):
    self._both(cv2.line, colour, tuple(int(round(v)) for v in a),
               tuple(int(round(v)) for v in b), thickness=max(1, int(round(thickness))))

  def ellipse(self, centre, axes, angle, colour):
    self._both(cv2.ellipse, colour, tuple(int(round(v)) for v in centre),
               tuple(max(1, int(round(v))) for v in axes), angle, 0, 360, thickness=-1)


def _colour(rng, lo=30, hi=230):
  return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _draw_car(p: _Painter, w: float, h: float, rng):
  body = _colour(rng)
  r = 0.2 * h
  p.poly([(0, 0.42 * h), (w - 1, 0.42 * h), (w - 1, h - 0.6 * r), (0, h - 0.6 * r)], body)
  cabin = [(0.18 * w, 0.44 * h), (0.3 * w, 0), (0.68 * w, 0), (0.86 * w, 0.44 * h)]
  p.poly(cabin, body)
  glass = tuple(int(v) for v in (rng.integers(60, 110), rng.integers(40, 80), rng.integers(20, 50)))
  p.poly([(0.25 * w, 0.4 * h), (0.33 * w, 0.08 * h), (0.65 * w, 0.08 * h), (0.8 * w, 0.4 * h)],
         glass)
  for cx in (0.2 * w, 0.8 * w):
    p.circle((cx, h - r - 0.5), r, (20, 20, 20))
    p.circle((cx, h - r - 0.5), 0.45 * r, (150, 150, 150))


def _draw_pedestrian(p: _Painter, w: float, h: float, rng):
  cloth, legs = _colour(rng), _colour(rng, 10, 120)
  skin = tuple(int(v) for v in (rng.integers(60, 140), rng.integers(110, 170),
                                rng.integers(160, 230)))
  t = max(1.0, 0.18 * w)
  p.line((0.4 * w, 0.58 * h), (0.25 * w, h - 1), legs, t)
  p.line((0.6 * w, 0.58 * h), (0.75 * w, h - 1), legs, t)
  p.line((0.3 * w, 0.25 * h), (0.08 * w, 0.55 * h), cloth, 0.7 * t)
  p.line((0.7 * w, 0.25 * h), (0.92 * w, 0.55 * h), cloth, 0.7 * t)
  p.ellipse((0.5 * w, 0.4 * h), (0.36 * w, 0.22 * h), 0, cloth)
  p.circle((0.5 * w, 0.09 * h), min(0.09 * h, 0.45 * w), skin)


def _draw_cyclist(p: _Painter, w: float, h: float, rng):
  frame, rider = _colour(rng), _colour(rng)
  r = 0.22 * h
  t = max(1.0, 0.2 * r)
  back, front = (r + 0.5, h - r - 0.5), (w - r - 1.5, h - r - 0.5)
  seat, bars = (0.42 * w, 0.55 * h), (0.75 * w, 0.5 * h)
  for c in (back, front):
    p.circle(c, r, (25, 25, 25), thickness=max(1, int(round(t))))
  for a, b in ((back, seat), (seat, front), (front, bars), (back, (0.55 * w, h - r)),
               (seat, (0.55 * w, h - r))):
    p.line(a, b, frame, t)
  p.line(seat, (0.58 * w, 0.18 * h), rider, 0.22 * w)       # leaning back
  p.line((0.58 * w, 0.22 * h), bars, rider, 0.08 * w)      # arm
  p.circle((0.62 * w, 0.09 * h), 0.09 * h, (90, 140, 200))


DRAW = {"Car": _draw_car, "Pedestrian": _draw_pedestrian, "Cyclist": _draw_cyclist}


def _background(rng, h: int, w: int, horizon: int) -> np.ndarray:
  y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
  sky0, sky1, gnd0, gnd1 = (rng.uniform(lo, hi, 3).astype(np.float32)
                            for lo, hi in ((120, 240), (80, 200), (40, 130), (60, 160)))
  t_sky = np.clip(y * h / max(horizon, 1), 0, 1)
  t_gnd = np.clip((y * h - horizon) / max(h - horizon, 1), 0, 1)
  img = np.where(y * h < horizon, sky0 + (sky1 - sky0) * t_sky, gnd0 + (gnd1 - gnd0) * t_gnd)
  small = rng.normal(0, 18, (int(rng.integers(3, 8)), int(rng.integers(4, 12)), 3))
  img = img + cv2.resize(small.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
  img = np.clip(img, 0, 255, out=img)
  for _ in range(int(rng.integers(2, 7))):             # buildings above the horizon
    bw, bh = rng.uniform(0.05, 0.2) * w, rng.uniform(0.1, 0.35) * h
    x0 = rng.uniform(-0.1, 1.0) * w
    c = tuple(float(v) for v in rng.uniform(60, 200, 3))
    cv2.rectangle(img, (int(x0), int(horizon - bh)), (int(x0 + bw), int(horizon)), c, -1)
  lane = tuple(float(v) for v in rng.uniform(180, 240, 3))
  for _ in range(int(rng.integers(1, 4))):             # lane marks on the ground
    x_far, x_near = rng.uniform(0.3, 0.7) * w, rng.uniform(-0.5, 1.5) * w
    cv2.line(img, (int(x_far), horizon), (int(x_near), h), lane, max(1, w // 160))
  return img


def _paste(img, owner, p: _Painter, x0: int, y0: int, k: int):
  """Composites the painter's object at (x0, y0); returns (in-image mask, its offset) or None."""
  h, w = owner.shape
  ph, pw = p.mask.shape
  ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + pw, w), min(y0 + ph, h)
  if ix0 >= ix1 or iy0 >= iy1:
    return None
  m = p.mask[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] > 0
  img[iy0:iy1, ix0:ix1][m] = p.canvas[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0][m]
  owner[iy0:iy1, ix0:ix1][m] = k
  return m, (ix0, iy0)


def _label(cls, trunc, occ, alpha, box, dims, loc, ry) -> str:
  vals = [trunc, occ, alpha, *box, *dims, *loc, ry]
  return cls + " " + " ".join(str(v) if isinstance(v, int) else f"{v:.2f}" for v in vals)


def make_scene(rng: np.random.Generator, width: int, height: int):
  """Returns (image uint8 BGR (H, W, 3), KITTI label lines)."""
  horizon = int(height * rng.uniform(0.35, 0.5))
  img = _background(rng, height, width, horizon)
  owner = np.full((height, width), -1, np.int32)     # -1 background, -2 don't-care clutter
  lines = []
  if rng.uniform() < 0.4:                            # distant clutter labelled as DontCare
    for _ in range(int(rng.integers(1, 3))):
      rw, rh = rng.uniform(0.08, 0.2) * width, rng.uniform(0.05, 0.12) * height
      rx, ry_ = rng.uniform(0, width - rw), horizon - rh * rng.uniform(0.3, 0.8)
      for _ in range(int(rng.integers(5, 15))):
        cls = CLASSES[int(rng.choice(3, p=CLASS_PROBS))]
        oh = rng.uniform(3, 7)
        ow = oh * rng.uniform(*ASPECT[cls])
        p = _Painter(int(math.ceil(oh)) + 1, int(math.ceil(ow)) + 1)
        DRAW[cls](p, ow, oh, rng)
        _paste(img, owner, p, int(rx + rng.uniform(0, max(rw - ow, 1))),
               int(ry_ + rng.uniform(0, max(rh - oh, 1))), -2)
      box = (max(rx, 0.0), max(ry_, 0.0), min(rx + rw, width), min(ry_ + rh, height))
      lines.append(_label("DontCare", *DONTCARE_FIELDS, box, DONTCARE_3D[:3], DONTCARE_3D[3:6],
                          DONTCARE_3D[6]))
  hmin, hmax = max(8.0, 0.05 * height), 0.75 * height
  objs = []
  for _ in range(int(rng.integers(1, 7))):
    cls = CLASSES[int(rng.choice(3, p=CLASS_PROBS))]
    oh = float(np.exp(rng.uniform(np.log(hmin), np.log(hmax))))
    ow = oh * rng.uniform(*ASPECT[cls])
    bottom = horizon + (oh / hmax) * (height - horizon) * rng.uniform(0.8, 1.15)
    cx = rng.uniform(-0.05, 1.05) * width
    objs.append((bottom, cls, oh, ow, cx))
  objs.sort(key=lambda o: o[0])                      # far (higher up) first: near ones occlude
  drawn = []
  for k, (bottom, cls, oh, ow, cx) in enumerate(objs):
    p = _Painter(int(math.ceil(oh)) + 1, int(math.ceil(ow)) + 1)
    DRAW[cls](p, ow, oh, rng)
    x0, y0 = int(round(cx - ow / 2)), int(round(bottom - oh))
    pasted = _paste(img, owner, p, x0, y0, k)
    total = int((p.mask > 0).sum())
    if pasted is not None and total:
      drawn.append((k, cls, oh, pasted, total))
  img += 3.0 * rng.standard_normal(img.shape, dtype=np.float32)      # sensor noise
  img = np.clip(np.round(img), 0, 255).astype(np.uint8)
  visible = np.bincount(owner.ravel() + 2, minlength=len(objs) + 2)[2:]
  for k, cls, oh, (m, (ix0, iy0)), total in drawn:
    inside = int(m.sum())
    vis = visible[k] / max(inside, 1)
    if vis < 0.1:
      continue
    ys, xs = np.nonzero(m)         # in-image extent, hidden parts included (as KITTI's boxes)
    box = (float(ix0 + xs.min()), float(iy0 + ys.min()), float(ix0 + xs.max() + 1),
           float(iy0 + ys.max() + 1))
    if box[2] - box[0] < 2 or box[3] - box[1] < 2:   # a sliver at the border: nothing to learn
      continue
    occ = 0 if vis >= 0.9 else 1 if vis >= 0.5 else 2
    trunc = 1.0 - inside / total
    dims = tuple(float(d * rng.uniform(0.9, 1.1)) for d in SIZE_3D[cls])
    z = width * dims[0] / oh                           # pinhole, focal length = width
    loc = ((0.5 * (box[0] + box[2]) - width / 2) * z / width, (box[3] - height / 2) * z / width, z)
    ry = float(rng.uniform(-np.pi, np.pi))
    alpha = float((ry - np.arctan2(loc[0], z) + np.pi) % (2 * np.pi) - np.pi)
    lines.append(_label(cls, trunc, occ, alpha, box, dims, loc, ry))
  return img, lines


def spec_dict(val_fraction: float, image_extension: str = ".png", num_shards: int = 0) -> dict:
  """The conversion spec written next to the data (root '.', relative to the spec file)."""
  return {
      "kitti_config": {"root_directory_path": ".", "image_dir_name": "images",
                       "label_dir_name": "labels", "image_extension": image_extension,
                       "partition_mode": "random", "num_partitions": 2,
                       "val_split": round(100.0 * val_fraction, 6), "num_shards": num_shards},
      "image_directory_path": ".",
      "target_class_mapping": {c.lower(): c.lower() for c in CLASSES},
  }


def make_synthetic(out_dir: str, num_images: int, seed: int = 0, width: int = 480,
                   height: int = 272, val_fraction: float = 0.2, overwrite: bool = False,
                   image_format: str = "png") -> dict:
  """Writes the dataset to out_dir (built beside it, then renamed into place). Returns counts:
  images, validation/training images of the written spec, objects per class, DontCare regions,
  truncated and occluded objects, and the spec path."""
  if num_images < 1:
    raise ValueError(f"num_images must be >= 1, got {num_images}")
  if width < 32 or height < 32:
    raise ValueError(f"image size must be at least 32x32, got {width}x{height}")
  if not 0 <= val_fraction < 1:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  if image_format not in ("png", "jpg"):
    raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
  fileio.check_can_write([out_dir], overwrite)
  ext = "." + image_format
  params = [cv2.IMWRITE_PNG_COMPRESSION, 3] if image_format == "png" else \
      [cv2.IMWRITE_JPEG_QUALITY, 92]
  objects, stats = collections.Counter(), collections.Counter()
  with fileio.atomic_path(out_dir) as tmp:
    os.makedirs(os.path.join(tmp, "images"))
    os.makedirs(os.path.join(tmp, "labels"))
    for i in range(num_images):
      img, lines = make_scene(np.random.default_rng([seed, i]), width, height)
      name = f"{i:06d}"
      if not cv2.imwrite(os.path.join(tmp, "images", name + ext), img, params):
        raise OSError(f"{out_dir}: cannot write image {name + ext}")
      with open(os.path.join(tmp, "labels", name + ".txt"), "w") as f:
        f.write("".join(line + "\n" for line in lines))
      for line in lines:
        fields = line.split()
        if fields[0] == "DontCare":
          stats["dontcare_regions"] += 1
          continue
        objects[fields[0]] += 1
        stats["truncated"] += float(fields[1]) > 0
        stats["occluded"] += int(fields[2]) > 0
    with open(os.path.join(tmp, SPEC_NAME), "w") as f:
      json.dump(spec_dict(val_fraction, ext), f, indent=1)
  num_val = int(float(np.float32(round(100.0 * val_fraction, 6))) / 100.0 * num_images)
  return {"images": num_images, "val_images": num_val, "train_images": num_images - num_val,
          "objects": dict(sorted(objects.items())), "dontcare_regions": stats["dontcare_regions"],
          "truncated": stats["truncated"], "occluded": stats["occluded"],
          "spec": os.path.join(os.path.abspath(out_dir), SPEC_NAME)}
