"""Export for deployment: ONNX (fp32, fp16) traced from the JAX inference function.

The ONNX graph comes from the jaxpr (jax2onnx), not from TensorFlow (DECISIONS.md): input
`input_1` (B, H, W, 3) float32, the normalised image (x / 256 - 0.5, RGB), outputs `heatmap_out`
(B, H/8, W/8, J+1) and `paf_out` (B, H/8, W/8, 2L) of the last stage (or
`inference.output_stage_to_use`); the batch is dynamic, height and width fixed (`input_dims`) or
dynamic. `sdk_compatible` adds the original's fixed x4 nearest-neighbour upsampling of the PAF
output. fp16 models compute in float16 with float32 inputs and outputs.

Every export is checked with ONNX Runtime against JAX on random and real images; the maximum
absolute differences go to OUT.report.json and the export fails if fp32 exceeds 1e-4.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Sequence

import numpy as np

from bpnet_jax import model as model_lib

TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}
OPSET = 17


class ExportError(ValueError):
  """An export that cannot be done or fails its check (reported in one line)."""


def _require_onnx():
  try:
    import jax2onnx  # noqa: F401
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
  except ImportError as e:
    raise ExportError(f"ONNX export needs onnx, onnxruntime and jax2onnx ({e.name} is missing): "
                      "pip install 'bpnet_jax[onnx]' && pip install --no-deps jax2onnx==0.17.1"
                      ) from None


def inference_fn(model, variables, stage: int | None = None, sdk_compatible: bool = False):
  """x (B, H, W, 3) normalised float32 -> (heatmap, paf) float32 of one stage."""
  import jax.numpy as jnp
  i = -1 if stage is None else stage - 1

  def fn(x):
    heats, pafs = model.apply(variables, x, train=False)
    heat, paf = heats[i].astype(jnp.float32), pafs[i].astype(jnp.float32)
    if sdk_compatible:   # x4 nearest neighbour (works with symbolic H and W)
      paf = jnp.repeat(jnp.repeat(paf, 4, axis=1), 4, axis=2)
    return heat, paf
  return fn


def _clean(proto):
  """Drops jax2onnx's intermediate shape annotations (symbolic H/W through strided convs are
  not always right) and leaves the outputs' spatial dims symbolic; ONNX Runtime and TensorRT
  infer shapes themselves."""
  del proto.graph.value_info[:]
  for out, names in zip(proto.graph.output, (("B", "h", "w", None), ("B", "hp", "wp", None))):
    dims = out.type.tensor_type.shape.dim
    for d, name in zip(dims, names):
      if name is not None:
        d.ClearField("dim_value")
        d.dim_param = name
  return proto


def to_onnx_model(model, variables, input_dims: Sequence[int] | None = None, *,
                  stage: int | None = None, dtype: str = "fp32", sdk_compatible: bool = False,
                  opset: int = OPSET):
  """An onnx.ModelProto of the inference function. input_dims (H, W) or None (dynamic)."""
  _require_onnx()
  import logging
  from jax2onnx import to_onnx
  fn = inference_fn(model, variables, stage, sdk_compatible)
  h, w = (input_dims[0], input_dims[1]) if input_dims else ("H", "W")
  # jax2onnx reports plugins for packages we do not use (equinox, dm-pix) as warnings.
  logs = [logging.getLogger(n) for n in ("jax2onnx.plugins.plugin_system", "onnx_ir.serde")]
  levels = [g.level for g in logs]
  for g in logs:
    g.setLevel(logging.ERROR)
  try:
    proto = to_onnx(fn, [("B", h, w, 3)], model_name="bpnet", opset=opset,
                    input_names=["input_1"], output_names=["heatmap_out", "paf_out"])
  finally:
    for g, lv in zip(logs, levels):
      g.setLevel(lv)
  proto = _clean(proto)
  return to_fp16(proto) if dtype == "fp16" else proto


def to_fp16(proto):
  """float16 weights and compute; the input and outputs stay float32 (Cast at both ends).
  Resize's roi/scales stay float32 as ONNX requires."""
  import onnx
  from onnx import TensorProto, helper, numpy_helper
  g = proto.graph
  keep32 = {n.input[i] for n in g.node if n.op_type == "Resize" for i in (1, 2)
            if len(n.input) > i}
  for i, t in enumerate(g.initializer):
    if t.data_type == TensorProto.FLOAT and t.name not in keep32:
      g.initializer[i].CopyFrom(numpy_helper.from_array(
          numpy_helper.to_array(t).astype(np.float16), t.name))
  for n in g.node:
    if n.op_type == "Constant" and n.output[0] not in keep32:
      for a in n.attribute:
        if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
          a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16)))
    for a in n.attribute:
      if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
        a.i = TensorProto.FLOAT16
  inp = g.input[0].name
  for n in g.node:
    n.input[:] = [inp + "_fp16" if x == inp else x for x in n.input]
  outs = {o.name for o in g.output}
  for n in g.node:
    n.output[:] = [x + "_fp16" if x in outs else x for x in n.output]
  g.node.insert(0, helper.make_node("Cast", [inp], [inp + "_fp16"], to=TensorProto.FLOAT16))
  for o in g.output:
    g.node.append(helper.make_node("Cast", [o.name + "_fp16"], [o.name], to=TensorProto.FLOAT))
  onnx.checker.check_model(proto)
  return proto


