"""DetectNet_v2 clustering speed: `postprocess.decode` against a plain-loop reference.

  python benchmarks/detectnet_v2_clustering.py            # 20 images, ~500 candidates each
  python benchmarks/detectnet_v2_clustering.py --smoke    # 2 small images, one repeat (CI)

Maps are synthetic network outputs at the KITTI spec's size (input 1248 x 384, stride 16 ->
output grid 78 x 24), 3 classes. Per class a few objects are drawn as coverage blobs (a
Gaussian of the box's size, peak 0.6-1.0) whose cells regress the object's box with noise
(N(0, 0.05) in units of 35 px, i.e. ~1.75 px), plus sparse background cells with low coverage
and random boxes (DBSCAN noise). --candidates sets the target number of cells above the
coverage threshold per image (all classes); the real count is printed.

The reference (`reference_decode`, below) is a straightforward implementation with the same
semantics: loops over cells, a double loop for the pairwise IoU, scikit-learn's DBSCAN
expansion written out (neighbour lists, weighted core test, depth-first stack), the original's
selection-sort NMS with the "+1 pixel" IoU. Both must return the same detections (same classes
and order, confidences within 1e-9, boxes within 1e-6 px); the script exits with status 1 if
they do not.

Timing: single thread (OMP/BLAS threads pinned to 1 before numpy is imported); decode gets one
warm-up pass, then --repeats passes over all images, the reference --ref_repeats passes. Per
image: the median and the best pass of wall time (time.perf_counter) and the median CPU time of
the process (time.process_time, less sensitive to other processes on a shared machine). Config
parsing is included in decode's time (it takes the plain config dict, as callers do).
Clustering settings: coverage threshold 0.005, eps 0.15, min_samples 1, min height 4, DBSCAN
confidence threshold 0.1, NMS IoU 0.3 and confidence 0.1 (HYBRID uses both).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
  os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402  (after pinning the BLAS threads)

from bpnet_jax.detectnet_v2 import postprocess  # noqa: E402

CLASSES = ("car", "cyclist", "pedestrian")
STRIDE, SCALE, OFFSET = 16, 35.0, 0.5


# ---------------------------------------------------------------------------------------------
# Synthetic maps


def synthetic_maps(rng, h, w, candidates, threshold=0.005):
  """One image: cov (h, w, 3) float32, bbox (h, w, 12) float32 with ~`candidates` cells above
  `threshold` over all classes (objects ~70-85%, isolated background cells the rest)."""
  nc = len(CLASSES)
  cov = np.zeros((h, w, nc), np.float32)
  bbox = rng.normal(0, 1.0, (h, w, 4 * nc)).astype(np.float32)   # background regressions
  rows, cols = np.mgrid[0:h, 0:w]
  px, py = STRIDE * cols + OFFSET, STRIDE * rows + OFFSET
  per_class = candidates / nc
  for c in range(nc):
    plane = np.zeros((h, w), np.float32)
    obj_cells, target = 0, 0.8 * per_class
    for _ in range(200):
      if obj_cells >= 0.9 * target:
        break
      bw, bh = rng.uniform(24, 240), rng.uniform(24, 150)
      x1, y1 = rng.uniform(-20, w * STRIDE - bw + 20), rng.uniform(-20, h * STRIDE - bh + 20)
      cx, cy = (x1 + bw / 2 - OFFSET) / STRIDE, (y1 + bh / 2 - OFFSET) / STRIDE
      sx, sy = max(bw / STRIDE / 4, 0.7), max(bh / STRIDE / 4, 0.7)
      blob = rng.uniform(0.6, 1.0) * np.exp(-0.5 * (((cols - cx) / sx) ** 2
                                                    + ((rows - cy) / sy) ** 2))
      cells = blob > threshold
      if (plane[cells] > 0).any() or obj_cells + cells.sum() > 1.2 * target:
        continue                                  # keep objects apart and near the target
      plane[cells] = blob[cells]
      t = np.stack([(px - x1) / SCALE, (py - y1) / SCALE, (x1 + bw - px) / SCALE,
                    (y1 + bh - py) / SCALE], -1)
      t = t + rng.normal(0, 0.05, t.shape)
      bbox[..., 4 * c:4 * c + 4][cells] = t[cells]
      obj_cells += int(cells.sum())
    free = np.flatnonzero(plane.ravel() == 0)
    noise = rng.choice(free, size=min(len(free), int(round(per_class - obj_cells))),
                       replace=False)
    plane.ravel()[noise] = rng.uniform(threshold * 1.01, 0.3, len(noise))
    cov[..., c] = plane
  return cov, bbox


def make_config(algorithm):
  cfg = postprocess.default_postprocessing_config(CLASSES)
  for name in CLASSES:
    cfg["target_class_config"][name]["clustering_config"].update(
        coverage_threshold=0.005, clustering_algorithm=algorithm, dbscan_eps=0.15,
        dbscan_min_samples=1, minimum_bounding_box_height=4, dbscan_confidence_threshold=0.1,
        nms_iou_threshold=0.3, nms_confidence_threshold=0.1)
  return cfg


# ---------------------------------------------------------------------------------------------
# Plain reference


def _iou(a, b, plus_one):
  d = 1.0 if plus_one else 0.0
  iw = min(a[2], b[2]) - max(a[0], b[0]) + d
  ih = min(a[3], b[3]) - max(a[1], b[1]) + d
  if iw <= 0 or ih <= 0:
    return 0.0
  inter = iw * ih
  union = (a[2] - a[0] + d) * (a[3] - a[1] + d) + (b[2] - b[0] + d) * (b[3] - b[1] + d) - inter
  if not plus_one:
    union += 1e-5
  return inter / union


def _dbscan(boxes, weights, eps, min_mass):
  n = len(boxes)
  nbrs = []
  for i in range(n):
    nbrs.append([j for j in range(n) if 1.0 - _iou(boxes[i], boxes[j], False) <= eps])
  core = [sum(weights[j] for j in nbrs[i]) >= min_mass for i in range(n)]
  labels = [-1] * n
  k = 0
  for i in range(n):
    if labels[i] != -1 or not core[i]:
      continue
    stack = [i]
    while stack:
      p = stack.pop()
      if labels[p] != -1:
        continue
      labels[p] = k
      if core[p]:
        stack.extend(j for j in nbrs[p] if labels[j] == -1)
    k += 1
  return labels, k


def _nms(boxes, scores, nt, threshold):
  """The original's selection-sort hard NMS; returns kept indices by descending score."""
  order = list(range(len(boxes)))
  s = list(scores)
  n = len(order)
  i = 0
  while i < n:
    best = i
    for pos in range(i + 1, n):
      if s[order[pos]] > s[order[best]]:
        best = pos
    order[i], order[best] = order[best], order[i]
    top = boxes[order[i]]
    pos = i + 1
    while pos < n:
      if _iou(top, boxes[order[pos]], True) > nt:
        s[order[pos]] = 0.0
      pos += 1
    i += 1
  return [k for k in order if s[k] > threshold]


