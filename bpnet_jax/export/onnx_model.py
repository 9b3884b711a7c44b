"""Export for deployment: ONNX (fp32, fp16) traced from the JAX inference function.

The ONNX graph comes from the jaxpr (jax2onnx), not from TensorFlow (docs/decisions.md): input
`input_1` (B, H, W, 3) float32, the normalised image (x / 256 - 0.5, RGB), outputs `heatmap_out`
(B, H/8, W/8, J+1) and `paf_out` (B, H/8, W/8, 2L) of the last stage (or
`inference.output_stage_to_use`); the batch is dynamic, height and width fixed (`input_dims`) or
dynamic. `sdk_compatible` adds the original's fixed x4 nearest-neighbour upsampling of the PAF
output. fp16 models compute in float16 with float32 inputs and outputs. `input_uint8` instead
takes `input_1` (B, H, W, 3) uint8 RGB and normalises inside the graph (Cast, Div, Sub: x /
scale - offset of config.dataloader.normalization_params): a quarter of the bytes per image for
runtimes that copy the input to a device (fp32, fp16 and int8 alike).

Every export is checked with ONNX Runtime against JAX on random and photo-like images; the
maximum absolute differences go to OUT.report.json and the export fails if fp32 exceeds 1e-4.
OUT.config.json (the model's resolved config, skeleton included) makes the exported model
self-describing: `Predictor.from_path("OUT.onnx")` needs no config.

onnx, onnxruntime and jax2onnx are optional extras: imported inside the functions that need
them, with a one-line ExportError naming the install command when missing.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from bpnet_jax import checkpoint as checkpoint_lib
from bpnet_jax import config as config_lib
from bpnet_jax import fileio
from bpnet_jax import model as model_lib
from bpnet_jax.data import synthetic
from bpnet_jax.errors import ExportError
from bpnet_jax.export import int8
from bpnet_jax.inference.backends import ort_session
from bpnet_jax.inference.preprocess import pad_value, preprocess
from bpnet_jax.skeleton import skeleton_from_config

TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}
OPSET = 17




def require_onnx():
  try:
    import jax2onnx  # noqa: F401  (optional extra)
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
  except ImportError as e:
    raise ExportError(f"ONNX export needs onnx, onnxruntime and jax2onnx ({e.name} is missing): "
                      "pip install 'bpnet_jax[onnx]' && pip install --no-deps jax2onnx==0.17.1"
                      ) from None


def inference_fn(model, variables, stage: int | None = None, sdk_compatible: bool = False):
  """x (B, H, W, 3) normalised float32 -> (heatmap, paf) float32 of one stage."""
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
  require_onnx()
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


def add_uint8_input(proto, image_scale, image_offset):
  """The graph's float input `input_1` becomes (B, H, W, 3) uint8 RGB, normalised in the graph:
  Cast to float32, Div by image_scale, Sub image_offset (per channel), then the original graph.
  Works on fp32, fp16 (its own Cast to float16 follows) and Q/DQ int8 graphs alike."""
  import onnx  # optional extra
  from onnx import TensorProto, helper, numpy_helper
  g = proto.graph
  inp = g.input[0].name
  norm = inp + "_normalized"
  for n in g.node:
    n.input[:] = [norm if x == inp else x for x in n.input]
  per_channel = lambda v: np.broadcast_to(np.asarray(v, np.float32), (3,)).copy()
  g.initializer.extend([numpy_helper.from_array(per_channel(image_scale), inp + "_scale"),
                        numpy_helper.from_array(per_channel(image_offset), inp + "_offset")])
  nodes = [helper.make_node("Cast", [inp], [inp + "_float"], to=TensorProto.FLOAT),
           helper.make_node("Div", [inp + "_float", inp + "_scale"], [inp + "_scaled"]),
           helper.make_node("Sub", [inp + "_scaled", inp + "_offset"], [norm])]
  for k, node in enumerate(nodes):
    g.node.insert(k, node)
  g.input[0].type.tensor_type.elem_type = TensorProto.UINT8
  onnx.checker.check_model(proto)
  return proto


def to_fp16(proto):
  """float16 weights and compute; the input and outputs stay float32 (Cast at both ends).
  Resize's roi/scales stay float32 as ONNX requires."""
  import onnx  # optional extra
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
  """Max |ONNX Runtime - JAX| over both outputs and all inputs (fed to both as they are:
  normalised float32, or uint8 images for a uint8-input model and a `jax_fn` that
  normalises)."""
  data = proto_or_path if isinstance(proto_or_path, str) else proto_or_path.SerializeToString()
  sess = ort_session(data)
  worst = 0.0
  for x in inputs:
    got = sess.run(["heatmap_out", "paf_out"], {"input_1": x})
    ref = [np.asarray(r) for r in jax_fn(x)]
    for a, b in zip(got, ref):
      if a.shape != b.shape:
        raise ExportError(f"ONNX output shape {a.shape} differs from JAX's {b.shape}")
      worst = max(worst, float(np.abs(a - b).max()))
  return worst


def photo_like_images(count: int = 2, seed: int = 0) -> list[np.ndarray]:
  """Photo-like RGB test images (synthetic people on textured backgrounds, 240x320): parity is
  checked on activations like real ones, without shipping photos."""
  rng = np.random.default_rng(seed)
  return [cv2.cvtColor(synthetic.make_image(rng, 320, 240, i, 0)[0], cv2.COLOR_BGR2RGB)
          for i in range(count)]


