"""`bpnet dataset_convert`: COCO person-keypoints JSON -> training records (+ masks).

For the chosen split it reads the annotation file, keeps "main persons" (enough keypoints,
segmentation area >= min_width*min_height, bbox centre not within ratio*max(w, h) of an already
accepted main person -- that person's size, fixing the original's use of the image's last
annotation), and writes one record per main person (or per image without duplication) with the
main person first and every other keypointed person after it, joints converted to the skeleton by
name (the neck as the midpoint of the shoulders, labelled only when both are).

Masks (255 = valid, 0 = ignore; ignore = (crowd AND NOT labelled) OR unlabelled, i.e. people
without keypoints). Every image with records needs one, from exactly one of:
  - `--generate_masks`: written as `<masks dir>/<image stem>.png`, lossless and exactly 0/255;
  - a mask file already in the masks dir: `<stem>.png` (bpnet_jax's), else `<stem>.jpg` (the
    original TAO converter's: it wrote masks as lossy JPEG under the image's own name). JPEG
    ringing leaves values near 0 and 255, so the input pipeline reads every mask as valid where
    the value is >= MASK_THRESHOLD (128, the midpoint) and ignore below;
  - `--no_masks`: no mask at all. Records then say so (`no_masks`, and an empty mask_path), and
    training logs once that crowds and unlabelled people count as background.
Without --generate_masks and --no_masks, an image with records whose mask file is missing fails
the conversion (one line naming the split and the first such image) before anything is written.
Every file_name, and its mask, must stay inside the split's images (masks) dir -- no absolute
paths, no '..' or symlink out (see `dataset_spec`); the JSON is rejected before anything is
written otherwise.

People beyond `max_people` in a record (the input pipeline's `dataloader.max_people`, which keeps
the first max_people: main person first) are kept in the records but counted in the summary.

The per-image work (mask, main persons, file checks, record encoding) runs in `workers`
processes; results come back in annotation order and the records are shuffled by one seeded
permutation afterwards, so the output bytes do not depend on the number of workers.
Outputs are written under temporary names and renamed at the end, so an interrupted or failed
conversion leaves nothing that looks complete. A JSON summary (`OUT.summary.json`) counts images,
persons, records, masks by source, people beyond max_people and every skipped item with its
reason.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import multiprocessing
import os
import sys
import time
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

# Mask file names looked for in the masks dir, in order: bpnet_jax's lossless masks, then the
# original's JPEG masks (read with the input pipeline's threshold).
MASK_SUFFIXES = (".png", ".jpg")
# The default of `dataloader.max_people` (bpnet_jax/config.py; the CLI passes the config's own).
DEFAULT_MAX_PEOPLE = 20
# Fewer images than this are converted in this process: a spawned worker takes ~3 s to start
# (it imports the package, jax included) and an image ~5-10 ms of work, so below a few hundred
# images the workers would not pay for themselves.
MIN_IMAGES_FOR_WORKERS = 500


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


def _segmentation_rle(seg, h: int, w: int):
  """One RLE of a COCO segmentation (polygons merged; uncompressed RLE compressed)."""
  if isinstance(seg, list):
    return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
  if isinstance(seg.get("counts"), list):
    return mask_utils.frPyObjects(seg, h, w)
  return seg


def ignore_mask(anns: list, h: int, w: int) -> np.ndarray:
  """(h, w) uint8 mask of one image: 255 = valid, 0 = ignore.

  ignore = (crowd AND NOT labelled) OR unlabelled. Each class's segmentations are merged as
  run-length encodings (a union without touching pixels) and decoded once, so an image costs at
  most three full-size decodes whatever its number of people, and none without crowds or
  unlabelled people.
  """
  by_kind = {"crowd": [], "unlabeled": [], "labeled": []}
  for a in anns:
    if a.get("segmentation"):
      kind = ("crowd" if a.get("iscrowd") else
              "unlabeled" if a["num_keypoints"] <= 0 else "labeled")
      by_kind[kind].append(_segmentation_rle(a["segmentation"], h, w))

  def union(kind):      # (h, w) bool
    return mask_utils.decode(mask_utils.merge(by_kind[kind])).astype(bool)

  ignore = np.zeros((h, w), bool)
  if by_kind["crowd"]:
    ignore |= union("crowd") & ~union("labeled") if by_kind["labeled"] else union("crowd")
  if by_kind["unlabeled"]:
    ignore |= union("unlabeled")
  return np.where(ignore, np.uint8(0), np.uint8(255))


def write_mask(anns: list, h: int, w: int, out_path: str) -> Optional[str]:
  """Writes one image's ignore mask as a 1-bit PNG; None, or why it could not (a malformed
  segmentation is reported per image and the conversion goes on).

  1-bit: OpenCV reads it back as 0/255 (any flags), and it decodes ~2x faster than an 8-bit PNG
  of the same mask, which the training input pipeline does for every sample.
  """
  try:
    ok, png = cv2.imencode(".png", ignore_mask(anns, h, w), [cv2.IMWRITE_PNG_BILEVEL, 1])
    if not ok:
      return f"cannot encode {out_path}"
    fileio.write_bytes(out_path, png.tobytes())
    return None
  except Exception as e:  # pycocotools and malformed JSON raise many types.
    return f"{type(e).__name__}: {e}"


def _image_problem(image_path: str) -> Optional[str]:
  """None if the image exists and decodes (at 1/8 size: enough to know), else the reason."""
  if not os.path.exists(image_path):
    return "image_missing"
  if cv2.imread(image_path, cv2.IMREAD_REDUCED_GRAYSCALE_8) is None:
    return "image_unreadable"
  return None


@dataclasses.dataclass(frozen=True)
class Context:
  """What every image's job shares (sent to each worker process once)."""
  spec: DatasetSpec
  skeleton: Skeleton
  images_rel: str
  generate_masks: bool
  no_masks: bool
  check_files: bool
  max_people: int


