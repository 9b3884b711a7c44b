"""`bpnet make_synthetic`: a procedural COCO-format person-keypoints dataset.

Stick-figure people (limbs as thick segments, torso as a quad, head as a disc) in random poses,
1-6 per image, 10-80% of the image height, overlapping, on textured backgrounds. Some people
have no keypoint labels (num_keypoints 0, like COCO's unannotated people), some images have a
crowd region (iscrowd 1, uncompressed RLE) of tiny figures, joints hidden by a later-drawn person
are occluded (v=1), joints outside the image are unlabelled (0, 0, 0). Annotations carry COCO-17
keypoints, bbox, area and segmentation polygons of each person's drawn silhouette.

style="demo" (STYLES) makes an easier dataset for `bpnet demo`: 1-3 people of 40-85% of the image
height on plain backgrounds, no crowds or unlabelled people, limbs and eyes/ears in fixed part
colours.

Output (deterministic from the seed):
  DIR/train/*.jpg, DIR/test/*.jpg
  DIR/annotations/person_keypoints_{train,test}.json
  DIR/dataset_spec.json      a dataset spec for `bpnet dataset_convert` (masks in DIR/*_mask)
"""

from __future__ import annotations

import json
import os
import sys

import cv2
import numpy as np
import tqdm

from bpnet_jax import fileio
from bpnet_jax.data.dataset_spec import COCO_KEYPOINTS, coco_spec_dict

