"""Inference backends: (B, H, W, 3) uint8 network inputs -> the selected stage's (heat, paf).

  JaxBackend       a Flax model and its variables, jitted once per input shape
  OnnxBackend      an exported ONNX model run with ONNX Runtime (needs onnxruntime)
  TensorRTBackend  a serialized TensorRT engine (needs tensorrt and PyTorch with CUDA)

Normalisation (pixel / scale - offset) runs inside the JAX function on the device; the ONNX
Runtime and TensorRT backends normalise on the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bpnet_jax.errors import InferenceError
from bpnet_jax.inference.preprocess import merge_maps
from bpnet_jax.skeleton import Skeleton


class JaxBackend:
  """A Flax model and its variables; one jitted function per input shape (and scale set)."""

  def __init__(self, model, variables, stage: int | None, image_scale, image_offset):
    self.variables = jax.device_put(variables)
    scale = jnp.asarray(image_scale, jnp.float32)
    offset = jnp.asarray(image_offset, jnp.float32)

    def forward(variables, images):
      x = images.astype(jnp.float32) / scale - offset
      heats, pafs = model.apply(variables, x, train=False)
      i = -1 if stage is None else stage - 1
      return heats[i].astype(jnp.float32), pafs[i].astype(jnp.float32)

    def multi(variables, images, params, grid_shape):
      outs = [forward(variables, im) for im in images]
      heat = merge_maps(tuple(o[0] for o in outs), params, grid_shape)
      paf = merge_maps(tuple(o[1] for o in outs), params, grid_shape)
      return heat, paf

    self._forward = jax.jit(forward)
    self._multi = jax.jit(multi, static_argnums=3)

  def __call__(self, images):
    return self._forward(self.variables, images)

  def multi_scale(self, images, params, grid_shape):
    return self._multi(self.variables, tuple(images), params, tuple(grid_shape))


class OnnxBackend:
  """An exported ONNX model run with ONNX Runtime (input: normalised NHWC float32)."""

  def __init__(self, path: str, skeleton: Skeleton, image_scale, image_offset):
    try:
      import onnxruntime as ort
    except ImportError:
      raise InferenceError(f"{path}: running ONNX models needs onnxruntime "
                           "(pip install 'bpnet_jax[onnx]')") from None
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in ort.get_available_providers()]
    try:
      opts = ort.SessionOptions()
      opts.log_severity_level = 3
      self.session = ort.InferenceSession(path, opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
      raise InferenceError(f"{path}: ONNX Runtime cannot load the model "
                           f"({str(e).splitlines()[0][:200]})") from None
    inp = self.session.get_inputs()
    if len(inp) != 1 or len(inp[0].shape) != 4:
      raise InferenceError(f"{path}: expected one NHWC image input, found "
                           f"{[(i.name, i.shape) for i in inp]}")
    self.input_name = inp[0].name
    shape = inp[0].shape
    self.fixed_hw = tuple(shape[1:3]) if all(isinstance(d, int) for d in shape[1:3]) else None
    self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
    self.heat_name, self.paf_name = _pick_outputs(
        path, [(o.name, o.shape[-1]) for o in self.session.get_outputs()], skeleton)
    self.scale = np.asarray(image_scale, np.float32)
    self.offset = np.asarray(image_offset, np.float32)

  def __call__(self, images):
    x = np.asarray(images, np.float32) / self.scale - self.offset
    if self.fixed_batch and x.shape[0] != self.fixed_batch:
      outs = [self.session.run([self.heat_name, self.paf_name], {self.input_name: x[i:i + 1]})
              for i in range(x.shape[0])]
      return tuple(np.concatenate([o[k] for o in outs]) for k in range(2))
    heat, paf = self.session.run([self.heat_name, self.paf_name], {self.input_name: x})
    return heat, paf


def _pick_outputs(path, outputs, skeleton: Skeleton):
  """(heat name, paf name) among (name, channels) outputs: by the export names, else by width."""
  names = [n for n, _ in outputs]
  if "heatmap_out" in names and "paf_out" in names:
    chans = dict(outputs)
    if chans["heatmap_out"] not in (skeleton.heat_channels, None) or \
        chans["paf_out"] not in (skeleton.paf_channels, None):
      raise InferenceError(
          f"{path}: outputs have {chans['heatmap_out']} heatmap and {chans['paf_out']} PAF "
          f"channels; skeleton {skeleton.name!r} needs {skeleton.heat_channels} and "
          f"{skeleton.paf_channels}")
    return "heatmap_out", "paf_out"
  heat = [n for n, c in outputs if c == skeleton.heat_channels]
  paf = [n for n, c in outputs if c == skeleton.paf_channels]
  if len(heat) != 1 or len(paf) != 1:
    raise InferenceError(
        f"{path}: cannot tell the heatmap ({skeleton.heat_channels} channels) and PAF "
        f"({skeleton.paf_channels} channels) outputs apart among {outputs}")
  return heat[0], paf[0]


class TensorRTBackend:
  """A serialized TensorRT engine (needs the `tensorrt` package and a CUDA GPU; buffers via
  PyTorch). Engines have a fixed input size."""

  def __init__(self, path: str, skeleton: Skeleton, image_scale, image_offset):
    try:
      import tensorrt as trt
      import torch
    except ImportError:
      raise InferenceError(f"{path}: running TensorRT engines needs the 'tensorrt' package and "
                           "PyTorch with CUDA on an NVIDIA GPU") from None
    if not torch.cuda.is_available():
      raise InferenceError(f"{path}: TensorRT engines need a CUDA GPU; none is visible")
    self.torch = torch
    logger = trt.Logger(trt.Logger.WARNING)
    with open(path, "rb") as f:
      engine = trt.Runtime(logger).deserialize_cuda_engine(f.read())
    if engine is None:
      raise InferenceError(f"{path}: not a TensorRT engine for this TensorRT version and GPU")
    self.engine, self.context = engine, engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if len(inputs) != 1:
      raise InferenceError(f"{path}: expected one input tensor, found {inputs}")
    self.input_name = inputs[0]
    shape = tuple(engine.get_tensor_shape(self.input_name))
    self.fixed_hw = shape[1:3] if min(shape[1:3]) > 0 else None
    self.fixed_batch = shape[0] if shape[0] > 0 else None
    self.heat_name, self.paf_name = _pick_outputs(
        path, [(n, engine.get_tensor_shape(n)[-1]) for n in outputs], skeleton)
    self.outputs = outputs
    self.scale = np.asarray(image_scale, np.float32)
    self.offset = np.asarray(image_offset, np.float32)

  def __call__(self, images):
    torch = self.torch
    x = torch.from_numpy(np.asarray(images, np.float32) / self.scale - self.offset).cuda()
    self.context.set_input_shape(self.input_name, tuple(x.shape))
    self.context.set_tensor_address(self.input_name, x.data_ptr())
    bufs = {}
    for n in self.outputs:
      shape = tuple(self.context.get_tensor_shape(n))
      bufs[n] = torch.empty(shape, dtype=torch.float32, device="cuda")
      self.context.set_tensor_address(n, bufs[n].data_ptr())
    stream = torch.cuda.current_stream()
    self.context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return bufs[self.heat_name].cpu().numpy(), bufs[self.paf_name].cpu().numpy()


