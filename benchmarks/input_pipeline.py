"""Input pipeline throughput at the config's own canvas: bytes per sample, host decode per worker,
the main process's share per core, and device augment + targets.

  python benchmarks/input_pipeline.py                 # configs/coco.py, batch 32, 2 workers
  python benchmarks/input_pipeline.py --smoke         # tiny, seconds (CI)

Builds synthetic COCO-like datasets (640x480 landscape and 480x640 portrait JPEGs, with masks),
converts them to records, and reads them with the config's decoder (`decoder_from_config`: its
`dataloader.max_image_size` canvas), then times
(1) `DecodeAndPad` in one process (= one worker's images/s), landscape and portrait;
(2) the training feed, `make_iterator` + `train.shard_batch` (waited for), with decoding in the
    main process and in --workers processes. With workers, images per CPU second of the main
    process is its share of the feed per host core (receiving batches, transfer): the part
    that more workers do not spread. "+ host copy" forces one copy of each batch into device
    memory (`device_put(may_alias=False)`), as a GPU's transfer from pageable memory costs the
    host; the CPU backend otherwise aliases the host buffers;
(3) the jitted device function (warp image + mask, keypoints, heatmaps, PAFs, normalisation) at
    the config's input size, excluding compilation.
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
  p.add_argument("--config", default="coco", help="configs/<name>.py or a path")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--num_images", type=int, default=96, help="landscape images (+ 1/4 portrait)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--batches", type=int, default=20, help="timed batches per feed measurement")
  p.add_argument("--repeats", type=int, default=3, help="decode passes over the records")
  p.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
  a = p.parse_args()
  size = (640, 480)
  if a.smoke:
    a.num_images, a.batch, a.workers, a.batches, a.repeats = 8, 4, 1, 2, 1
    size = (160, 120)
    a.set = a.set + ["dataloader.image_config.height=64", "dataloader.image_config.width=64",
                     "dataloader.pose_config.target_shape=(8,8)"]

  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from bpnet_jax import augment, train
  from bpnet_jax import skeleton as skeleton_lib
  from bpnet_jax.data import input_pipeline as ip

  cfg = _common.load_config(a.config, a.set)
  cfg.dataloader.batch_size = a.batch
  canvas = tuple(cfg.dataloader.max_image_size)
  with tempfile.TemporaryDirectory() as tmp:
    recs = _common.synthetic_records(os.path.join(tmp, "land"), a.num_images, *size,
                                     workers=a.workers)
    tall = _common.synthetic_records(os.path.join(tmp, "tall"), max(2, a.num_images // 4),
                                     size[1], size[0], workers=a.workers, seed=1)
    cfg = _common.point_config_at_records(cfg, recs)
    dec, src = _common.decoder_and_source(cfg, recs)
    assert tuple(dec.canvas_hw) == canvas, (dec.canvas_hw, canvas)   # the config's own canvas
    decode = {"landscape": _common.decode_rate(dec, src, a.repeats * len(src))}
    tdec, tsrc = _common.decoder_and_source(_common.point_config_at_records(cfg, tall), tall)
    decode["portrait"] = _common.decode_rate(tdec, tsrc, a.repeats * len(tsrc))

    sk = skeleton_lib.load_skeleton(cfg.dataloader.pose_config.pose_config_path)
    ds = ip.train_dataset_from_config(cfg, sk)
    it = ip.make_iterator(ds, a.batch, 0)
    batch = next(it)
    if hasattr(it, "close"):
      it.close()
    per_sample = {k: np.asarray(v).nbytes / a.batch for k, v in batch.items()}

    mesh = train.make_mesh()
    sharding = NamedSharding(mesh, P("data"))
    puts = {"": lambda b: train.shard_batch(b, mesh),
            " + host copy": lambda b: jax.device_put({k: np.asarray(v) for k, v in b.items()},
                                                     sharding, may_alias=False)}
    feed = {}
    # Worker runs first: a closed in-process iterator may still finish decoding what it had
    # started, which would count against the main process's share.
    for workers in sorted({0, a.workers}, reverse=True):
      for name, put in puts.items():
        if workers == 0 and name:
          continue
        it = ip.make_iterator(ds, a.batch, workers)
        feed[(workers, name)] = _common.feed_rate(it, put, a.batches, a.batch)
        if hasattr(it, "close"):
          it.close()

    d = cfg.dataloader
    fn = augment.make_device_preprocess(
        augment.AugParams.from_config(d.augmentation_config), augment.LabelParams.from_config(cfg),
        sk)
    dev = jax.device_put(augment.sample_fields(batch))
    t = time.perf_counter()
    jax.block_until_ready(fn(jax.random.key(0), dev))
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(a.repeats):
      res = fn(jax.random.key(i + 1), dev)
    jax.block_until_ready(res)
    device = a.repeats * a.batch / (time.perf_counter() - t)

  ih, iw = d.image_config.height, d.image_config.width
  print(f"machine: {_common.machine_line()}")
  print(f"config {a.config}: canvas (max_image_size) {canvas[0]}x{canvas[1]} (HxW), batch "
        f"{a.batch}; {len(src)} records of {size[0]}x{size[1]} JPEG, {len(tsrc)} of "
        f"{size[1]}x{size[0]}")
  big = ", ".join(f"{k} {v / 1e3:.1f} kB" for k, v in per_sample.items() if v >= 1000)
  print(f"bytes per sample: {sum(per_sample.values()) / 1e6:.3f} MB ({big}, "
        f"{sum(v for v in per_sample.values() if v < 1000) / 1e3:.1f} kB other)")
  for kind, rate in decode.items():
    print(f"host decode+pad (1 worker), {kind}: {rate:8.1f} images/s")
  for (workers, name), r in feed.items():
    if workers:
      print(f"host grain pipeline, batch {a.batch}, {workers} worker processes{name}: "
            f"{r['wall']:8.1f} images/s; main process {r['per_core']:8.1f} images/s per core")
    else:
      print(f"host grain pipeline, batch {a.batch}, in the main process (decoding too): "
            f"{r['wall']:8.1f} images/s")
  print(f"device augment+targets ({ih}x{iw}, batch {a.batch}): {device:8.1f} images/s "
        f"(compile {compile_s:.1f} s)")


if __name__ == "__main__":
  main()
