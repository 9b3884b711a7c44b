"""TensorRT engines and TF SavedModels from an exported model (optional packages: tensorrt
needs an NVIDIA GPU; TensorFlow is the `tf` extra). Each is imported inside its function, with
a one-line ExportError when missing.
"""

from __future__ import annotations

import os
import shutil
from typing import Sequence

import jax
import numpy as np

from bpnet_jax import fileio
from bpnet_jax.errors import ExportError
from bpnet_jax.export.onnx_model import TOLERANCE, inference_fn


def build_engine(onnx_path: str, engine_path: str, data_type: str, input_dims: Sequence[int],
                 max_batch_size: int = 1, workspace_bytes: int = 2 << 30,
                 overwrite: bool = False) -> dict:
  """Builds a TensorRT engine from an exported ONNX model (needs the `tensorrt` package and an
  NVIDIA GPU). One optimisation profile: batch 1..max_batch_size at input_dims; fp16 sets the
  FP16 flag, int8 builds the Q/DQ model with explicit quantization (INT8 flag)."""
  if os.path.exists(engine_path) and not overwrite:
    raise FileExistsError(f"{engine_path} already exists (pass --overwrite to replace it)")
  try:
    import tensorrt as trt  # optional extra
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
  fileio.write_bytes(engine_path, bytes(blob))
  return {"engine": os.path.abspath(engine_path), "tensorrt": trt.__version__,
          "max_batch_size": max_batch_size, "workspace_bytes": int(workspace_bytes)}


def export_saved_model(model, variables, out_dir: str, input_dims: Sequence[int] | None = None,
                       stage: int | None = None, check: Sequence[np.ndarray] = (),
                       overwrite: bool = False) -> dict:
  """A TF SavedModel of the inference function via jax2tf (signature 'serving_default': input
  `input_1`, outputs `heatmap_out`, `paf_out`), loaded back and compared with JAX."""
  try:
    import tensorflow as tf  # optional extra
    from jax.experimental import jax2tf
  except ImportError:
    raise ExportError("--saved_model needs TensorFlow (pip install 'bpnet_jax[tf]')") from None
  if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} already exists (pass --overwrite to replace it)")
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
