"""ONNX Runtime latency of exported models: fp32 vs fp16 vs int8 (Q/DQ), batch 1.

  python benchmarks/export.py                      # configs/coco.py model, 288x384 (the tutorial's)
  python benchmarks/export.py --smoke              # tiny model, 64x64 (CI)

Builds the config's model (random weights: latency does not depend on their values), exports it
with `bpnet_jax.export` (each export checks ONNX Runtime against JAX), calibrates the int8 model
on --cal_images random images, then times `InferenceSession.run` on the CPU with ONNX Runtime's
default thread count and with one thread (median of --repeats after a warm-up run).
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="coco", help="a configs/ module name")
  p.add_argument("--height", type=int, default=288)
  p.add_argument("--width", type=int, default=384)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--cal_images", type=int, default=8)
  p.add_argument("--smoke", action="store_true")
  a = p.parse_args()
  if a.smoke:
    a.config, a.height, a.width, a.repeats, a.cal_images = "demo", 64, 64, 2, 2

  import importlib

  import jax
  import numpy as np
  import onnxruntime as ort

  from bpnet_jax import model as model_lib
  from bpnet_jax.export import onnx_model
  from bpnet_jax.skeleton import load_skeleton
  cfg = importlib.import_module(f"configs.{a.config}").get_config()
  sk = load_skeleton(cfg.dataloader.pose_config.pose_config_path)
  net = model_lib.build_model(cfg.model, sk)
  v = model_lib.init_variables(net, jax.random.key(0), 64, 64)
  rng = np.random.default_rng(0)
  x = rng.uniform(-0.5, 0.5, (1, a.height, a.width, 3)).astype(np.float32)
  cal = rng.uniform(-0.5, 0.5, (a.cal_images, a.height, a.width, 3)).astype(np.float32)
  print(f"{cfg.model.architecture}, {cfg.model.stages} stages, "
        f"{model_lib.count_params(v)['total']:,} params, input {a.height}x{a.width}, batch 1; "
        f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for dtype in ("fp32", "fp16", "int8"):
      path = os.path.join(tmp, f"m_{dtype}.onnx")
      t0 = time.perf_counter()
      r = onnx_model.export(cfg, v, path, input_dims=(a.height, a.width), data_type=dtype,
                        calibration={"data": lambda: cal, "batch_size": 1,
                                     "method": "percentile"})
      t_export = time.perf_counter() - t0
      times = {}
      for threads in (0, 1):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        s.run(None, {"input_1": x})
        ts = []
        for _ in range(a.repeats):
          t0 = time.perf_counter()
          s.run(None, {"input_1": x})
          ts.append(time.perf_counter() - t0)
        times[threads] = 1e3 * float(np.median(ts))
      rows.append((dtype, times[0], times[1], r["parity"]["max_abs_diff"], t_export,
                   os.path.getsize(path) / 1e6))
  print(f"{'model':<6} {'ms (default threads)':>22} {'ms (1 thread)':>15} {'max|diff| vs JAX':>18} "
        f"{'export s':>9} {'MB':>7}")
  for dtype, t_all, t_one, diff, t_exp, mb in rows:
    print(f"{dtype:<6} {t_all:>22.1f} {t_one:>15.1f} {diff:>18.2e} {t_exp:>9.1f} {mb:>7.1f}")
  base = rows[0]
  for dtype, t_all, t_one, *_ in rows[1:]:
    print(f"speed-up {dtype} vs fp32: {base[1] / t_all:.2f}x (default threads), "
          f"{base[2] / t_one:.2f}x (1 thread)")


if __name__ == "__main__":
  main()