@dataclasses.dataclass(frozen=True)
class ImageJob:
  """One annotated image: its COCO entry, annotations (in JSON order) and checked paths.

  masks: (relative, absolute) path of each mask file that may hold its mask, in the order they
  are looked for (`MASK_SUFFIXES`; only the .png when masks are generated, none with no_masks).
  """
  image_id: int
  meta: dict
  anns: list
  image_path: str
  masks: tuple


@dataclasses.dataclass
class ImageResult:
  """What one image gives: its encoded records, or why it gives none.

  mask: 'generated', 'png', 'jpg' (the file its records name), 'none' (no_masks), 'missing'
  (no file: the conversion fails), or '' when the image was skipped before its mask was needed.
  """
  image_id: int
  persons: int
  main_persons: int = 0
  records: list = dataclasses.field(default_factory=list)
  skip: Optional[str] = None
  error: str = ""
  mask: str = ""
  records_over_max_people: int = 0
  people_over_max_people: int = 0


def _mask_source(ctx: Context, job: ImageJob) -> tuple[str, str]:
  """(kind, relative path for the records) of an image's mask; see `ImageResult.mask`."""
  if ctx.no_masks:
    return "none", ""
  if ctx.generate_masks:
    return "generated", job.masks[0][0]
  for rel, path in job.masks:
    if os.path.isfile(path):
      return os.path.splitext(path)[1][1:], rel
  return "missing", ""