def op_inventory(proto) -> dict:
  """{op type: count} over the graph (custom domains show as 'domain::op')."""
  out: dict = {}
  for n in proto.graph.node:
    key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
    out[key] = out.get(key, 0) + 1
  return dict(sorted(out.items()))


def check_parity(proto_or_path, jax_fn, inputs: Sequence[np.ndarray]) -> float:
  """Max |ONNX Runtime - JAX| over both outputs and all inputs."""
  import onnxruntime as ort
  data = proto_or_path if isinstance(proto_or_path, str) else proto_or_path.SerializeToString()
  opts = ort.SessionOptions()
  opts.log_severity_level = 3          # no shape-merge warnings on symbolic dims
  sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
  worst = 0.0
  for x in inputs:
    got = sess.run(["heatmap_out", "paf_out"], {"input_1": x})
    ref = [np.asarray(r) for r in jax_fn(x)]
    for a, b in zip(got, ref):
      if a.shape != b.shape:
        raise ExportError(f"ONNX output shape {a.shape} differs from JAX's {b.shape}")
      worst = max(worst, float(np.abs(a - b).max()))
  return worst


def check_inputs(input_dims, images: Sequence[np.ndarray] = (), seed: int = 0,
                 fill=(128, 128, 128), image_scale=(256.0,) * 3, image_offset=(0.5,) * 3):
  """Normalised check inputs: random batches (1 and 3) and real images preprocessed like
  inference (pad_image_input at input_dims, or 128x160 when dynamic)."""
  from bpnet_jax.inference.predictor import preprocess
  h, w = input_dims if input_dims else (128, 160)
  rng = np.random.default_rng(seed)
  out = [rng.uniform(-0.5, 0.5, (1, h, w, 3)).astype(np.float32),
         rng.uniform(-0.5, 0.5, (3, h, w, 3)).astype(np.float32)]
  if not input_dims:
    out.append(rng.uniform(-0.5, 0.5, (2, h + 32, w - 64, 3)).astype(np.float32))
  real = [preprocess(im, (h, w), "pad_image_input", fill)[0] for im in images]
  if real:
    x = np.stack(real).astype(np.float32) / np.asarray(image_scale, np.float32) \
        - np.asarray(image_offset, np.float32)
    out.append(x)
  return out


