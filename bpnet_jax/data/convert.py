"""`bpnet dataset_convert`: COCO person-keypoints JSON -> training records (+ masks).

For the chosen split it reads the annotation file, keeps "main persons" (enough keypoints,
segmentation area >= min_width*min_height, bbox centre not within ratio*max(w, h) of an already
accepted main person -- that person's size, fixing the original's use of the image's last
annotation), and writes one record per main person (or per image without duplication) with the
main person first and every other keypointed person after it, joints converted to the skeleton by
name (the neck as the midpoint of the shoulders, labelled only when both are).

`--generate_masks` writes `<masks dir>/<image stem>.png`: 255 = valid, 0 = ignore, with
ignore = (crowd AND NOT labelled) OR unlabelled (people without keypoints). Lossless and binary.
Every file_name, and its mask, must stay inside the split's images (masks) dir -- no absolute
paths, no '..' or symlink out (see `dataset_spec`); the JSON is rejected before anything is
written otherwise.

Outputs are written under temporary names and renamed at the end, so an interrupted or failed
conversion leaves nothing that looks complete. A JSON summary (`OUT.summary.json`) counts images,
persons, records and every skipped item with its reason.
"""

from __future__ import annotations

import collections
import json
import logging
import multiprocessing
import os
import sys
from typing import Optional

import cv2
import numpy as np
import tqdm
from pycocotools import mask as mask_utils

from bpnet_jax import fileio
from bpnet_jax.data import records as records_lib
from bpnet_jax.data.dataset_spec import DatasetSpec, SpecError, load_spec, resolve_inside
from bpnet_jax.data.records import Visibility
from bpnet_jax.skeleton import Skeleton, load_skeleton

log = logging.getLogger("bpnet.convert")


def convert_keypoints(kpts: np.ndarray, spec: DatasetSpec, skeleton: Skeleton):
  """(N, K*3) dataset keypoints -> joints (N, J, 2) float32, visibility (N, J) uint8.

  Flags are mapped with the spec's visibility_flags; joints the dataset lacks are
  NOT_LABELED_IN_DATASET; a derived joint (the neck) is the midpoint of its two sources, labelled
  only when both are, with the weaker (larger) of their visibilities.
  """
  kpts = np.asarray(kpts, np.float64).reshape(len(kpts), -1, 3)
  src, derived = skeleton.from_dataset(spec.keypoints)
  flags = kpts[..., 2].round().astype(np.int64)
  lut = np.full(max(list(spec.visibility_map) + [0]) + 1, int(Visibility.NOT_LABELED), np.uint8)
  for value, vis in spec.visibility_map.items():
    lut[value] = vis
  mapped = lut[np.clip(flags, 0, len(lut) - 1)]                     # (N, K)
  n, j = len(kpts), skeleton.num_joints
  joints = np.zeros((n, j, 2), np.float32)
  vis = np.full((n, j), int(Visibility.NOT_LABELED_IN_DATASET), np.uint8)
  has = src >= 0
  joints[:, has] = kpts[:, src[has], :2]
  vis[:, has] = mapped[:, src[has]]
  for jj in np.nonzero((src < 0) & (derived[:, 0] >= 0))[0]:       # a handful of joints
    a, b = derived[jj]
    joints[:, jj] = (kpts[:, a, :2] + kpts[:, b, :2]) / 2
    both = (mapped[:, a] < records_lib.LABELED_BELOW) & (mapped[:, b] < records_lib.LABELED_BELOW)
    vis[:, jj] = np.where(both, np.maximum(mapped[:, a], mapped[:, b]),
                          int(Visibility.NOT_LABELED))
  return joints, vis


def select_main_persons(anns: list, spec: DatasetSpec) -> list[int]:
  """Indices (into anns) of the main persons, in annotation order."""
  main, radii, centres = [], [], []
  for i, a in enumerate(anns):
    if a["num_keypoints"] < spec.min_kpts or a["area"] < spec.min_width * spec.min_height:
      continue
    x, y, w, h = a["bbox"]
    c = np.array([x + w / 2, y + h / 2])
    if any(np.hypot(*(c - pc)) < r for pc, r in zip(centres, radii)):
      continue
    main.append(i)
    centres.append(c)
    radii.append(spec.min_dist_ratio * max(w, h))
  return main


def _validate_annotation(a, num_kpts):
  """None if usable, else the skip reason."""
  if not isinstance(a, dict):
    return "annotation_not_an_object"
  for key in ("id", "image_id", "bbox", "keypoints", "num_keypoints", "area", "iscrowd"):
    if key not in a:
      return f"missing_{key}"
  if not isinstance(a["keypoints"], list) or len(a["keypoints"]) != 3 * num_kpts:
    return "bad_keypoints_length"
  if not isinstance(a["bbox"], list) or len(a["bbox"]) != 4:
    return "bad_bbox"
  return None