K = {n: i for i, n in enumerate(COCO_KEYPOINTS)}
# Drawn segments (COCO-17 names); the torso is drawn as a filled quad.
SEGMENTS = [("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
            ("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"),
            ("left_hip", "left_knee"), ("left_knee", "left_ankle"),
            ("right_hip", "right_knee"), ("right_knee", "right_ankle"),
            ("left_shoulder", "right_shoulder"), ("left_hip", "right_hip")]


def _rot(v, angle):
  c, s = np.cos(angle), np.sin(angle)
  return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def random_pose(rng: np.random.Generator, height: float, pelvis: np.ndarray) -> np.ndarray:
  """(17, 2) COCO-order joint positions of a figure about `height` pixels tall."""
  h = height
  lean = np.deg2rad(rng.normal(0, 12))
  up = _rot(np.array([0.0, -1.0]), lean)
  side = np.array([-up[1], up[0]])                 # image-right when facing the camera
  facing = 1.0 if rng.uniform() < 0.7 else -1.0    # -1: seen from the back (left on image-left)
  yaw = rng.uniform(0.35, 1.0) * facing            # shrinks widths for a turned body
  neck = pelvis + up * 0.30 * h
  p = np.zeros((17, 2))
  p[K["left_shoulder"]] = neck + side * 0.10 * h * yaw
  p[K["right_shoulder"]] = neck - side * 0.10 * h * yaw
  p[K["left_hip"]] = pelvis + side * 0.07 * h * yaw
  p[K["right_hip"]] = pelvis - side * 0.07 * h * yaw
  head = neck + up * 0.10 * h
  p[K["nose"]] = head + side * 0.02 * h * rng.normal() * (1 - abs(yaw))
  p[K["left_eye"]] = p[K["nose"]] + up * 0.025 * h + side * 0.025 * h * yaw
  p[K["right_eye"]] = p[K["nose"]] + up * 0.025 * h - side * 0.025 * h * yaw
  p[K["left_ear"]] = p[K["nose"]] + up * 0.01 * h + side * 0.05 * h * yaw
  p[K["right_ear"]] = p[K["nose"]] + up * 0.01 * h - side * 0.05 * h * yaw
  down = -up
  for s, sign in (("left", 1.0), ("right", -1.0)):
    a1 = np.deg2rad(rng.uniform(-160, 160))
    elbow = p[K[f"{s}_shoulder"]] + _rot(down, a1) * 0.16 * h
    wrist = elbow + _rot(down, a1 + np.deg2rad(rng.uniform(-120, 120))) * 0.14 * h
    p[K[f"{s}_elbow"]], p[K[f"{s}_wrist"]] = elbow, wrist
    t1 = np.deg2rad(rng.uniform(-35, 35) + sign * 5)
    knee = p[K[f"{s}_hip"]] + _rot(down, t1) * 0.24 * h
    ankle = knee + _rot(down, t1 + np.deg2rad(rng.uniform(-60, 60))) * 0.24 * h
    p[K[f"{s}_knee"]], p[K[f"{s}_ankle"]] = knee, ankle
  return p


def _plain(rng, h, w):
  """A low-contrast background: a soft grey-ish gradient with mild noise (the demo style)."""
  small = rng.uniform(90, 170, (2, 2, 1)) + rng.uniform(-15, 15, (2, 2, 3))
  img = cv2.resize(small.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
  img += rng.normal(0, 4, img.shape).astype(np.float32)
  return np.clip(img, 0, 255).astype(np.uint8)


def _texture(rng, h, w):
  small = rng.uniform(0, 255, (rng.integers(3, 9), rng.integers(3, 9), 3)).astype(np.float32)
  img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
  for _ in range(rng.integers(3, 12)):
    color = tuple(int(c) for c in rng.integers(0, 256, 3))
    x1, y1 = int(rng.integers(0, w)), int(rng.integers(0, h))
    if rng.uniform() < 0.5:
      cv2.rectangle(img, (x1, y1), (x1 + int(rng.integers(5, w // 3 + 6)),
                                    y1 + int(rng.integers(5, h // 3 + 6))), color, -1)
    else:
      cv2.circle(img, (x1, y1), int(rng.integers(3, min(h, w) // 6 + 4)), color, -1)
  img += rng.normal(0, 6, img.shape).astype(np.float32)
  return np.clip(img, 0, 255).astype(np.uint8)


# The "demo" style's fixed part colours (BGR): each limb segment and each face point has its own
# colour, so joint identity and left/right are visible locally (a demo simplification; real
# people need context for both). Left parts are warm, right parts cool.
PART_COLOURS = {
    ("left_shoulder", "left_elbow"): (0, 0, 255), ("left_elbow", "left_wrist"): (0, 200, 255),
    ("right_shoulder", "right_elbow"): (255, 0, 0), ("right_elbow", "right_wrist"): (255, 200, 0),
    ("left_hip", "left_knee"): (180, 0, 255), ("left_knee", "left_ankle"): (0, 255, 255),
    ("right_hip", "right_knee"): (0, 255, 0), ("right_knee", "right_ankle"): (255, 255, 0),
    ("left_shoulder", "right_shoulder"): (255, 255, 255), ("left_hip", "right_hip"): (40, 40, 40),
    "left_eye": (0, 0, 160), "right_eye": (160, 0, 0), "left_ear": (0, 160, 255),
    "right_ear": (255, 160, 0),
}

# Generator settings. "default": the varied dataset the tests and `bpnet make_synthetic` use.
# "demo": fewer, larger people without crowds or unlabelled people, limbs and face points in
# fixed part colours, for the demo's three-minute CPU training (see docs/training.md).
STYLES = {
    "default": dict(people=(1, 6), height=(0.10, 0.80), unlabelled_prob=0.12, crowd_prob=0.25,
                    part_colours=False, plain_background=False),
    "demo": dict(people=(1, 3), height=(0.40, 0.85), unlabelled_prob=0.0, crowd_prob=0.0,
                 part_colours=True, plain_background=True),
}


def _draw_person(img, mask, pts, height, color, part_colours=False):
  """Draws a figure into img and its silhouette into mask (both in place).

  part_colours: limbs and face points in PART_COLOURS (the torso and head keep `color`).
  """
  t = max(2, int(round(0.06 * height)))
  torso = np.round(pts[[K["left_shoulder"], K["right_shoulder"], K["right_hip"],
                        K["left_hip"]]]).astype(np.int32)
  head_r = max(2, int(round(0.06 * height)))
  nose = tuple(int(v) for v in np.round(pts[K["nose"]]))
  for canvas, c, parts in ((img, color, part_colours), (mask, 255, False)):
    cv2.fillConvexPoly(canvas, torso, c)
    for a, b in SEGMENTS:
      pa = tuple(int(v) for v in np.round(pts[K[a]]))
      pb = tuple(int(v) for v in np.round(pts[K[b]]))
      cv2.line(canvas, pa, pb, PART_COLOURS[(a, b)] if parts else c, t)
    neck = tuple(int(v) for v in np.round((pts[K["left_shoulder"]] + pts[K["right_shoulder"]]) / 2))
    cv2.line(canvas, neck, nose, c, t)
    cv2.circle(canvas, nose, head_r, c, -1)
    if parts:
      r = max(1, int(round(0.02 * height)))
      for name in ("left_ear", "right_ear", "left_eye", "right_eye"):
        cv2.circle(canvas, tuple(int(v) for v in np.round(pts[K[name]])), r,
                   PART_COLOURS[name], -1)


def _polygons(mask):
  contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  polys = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
  return polys


def _rle(mask):
  """COCO uncompressed RLE (column-major run lengths, starting with a run of zeros)."""
  flat = (mask.T.reshape(-1) > 0).astype(np.int8)
  change = np.nonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))[0]
  counts = np.diff(np.concatenate([[0], change]))
  return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts.tolist()}


def make_image(rng: np.random.Generator, width: int, height: int, image_id: int,
               ann_id_start: int, style: str = "default"):
  """Returns (image uint8 BGR, annotations list). style: a key of STYLES."""
  st = STYLES[style]
  img = (_plain if st["plain_background"] else _texture)(rng, height, width)
  anns = []
  people = []
  n = int(rng.integers(st["people"][0], st["people"][1] + 1))
  for _ in range(n):
    ph = float(rng.uniform(*st["height"])) * height
    pelvis = np.array([rng.uniform(-0.05, 1.05) * width, rng.uniform(0.2, 1.1) * height])
    pelvis[1] = min(pelvis[1], height - 0.1 * ph + 0.3 * ph * rng.uniform())
    pts = random_pose(rng, ph, pelvis)
    labelled = rng.uniform() > st["unlabelled_prob"]
    people.append((pts, ph, labelled))
  # Draw back to front: bigger people (closer) last, so they occlude the smaller ones.
  people.sort(key=lambda p: p[1])
  masks = []
  for pts, ph, _ in people:
    m = np.zeros((height, width), np.uint8)
    color = tuple(int(c) for c in rng.integers(0, 256, 3))
    _draw_person(img, m, pts, ph, color, st["part_colours"])
    masks.append(m)
  later = np.zeros((height, width), bool)
  visible_masks = [None] * len(masks)
  for i in range(len(masks) - 1, -1, -1):       # What remains visible of each person.
    visible_masks[i] = (masks[i] > 0) & ~later
    later |= masks[i] > 0
  aid = ann_id_start
  for i, (pts, _, labelled) in enumerate(people):
    vis_mask = visible_masks[i]
    area = int(vis_mask.sum())
    if area < 4:
      continue
    ys, xs = np.nonzero(vis_mask)
    bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1)]
    kp = np.zeros((17, 3))
    if labelled:
      inside = (pts[:, 0] >= 0) & (pts[:, 0] <= width - 1) & (pts[:, 1] >= 0) & \
               (pts[:, 1] <= height - 1)
      xi = np.clip(np.round(pts[:, 0]).astype(int), 0, width - 1)
      yi = np.clip(np.round(pts[:, 1]).astype(int), 0, height - 1)
      hidden = ~vis_mask[yi, xi] | (rng.uniform(size=17) < 0.05)
      kp[:, :2] = np.where(inside[:, None], pts, 0.0)
      kp[:, 2] = np.where(inside, np.where(hidden, 1, 2), 0)
    anns.append({"id": aid, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                 "keypoints": [round(float(v), 2) for v in kp.reshape(-1)],
                 "num_keypoints": int((kp[:, 2] > 0).sum()), "bbox": bbox,
                 "area": float(area), "segmentation": _polygons(vis_mask.astype(np.uint8))})
    aid += 1
  if rng.uniform() < st["crowd_prob"]:           # A crowd of tiny figures.
    crowd = np.zeros((height, width), np.uint8)
    cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.3, 0.8) * height
    for _ in range(int(rng.integers(4, 10))):
      ph = float(rng.uniform(0.05, 0.10)) * height
      pts = random_pose(rng, ph, np.array([cx + rng.normal(0, 0.06 * width),
                                           cy + rng.normal(0, 0.04 * height)]))
      _draw_person(img, crowd, pts, ph, tuple(int(c) for c in rng.integers(0, 256, 3)),
                   st["part_colours"])
    if crowd.any():
      ys, xs = np.nonzero(crowd)
      anns.append({"id": aid, "image_id": image_id, "category_id": 1, "iscrowd": 1,
                   "keypoints": [0] * 51, "num_keypoints": 0,
                   "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                            float(ys.max() - ys.min() + 1)],
                   "area": float((crowd > 0).sum()), "segmentation": _rle(crowd)})
  return img, anns


def make_synthetic(out: str, num_images: int, seed: int = 0, width: int = 320,
                   height: int = 240, test_fraction: float = 0.2, overwrite: bool = False,
                   progress: bool = True, style: str = "default") -> dict:
  """Writes the dataset to `out` (atomically: built beside it, then renamed). Returns counts.

  style: a key of STYLES ("default", or "demo": fewer, larger, part-coloured people).
  """
  if style not in STYLES:
    raise ValueError(f"style must be one of {sorted(STYLES)}, got {style!r}")
  if num_images < 1:
    raise ValueError(f"--num_images must be >= 1, got {num_images}")
  if width < 16 or height < 16:
    raise ValueError(f"image size must be at least 16x16, got {width}x{height}")
  if os.path.exists(out) and os.listdir(out) and not overwrite:
    raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
  with fileio.atomic_path(out) as tmp:   # built beside `out`, then renamed into place
    os.makedirs(tmp)
    num_test = int(round(num_images * test_fraction)) if num_images > 1 else 0
    splits = {"train": range(num_images - num_test),
              "test": range(num_images - num_test, num_images)}
    categories = coco_spec_dict("", None, None)["categories"]
    counts = {}
    bar = tqdm.tqdm(total=num_images, desc="synthetic", unit="img", file=sys.stderr,
                    leave=False, disable=not progress)
    for split, ids in splits.items():
      if not len(ids):
        continue
      os.makedirs(os.path.join(tmp, split))
      images, anns = [], []
      for i in ids:
        rng = np.random.default_rng([seed, i])
        img, a = make_image(rng, width, height, image_id=i + 1, ann_id_start=(i + 1) * 100,
                            style=style)
        name = f"{i + 1:012d}.jpg"
        cv2.imwrite(os.path.join(tmp, split, name), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height,
                       "license": 0})
        anns.extend(a)
        bar.update(1)
      os.makedirs(os.path.join(tmp, "annotations"), exist_ok=True)
      with open(os.path.join(tmp, "annotations", f"person_keypoints_{split}.json"),
              "w") as f:
        json.dump({"info": {"description": f"bpnet_jax synthetic people, seed {seed}"},
                   "licenses": [{"id": 0, "name": "generated, public domain"}],
                   "images": images, "annotations": anns, "categories": categories}, f)
      counts[split] = {"images": len(images), "annotations": len(anns),
                       "labelled_people": sum(a["num_keypoints"] > 0 for a in anns),
                       "unlabelled_people": sum(a["num_keypoints"] == 0 and not a["iscrowd"]
                                                for a in anns),
                       "crowd_regions": sum(a["iscrowd"] for a in anns)}
    bar.close()
    # COCO's 32x32 minimum person area, scaled to the synthetic image size.
    min_size = max(8, int(round(32 * min(width / 640, height / 480))))
    spec = coco_spec_dict(".", ("train", "train_mask", "annotations/person_keypoints_train.json"),
                          ("test", "test_mask", "annotations/person_keypoints_test.json")
                          if num_test else None, min_size=min_size)
    with open(os.path.join(tmp, "dataset_spec.json"), "w") as f:
      json.dump(spec, f, indent=1)
  return counts