def export(config, variables, out_path: str, *, input_dims: Sequence[int] | None = None,
           data_type: str = "fp32", opset: int = OPSET, sdk_compatible: bool = False,
           check_images: Sequence[np.ndarray] = (), overwrite: bool = False,
           calibration: dict | None = None) -> dict:
  """Writes OUT.onnx and OUT.report.json (atomically); returns the report.

  int8: `calibration` = {"data": callable -> (N, H, W, 3) normalised tensor (called only if the
  cache is absent), "batch_size", "method" (entropy|percentile|minmax), "cache_file" (TensorRT
  calibration cache: reused if present, else written)}. The int8 export also writes
  OUT.fp32.onnx, the BatchNorm-folded fp32 graph whose tensor names the cache uses.
  """
  from bpnet_jax.skeleton import load_skeleton
  if data_type not in TOLERANCE and data_type != "int8":
    raise ExportError(f"--data_type {data_type!r}: expected fp32, fp16 or int8")
  if data_type == "int8":
    if input_dims is None:
      raise ExportError("--data_type int8 needs fixed --input_dims (calibration runs at one size)")
    if calibration is None:
      raise ExportError("--data_type int8 needs calibration images (--cal_image_dir) or a "
                        "calibration tensor (--cal_data_file) or cache (--cal_cache_file)")
  if input_dims is not None and (len(input_dims) != 2 or any(d % model_lib.OUTPUT_STRIDE or
                                                              d <= 0 for d in input_dims)):
    raise ExportError(f"input dims {tuple(input_dims)}: expected H,W positive multiples of "
                      f"{model_lib.OUTPUT_STRIDE}")
  report_path = os.path.splitext(out_path)[0] + ".report.json"
  for p in (out_path, report_path):
    if os.path.exists(p) and not overwrite:
      raise FileExistsError(f"{p} already exists (pass --overwrite to replace it)")
  sk = load_skeleton(config.dataloader.pose_config.pose_config_path)
  model = model_lib.build_model(config.model, sk)
  stage = config.inference.output_stage_to_use
  proto = to_onnx_model(model, variables, input_dims, stage=stage,
                        dtype="fp32" if data_type == "int8" else data_type,
                        sdk_compatible=sdk_compatible, opset=opset)
  int8_info = None
  if data_type == "int8":
    proto, int8_info = _int8(proto, out_path, calibration, overwrite)
  n = config.dataloader.normalization_params
  inputs = check_inputs(input_dims, check_images, image_scale=n.image_scale,
                        image_offset=n.image_offset)
  import jax
  ref_fn = jax.jit(inference_fn(model, variables, stage, sdk_compatible))
  diff = check_parity(proto, ref_fn, inputs)
  report = {
      "format": "bpnet_jax.export/1", "onnx": os.path.abspath(out_path), "data_type": data_type,
      "opset": opset, "input": {"name": "input_1", "layout": "NHWC", "dims": list(input_dims)
                                if input_dims else ["H", "W"], "dynamic_batch": True,
                                "normalization": {"scale": list(n.image_scale),
                                                  "offset": list(n.image_offset)}},
      "outputs": {"heatmap_out": sk.heat_channels, "paf_out": sk.paf_channels,
                  "stage": stage or config.model.stages, "sdk_compatible": sdk_compatible},
      "params": model_lib.count_params(variables)["total"],
      "parity": {"max_abs_diff": diff, "tolerance": TOLERANCE.get(data_type),
                 "inputs": [list(x.shape) for x in inputs],
                 "real_images": len(check_images)},
      "ops": op_inventory(proto),
  }
  if int8_info is not None:
    report["int8"] = int8_info
  if data_type in TOLERANCE and diff > TOLERANCE[data_type]:
    raise ExportError(f"ONNX Runtime differs from JAX by {diff:.3g} (> {TOLERANCE[data_type]} "
                      f"for {data_type}); nothing written")
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  tmp = out_path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(proto.SerializeToString())
  os.replace(tmp, out_path)
  with open(report_path + ".tmp", "w") as f:
    json.dump(report, f, indent=1)
  os.replace(report_path + ".tmp", report_path)
  return report


# ----------------------------------------------------------------------------------------------
# INT8: calibration data, activation ranges, a Q/DQ model, a TensorRT calibration cache.

CALIBRATION_METHODS = ("entropy", "percentile", "minmax")
TRT_CACHE_VERSION = "8601"   # header of caches written without TensorRT installed (TRT 8.6)


def calibration_data(image_dir: str, input_dims: Sequence[int], batches: int, batch_size: int,
                     fill=(128, 128, 128), image_scale=(256.0,) * 3, image_offset=(0.5,) * 3,
                     seed: int = 0) -> np.ndarray:
  """(batches * batch_size, H, W, 3) float32 normalised calibration images: a seeded random
  sample of the folder's .jpg/.jpeg/.png files, preprocessed like inference (pad_image_input at
  input_dims)."""
  from bpnet_jax.inference.predictor import IMAGE_EXTENSIONS, InferenceError, preprocess, read_image
  if not os.path.isdir(image_dir):
    raise ExportError(f"--cal_image_dir {image_dir}: not a directory")
  files = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
  need = batches * batch_size
  if len(files) < need:
    raise ExportError(f"--cal_image_dir {image_dir}: {len(files)} images, but --batches "
                      f"{batches} x --batch_size {batch_size} = {need} are needed")
  pick = sorted(np.random.default_rng(seed).choice(len(files), need, replace=False).tolist())
  out = np.empty((need, input_dims[0], input_dims[1], 3), np.float32)
  for k, i in enumerate(pick):
    try:
      image = read_image(os.path.join(image_dir, files[i]))
    except InferenceError as e:
      raise ExportError(f"calibration image {e}") from None
    x, _ = preprocess(image, input_dims, "pad_image_input", fill)
    out[k] = x.astype(np.float32) / np.asarray(image_scale, np.float32) \
        - np.asarray(image_offset, np.float32)
  return out