def load_annotations(path: str, spec: DatasetSpec, skipped: collections.Counter):
  """Reads and checks the COCO JSON. Returns (images {id: meta}, anns per image id in order)."""
  try:
    with open(path) as f:
      d = json.load(f)
  except FileNotFoundError:
    raise SpecError(f"{path}: annotation file not found") from None
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SpecError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(d, dict) or not isinstance(d.get("images"), list) \
      or not isinstance(d.get("annotations"), list):
    raise SpecError(f"{path}: expected an object with 'images' and 'annotations' lists")
  images = {}
  for i, im in enumerate(d["images"]):
    if not isinstance(im, dict) or not all(k in im for k in ("id", "file_name", "width",
                                                              "height")):
      raise SpecError(f"{path}: images[{i}] needs id, file_name, width and height")
    images[im["id"]] = im
  per_image = collections.defaultdict(list)
  nk = len(spec.keypoints)
  for a in d["annotations"]:
    reason = _validate_annotation(a, nk)
    if reason is None and a["image_id"] not in images:
      reason = "unknown_image_id"
    if reason:
      skipped[reason] += 1
      log.warning("%s: annotation %s skipped: %s", path,
                  a.get("id", "?") if isinstance(a, dict) else "?", reason)
      continue
    per_image[a["image_id"]].append(a)
  return images, per_image


def _mask_job(args):
  """Writes one image's ignore mask; returns (image_id, error or None)."""
  image_id, h, w, anns, out_path = args
  try:
    crowd = np.zeros((h, w), bool)
    unlabeled = np.zeros((h, w), bool)
    labeled = np.zeros((h, w), bool)
    for a in anns:
      seg = a.get("segmentation")
      if not seg:
        continue
      if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
      elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)
      else:
        rle = seg
      m = mask_utils.decode(rle).astype(bool)
      if a.get("iscrowd"):
        crowd |= m
      elif a["num_keypoints"] <= 0:
        unlabeled |= m
      else:
        labeled |= m
    ignore = (crowd & ~labeled) | unlabeled
    ok, png = cv2.imencode(".png", np.where(ignore, 0, 255).astype(np.uint8))
    if not ok:
      return image_id, f"cannot encode {out_path}"
    fileio.write_bytes(out_path, png.tobytes())
    return image_id, None
  except Exception as e:  # A malformed segmentation: reported per image, conversion goes on.
    return image_id, f"{type(e).__name__}: {e}"


def _check_job(args):
  """(image_id, reason or None): the image must exist and decode; the mask must exist."""
  image_id, image_path, mask_path = args
  if not os.path.exists(image_path):
    return image_id, "image_missing"
  if cv2.imread(image_path, cv2.IMREAD_REDUCED_GRAYSCALE_8) is None:
    return image_id, "image_unreadable"
  if mask_path and not os.path.exists(mask_path):
    return image_id, "mask_missing"
  return image_id, None


def _pool_map(fn, jobs, workers, desc):
  if workers <= 1 or len(jobs) < 8:
    return [fn(j) for j in tqdm.tqdm(jobs, desc=desc, unit="img", file=sys.stderr, leave=False)]
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(workers) as pool:
    return list(tqdm.tqdm(pool.imap(fn, jobs, chunksize=4), total=len(jobs), desc=desc, unit="img",
                     file=sys.stderr, leave=False))


def mask_path_for(split, file_name: str) -> tuple[str, str]:
  """(relative, absolute) path of an image's mask PNG (unchecked: see `image_paths`)."""
  stem = os.path.splitext(file_name)[0] + ".png"
  return os.path.join(split.masks_rel, stem), os.path.join(split.masks_dir, stem)


def image_paths(split, images: dict, where: str) -> dict:
  """{image id: (image path, mask path)}, absolute, each checked to stay inside its directory.

  A COCO file_name is relative to the split's images dir and its mask `<stem>.png` to the masks
  dir; one that is absolute, or leaves its dir through '..' or a symlink, is a DataError naming
  `where` (the JSON file), the image id and the file_name. Run before anything is written, so
  a crafted JSON can neither overwrite a file elsewhere with a mask nor make records point at one.
  """
  out = {}
  for iid, im in images.items():
    name = im["file_name"]
    image = resolve_inside(split.images_dir, name, f"{where}: image {iid}: file_name")
    stem = os.path.splitext(name)[0] + ".png"
    mask = resolve_inside(split.masks_dir, stem, f"{where}: image {iid} (file_name {name!r}): "
                          "its mask")
    out[iid] = (image, mask)
  return out


