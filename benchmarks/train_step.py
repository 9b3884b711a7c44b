"""Training-step throughput, model-FLOPs utilisation, compile time and memory.

  python benchmarks/train_step.py                          # configs/coco.py, 256x256
  python benchmarks/train_step.py --batch_sizes 64,128,256 --dtypes bfloat16
  python benchmarks/train_step.py --memory_only --batch_sizes 64   # compile only: memory
  python benchmarks/train_step.py --smoke                  # tiny config, seconds (CI)

Times the training loop's own jitted step (`train.make_train_step` under `train.jit_train_step`:
on-device augmentation and targets, forward, loss, backward, optimizer update, donated state) on
a batch that already lives on the device (decoded from real synthetic 640x480 JPEG records), so
the figure is the device's limit; `benchmarks/end_to_end.py` compares it with the full pipeline.

Reported per (compute dtype, global batch):
  compile s     lowering + XLA compilation of the step (once per shape; excluded from timing)
  images/s      global batch * steps / seconds, after --warmup steps
  model TFLOP/s 3 x forward FLOPs per image (forward + 2x for backward, the usual MFU
                convention; the forward count is XLA's for one image) x images/s
  MFU           model TFLOP/s / the device's dense peak for the dtype (H100/H200/A100 known;
                --peak_tflops for others; n/a on CPU)
  XLA TFLOP/s   XLA's count for the whole compiled step (includes augmentation and targets)
  memory        XLA's buffer assignment for the step (arguments + outputs - donated + temporaries)
                per image; on GPUs also the allocator's peak since the process started
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="coco", help="configs/<name>.py or a path")
  p.add_argument("--batch_sizes", default="32,64,128", help="global batch sizes")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--num_images", type=int, default=16, help="distinct images in the batch")
  p.add_argument("--peak_tflops", type=float, default=None)
  p.add_argument("--memory_only", action="store_true", help="compile and report memory only")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. --set model.width_multiplier=0.5")
  p.add_argument("--smoke", action="store_true", help="tiny config and sizes, for CI")
  a = p.parse_args()
  if a.smoke:
    a.config, a.batch_sizes, a.steps, a.warmup, a.num_images = "demo", "4", 2, 1, 2
    a.set = a.set + ["dataloader.image_config.height=64", "dataloader.image_config.width=64",
                     "dataloader.pose_config.target_shape=(8,8)"]

  import tempfile

  import jax
  config = _common.load_config(a.config, a.set)
  fwd = _common.forward_flops(config)
  h, w = config.dataloader.image_config.height, config.dataloader.image_config.width
  dev = jax.devices()[0]
  print(f"machine: {_common.machine_line()}")
  print(f"config {a.config}: {config.model.architecture}, {config.model.stages} stages, "
        f"width x{config.model.width_multiplier}, input {h}x{w}; forward {fwd / 1e9:.2f} GFLOPs "
        f"per image (XLA count)")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    size = (160, 120) if a.smoke else (640, 480)
    recs = _common.synthetic_records(tmp, a.num_images, *size)
    for dtype in a.dtypes.split(","):
      for b in (int(x) for x in a.batch_sizes.split(",")):
        c = config.copy_and_resolve_references()
        c.trainer.compute_dtype = dtype
        c.dataloader.batch_size = b
        c = _common.point_config_at_records(c, recs)
        if a.smoke:
          c.dataloader.max_image_size = (size[1], size[0])
        step = _common.DeviceTrainStep(c)
        batch = step.put(_common.host_batch(c, recs, b))
        compile_s = step.compile(batch)
        mem = step.memory_bytes()
        row = dict(dtype=dtype, batch=b, compile_s=compile_s, mem=mem)
        if not a.memory_only:
          step.run(batch, a.warmup)
          seconds = step.run(batch, a.steps)
          ips = a.steps * b / seconds
          xla = step.xla_flops()
          peak = _common.peak_flops(dev, dtype, a.peak_tflops)
          row.update(ips=ips, step_ms=1e3 * seconds / a.steps, model_tflops=3 * fwd * ips / 1e12,
                     xla_tflops=(xla or 0) * a.steps / seconds / 1e12,
                     mfu=(3 * fwd * ips / peak) if peak else None)
        stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
        row["allocator_peak"] = (stats or {}).get("peak_bytes_in_use")
        rows.append(row)
        del step, batch

  print()
  head = ("| dtype | batch | compile s | images/s | step ms | model TFLOP/s | MFU | XLA TFLOP/s "
          "| memory/image (XLA) | step memory (XLA) | allocator peak |")
  print(head)
  print("|" + "---|" * (head.count("|") - 1))
  for r in rows:
    m = r["mem"]
    fm = lambda k: _common.fmt_bytes(m[k]) if m else "n/a"
    per_image = _common.fmt_bytes(m["peak_estimate"] / r["batch"]) if m else "n/a"
    ap = _common.fmt_bytes(r["allocator_peak"]) if r["allocator_peak"] else "n/a"
    if "ips" in r:
      mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
      perf = (f"{r['ips']:.1f} | {r['step_ms']:.1f} | {r['model_tflops']:.2f} | {mfu} | "
              f"{r['xla_tflops']:.2f}")
    else:
      perf = "- | - | - | - | -"
    print(f"| {r['dtype']} | {r['batch']} | {r['compile_s']:.1f} | {perf} | {per_image} | "
          f"{fm('peak_estimate')} | {ap} |")


if __name__ == "__main__":
  main()
