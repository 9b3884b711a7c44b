"""Real training from records: full input pipeline vs data already on the device.

  python benchmarks/end_to_end.py                         # configs/coco.py, bf16, batch 64
  python benchmarks/end_to_end.py --dtype float32 --batch 32 --workers 8
  python benchmarks/end_to_end.py --smoke                 # tiny, for CI

1. Makes --num_images synthetic 640x480 JPEG images (COCO-like size, people with masks of the
   unlabelled ones) and converts them to records.
2. Full pipeline: `bpnet_jax.train.train` itself (grain decode in --workers processes, batching,
   prefetch to the device, on-device augmentation and targets, the jitted step, metrics) for
   --warmup + --steps steps; images/s is the loop's own figure (metrics.jsonl) over the windows
   after the warm-up (compilation and worker start-up excluded).
3. Device only: the same jitted step on one batch that stays on the device.

The ratio full / device-only shows an input bottleneck: near 1.0 the device never waits on the
host. The host's capacity (decode images/s per worker x workers) is printed alongside.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def pipeline_rate(metrics_path: str, warmup_steps: int) -> tuple[float, int]:
  """(images/s over the windows that start after warmup_steps, steps counted)."""
  rows = [json.loads(l) for l in open(metrics_path)]
  rows = [r for r in rows if "images_per_sec" in r]
  # A window of n steps of B images at r images/s took n*B/r s: the rate over windows is
  # sum(n) / sum(n / r) (B cancels).
  prev, steps, weighted = 0, 0, 0.0
  for r in rows:
    n = r["step"] - prev
    if prev >= warmup_steps and r["images_per_sec"] > 0:
      steps += n
      weighted += n / r["images_per_sec"]
    prev = r["step"]
  return (steps / weighted if weighted else float("nan")), steps


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="coco", help="configs/<name>.py or a path")
  p.add_argument("--batch", type=int, default=64, help="global batch")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--num_images", type=int, default=512)
  p.add_argument("--workers", type=int, default=-1, help="decode processes (-1: automatic)")
  p.add_argument("--steps", type=int, default=60, help="timed steps")
  p.add_argument("--warmup", type=int, default=10, help="steps excluded (compile, start-up)")
  p.add_argument("--window", type=int, default=20, help="steps per metrics window")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--smoke", action="store_true", help="tiny config and sizes, for CI")
  a = p.parse_args()
  size = (640, 480)
  if a.smoke:
    a.config, a.batch, a.dtype, a.num_images, a.steps, a.warmup, a.window = \
        "demo", 4, "float32", 4, 2, 2, 1
    size = (160, 120)
    a.set = a.set + ["dataloader.image_config.height=64", "dataloader.image_config.width=64",
                     "dataloader.pose_config.target_shape=(8,8)",
                     "dataloader.max_image_size=(120,160)"]

  import tempfile

  import jax

  from bpnet_jax import train
  from bpnet_jax.data import input_pipeline
  config = _common.load_config(a.config, a.set)
  c = config
  c.trainer.compute_dtype = a.dtype
  c.dataloader.batch_size = a.batch
  c.dataloader.num_workers = a.workers
  workers = a.workers if a.workers >= 0 else input_pipeline.auto_num_workers()
  print(f"machine: {_common.machine_line()}")
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    recs = _common.synthetic_records(tmp, a.num_images, *size, workers=os.cpu_count())
    print(f"data: {a.num_images} synthetic {size[0]}x{size[1]} JPEG -> {recs['num_records']} "
          f"records in {time.perf_counter() - t:.0f} s")
    c = _common.point_config_at_records(c, recs)
    spe = recs["num_records"] // a.batch
    if spe < 1:
      sys.exit(f"end_to_end: {recs['num_records']} records are fewer than one batch of {a.batch}")
    warm = -(-a.warmup // a.window) * a.window     # whole metrics windows
    total = warm + a.steps
    c.trainer.num_epoch = -(-total // spe)
    c.trainer.checkpoint_n_epoch = c.trainer.num_epoch
    c.trainer.summary_every_n_steps = a.window
    c.trainer.log_every_n_secs = 1000
    per_worker = _common.decode_rate(*_common.decoder_and_source(c, recs), 8 if a.smoke else 64)

    t = time.perf_counter()
    out = train.train(c, os.path.join(tmp, "work"), progress=False)
    wall = time.perf_counter() - t
    full, counted = pipeline_rate(os.path.join(tmp, "work", "metrics.jsonl"), warm)

    step = _common.DeviceTrainStep(c)
    batch = step.put(_common.host_batch(c, recs, a.batch))
    step.compile(batch)
    step.run(batch, 2)
    device = a.steps * a.batch / step.run(batch, a.steps)

  h, w = c.dataloader.image_config.height, c.dataloader.image_config.width
  print(f"config {a.config}, {a.dtype}, input {h}x{w}, global batch {a.batch}, "
        f"{jax.device_count()} device(s), {workers} decode worker(s)")
  print(f"host decode capacity: {per_worker:.0f} images/s per worker x {max(workers, 1)} = "
        f"{per_worker * max(workers, 1):.0f} images/s")
  print(f"full pipeline (train.train, {out['step']} steps, {wall:.0f} s wall incl. compile):"
        f" {full:.1f} images/s over {counted} steps")
  print(f"data on device (same step, one resident batch): {device:.1f} images/s")
  print(f"ratio full / on-device: {full / device:.2f}")


if __name__ == "__main__":
  main()