def convert(spec_path: str, output: str, mode: str = "train", generate_masks: bool = False,
            check_files: bool = False, num_partitions: int = 1, num_shards: int = 0,
            skeleton: Optional[Skeleton] = None, workers: Optional[int] = None,
            seed: int = 42) -> dict:
  """Runs the conversion; returns the summary dict (also written to OUTPUT.summary.json)."""
  spec = load_spec(spec_path)
  split = spec.split(mode)
  skeleton = skeleton or load_skeleton()
  workers = workers or os.cpu_count() or 1
  skipped = collections.Counter()
  images, per_image = load_annotations(split.annotations, spec, skipped)
  no_ann = sum(1 for i in images if i not in per_image)
  paths = image_paths(split, images, split.annotations)

  mask_errors = {}
  if generate_masks:
    jobs = [(iid, int(images[iid]["height"]), int(images[iid]["width"]), anns, paths[iid][1])
            for iid, anns in per_image.items()]
    for iid, err in _pool_map(_mask_job, jobs, workers, "masks"):
      if err:
        mask_errors[iid] = err
        log.warning("%s: image %s: mask not written: %s", split.annotations, iid, err)

  # Records.
  recs, persons, main_total = [], 0, 0
  images_used = set()
  for iid, anns in per_image.items():
    persons += len(anns)
    meta = images[iid]
    if iid in mask_errors:
      skipped["mask_error"] += 1
      continue
    main = select_main_persons(anns, spec)
    main_total += len(main)
    if not main:
      skipped["image_without_main_person"] += 1
      continue
    mask_rel = mask_path_for(split, meta["file_name"])[0]
    if not (generate_masks or os.path.exists(paths[iid][1])):
      mask_rel = ""
    kp = np.array([a["keypoints"] for a in anns], np.float64)
    joints, vis = convert_keypoints(kp, spec, skeleton)
    bbox = np.array([a["bbox"] for a in anns], np.float64)
    centres = np.stack([bbox[:, 0] + bbox[:, 2] / 2, bbox[:, 1] + bbox[:, 3] / 2], -1)
    keypointed = np.array([a["num_keypoints"] > 0 for a in anns])
    for m in (main if spec.duplicate_each_person else main[:1]):
      order = [m] + [i for i in range(len(anns)) if i != m and keypointed[i]]
      recs.append(dict(
          image_id=int(iid), height=int(meta["height"]), width=int(meta["width"]),
          image_path=os.path.join(split.images_rel, meta["file_name"]), mask_path=mask_rel,
          dataset=spec.dataset, skeleton=skeleton.name, person_idx=int(m),
          joints=joints[order], visibility=vis[order], centers=centres[order],
          scales=bbox[order, 3]))
      images_used.add(iid)

  if check_files:
    checked = {int(i): p for i, p in paths.items() if i in images_used}
    jobs = sorted({(r["image_id"], checked[r["image_id"]][0],
                    checked[r["image_id"]][1] if r["mask_path"] else "") for r in recs})
    bad = {}
    for iid, reason in _pool_map(_check_job, jobs, workers, "check files"):
      if reason:
        bad[iid] = reason
        log.warning("%s: image %s dropped: %s", split.annotations, iid, reason)
    for reason in bad.values():
      skipped[reason] += 1
    recs = [r for r in recs if r["image_id"] not in bad]
    images_used -= set(bad)

  if not recs:
    raise SpecError(f"{split.annotations}: no records left after filtering "
                    f"(skipped: {dict(skipped) or 'none'}); nothing written")

  rng = np.random.default_rng(seed)
  recs = [recs[i] for i in rng.permutation(len(recs))]
  out_dir = os.path.dirname(os.path.abspath(output))
  os.makedirs(out_dir, exist_ok=True)
  files = []
  num_partitions = max(1, num_partitions)
  for p in range(num_partitions):
    part = recs[p::num_partitions]
    pieces = max(1, num_shards)
    size = len(part) // pieces
    for s in range(pieces):
      chunk = part[s * size:(s + 1) * size] if s < pieces - 1 else part[s * size:]
      name = records_lib.shard_name(output, p, num_partitions, s, num_shards)
      records_lib.write_records(name, chunk)
      files.append(os.path.basename(name))
  summary = {
      "mode": mode, "dataset": spec.dataset, "annotation_file": split.annotations,
      "root": spec.root, "skeleton": skeleton.name,
      "images": len(images), "images_without_annotations": no_ann,
      "images_with_records": len(images_used), "persons": persons,
      "main_persons": main_total, "records": len(recs),
      "masks_written": (len(per_image) - len(mask_errors)) if generate_masks else 0,
      "skipped": dict(sorted(skipped.items())), "files": files,
  }
  fileio.write_json(output + ".summary.json", summary, indent=2)
  return summary