def load_or_make_calibration_data(cal_data_file: str | None, make) -> np.ndarray:
  """The calibration tensor from cal_data_file (.npy) if present, else make() saved there."""
  if cal_data_file and os.path.exists(cal_data_file):
    try:
      return np.load(cal_data_file)
    except (OSError, ValueError) as e:
      raise ExportError(f"--cal_data_file {cal_data_file}: not a calibration tensor file ({e})"
                        ) from None
  data = make()
  if cal_data_file:
    tmp = cal_data_file + ".tmp.npy"
    np.save(tmp, data)
    os.replace(tmp, cal_data_file)
  return data


def int8_calibration(config, image_dir: str | None, input_dims: Sequence[int], batches: int,
                     batch_size: int, method: str = "entropy", data_file: str | None = None,
                     cache_file: str | None = None) -> dict:
  """The `calibration` argument of `export` for int8: images of `image_dir` preprocessed with
  the config's normalisation, through `data_file` (made once, then reused) and `cache_file`."""
  from bpnet_jax.inference.predictor import pad_value
  n = config.dataloader.normalization_params
  make = lambda: calibration_data(image_dir, input_dims, batches, batch_size,
                                  pad_value(n.image_scale, n.image_offset), n.image_scale,
                                  n.image_offset)
  return {"data": lambda: load_or_make_calibration_data(data_file, make),
          "batch_size": batch_size, "method": method, "cache_file": cache_file}


def write_trt_cache(path: str, ranges: dict, version: str | None = None) -> None:
  """TensorRT calibration cache: 'TRT-<ver>-EntropyCalibration2', then one line per tensor,
  'name: <big-endian float32 scale in hex>', scale = max |range| / 127."""
  import struct
  if version is None:
    try:
      import tensorrt
      major, minor, patch = (tensorrt.__version__.split(".") + ["0", "0"])[:3]
      version = f"{int(major)}{int(minor)}{int(patch):02d}"
    except ImportError:
      version = TRT_CACHE_VERSION
  lines = [f"TRT-{version}-EntropyCalibration2"]
  for name, (lo, hi) in ranges.items():
    scale = max(abs(float(lo)), abs(float(hi))) / 127.0
    lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(tmp, path)


def read_trt_cache(path: str) -> dict:
  """{tensor name: (-amax, amax)} from a TensorRT calibration cache."""
  import struct
  try:
    lines = open(path).read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ExportError(f"--cal_cache_file {path}: unreadable ({e})") from None
  if not lines or not lines[0].startswith("TRT-"):
    raise ExportError(f"--cal_cache_file {path}: not a TensorRT calibration cache (expected a "
                      "'TRT-<version>-...' header)")
  out = {}
  for i, line in enumerate(lines[1:], 2):
    name, sep, value = line.rpartition(": ")
    try:
      scale = struct.unpack(">f", bytes.fromhex(value.strip()))[0]
    except ValueError:
      raise ExportError(f"--cal_cache_file {path}:{i}: expected 'tensor: <8 hex digits>'"
                        ) from None
    out[name] = (-127.0 * scale, 127.0 * scale)
  return out


def calibrate(model_path: str, data: np.ndarray, batch_size: int, method: str) -> dict:
  """{tensor name: (lowest, highest)} activation ranges over the calibration batches."""
  from onnxruntime import quantization as q
  import tempfile
  reader = _Batches(data, batch_size)
  with tempfile.TemporaryDirectory() as tmp:
    cal = q.create_calibrator(model_path, augmented_model_path=os.path.join(tmp, "aug.onnx"),
                              calibrate_method=_ort_method(method),
                              extra_options={"symmetric": True})
    with contextlib.redirect_stdout(io.StringIO()):    # the calibrators print progress
      cal.collect_data(reader)
      data_ = cal.compute_data()
  return {k: tuple(float(np.asarray(x)) for x in v.range_value) for k, v in data_.data.items()}