def check_inputs(input_dims, images: Sequence[np.ndarray] = (), seed: int = 0,
                 fill=(128, 128, 128), image_scale=(256.0,) * 3, image_offset=(0.5,) * 3,
                 uint8: bool = False):
  """Check inputs: random batches (1 and 3, and a second size when dynamic) and images
  preprocessed like inference (pad_image_input at input_dims, or 128x160 when dynamic).
  Normalised float32 (x / image_scale - image_offset), or the (B, H, W, 3) uint8 pixels when
  `uint8` (for a uint8-input model)."""
  h, w = input_dims if input_dims else (128, 160)
  rng = np.random.default_rng(seed)
  shapes = [(1, h, w, 3), (3, h, w, 3)] + ([] if input_dims else [(2, h + 32, w - 64, 3)])
  out = [rng.integers(0, 256, s, np.uint8) for s in shapes] if uint8 else \
      [rng.uniform(-0.5, 0.5, s).astype(np.float32) for s in shapes]
  real = [preprocess(im, (h, w), "pad_image_input", fill)[0] for im in images]
  if real:
    out.append(np.stack(real) if uint8 else normalize(np.stack(real), image_scale, image_offset))
  return out


def normalize(images, image_scale, image_offset):
  """(..., 3) uint8 pixels -> float32 x / image_scale - image_offset (the network's input)."""
  return (np.asarray(images).astype(np.float32) / np.asarray(image_scale, np.float32)
          - np.asarray(image_offset, np.float32))


def export(config, variables, out_path: str, *, input_dims: Sequence[int] | None = None,
           data_type: str = "fp32", opset: int = OPSET, sdk_compatible: bool = False,
           check_images: Sequence[np.ndarray] = (), overwrite: bool = False,
           calibration: dict | None = None, input_uint8: bool = False) -> dict:
  """Writes OUT.onnx and OUT.report.json (atomically); returns the report.

  input_uint8: `input_1` is (B, H, W, 3) uint8 RGB, normalised inside the graph with the
  config's normalization_params (report: "input": {"dtype": "uint8", ...}); the default is the
  TAO/DeepStream contract, normalised float32. Parity is then checked on uint8 images against
  JAX normalising them the same way.

  int8: `calibration` = {"data": callable -> (N, H, W, 3) normalised tensor (called only if the
  cache is absent), "batch_size", "method" (entropy|percentile|minmax), "cache_file" (TensorRT
  calibration cache: reused if present, else written)}. The int8 export also writes
  OUT.fp32.onnx, the BatchNorm-folded fp32 graph whose tensor names the cache uses.
  """
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
  config_path = os.path.splitext(out_path)[0] + ".config.json"
  fileio.check_can_write([out_path, report_path, config_path], overwrite)
  check_images = list(check_images) or photo_like_images()
  sk = skeleton_from_config(config)
  model = model_lib.build_model(config.model, sk)
  stage = config.inference.output_stage_to_use
  proto = to_onnx_model(model, variables, input_dims, stage=stage,
                        dtype="fp32" if data_type == "int8" else data_type,
                        sdk_compatible=sdk_compatible, opset=opset)
  int8_info = None
  if data_type == "int8":
    proto, int8_info = int8.quantize_model(proto, out_path, calibration, overwrite)
  n = config.dataloader.normalization_params
  fn = inference_fn(model, variables, stage, sdk_compatible)
  if input_uint8:
    # After fp16/int8 conversion: the prefix stays float32 and feeds their own first nodes.
    proto = add_uint8_input(proto, n.image_scale, n.image_offset)
    net_fn = fn
    fn = lambda x: net_fn(x.astype(jnp.float32) / jnp.asarray(n.image_scale, jnp.float32)
                          - jnp.asarray(n.image_offset, jnp.float32))
  inputs = check_inputs(input_dims, check_images, fill=pad_value(n.image_scale, n.image_offset),
                        image_scale=n.image_scale, image_offset=n.image_offset,
                        uint8=input_uint8)
  diff = check_parity(proto, jax.jit(fn), inputs)
  report = {
      "format": "bpnet_jax.export/1", "onnx": os.path.abspath(out_path), "data_type": data_type,
      "opset": opset, "input": {"name": "input_1", "layout": "NHWC",
                                "dtype": "uint8" if input_uint8 else "float32",
                                "dims": list(input_dims) if input_dims else ["H", "W"],
                                "dynamic_batch": True,
                                "normalization": {"scale": list(n.image_scale),
                                                  "offset": list(n.image_offset),
                                                  "in_graph": input_uint8}},
      "outputs": {"heatmap_out": sk.heat_channels, "paf_out": sk.paf_channels,
                  "stage": stage or config.model.stages, "sdk_compatible": sdk_compatible},
      "params": model_lib.count_params(variables)["total"],
      "parity": {"max_abs_diff": diff, "tolerance": TOLERANCE.get(data_type),
                 "inputs": [list(x.shape) for x in inputs],
                 "images": len(check_images)},
      "ops": op_inventory(proto),
  }
  if int8_info is not None:
    report["int8"] = int8_info
  if data_type in TOLERANCE and diff > TOLERANCE[data_type]:
    raise ExportError(f"ONNX Runtime differs from JAX by {diff:.3g} (> {TOLERANCE[data_type]} "
                      f"for {data_type}); nothing written")
  fileio.write_bytes(out_path, proto.SerializeToString())
  fileio.write_json(report_path, report)
  fileio.write_text(config_path, config_lib.to_json(checkpoint_lib.with_skeleton(config)))
  return report
