"""`bpnet export` as one library call: a saved model -> ONNX (fp32, fp16 or int8), and
optionally a TensorRT engine and a TF SavedModel."""

from __future__ import annotations

import os
from typing import Sequence

from bpnet_jax import checkpoint as checkpoint_lib
from bpnet_jax import config as config_lib
from bpnet_jax import fileio
from bpnet_jax import model as model_lib
from bpnet_jax.errors import ExportError
from bpnet_jax.export import int8, onnx_model, runtimes


def export_model(model_path: str, output_file: str, *, config=None, data_type: str = "fp32",
                 input_dims: Sequence[int] | None = None, opset: int = onnx_model.OPSET,
                 sdk_compatible: bool = False, cal_image_dir: str | None = None,
                 cal_data_file: str | None = None, cal_cache_file: str | None = None,
                 cal_method: str = "entropy", batches: int = 10, batch_size: int = 1,
                 engine_file: str | None = None, max_batch_size: int = 1,
                 max_workspace_size: int = 2 << 30, saved_model: str | None = None,
                 overwrite: bool = False, input_uint8: bool = False) -> dict:
  """Exports the saved model at `model_path` (workdir, checkpoint or pruned model dir).

  input_dims: (H, W) fixed input size, or None for dynamic H and W (int8 and engines default to
  `inference.input_shape`). input_uint8: the ONNX model (and an engine built from it) takes
  uint8 RGB pixels and normalises them itself (the TF SavedModel keeps the float input).
  Returns the ONNX report, plus "engine" and "saved_model" sections when those were built.
  """
  if not output_file.endswith(".onnx"):
    raise ExportError(f"-o {output_file}: expected a path ending in .onnx")
  saved = checkpoint_lib.load_model(model_path, config)
  config, variables = saved.config, saved.variables
  calibration = None
  if data_type == "int8":
    input_dims = list(input_dims or config.inference.input_shape)
    have = [x for x in (cal_cache_file, cal_data_file) if x and os.path.exists(x)]
    if not cal_image_dir and not have:
      raise ExportError("--data_type int8 needs --cal_image_dir (or an existing --cal_data_file "
                        "or --cal_cache_file)")
    calibration = int8.int8_calibration(config, cal_image_dir, input_dims, batches, batch_size,
                                        cal_method, cal_data_file, cal_cache_file)
  if engine_file and input_dims is None:
    raise ExportError("--engine_file needs --input_dims H,W,3 (engines have a fixed input size)")
  report = onnx_model.export(config, variables, output_file, input_dims=input_dims,
                             data_type=data_type, opset=opset, sdk_compatible=sdk_compatible,
                             overwrite=overwrite, calibration=calibration,
                             input_uint8=input_uint8)
  if saved_model:
    net = model_lib.build_model(config.model, saved.skeleton)
    report["saved_model"] = runtimes.export_saved_model(
        net, variables, saved_model, input_dims, config.inference.output_stage_to_use,
        onnx_model.check_inputs(input_dims), overwrite)
  if engine_file:
    report["engine"] = runtimes.build_engine(output_file, engine_file, data_type, input_dims,
                                             max_batch_size, max_workspace_size, overwrite)
    # The engine describes itself like the ONNX model it was built from.
    fileio.write_text(os.path.splitext(engine_file)[0] + ".config.json", config_lib.to_json(
        checkpoint_lib.with_skeleton(config)))
  return report
