"""Post-processing speed and accuracy: `bpnet_jax.decode` against the original-style decoder.

  python benchmarks/decode.py            # all annotated images of tests/data/coco_mini
  python benchmarks/decode.py --smoke    # a handful of images, one repeat (CI)
  python benchmarks/decode.py --reference_only   # without bpnet_jax.decode

No network is involved: for every image of the COCO annotation file, the ground-truth people
are rendered into IDEAL network outputs (heatmaps + background and PAFs from
`bpnet_jax.targets`, sigma 7 px, PAF ortho threshold 1 cell, as the default config) on the
output grid the original's default `adjust_network_input` mode gives at input_shape 368x368
(uniform scale s, input round(h*s) x round(w*s), output ceil(H/8) x ceil(W/8)). GT keypoints are
mapped to network-input pixels by x_in = (x + 0.5) * s - 0.5; crowd annotations are not
rendered. Rendering happens once, up front, and is not timed.

Each map pair is then decoded by `bpnet_jax.decode` (the fast decoder) and by
`benchmarks/reference_decoder.decode_reference` (a straightforward port of the original
post-processor). Per-image wall time is measured with time.perf_counter, single-threaded
(OMP/BLAS/cv2/XLA threads are pinned to 1 before numpy is imported; --threads changes that).
The fast decoder gets a warm-up pass (jit compilation, caches; its time is printed separately)
and then --repeats timed passes, and its per-image time is the median over the repeats; the
reference runs --ref_repeats passes (median likewise). Keypoints go back to image pixels by
x = (x_in + 0.5) / s - 0.5, to COCO-17 order by name (the neck is dropped; missing joints are
0,0,0, found ones get visibility 1, coordinates stay float unlike the original's int()), the
person score is the decoder's score, and pycocotools COCOeval (keypoints, maxDets [20] as the
original) scores both decoders against the same annotation file.

Image set: by default every image with at least one annotation (crowd-only images and
people without labelled keypoints included; they simply render empty or partial maps). Images
without any annotation render all-zero maps, on which both decoders trivially find nobody:
they cannot change AP or AR (no GT, no detections) and would only dilute the timings, so they
are left out unless --all_images is given (then COCOeval runs over all GT image ids, as the
original's evaluate does).

Since the maps are ideal, AP measures the decoders (peak finding, limb scoring, assembly,
coordinate mapping), not a model; it stays below 1 where ideal maps are still ambiguous
(overlapping people, joints closer than the heatmap sigma, limbs that leave the image...).
"""

import argparse
import contextlib
import io
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_ANN = os.path.join(ROOT, "tests", "data", "coco_mini", "annotations",
                           "person_keypoints_train2017.json")
STRIDE = 8


def pin_threads(n):
  """Must run before numpy / cv2 / jax are imported."""
  for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[var] = str(n)
  if n == 1:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
      os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false "
                                 "intra_op_parallelism_threads=1").strip()