def _ort_method(method):
  from onnxruntime import quantization as q
  return {"entropy": q.CalibrationMethod.Entropy, "percentile": q.CalibrationMethod.Percentile,
          "minmax": q.CalibrationMethod.MinMax}[method]


class _Batches:
  """onnxruntime CalibrationDataReader over a calibration tensor."""

  def __init__(self, data, batch_size):
    self.batches = [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
    self.i = 0

  def get_next(self):
    if self.i >= len(self.batches):
      return None
    self.i += 1
    return {"input_1": self.batches[self.i - 1]}

  def rewind(self):
    self.i = 0


def fold_batchnorm(fp32_path: str, out_path: str) -> None:
  """The fp32 model with shapes inferred and BatchNorm folded into the convs (ONNX Runtime's
  quantization preprocessing): the graph INT8 calibration and quantization work on."""
  from onnxruntime import quantization as q
  q.quant_pre_process(fp32_path, out_path)


def quantize_qdq(base_path: str, out_path: str, ranges: dict, method: str) -> None:
  """A Q/DQ INT8 model (symmetric int8 activations and per-channel weights, as TensorRT builds
  them) from a BN-folded fp32 model and its activation ranges."""
  import tempfile
  from onnxruntime import quantization as q
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, "ranges")
    td = q.TensorsData(_ort_method(method), {k: q.TensorData(
        lowest=np.float32(lo), highest=np.float32(hi)) for k, (lo, hi) in ranges.items()})
    q.save_tensors_data(td, cache)
    with contextlib.redirect_stdout(io.StringIO()):
      q.quantize_static(base_path, os.path.join(tmp, "int8.onnx"), None,
                        quant_format=q.QuantFormat.QDQ, per_channel=True,
                        activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                        calibrate_method=_ort_method(method), calibration_cache_path=cache,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    os.replace(os.path.join(tmp, "int8.onnx"), out_path)


def _int8(proto, out_path, calibration, overwrite):
  """(Q/DQ proto, report section); writes OUT.fp32.onnx and the calibration cache."""
  import tempfile
  import onnx
  base = os.path.splitext(out_path)[0] + ".fp32.onnx"
  cache = calibration.get("cache_file")
  method = calibration.get("method", "entropy")
  if method not in CALIBRATION_METHODS:
    raise ExportError(f"calibration method {method!r}: expected one of {CALIBRATION_METHODS}")
  if os.path.exists(base) and not overwrite:
    raise FileExistsError(f"{base} already exists (pass --overwrite to replace it)")
  with tempfile.TemporaryDirectory() as tmp:
    raw, folded = os.path.join(tmp, "raw.onnx"), os.path.join(tmp, "folded.onnx")
    onnx.save(proto, raw)
    fold_batchnorm(raw, folded)
    if cache and os.path.exists(cache):
      ranges, source = read_trt_cache(cache), "cache"
      names = {o for n in onnx.load(folded).graph.node for o in n.output}
      unknown = sorted(set(ranges) - names - {"input_1"})
      if unknown:
        raise ExportError(f"--cal_cache_file {cache}: tensors {unknown[:3]} are not in this "
                          "model (a cache from another model or export options?)")
    else:
      data = calibration["data"]()
      ranges = calibrate(folded, data, calibration.get("batch_size", 1), method)
      source = f"{len(data)} images"
      if cache:
        write_trt_cache(cache, ranges)
    q8 = os.path.join(tmp, "int8.onnx")
    quantize_qdq(folded, q8, ranges, method)
    os.replace(folded, base + ".tmp")
    os.replace(base + ".tmp", base)
    proto8 = onnx.load(q8)
  return proto8, {"calibration": source, "method": method, "tensors": len(ranges),
                  "cache_file": os.path.abspath(cache) if cache else None,
                  "fp32_graph": os.path.abspath(base)}


# ----------------------------------------------------------------------------------------------
# TensorRT engines and TF SavedModels (optional packages, imported only here).

def build_engine(onnx_path: str, engine_path: str, data_type: str, input_dims: Sequence[int],
                 max_batch_size: int = 1, workspace_bytes: int = 2 << 30,
                 overwrite: bool = False) -> dict:
  """Builds a TensorRT engine from an exported ONNX model (needs the `tensorrt` package and an
  NVIDIA GPU). One optimisation profile: batch 1..max_batch_size at input_dims; fp16 sets the
  FP16 flag, int8 builds the Q/DQ model with explicit quantization (INT8 flag)."""
  if os.path.exists(engine_path) and not overwrite:
    raise FileExistsError(f"{engine_path} already exists (pass --overwrite to replace it)")
  try:
    import tensorrt as trt
  except ImportError:
    raise ExportError("--engine_file needs TensorRT (the 'tensorrt' package on a machine with "
                      "an NVIDIA GPU); the ONNX export itself succeeded") from None
  logger = trt.Logger(trt.Logger.WARNING)
  builder = trt.Builder(logger)
  flags = 0
  if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):   # implicit in TensorRT 10
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
  network = builder.create_network(flags)
  parser = trt.OnnxParser(network, logger)
  with open(onnx_path, "rb") as f:
    if not parser.parse(f.read()):
      errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
      raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors[:300]}")
  config = builder.create_builder_config()
  config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
  if data_type == "fp16":
    config.set_flag(trt.BuilderFlag.FP16)
  elif data_type == "int8":
    config.set_flag(trt.BuilderFlag.INT8)
    config.set_flag(trt.BuilderFlag.FP16)      # layers left unquantized may run in fp16
  h, w = input_dims
  profile = builder.create_optimization_profile()
  profile.set_shape("input_1", (1, h, w, 3), (max(1, max_batch_size // 2), h, w, 3),
                    (max_batch_size, h, w, 3))
  config.add_optimization_profile(profile)
  blob = builder.build_serialized_network(network, config)
  if blob is None:
    raise ExportError(f"TensorRT failed to build an engine from {onnx_path}")
  with open(engine_path + ".tmp", "wb") as f:
    f.write(bytes(blob))
  os.replace(engine_path + ".tmp", engine_path)
  return {"engine": os.path.abspath(engine_path), "tensorrt": trt.__version__,
          "max_batch_size": max_batch_size, "workspace_bytes": int(workspace_bytes)}


def export_saved_model(model, variables, out_dir: str, input_dims: Sequence[int] | None = None,
                       stage: int | None = None, check: Sequence[np.ndarray] = (),
                       overwrite: bool = False) -> dict:
  """A TF SavedModel of the inference function via jax2tf (signature 'serving_default': input
  `input_1`, outputs `heatmap_out`, `paf_out`), loaded back and compared with JAX."""
  import shutil
  try:
    import tensorflow as tf
    from jax.experimental import jax2tf
  except ImportError:
    raise ExportError("--saved_model needs TensorFlow (pip install 'bpnet_jax[tf]')") from None
  if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} already exists (pass --overwrite to replace it)")
  import jax
  fn = inference_fn(model, variables, stage)
  h, w = (input_dims[0], input_dims[1]) if input_dims else (None, None)
  poly = "(b, _, _, _)" if input_dims else "(b, 8*h, 8*w, _)"
  tf_fn = jax2tf.convert(fn, polymorphic_shapes=[poly], with_gradient=False)
  spec = tf.TensorSpec([None, h, w, 3], tf.float32, name="input_1")

  @tf.function(input_signature=[spec], autograph=False)
  def serve(input_1):
    heat, paf = tf_fn(input_1)
    return {"heatmap_out": heat, "paf_out": paf}

  module = tf.Module()
  module.serve = serve
  tmp = out_dir.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  tf.saved_model.save(module, tmp, signatures={"serving_default": serve})
  loaded = tf.saved_model.load(tmp).signatures["serving_default"]
  ref = jax.jit(fn)
  worst = 0.0
  for x in check:
    got = loaded(input_1=tf.constant(x))
    for name, r in zip(("heatmap_out", "paf_out"), ref(x)):
      worst = max(worst, float(np.abs(got[name].numpy() - np.asarray(r)).max()))
  if worst > TOLERANCE["fp32"]:
    shutil.rmtree(tmp, ignore_errors=True)
    raise ExportError(f"the SavedModel differs from JAX by {worst:.3g}; nothing written")
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  return {"saved_model": os.path.abspath(out_dir), "max_abs_diff": worst,
          "tensorflow": tf.__version__}
