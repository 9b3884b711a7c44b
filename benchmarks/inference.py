"""Inference latency and throughput: JAX (jit, fp32/bf16), ONNX Runtime (fp32/int8), TensorRT
(fp16/int8, when installed), network only and end to end.

  python benchmarks/inference.py                        # configs/coco.py, all sizes, batch 1, 8
  python benchmarks/inference.py --sizes 288x384 --batches 8 --backends jax-bf16
  python benchmarks/inference.py --model WORKDIR        # trained weights (else random)
  python benchmarks/inference.py --smoke                # tiny, for CI

Network: the model's forward pass on a device-resident (JAX) / host (ONNX Runtime, TensorRT)
normalised batch at each HxW and batch size. `latency ms` is the median of --repeats
synchronous calls; `images/s` is batch x --repeats / the time of --repeats back-to-back calls
(JAX dispatches asynchronously, so consecutive calls overlap host and device work).

End to end (--e2e_size, --e2e_batches images per network call, as `bpnet inference
--batch_size`): `Predictor.predict_iter` over the real photos in tests/data/coco_mini (JPEG
decode and resize/pad on --e2e_workers host threads, network, peak search and limb assembly on
as many decode threads), images/s over the whole folder after one warm-up pass. With random
weights the decoder finds few peaks, so its share is small; pass --model for a trained
model's figure.

`ort-fp32-u8` (end to end) runs the model exported with `--input_uint8`: ONNX Runtime is fed
the uint8 pixels and normalises inside the graph, instead of the host normalising to float32.

Mixed aspect ratios (--mixed_images photos of tests/data/coco_mini, cycled, at --e2e_size with
`adjust_network_input`, so the network input takes each photo's aspect ratio): the JAX
forward's compilations and network calls of `predict_iter(batch_size=--mixed_batch)`, now
(shape buckets, partial buckets padded) and before (the grouping `predict_iter` had until issue
18: consecutive same-shape images, partial groups sent as they were), the latter replayed as
the same sequence of network calls on a fresh jitted forward.

ONNX models are exported with `bpnet_jax.export` (each export checks parity against JAX; int8
is calibrated on random inputs, which is fine for timing). TensorRT engines are built when the
`tensorrt` package and a CUDA GPU are present (rows feed uint8 pixels, normalised on the GPU, as
`bpnet inference` does); otherwise those rows say why they are missing.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

BACKENDS = ("jax-fp32", "jax-bf16", "ort-fp32", "ort-int8", "trt-fp16", "trt-int8")
E2E_BACKENDS = ("jax-fp32", "jax-bf16", "ort-fp32", "ort-fp32-u8")


def consecutive_groups(shapes, batch_size: int) -> list[tuple]:
  """(batch, H, W) of each network call the old `predict_iter` made for network-input shapes
  in this order: runs of one shape, cut every batch_size images, partial runs sent as they
  were."""
  calls, run = [], []
  for hw in list(shapes) + [None]:
    if run and (hw != run[0] or len(run) == batch_size):
      calls.append((len(run),) + tuple(run[0]))
      run = []
    if hw is not None:
      run.append(hw)
  return calls


def timed(call, repeats: int, sync) -> tuple[float, float]:
  """(median synchronous seconds per call, seconds for `repeats` back-to-back calls)."""
  sync(call())                                       # warm-up (compilation, allocation)
  lat = []
  for _ in range(repeats):
    t = time.perf_counter()
    sync(call())
    lat.append(time.perf_counter() - t)
  t = time.perf_counter()
  out = None
  for _ in range(repeats):
    out = call()
  sync(out)
  return statistics.median(lat), time.perf_counter() - t


def jax_forward(config, variables, dtype: str):
  """jit(normalised (B, H, W, 3) float32 -> last-stage (heat, paf) float32) for a compute dtype."""
  import jax
  import jax.numpy as jnp

  from bpnet_jax import model as model_lib
  from bpnet_jax import skeleton as skeleton_lib
  sk = skeleton_lib.load_skeleton(config.dataloader.pose_config.pose_config_path)
  model = model_lib.build_model(config.model, sk, dtype)

  @jax.jit
  def forward(v, x):
    heats, pafs = model.apply(v, x, train=False)
    return heats[-1].astype(jnp.float32), pafs[-1].astype(jnp.float32)
  return forward


def ort_session(path: str):
  import onnxruntime as ort
  providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
               if p in ort.get_available_providers()]
  opts = ort.SessionOptions()
  opts.log_severity_level = 3
  s = ort.InferenceSession(path, opts, providers=providers)
  return s, s.get_providers()[0]


def trt_missing() -> str | None:
  """Why TensorRT rows cannot run here, or None."""
  try:
    import tensorrt  # noqa: F401
  except ImportError:
    return "the tensorrt package is not installed"
  try:
    import torch
  except ImportError:
    return "PyTorch (for CUDA buffers) is not installed"
  if not torch.cuda.is_available():
    return "no CUDA GPU"
  return None


def mixed_aspect_compiles(config, variables, hw, files, count: int, batch_size: int,
                          workers: int) -> dict:
  """Compilations and network calls of the JAX forward for `count` photos (cycled) of mixed
  aspect ratios: `predict_iter` now, and the old consecutive grouping replayed on a fresh
  predictor. Returns {"images", "shapes", "before", "now"}, each of the last two {"calls",
  "batches": {batch size: calls}, "compilations"}."""
  import collections

  import numpy as np

  from bpnet_jax.inference import predictor, preprocess
  c = config.copy_and_resolve_references()
  c.inference.input_shape = list(hw)
  c.inference.keep_aspect_ratio_mode = "adjust_network_input"
  c.inference.compute_dtype = "float32"
  photos = [files[i % len(files)] for i in range(count)]

  def counted():
    pred = predictor.Predictor.from_variables(c, variables)
    fwd, calls = pred.backend._forward, []
    pred.backend._forward = lambda v, x: (calls.append(x.shape[:3]), fwd(v, x))[1]
    return pred, fwd, calls

  def summary(fwd, calls):
    return {"calls": len(calls), "batches": dict(collections.Counter(s[0] for s in calls)),
            "compilations": fwd._cache_size()}

  pred, fwd, calls = counted()
  shapes = [pred.prepare(preprocess.read_image(f))[0][0].shape[:2] for f in photos]
  list(pred.predict_iter(photos, workers=workers, batch_size=batch_size))
  now = summary(fwd, calls)
  old, fwd, calls = counted()
  for b, h, w in consecutive_groups(shapes, batch_size):
    np.asarray(old.backend(np.zeros((b, h, w, 3), np.uint8))[0])
  return {"images": count, "shapes": len(set(shapes)), "before": summary(fwd, calls),
          "now": now}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="coco", help="configs/<name>.py or a path")
  p.add_argument("--model", default=None, help="a training workdir / checkpoint (else random)")
  p.add_argument("--sizes", default="224x320,288x384,320x448", help="HxW list")
  p.add_argument("--batches", default="1,8")
  p.add_argument("--backends", default=",".join(BACKENDS))
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--e2e_size", default="288x384", help="HxW of the end-to-end run ('' skips)")
  p.add_argument("--e2e_backends", default="jax-fp32,jax-bf16,ort-fp32,ort-fp32-u8")
  p.add_argument("--e2e_workers", type=int, default=4)
  p.add_argument("--e2e_batches", default="1,8", help="images per network call")
  p.add_argument("--e2e_images", type=int, default=0, help="limit (0: the whole folder)")
  p.add_argument("--mixed_images", type=int, default=20,
                 help="photos (cycled) of the mixed-aspect compile count (0 skips)")
  p.add_argument("--mixed_batch", type=int, default=4, help="its batch size")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--smoke", action="store_true", help="tiny config and sizes, for CI")
  a = p.parse_args()
  if a.smoke:
    a.config, a.sizes, a.batches, a.repeats, a.e2e_size, a.e2e_images = \
        "demo", "64x64", "1,2", 2, "64x96", 3
    a.backends = "jax-fp32,jax-bf16,ort-fp32,ort-int8,trt-fp16"
    a.e2e_backends, a.e2e_batches, a.mixed_images = "jax-fp32,ort-fp32", "1,2", 12
  sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",") if s]
  batches = [int(b) for b in a.batches.split(",")]
  backends = [b for b in a.backends.split(",") if b]
  unknown = set(backends) - set(BACKENDS)
  if unknown:
    sys.exit(f"inference benchmark: unknown backends {sorted(unknown)}; choose from {BACKENDS}")
  e2e_backends = [b for b in a.e2e_backends.split(",") if b]
  if set(e2e_backends) - set(E2E_BACKENDS):
    sys.exit(f"inference benchmark: unknown --e2e_backends "
             f"{sorted(set(e2e_backends) - set(E2E_BACKENDS))}; choose from {E2E_BACKENDS}")

  import tempfile

  import jax
  import numpy as np

  from bpnet_jax import checkpoint
  from bpnet_jax import model as model_lib
  from bpnet_jax.inference import backends as backends_lib
  from bpnet_jax.inference import predictor, preprocess
  config = _common.load_config(a.config, a.set)
  if a.model:
    saved = checkpoint.load_model(a.model, config)
    config, variables = saved.config, saved.variables
  else:
    from bpnet_jax import skeleton as skeleton_lib
    sk = skeleton_lib.load_skeleton(config.dataloader.pose_config.pose_config_path)
    variables = model_lib.init_variables(model_lib.build_model(config.model, sk),
                                         jax.random.key(0), 64, 64)
  print(f"machine: {_common.machine_line()}")
  print(f"config {a.config}: {config.model.architecture}, {config.model.stages} stages, "
        f"{model_lib.count_params(variables)['total']:,} params, "
        f"{'weights ' + a.model if a.model else 'random weights'}")
  rng = np.random.default_rng(0)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    onnx_paths = {}

    def onnx_path(kind: str, hw, uint8: bool = False):
      """Exported model path for ('fp32', None) (dynamic H, W) or ('int8', (H, W)); uint8: the
      `--input_uint8` variant (normalises in the graph)."""
      from bpnet_jax.export import onnx_model
      key = (kind, hw, uint8)
      if key not in onnx_paths:
        path = os.path.join(tmp, f"{kind}_{hw[0] if hw else 'dyn'}x{hw[1] if hw else ''}"
                            f"{'_u8' if uint8 else ''}.onnx")
        cal = None
        if kind == "int8":
          data = rng.uniform(-0.5, 0.5, (4, hw[0], hw[1], 3)).astype(np.float32)
          cal = {"data": lambda: data, "batch_size": 1, "method": "percentile"}
        onnx_model.export(config, variables, path, input_dims=hw, data_type=kind, calibration=cal,
                          input_uint8=uint8)
        onnx_paths[key] = path
      return onnx_paths[key]

    jax_fns, device_vars = {}, jax.device_put(variables)
    for backend in backends:
      if backend.startswith("trt"):
        why = trt_missing()
        if why:
          rows.append(dict(backend=backend, size="all", batch="all", skipped=why))
          continue
      for hw in sizes:
        for b in batches:
          x = rng.uniform(-0.5, 0.5, (b, hw[0], hw[1], 3)).astype(np.float32)
          row = dict(backend=backend, size=f"{hw[0]}x{hw[1]}", batch=b)
          try:
            if backend.startswith("jax"):
              if backend not in jax_fns:     # one jitted function per dtype (one compile per shape)
                dtype = "bfloat16" if backend == "jax-bf16" else "float32"
                jax_fns[backend] = jax_forward(config, variables, dtype)
              fwd, xd = jax_fns[backend], jax.device_put(x)
              lat, total = timed(lambda: fwd(device_vars, xd), a.repeats, jax.block_until_ready)
              row["where"] = jax.devices()[0].platform
            elif backend.startswith("ort"):
              kind = backend.split("-")[1]
              path = onnx_path(kind, None if kind == "fp32" else hw)
              sess, provider = ort_session(path)
              lat, total = timed(lambda: sess.run(None, {"input_1": x}), a.repeats, lambda o: o)
              row["where"] = provider
            else:
              import tensorrt

              from bpnet_jax.export import runtimes
              from bpnet_jax.skeleton import skeleton_from_config
              kind = backend.split("-")[1]
              src = onnx_path("int8", hw) if kind == "int8" else onnx_path("fp32", None)
              eng = os.path.join(tmp, f"{backend}_{hw[0]}x{hw[1]}_b{b}.engine")
              runtimes.build_engine(src, eng, kind, hw, max_batch_size=max(batches))
              norm = config.dataloader.normalization_params
              trt = backends_lib.TensorRTBackend(eng, skeleton_from_config(config),
                                                 norm.image_scale, norm.image_offset)
              pixels = rng.integers(0, 256, x.shape, np.uint8)     # as the Predictor feeds it
              lat, total = timed(lambda: trt(pixels), a.repeats, lambda o: o)
              row["where"] = "TensorRT " + tensorrt.__version__
            row.update(latency_ms=1e3 * lat, ips=b * a.repeats / total)
          except (RuntimeError, ImportError) as e:
            row["skipped"] = str(e).splitlines()[0][:80]
          rows.append(row)

    e2e = []
    if a.e2e_size:
      hw = tuple(int(v) for v in a.e2e_size.split("x"))
      folder = os.path.join(_common.ROOT, "tests", "data", "coco_mini", "train2017")
      photos = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                      if f.lower().endswith(preprocess.IMAGE_EXTENSIONS))
      files = photos[:a.e2e_images] if a.e2e_images else photos
      c = config.copy_and_resolve_references()
      c.inference.input_shape = list(hw)
      c.inference.keep_aspect_ratio_mode = "pad_image_input"   # one shape: no recompiles
      for backend in e2e_backends:
        if backend.startswith("jax"):
          c.inference.compute_dtype = "bfloat16" if backend == "jax-bf16" else "float32"
          pred = predictor.Predictor.from_variables(c, variables)
        else:
          pred = predictor.Predictor.from_path(
              onnx_path("fp32", None, uint8=backend == "ort-fp32-u8"), c)
        for b in (int(v) for v in a.e2e_batches.split(",")):
          # Warm-up: compiles the one batch size per input shape a pass uses.
          list(pred.predict_iter(files, workers=a.e2e_workers, batch_size=b))
          t = time.perf_counter()
          people = sum(len(pp or []) for _, pp, _ in pred.predict_iter(
              files, workers=a.e2e_workers, batch_size=b))
          dt = time.perf_counter() - t
          e2e.append(dict(backend=backend, batch=b, images=len(files), ips=len(files) / dt,
                          people=people))

    mixed = None
    if a.e2e_size and a.mixed_images:
      mixed = mixed_aspect_compiles(config, variables, hw, photos, a.mixed_images,
                                    a.mixed_batch, a.e2e_workers)

  print()
  print("| backend | runs on | input HxW | batch | latency ms | images/s |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    if "skipped" in r:
      print(f"| {r['backend']} | - | {r['size']} | {r['batch']} | skipped: {r['skipped']} | - |")
    else:
      print(f"| {r['backend']} | {r['where']} | {r['size']} | {r['batch']} | "
            f"{r['latency_ms']:.2f} | {r['ips']:.1f} |")
  if e2e:
    print()
    print(f"end to end at {a.e2e_size} (JPEG decode + resize/pad on {a.e2e_workers} threads + "
          f"network + decode), tests/data/coco_mini photos:")
    print("| backend | batch | images | images/s | people found |")
    print("|---|---|---|---|---|")
    for r in e2e:
      print(f"| {r['backend']} | {r['batch']} | {r['images']} | {r['ips']:.1f} | {r['people']} |")
  if mixed:
    print()
    print(f"mixed aspect ratios at {a.e2e_size} (adjust_network_input), {mixed['images']} "
          f"coco_mini photos, batch {a.mixed_batch}: {mixed['shapes']} network input shapes")
    print("| grouping | network calls | batch size: calls | compilations |")
    print("|---|---|---|---|")
    for name, r in (("before: consecutive same-shape runs, partial groups as they are",
                     mixed["before"]),
                    ("now: shape buckets, partial buckets padded", mixed["now"])):
      sizes = ", ".join(f"{b}: {n}" for b, n in sorted(r["batches"].items(), reverse=True))
      print(f"| {name} | {r['calls']} | {sizes} | {r['compilations']} |")
    print(f"compile count (mixed aspect): before {mixed['before']['compilations']}, now "
          f"{mixed['now']['compilations']} (network shapes {mixed['shapes']})")


if __name__ == "__main__":
  main()