def _image_records(ctx: Context, job: ImageJob, main: list, mask_rel: str, result: ImageResult):
  """Appends the image's encoded records (one per main person, or the first) to result."""
  anns, meta = job.anns, job.meta
  kp = np.array([a["keypoints"] for a in anns], np.float64)
  joints, vis = convert_keypoints(kp, ctx.spec, ctx.skeleton)
  bbox = np.array([a["bbox"] for a in anns], np.float64)
  centres = np.stack([bbox[:, 0] + bbox[:, 2] / 2, bbox[:, 1] + bbox[:, 3] / 2], -1)
  keypointed = [i for i, a in enumerate(anns) if a["num_keypoints"] > 0]
  for m in (main if ctx.spec.duplicate_each_person else main[:1]):
    order = [m] + [i for i in keypointed if i != m]
    beyond = len(order) - ctx.max_people
    if beyond > 0:
      result.records_over_max_people += 1
      result.people_over_max_people += beyond
    result.records.append(records_lib.encode(dict(
        image_id=job.image_id, height=int(meta["height"]), width=int(meta["width"]),
        image_path=os.path.join(ctx.images_rel, meta["file_name"]), mask_path=mask_rel,
        no_masks=ctx.no_masks, dataset=ctx.spec.dataset, skeleton=ctx.skeleton.name,
        person_idx=int(m), joints=joints[order], visibility=vis[order], centers=centres[order],
        scales=bbox[order, 3])))


def convert_image(ctx: Context, job: ImageJob) -> ImageResult:
  """All the work for one image: mask, main persons, file checks, records (bytes)."""
  result = ImageResult(job.image_id, persons=len(job.anns))
  if ctx.generate_masks:
    error = write_mask(job.anns, int(job.meta["height"]), int(job.meta["width"]), job.masks[0][1])
    if error:
      result.skip, result.error = "mask_error", error
      return result
  main = select_main_persons(job.anns, ctx.spec)
  result.main_persons = len(main)
  if not main:
    result.skip = "image_without_main_person"
    return result
  if ctx.check_files:
    result.skip = _image_problem(job.image_path)
    if result.skip:
      return result
  result.mask, mask_rel = _mask_source(ctx, job)
  if result.mask != "missing":      # a missing mask fails the conversion: no records needed
    _image_records(ctx, job, main, mask_rel, result)
  return result


_worker_context: Optional[Context] = None


def _init_worker(ctx: Context) -> None:
  global _worker_context
  _worker_context = ctx


def _convert_image_in_worker(job: ImageJob) -> ImageResult:
  return convert_image(_worker_context, job)


def _pool_context():
  """The multiprocessing context of the workers: 'forkserver' where the platform has it (one
  fresh, single-threaded server imports this module once and forks each worker from it; 'spawn'
  would import the package, jax included, in every worker: ~3 s of CPU apiece), else 'spawn'.
  Never plain 'fork': the caller may hold threads (JAX, tqdm's monitor)."""
  if "forkserver" in multiprocessing.get_all_start_methods():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])    # no effect once the server is running
    return context
  return multiprocessing.get_context("spawn")


