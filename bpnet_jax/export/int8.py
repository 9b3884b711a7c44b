"""INT8 export: calibration data, activation ranges, a Q/DQ ONNX model, a TensorRT cache.

Calibration images are preprocessed like inference (pad_image_input at the export size) into a
normalised (N, H, W, 3) tensor, kept in a .npy file for reuse. Activation ranges come from ONNX
Runtime's calibrators on the BatchNorm-folded fp32 graph (entropy, percentile or min-max); they
are written as a TensorRT calibration cache (scale = max |range| / 127 per tensor) and turned
into a Q/DQ model with symmetric int8 activations and per-channel int8 weights, as TensorRT
builds them. onnx and onnxruntime are optional extras, imported where used.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import struct
import tempfile
from typing import Sequence

import numpy as np

from bpnet_jax import fileio
from bpnet_jax.errors import ExportError, InferenceError
from bpnet_jax.inference.preprocess import IMAGE_EXTENSIONS, pad_value, preprocess, read_image

CALIBRATION_METHODS = ("entropy", "percentile", "minmax")
TRT_CACHE_VERSION = "8601"   # header of caches written without TensorRT installed (TRT 8.6)


def calibration_data(image_dir: str, input_dims: Sequence[int], batches: int, batch_size: int,
                     fill=(128, 128, 128), image_scale=(256.0,) * 3, image_offset=(0.5,) * 3,
                     seed: int = 0) -> np.ndarray:
  """(batches * batch_size, H, W, 3) float32 normalised calibration images: a seeded random
  sample of the folder's .jpg/.jpeg/.png files, preprocessed like inference (pad_image_input at
  input_dims)."""
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


def load_or_make_calibration_data(cal_data_file: str | None, make,
                                  input_dims: Sequence[int] | None = None) -> np.ndarray:
  """The calibration tensor from cal_data_file (.npy) if present, else make() saved there."""
  if cal_data_file and os.path.exists(cal_data_file):
    try:
      data = np.load(cal_data_file)
    except (OSError, ValueError) as e:
      raise ExportError(f"--cal_data_file {cal_data_file}: not a calibration tensor file ({e})"
                        ) from None
    want = f"(N, {input_dims[0]}, {input_dims[1]}, 3)" if input_dims else "(N, H, W, 3)"
    if (data.ndim != 4 or data.shape[-1] != 3 or len(data) == 0
        or (input_dims and tuple(data.shape[1:3]) != tuple(input_dims))):
      raise ExportError(f"--cal_data_file {cal_data_file}: shape {data.shape}, expected {want} "
                        "normalised images at the export size")
    return data.astype(np.float32, copy=False)
  data = make()
  if cal_data_file:
    with fileio.atomic_path(cal_data_file) as tmp, open(tmp, "wb") as f:
      np.save(f, data)
  return data


def int8_calibration(config, image_dir: str | None, input_dims: Sequence[int], batches: int,
                     batch_size: int, method: str = "entropy", data_file: str | None = None,
                     cache_file: str | None = None) -> dict:
  """The `calibration` argument of `export` for int8: images of `image_dir` preprocessed with
  the config's normalisation, through `data_file` (made once, then reused) and `cache_file`."""
  n = config.dataloader.normalization_params
  make = lambda: calibration_data(image_dir, input_dims, batches, batch_size,
                                  pad_value(n.image_scale, n.image_offset), n.image_scale,
                                  n.image_offset)
  return {"data": lambda: load_or_make_calibration_data(data_file, make, input_dims),
          "batch_size": batch_size, "method": method, "cache_file": cache_file}


def write_trt_cache(path: str, ranges: dict, version: str | None = None) -> None:
  """TensorRT calibration cache: 'TRT-<ver>-EntropyCalibration2', then one line per tensor,
  'name: <big-endian float32 scale in hex>', scale = max |range| / 127."""
  if version is None:
    try:
      import tensorrt  # optional extra
      major, minor, patch = (tensorrt.__version__.split(".") + ["0", "0"])[:3]
      version = f"{int(major)}{int(minor)}{int(patch):02d}"
    except ImportError:
      version = TRT_CACHE_VERSION
  lines = [f"TRT-{version}-EntropyCalibration2"]
  for name, (lo, hi) in ranges.items():
    scale = max(abs(float(lo)), abs(float(hi))) / 127.0
    lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
  fileio.write_text(path, "\n".join(lines) + "\n")


def read_trt_cache(path: str) -> dict:
  """{tensor name: (-amax, amax)} from a TensorRT calibration cache."""
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
  from onnxruntime import quantization as q  # optional extra
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
  from onnxruntime import quantization as q  # optional extra
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
  from onnxruntime import quantization as q  # optional extra
  q.quant_pre_process(fp32_path, out_path)


def quantize_qdq(base_path: str, out_path: str, ranges: dict, method: str) -> None:
  """A Q/DQ INT8 model (symmetric int8 activations and per-channel weights, as TensorRT builds
  them) from a BN-folded fp32 model and its activation ranges."""
  from onnxruntime import quantization as q  # optional extra
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
    shutil.move(os.path.join(tmp, "int8.onnx"), out_path)


def quantize_model(proto, out_path, calibration, overwrite):
  """(Q/DQ proto, report section); writes OUT.fp32.onnx and the calibration cache."""
  import onnx  # optional extra
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
    with fileio.atomic_path(base) as tmp_base:
      shutil.move(folded, tmp_base)
    proto8 = onnx.load(q8)
  return proto8, {"calibration": source, "method": method, "tensors": len(ranges),
                  "cache_file": os.path.abspath(cache) if cache else None,
                  "fp32_graph": os.path.abspath(base)}