def network_geometry(img_h, img_w, in_h, in_w):
  """adjust_network_input: uniform scale s, network input (H, W) and output grid (h, w)."""
  s = in_h / img_h if img_w / img_h > in_w / in_h else in_w / img_w
  net_h, net_w = round(img_h * s), round(img_w * s)
  return s, (net_h, net_w), (-(-net_h // STRIDE), -(-net_w // STRIDE))


def gt_people(anns, skeleton, coco_names, s):
  """Non-crowd GT people as (P, J, 2) network-input pixels and (P, J) validity."""
  import numpy as np
  src, derived = skeleton.from_dataset(coco_names)
  joints, valid = [], []
  for ann in anns:
    if ann.get("iscrowd", 0) or not ann.get("num_keypoints", 1):
      continue
    kp = np.asarray(ann["keypoints"], np.float64).reshape(-1, 3)
    xy = np.zeros((skeleton.num_joints, 2))
    ok = np.zeros(skeleton.num_joints, bool)
    for j in range(skeleton.num_joints):
      if src[j] >= 0:
        xy[j], ok[j] = kp[src[j], :2], kp[src[j], 2] > 0
      elif derived[j, 0] >= 0:
        a, b = kp[derived[j, 0]], kp[derived[j, 1]]
        xy[j], ok[j] = (a[:2] + b[:2]) / 2, a[2] > 0 and b[2] > 0
    if ok.any():
      joints.append((xy + 0.5) * s - 0.5)
      valid.append(ok)
  return (np.asarray(joints, np.float32).reshape(-1, skeleton.num_joints, 2),
          np.asarray(valid, bool).reshape(-1, skeleton.num_joints))


def make_renderer(skeleton, grid, max_people, sigma, ortho):
  """One jitted renderer on a fixed (grid, people) shape: labels of a cell do not depend on
  the grid size, so each image's maps are the top-left crop of the full-grid ones."""
  import jax
  import numpy as np

  from bpnet_jax import targets

  @jax.jit
  def full(joints, valid):
    return (targets.heatmaps(joints, valid, grid, STRIDE, sigma),
            targets.pafs(joints, valid, skeleton, grid, STRIDE, ortho))

  def render(joints, valid, out_grid):
    """Ideal (h, w, J+1) heatmap (background last) and (h, w, 2L) PAF."""
    pj = np.zeros((max_people, skeleton.num_joints, 2), np.float32)
    pv = np.zeros((max_people, skeleton.num_joints), bool)
    pj[:len(joints)], pv[:len(valid)] = joints, valid
    heat, paf = (np.asarray(m)[:out_grid[0], :out_grid[1]] for m in full(pj, pv))
    bkg = np.clip(1.0 - heat.max(axis=-1, keepdims=True), 0.0, 1.0)
    return (np.ascontiguousarray(np.concatenate([heat, bkg], -1), np.float32),
            np.ascontiguousarray(paf, np.float32))
  return render


def to_coco(people, image_id, s, skeleton):
  """Decoder output (network-input pixels, J joints) -> COCO keypoint result dicts."""
  import numpy as np
  idx = skeleton.to_coco
  out = []
  for person in people:
    kps = np.asarray(person["keypoints"], np.float64)
    coco = np.zeros((len(idx), 3))
    for k, j in enumerate(idx):
      if j >= 0 and kps[j, 2] > 0:
        coco[k] = ((kps[j, 0] + 0.5) / s - 0.5, (kps[j, 1] + 0.5) / s - 0.5, 1.0)
    out.append({"image_id": image_id, "category_id": 1,
                "keypoints": [float(v) for v in coco.reshape(-1)],
                "score": float(person["score"])})
  return out


def evaluate(gt, results, image_ids, verbose):
  """COCOeval keypoints, maxDets [20]: (AP, AP50, AP75, AR)."""
  from pycocotools.cocoeval import COCOeval
  if not results:
    return (0.0, 0.0, 0.0, 0.0)
  quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
  with quiet:
    dt = gt.loadRes(results)
    ev = COCOeval(gt, dt, "keypoints")
    ev.params.imgIds = sorted(image_ids)
    ev.params.maxDets = [20]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  st = ev.stats
  return (st[0], st[1], st[2], st[5])


def time_decoder(fn, maps, repeats):
  """Runs fn over every image `repeats` times: (outputs of the last pass, (N,) median seconds)."""
  import numpy as np
  times = np.zeros((max(repeats, 1), len(maps)))
  outs = []
  for r in range(max(repeats, 1)):
    outs = []
    for i, (heat, paf) in enumerate(maps):
      t = time.perf_counter()
      outs.append(fn(heat, paf))
      times[r, i] = time.perf_counter() - t
  return outs, np.median(times, axis=0)


def compare(fast_out, ref_out):
  """Agreement: (#images with identical outputs, #fast people with an identical reference
  person (keypoints within 1e-3 px, score within 1e-5), #reference people)."""
  import numpy as np
  def same(p, q):
    return (np.abs(np.asarray(p["keypoints"], np.float64)
                   - np.asarray(q["keypoints"], np.float64)).max() < 1e-3
            and abs(p["score"] - q["score"]) < 1e-5)
  images = people = 0
  for f, r in zip(fast_out, ref_out):
    matched = sum(any(same(p, q) for q in r) for p in f)
    people += matched
    images += matched == len(f) == len(r)
  return images, people, sum(len(r) for r in ref_out)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--annotations", default=DEFAULT_ANN)
  p.add_argument("--input_shape", type=int, nargs=2, default=(368, 368), metavar=("H", "W"))
  p.add_argument("--sigma", type=float, default=7.0, help="heatmap sigma, input pixels")
  p.add_argument("--ortho", type=float, default=1.0, help="PAF half-width, output cells")
  p.add_argument("--repeats", type=int, default=5, help="timed passes of the fast decoder")
  p.add_argument("--ref_repeats", type=int, default=1, help="timed passes of the reference")
  p.add_argument("--max_images", type=int, default=0, help="0: all")
  p.add_argument("--all_images", action="store_true",
                 help="also images without annotations (all-zero maps)")
  p.add_argument("--threads", type=int, default=1, help="OMP/BLAS/cv2/XLA threads")
  p.add_argument("--reference_only", action="store_true",
                 help="run only the reference decoder (otherwise a missing fast one is an error)")
  p.add_argument("--smoke", action="store_true", help="a handful of images, one repeat (CI)")
  p.add_argument("--verbose", action="store_true", help="show pycocotools' output")
  a = p.parse_args()
  if a.smoke:
    a.max_images, a.repeats, a.ref_repeats = 6, 1, 1
  pin_threads(a.threads)

  import cv2
  import numpy as np
  from pycocotools.coco import COCO

  from benchmarks.reference_decoder import decode_reference
  from bpnet_jax.skeleton import load_skeleton
  cv2.setNumThreads(a.threads)

  fast = None
  if not a.reference_only:
    try:
      from bpnet_jax import decode as fast
    except ImportError as e:
      sys.exit(f"bpnet_jax.decode is not importable ({e}); use --reference_only")

  skeleton = load_skeleton()
  with open(a.annotations) as f:
    data = json.load(f)
  coco_names = data["categories"][0]["keypoints"]
  by_image = {}
  for ann in data["annotations"]:
    by_image.setdefault(ann["image_id"], []).append(ann)
  images = [im for im in data["images"] if a.all_images or im["id"] in by_image]
  if a.max_images:
    images = images[:a.max_images]
  with contextlib.redirect_stdout(io.StringIO()) if not a.verbose else contextlib.nullcontext():
    gt = COCO(a.annotations)

  in_h, in_w = a.input_shape
  t0 = time.perf_counter()
  geometry, people = [], []
  for im in images:
    s, _, grid = network_geometry(im["height"], im["width"], in_h, in_w)
    geometry.append((s, grid))
    people.append(gt_people(by_image.get(im["id"], []), skeleton, coco_names, s))
  full_grid = (max(g[0] for _, g in geometry), max(g[1] for _, g in geometry))
  render = make_renderer(skeleton, full_grid, max(1, max(len(j) for j, _ in people)),
                         a.sigma, a.ortho)
  maps = [render(j, v, grid) for (j, v), (_, grid) in zip(people, geometry)]
  scales = [s for s, _ in geometry]
  crowd = [len(j) for j, _ in people]
  render_s = time.perf_counter() - t0
  image_ids = [im["id"] for im in images]

  rows = {}
  outputs = {}
  warmup_s = None
  decoders = [("reference (original-style)", lambda h, q: decode_reference(h, q, skeleton),
               a.ref_repeats)]
  if fast is not None:
    t0 = time.perf_counter()
    for heat, paf in maps:                       # warm-up: compilation, caches
      fast(heat, paf, skeleton=skeleton)
    warmup_s = time.perf_counter() - t0
    decoders.insert(0, ("bpnet_jax.decode (fast)",
                        lambda h, q: fast(h, q, skeleton=skeleton), a.repeats))
  for name, fn, repeats in decoders:
    out, times = time_decoder(fn, maps, repeats)
    results = [r for o, iid, s in zip(out, image_ids, scales) for r in to_coco(o, iid, s, skeleton)]
    rows[name] = (sum(len(o) for o in out), evaluate(gt, results, image_ids, a.verbose), times)
    outputs[name] = out

  n_gt = sum(crowd)
  worst = int(np.argmax(crowd)) if crowd else 0
  print(f"{len(images)} images of {os.path.relpath(a.annotations, ROOT)}, input_shape "
        f"{in_h}x{in_w} (adjust_network_input), ideal maps (sigma {a.sigma:g} px, PAF ortho "
        f"{a.ortho:g}), {n_gt} rendered people, rendering {render_s:.1f} s")
  if crowd:
    print(f"most crowded image: id {image_ids[worst]} with {crowd[worst]} rendered people "
          f"(output grid {maps[worst][0].shape[0]}x{maps[worst][0].shape[1]})")
  print(f"threads: {a.threads} (OMP/BLAS/cv2/XLA); fast: median of {a.repeats} passes after a "
        f"warm-up pass; reference: median of {a.ref_repeats}")
  if fast is None:
    print("bpnet_jax.decode (fast): MISSING (--reference_only); only the reference ran")
  header = (f"{'decoder':28s} {'images':>6s} {'people':>6s} {'AP':>6s} {'AP50':>6s} {'AP75':>6s} "
            f"{'AR':>6s} {'mean ms':>8s} {'p50 ms':>8s} {'max ms':>8s}")
  print(header)
  print("-" * len(header))
  for name, (people, (ap, ap50, ap75, ar), times) in rows.items():
    ms = times * 1e3
    print(f"{name:28s} {len(images):6d} {people:6d} {ap:6.3f} {ap50:6.3f} {ap75:6.3f} {ar:6.3f} "
          f"{ms.mean():8.2f} {np.median(ms):8.2f} {ms.max():8.2f}")
  if fast is not None:
    names = list(rows)
    tf, tr = rows[names[0]][2], rows[names[1]][2]
    print(f"speed ratio (reference / fast): mean {tr.mean() / tf.mean():.1f}x, "
          f"p50 {np.median(tr) / np.median(tf):.1f}x, max {tr.max() / tf.max():.1f}x; "
          f"fast warm-up pass {warmup_s:.2f} s")
    same_images, same_people, ref_people = compare(outputs[names[0]], outputs[names[1]])
    print(f"agreement: identical output on {same_images}/{len(images)} images; "
          f"{same_people}/{ref_people} reference people found identically by the fast decoder")


if __name__ == "__main__":
  main()