def convert_images(ctx: Context, jobs: list, workers: int) -> list:
  """`convert_image` of every job, in job order, in `workers` processes (or this one).

  Each result depends only on its job, and imap returns them in order, so the results are the
  same with any number of workers.
  """
  progress = dict(total=len(jobs), desc="images", unit="img", file=sys.stderr, leave=False,
                  disable=None)     # a bar on terminals only (logs and captured stderr stay clean)
  if workers <= 1 or len(jobs) < MIN_IMAGES_FOR_WORKERS:
    return [convert_image(ctx, j) for j in tqdm.tqdm(jobs, **progress)]
  # Chunks amortise the inter-process round trip; ~16 per worker keep the load balanced.
  chunk = max(1, min(64, len(jobs) // (16 * workers)))
  workers = min(workers, -(-len(jobs) // chunk))
  with _pool_context().Pool(workers, initializer=_init_worker, initargs=(ctx,)) as pool:
    return list(tqdm.tqdm(pool.imap(_convert_image_in_worker, jobs, chunksize=chunk),
                          **progress))


def mask_candidates(split, file_name: str, suffixes=MASK_SUFFIXES, where: str = "",
                    image_path: str = "") -> tuple:
  """((relative, absolute) path, ...) of an image's possible masks `<stem><suffix>`, each
  checked to stay inside the masks dir (DataError naming `where` otherwise). A candidate that
  is the image itself (masks dir = images dir) is left out."""
  stem = os.path.splitext(file_name)[0]
  out = []
  for suffix in suffixes:
    path = resolve_inside(split.masks_dir, stem + suffix, f"{where}: its mask")
    if path != image_path:
      out.append((os.path.join(split.masks_rel, stem + suffix), path))
  return tuple(out)


def image_paths(split, images: dict, where: str, mask_suffixes=MASK_SUFFIXES) -> dict:
  """{image id: (image path, mask candidates)}, absolute, each checked to stay inside its dir.

  A COCO file_name is relative to the split's images dir and its masks `<stem><suffix>` to the
  masks dir (see `mask_candidates`); one that is absolute, or leaves its dir through '..' or a
  symlink, is a DataError naming `where` (the JSON file), the image id and the file_name. Run
  before anything is written, so a crafted JSON can neither overwrite a file elsewhere with a
  mask nor make records point at one.
  """
  out = {}
  for iid, im in images.items():
    name = im["file_name"]
    image = resolve_inside(split.images_dir, name, f"{where}: image {iid}: file_name")
    out[iid] = (image, mask_candidates(split, name, mask_suffixes,
                                       f"{where}: image {iid} (file_name {name!r})", image))
  return out


def _without_segmentation(anns: list) -> list:
  # Segmentations (most of an annotation's bytes) are only needed to make masks; leaving them
  # out shortens the hand-over to the workers.
  return [{k: v for k, v in a.items() if k != "segmentation"} for a in anns]


def _missing_masks_error(split, mode: str, results: list, paths: dict, images: dict) -> SpecError:
  """The one-line error for images with records but no mask file (first one named)."""
  missing = [r for r in results if r.mask == "missing"]
  first = missing[0].image_id
  names = [p for _, p in paths[first][1]]
  absent = (f"neither {' nor '.join(names)} exists" if len(names) > 1 else
            f"{names[0]} does not exist" if names else "no mask file name is possible")
  needing = sum(1 for r in results if r.mask)
  return SpecError(
      f"{split.annotations}: split '{mode}': image {first} ({images[first]['file_name']}) has "
      f"no mask: {absent} ({len(missing)} of {needing} images with records lack one); pass "
      "--generate_masks to write masks of crowds and unlabelled people, or --no_masks to "
      "convert without masks (they then count as background)")


def _write_shards(output: str, encoded: list, num_partitions: int, num_shards: int) -> list:
  """Writes the (already shuffled) encoded records round-robin to partitions, each split into
  num_shards files; returns the file names."""
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  files = []
  for p in range(num_partitions):
    part = encoded[p::num_partitions]
    pieces = max(1, num_shards)
    size = len(part) // pieces
    for s in range(pieces):
      chunk = part[s * size:(s + 1) * size] if s < pieces - 1 else part[s * size:]
      name = records_lib.shard_name(output, p, num_partitions, s, num_shards)
      records_lib.write_records(name, chunk, encode_fn=bytes)
      files.append(os.path.basename(name))
  return files


def convert(spec_path: str, output: str, mode: str = "train", generate_masks: bool = False,
            check_files: bool = False, num_partitions: int = 1, num_shards: int = 0,
            skeleton: Optional[Skeleton] = None, workers: Optional[int] = None,
            seed: int = 42, no_masks: bool = False, max_people: int = DEFAULT_MAX_PEOPLE,
            timings: Optional[dict] = None) -> dict:
  """Runs the conversion; returns the summary dict (also written to OUTPUT.summary.json).

  workers: processes for the per-image work (None: one per core; the output bytes are the same
  for any count). no_masks: convert without masks (else every image with records needs one:
  generated, or a file in the masks dir). max_people: the training config's
  `dataloader.max_people`, for counting people beyond it. timings, if given, receives the
  seconds of each phase ('read': JSON and paths, 'images': per-image work, 'write'), and
  this process's CPU seconds in each ('read_cpu', ...: with workers, 'images_cpu' is the
  hand-over of jobs and results, the part that more workers do not spread).
  """
  if generate_masks and no_masks:
    raise SpecError("--generate_masks and --no_masks contradict each other; pass one")
  if int(max_people) < 1:
    raise SpecError(f"max_people must be >= 1, got {max_people!r}")
  clock = [(time.perf_counter(), time.process_time())]   # phase boundaries: (wall, CPU) s
  spec = load_spec(spec_path)
  split = spec.split(mode)
  skeleton = skeleton or load_skeleton()
  workers = workers or os.cpu_count() or 1
  skipped = collections.Counter()
  images, per_image = load_annotations(split.annotations, spec, skipped)
  suffixes = () if no_masks else MASK_SUFFIXES[:1] if generate_masks else MASK_SUFFIXES
  paths = image_paths(split, images, split.annotations, suffixes)
  ctx = Context(spec, skeleton, split.images_rel, generate_masks, no_masks, check_files,
                int(max_people))
  jobs = [ImageJob(int(iid), {k: images[iid][k] for k in ("height", "width", "file_name")},
                   anns if generate_masks else _without_segmentation(anns), *paths[iid])
          for iid, anns in per_image.items()]
  clock.append((time.perf_counter(), time.process_time()))
  results = convert_images(ctx, jobs, workers)
  clock.append((time.perf_counter(), time.process_time()))

  for r in results:
    if r.skip:
      skipped[r.skip] += 1
    if r.error:
      log.warning("%s: image %s: mask not written: %s", split.annotations, r.image_id, r.error)
    elif r.skip in ("image_missing", "image_unreadable"):
      log.warning("%s: image %s dropped: %s", split.annotations, r.image_id, r.skip)
  if any(r.mask == "missing" for r in results):
    raise _missing_masks_error(split, mode, results, paths, images)
  encoded = [rec for r in results for rec in r.records]
  if not encoded:
    raise SpecError(f"{split.annotations}: no records left after filtering "
                    f"(skipped: {dict(skipped) or 'none'}); nothing written")
  over = collections.Counter()
  for r in results:
    over["records"] += r.records_over_max_people
    over["people"] += r.people_over_max_people
  if over["records"]:
    log.warning("%s: %d records hold more than max_people=%d people; training keeps the first "
                "%d of each (main person first) and drops %d people (raise "
                "dataloader.max_people, and --max_people here, to keep them)",
                split.annotations, over["records"], max_people, max_people, over["people"])

  rng = np.random.default_rng(seed)
  encoded = [encoded[i] for i in rng.permutation(len(encoded))]
  files = _write_shards(output, encoded, max(1, num_partitions), num_shards)
  mask_kinds = collections.Counter(r.mask for r in results if r.records)
  summary = {
      "mode": mode, "dataset": spec.dataset, "annotation_file": split.annotations,
      "root": spec.root, "skeleton": skeleton.name,
      "images": len(images),
      "images_without_annotations": sum(1 for i in images if i not in per_image),
      "images_with_records": sum(1 for r in results if r.records),
      "persons": sum(r.persons for r in results),
      "main_persons": sum(r.main_persons for r in results), "records": len(encoded),
      "masks": "generated" if generate_masks else "none" if no_masks else "files",
      "no_masks": bool(no_masks), "mask_sources": dict(sorted(mask_kinds.items())),
      "masks_written": sum(1 for r in results if r.skip != "mask_error") if generate_masks else 0,
      "max_people": int(max_people), "records_over_max_people": over["records"],
      "people_over_max_people": over["people"],
      "skipped": dict(sorted(skipped.items())), "files": files,
  }
  fileio.write_json(output + ".summary.json", summary, indent=2)
  clock.append((time.perf_counter(), time.process_time()))
  if timings is not None:
    for name, (wall0, cpu0), (wall1, cpu1) in zip(("read", "images", "write"), clock, clock[1:]):
      timings[name], timings[name + "_cpu"] = wall1 - wall0, cpu1 - cpu0
  return summary