def reference_decode(cov, bbox, config, class_names):
  params = postprocess.resolve_postprocessing_config(config, class_names)
  h, w = cov.shape[:2]
  width, height = w * params.stride, h * params.stride
  dets = []
  for c, p in enumerate(params.classes):
    boxes, weights = [], []
    for r in range(h):
      for q in range(w):
        v = float(cov[r, q, c])
        if v > p.coverage_threshold:
          t = [float(x) for x in bbox[r, q, 4 * c:4 * c + 4]]
          x0, y0 = q * params.stride + params.offset, r * params.stride + params.offset
          x1 = min(max(x0 - params.scale * t[0], 0.0), width)
          y1 = min(max(y0 - params.scale * t[1], 0.0), height)
          x2 = min(max(x0 + params.scale * t[2], x1), width)
          y2 = min(max(y0 + params.scale * t[3], y1), height)
          boxes.append((x1, y1, x2, y2))
          weights.append(v)
    found = []
    if p.algorithm in ("DBSCAN", "HYBRID"):
      labels, k = _dbscan(boxes, weights, p.eps, p.min_mass)
      survivors = []
      for cl in range(k):
        members = [i for i in range(len(boxes)) if labels[i] == cl]
        total = sum(weights[i] for i in members)
        box = tuple(sum(weights[i] * boxes[i][j] for i in members) / total for j in range(4))
        if p.confidence_model == "aggregate_cov":
          conf = total
        else:
          ws = [weights[i] for i in members]
          mean = total / len(ws)
          conf = (mean - min(ws)) / (max(ws) - min(ws)) if max(ws) > min(ws) else mean
        if box[3] - box[1] > p.min_height and conf >= p.dbscan_threshold:
          found.append((box, conf))
          survivors.extend(members)
      if p.algorithm == "HYBRID":
        survivors.sort()
        keep = _nms([boxes[i] for i in survivors], [weights[i] for i in survivors],
                    p.nms_iou, p.nms_threshold)
        found = [(boxes[survivors[i]], weights[survivors[i]]) for i in keep]
    else:
      keep = _nms(boxes, weights, p.nms_iou, p.nms_threshold)
      found = [(boxes[i], weights[i]) for i in keep]
    if p.algorithm != "DBSCAN":
      found = [f for f in found if f[0][3] - f[0][1] > p.min_height]
    found.sort(key=lambda f: -f[1])
    for box, conf in found:
      dets.append({"class_id": c, "class_name": class_names[c], "box": tuple(box),
                   "confidence": conf})
  return dets


