"""`bpnet dataset_convert` throughput: images/s with 1 and N worker processes, and the
extrapolated wall time for COCO train2017 on 16 cores.

  python benchmarks/convert_speed.py                       # 256 images; 1 and all cores
  python benchmarks/convert_speed.py --workers 16 --num_images 2048
  python benchmarks/convert_speed.py --smoke               # tiny, seconds (CI)

Makes a synthetic COCO-layout dataset (`bpnet_jax.data.synthetic`, default style: 640x480 JPEGs
with 1-6 people each, crowd regions, unlabelled people, polygon segmentations), then times the
whole `convert.convert` as `bpnet dataset_convert --generate_masks --check_files` runs it
(reading the JSON and resolving paths; per image: mask, main persons, image decode check,
encoded records; writing the shuffled records), once with 1 worker and once with --workers,
and checks that both runs wrote the same bytes (records, summary, masks). Starting the worker
processes the first time (a forkserver that imports the package once, ~3 s) is timed on its
own; this process's CPU time during the parallel per-image phase is the hand-over of jobs and
records, the part that more workers do not spread.

The COCO figure is an extrapolation, not a measurement: train2017's 118,287 images are each
costed as a synthetic image with people (only ~64k of them have person annotations, and the
synthetic JSON holds heavier polygons than COCO's, so it errs high); the per-image work is
assumed to scale linearly over 16 cores from the measured 1-worker rate, and the serial phases
(JSON + paths, writing) are added unscaled at their measured per-image cost.
"""

import argparse
import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402,F401  (puts the repository on sys.path)

COCO_TRAIN_IMAGES = 118_287
TARGET_CORES = 16


def tree_digest(paths) -> str:
  """SHA-256 over the relative names and bytes of every file under `paths` (sorted)."""
  h = hashlib.sha256()
  for base in paths:
    for root, dirs, files in sorted(os.walk(base)):
      dirs.sort()
      for name in sorted(files):
        full = os.path.join(root, name)
        h.update(os.path.relpath(full, base).encode() + b"\0")
        with open(full, "rb") as f:
          h.update(f.read())
  return h.hexdigest()


def timed_convert(spec: str, out_dir: str, masks_dir: str, workers: int) -> dict:
  """One fresh conversion (outputs and masks removed first): seconds, phases, output digest."""
  from bpnet_jax.data import convert
  for path in (out_dir, masks_dir):
    shutil.rmtree(path, ignore_errors=True)
  phases = {}
  t = time.perf_counter()
  summary = convert.convert(spec, os.path.join(out_dir, "train"), "train", generate_masks=True,
                            check_files=True, workers=workers, timings=phases)
  return {"seconds": time.perf_counter() - t, "phases": phases, "summary": summary,
          "digest": tree_digest([out_dir, masks_dir])}


def pool_startup(workers: int) -> float:
  """Seconds to start `workers` conversion worker processes and get one answer from each."""
  from bpnet_jax.data import convert
  t = time.perf_counter()
  with convert._pool_context().Pool(workers, initializer=convert._init_worker,
                                    initargs=(None,)) as pool:
    pool.map(abs, range(workers), chunksize=1)
  return time.perf_counter() - t


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--num_images", type=int, default=256)
  p.add_argument("--width", type=int, default=640)
  p.add_argument("--height", type=int, default=480)
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                 help="worker processes of the parallel run (default: all cores)")
  p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
  a = p.parse_args()
  if a.smoke:
    a.num_images, a.width, a.height, a.workers = 10, 96, 72, 2

  from bpnet_jax.data import convert, synthetic
  convert.MIN_IMAGES_FOR_WORKERS = 1      # measure the worker processes even on small sets
  with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, "data")
    t = time.perf_counter()
    synthetic.make_synthetic(data, a.num_images, seed=0, width=a.width, height=a.height,
                             test_fraction=0, progress=False)
    make_s = time.perf_counter() - t
    spec = os.path.join(data, "dataset_spec.json")
    masks, out = os.path.join(data, "train_mask"), os.path.join(tmp, "records")
    json_kb = os.path.getsize(os.path.join(data, "annotations",
                                           "person_keypoints_train.json")) / 1e3
    serial = timed_convert(spec, out, masks, 1)
    # First pool of this process: starts the forkserver, which imports the package once; later
    # pools (the timed parallel run) fork their workers from it.
    startup = pool_startup(a.workers)
    parallel = timed_convert(spec, out, masks, a.workers)

  n, s = a.num_images, serial["summary"]
  print(f"machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"python {platform.python_version()}")
  print(f"dataset: {n} synthetic {a.width}x{a.height} JPEGs ({make_s:.1f} s to make), "
        f"{s['persons']} persons ({s['persons'] / n:.1f} per image), {s['records']} records, "
        f"{json_kb / n:.1f} kB of JSON per image")
  for name, run, workers in (("serial", serial, 1), ("parallel", parallel, a.workers)):
    ph = run["phases"]
    print(f"{name}, {workers} worker{'s' if workers > 1 else ''}: {run['seconds']:.2f} s = "
          f"{n / run['seconds']:.1f} images/s (JSON + paths {ph['read']:.2f} s, per-image work "
          f"{ph['images']:.2f} s, writing {ph['write']:.2f} s)")
  print(f"speed-up {a.workers} workers vs 1: {serial['seconds'] / parallel['seconds']:.2f}x; "
        f"output identical to 1 worker (records, summary, masks): "
        f"{'yes' if serial['digest'] == parallel['digest'] else 'NO'}")
  ph = serial["phases"]
  per_image_core = ph["images"] / n                        # s of per-image work, one core
  handover = parallel["phases"]["images_cpu"] / n          # s of this process's CPU per image
  print(f"starting {a.workers} worker processes (first time: not in the parallel run above): "
        f"{startup:.1f} s; this process's CPU while "
        f"they work: {1e3 * handover:.2f} ms per image (the hand-over: at most "
        f"{1 / max(handover, 1e-9):.0f} images/s through one process)")
  # The per-image phase on 16 cores: the workers' share, unless the hand-over is slower.
  work = COCO_TRAIN_IMAGES * max(per_image_core / TARGET_CORES, handover)
  rest = COCO_TRAIN_IMAGES * (ph["read"] + ph["write"]) / n
  print(f"COCO train2017 ({COCO_TRAIN_IMAGES:,} images) on {TARGET_CORES} cores, extrapolated "
        f"(per-image work scaled linearly from the 1-worker rate of {1 / per_image_core:.0f} "
        f"images/s per core, capped by the hand-over; serial phases and start-up unscaled): "
        f"{work:.0f} s per-image work + {rest:.0f} s serial + {startup:.0f} s start-up = "
        f"{(work + rest + startup) / 60:.1f} min")


if __name__ == "__main__":
  main()
