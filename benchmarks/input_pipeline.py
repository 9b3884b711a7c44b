"""Input pipeline throughput: host decode+pad per worker, and device augment+targets.

  python benchmarks/input_pipeline.py                 # 640x480 JPEGs, 256x256 input, batch 32
  python benchmarks/input_pipeline.py --smoke         # tiny, seconds (CI)

Builds a synthetic COCO-like dataset (640x480 JPEG, masks), converts it to records, then times
(1) `DecodeAndPad` in one process (= one worker's images/s), (2) the grain pipeline with N worker
processes, (3) the jitted device function (warp image + mask, keypoints, heatmaps, PAFs,
normalisation) at the config's input size, excluding compilation.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--num_images", type=int, default=96)
  p.add_argument("--width", type=int, default=640)
  p.add_argument("--height", type=int, default=480)
  p.add_argument("--input", type=int, default=256, help="network input size (square)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
  a = p.parse_args()
  if a.smoke:
    a.num_images, a.width, a.height, a.input = 8, 160, 120, 64
    a.batch, a.workers, a.repeats = 4, 1, 1

  import jax
  import numpy as np

  from bpnet_jax import augment
  from bpnet_jax.data import input_pipeline as ip
  from bpnet_jax.skeleton import load_skeleton
  from configs import coco

  sk = load_skeleton()
  with tempfile.TemporaryDirectory() as tmp:
    s = _common.synthetic_records(tmp, a.num_images, a.width, a.height, workers=a.workers)
    path, data = s["records"], s["data"]
    dec = ip.DecodeAndPad({"coco": data}, data, (a.height, a.width), 20, sk.num_joints)
    from array_record.python import array_record_data_source
    src = array_record_data_source.ArrayRecordDataSource([path])
    n = len(src)
    per_worker = _common.decode_rate(dec, src, a.repeats * n)

    ds = ip.build_dataset([path], dec, 0, 10**6)
    pipeline = {}
    for workers in sorted({0, a.workers}):
      it = ip.make_iterator(ds, a.batch, workers)
      next(it)                                 # start-up (process spawn) excluded
      steps = max(2, a.repeats * n // a.batch)
      t = time.perf_counter()
      for _ in range(steps):
        batch = next(it)
      pipeline[workers] = steps * a.batch / (time.perf_counter() - t)
      it.close()

    # The main process's share with workers: stacking decoded samples into a batch and handing
    # it to the device (what `train.shard_batch` does), without decoding.
    from bpnet_jax import train
    samples = [dec(src[i % n]) for i in range(a.batch)]
    mesh = train.make_mesh()
    t = time.perf_counter()
    for _ in range(a.repeats):
      stacked = {k: np.stack([x[k] for x in samples]) for k in samples[0]}
      jax.block_until_ready(train.shard_batch(stacked, mesh))
    collate = a.repeats * a.batch / (time.perf_counter() - t)

    cfg = coco.get_config()
    cfg.dataloader.image_config.height = cfg.dataloader.image_config.width = a.input
    cfg.dataloader.pose_config.target_shape = [a.input // 8, a.input // 8]
    fn = augment.make_device_preprocess(
        augment.AugParams.from_config(cfg.dataloader.augmentation_config),
        augment.LabelParams.from_config(cfg), sk)
    keys = ("image", "mask", "size", "joints", "visibility", "centers", "scales", "num_people")
    dev = jax.device_put({k: batch[k] for k in keys})
    t = time.perf_counter()
    jax.block_until_ready(fn(jax.random.key(0), dev))
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(a.repeats):
      res = fn(jax.random.key(i + 1), dev)
    jax.block_until_ready(res)
    device = a.repeats * a.batch / (time.perf_counter() - t)

  print(f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}; {s['num_records']} records of {a.width}x{a.height} JPEG")
  print(f"host decode+pad (1 worker):            {per_worker:8.1f} images/s")
  for workers, rate in pipeline.items():
    where = f"{workers} worker processes" if workers else "in the main process"
    print(f"host grain pipeline, batch {a.batch}, {where}: {rate:8.1f} images/s")
  print(f"main process: batch + transfer to the device (no decode): {collate:8.1f} images/s")
  print(f"device augment+targets ({a.input}x{a.input}, batch {a.batch}): {device:8.1f} images/s "
        f"(compile {compile_s:.1f} s)")


if __name__ == "__main__":
  main()