# ---------------------------------------------------------------------------------------------


def same(a, b, tol=1e-9):
  if len(a) != len(b):
    return False
  for x, y in zip(a, b):
    if x["class_id"] != y["class_id"] or abs(x["confidence"] - y["confidence"]) > tol:
      return False
    if max(abs(u - v) for u, v in zip(x["box"], y["box"])) > tol * 1e3:
      return False
  return True


def time_per_image(fn, images, config, repeats):
  """Per-image ms over `repeats` passes: (median wall, min wall, median CPU), last outputs."""
  wall, cpu = [], []
  out = None
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    out = [fn(cov, bbox, config, CLASSES) for cov, bbox in images]
    wall.append((time.perf_counter() - t0) / len(images) * 1e3)
    cpu.append((time.process_time() - c0) / len(images) * 1e3)
  return (float(np.median(wall)), float(np.min(wall)), float(np.median(cpu))), out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true", help="2 small images, 1 repeat")
  ap.add_argument("--images", type=int, default=20)
  ap.add_argument("--candidates", type=int, default=500, help="target candidates per image")
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--ref_repeats", type=int, default=1)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  h, w = 24, 78
  if args.smoke:
    args.images, args.candidates, args.repeats, args.ref_repeats = 2, 60, 1, 1
    h, w = 12, 20
  rng = np.random.default_rng(args.seed)
  images = [synthetic_maps(rng, h, w, args.candidates) for _ in range(args.images)]
  counts = [int((cov > 0.005).sum()) for cov, _ in images]
  load = ", load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores{load}, "
        f"python {platform.python_version()}, numpy {np.__version__}, 1 thread")
  print(f"{args.images} synthetic images, input {w * STRIDE}x{h * STRIDE} (grid {w}x{h}), "
        f"{len(CLASSES)} classes, candidates per image: mean {np.mean(counts):.0f} "
        f"(min {min(counts)}, max {max(counts)})")
  print()
  print("| algorithm | implementation | ms/image (median) | ms/image (best pass) | "
        "CPU ms/image (median) | detections/image |")
  print("|---|---|---|---|---|---|")
  ok_all = True
  summary = []
  for algo in ("DBSCAN", "NMS", "HYBRID"):
    config = make_config(algo)
    postprocess.decode(*images[0], config, CLASSES)               # warm-up
    fast_t, fast = time_per_image(postprocess.decode, images, config, args.repeats)
    ref_t, ref = time_per_image(reference_decode, images, config, args.ref_repeats)
    ok = all(same(a, b) for a, b in zip(fast, ref))
    ok_all &= ok
    for name, t, dets in (("postprocess.decode", fast_t, fast), ("reference (loops)", ref_t, ref)):
      print(f"| {algo} | {name} | {t[0]:.3f} | {t[1]:.3f} | {t[2]:.3f} | "
            f"{np.mean([len(d) for d in dets]):.1f} |")
    summary.append(f"{algo}: speed-up {ref_t[0] / fast_t[0]:.0f}x (medians), same detections: "
                   f"{'yes' if ok else 'NO'}")
  print()
  for line in summary:
    print(line)
  if not ok_all:
    print("ERROR: decode and the reference disagree", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
