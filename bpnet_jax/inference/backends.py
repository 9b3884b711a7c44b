"""Inference backends: (B, H, W, 3) uint8 network inputs -> the selected stage's (heat, paf).

  JaxBackend       a Flax model and its variables, jitted once per input shape
  OnnxBackend      an exported ONNX model run with ONNX Runtime (needs onnxruntime)
  TensorRTBackend  a serialized TensorRT engine (needs tensorrt and PyTorch with CUDA)

Normalisation (pixel / scale - offset) runs inside the JAX function on the device, inside the
graph of a uint8-input ONNX model (`bpnet export --input_uint8`; ONNX Runtime is fed the uint8
pixels), on the GPU for TensorRT engines (uint8 pixels are copied, a quarter of the float32
bytes), and on the host only for float-input ONNX models.
"""

from __future__ import annotations

import platform

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


def int8_kernels_exact() -> bool:
  """False on x86 CPUs without VNNI dot-product instructions (e.g. AVX2-only parts), where ONNX
  Runtime's fused int8 convolutions multiply u8 x s8 pairs with a saturating 16-bit add
  (vpmaddubsw) and can be far off (0.4-0.8 on 0.3-std maps, measured); True elsewhere."""
  if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
    return True
  try:
    with open("/proc/cpuinfo") as f:
      flags = f.read()
  except OSError:
    return True                      # not Linux: assume a recent CPU
  return "avx512_vnni" in flags or "avx_vnni" in flags


def ort_session(model, providers=("CPUExecutionProvider",)):
  """An ONNX Runtime session for a model (path or serialized bytes).

  A Q/DQ (int8) model on a CPU whose int8 kernels saturate runs with graph optimisation at the
  basic level: ONNX Runtime then executes DequantizeLinear -> float op -> QuantizeLinear as
  written, which is exactly the quantized model's arithmetic (slower, but the numbers are the
  ones TensorRT computes). Everything else runs fully optimised.
  """
  import onnxruntime as ort  # optional extra
  opts = ort.SessionOptions()
  opts.log_severity_level = 3          # no shape-merge warnings on symbolic dims
  data = model
  if isinstance(model, str):
    with open(model, "rb") as f:
      data = f.read()
  if (b"DequantizeLinear" in data and "CUDAExecutionProvider" not in providers
      and not int8_kernels_exact()):
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
  return ort.InferenceSession(data, opts, providers=list(providers))


class OnnxBackend:
  """An exported ONNX model run with ONNX Runtime. Input: normalised NHWC float32 (the default
  export), or uint8 NHWC pixels when the model normalises them itself (`--input_uint8`, told by
  the session's input type): those are fed as they are, with no host normalisation."""

  def __init__(self, path: str, skeleton: Skeleton, image_scale, image_offset):
    try:
      import onnxruntime as ort
    except ImportError:
      raise InferenceError(f"{path}: running ONNX models needs onnxruntime "
                           "(pip install 'bpnet_jax[onnx]')") from None
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in ort.get_available_providers()]
    try:
      self.session = ort_session(path, providers)
    except OSError:
      raise
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
      raise InferenceError(f"{path}: ONNX Runtime cannot load the model "
                           f"({str(e).splitlines()[0][:200]})") from None
    inp = self.session.get_inputs()
    if len(inp) != 1 or len(inp[0].shape) != 4:
      raise InferenceError(f"{path}: expected one NHWC image input, found "
                           f"{[(i.name, i.shape) for i in inp]}")
    if inp[0].type not in ("tensor(float)", "tensor(uint8)"):
      raise InferenceError(f"{path}: input {inp[0].name} is {inp[0].type}; expected float "
                           "(normalised) or uint8 (pixels) NHWC images")
    self.input_name = inp[0].name
    self.uint8_input = inp[0].type == "tensor(uint8)"
    shape = inp[0].shape
    self.fixed_hw = tuple(shape[1:3]) if all(isinstance(d, int) for d in shape[1:3]) else None
    self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
    self.heat_name, self.paf_name = _pick_outputs(
        path, [(o.name, o.shape[-1]) for o in self.session.get_outputs()], skeleton)
    self.scale = np.asarray(image_scale, np.float32)
    self.offset = np.asarray(image_offset, np.float32)

  def __call__(self, images):
    """(B, H, W, 3) uint8 -> (heat, paf) float32 of the model's output stage."""
    if self.uint8_input:
      x = np.ascontiguousarray(images, np.uint8)
    else:
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
  """A serialized TensorRT engine (needs the `tensorrt` package, PyTorch with CUDA and an NVIDIA
  GPU). Engines have a fixed input size; the batch is fixed or 1..the profile's maximum (larger
  batches run in chunks, a short fixed-batch chunk is padded).

  Not yet run on a GPU in this project: written against the TensorRT 8.6/10 Python API
  (named I/O tensors, execute_async_v3). Per input shape, buffers are allocated once and reused:
  a pinned host input, device input (and raw-pixel) buffers, device outputs and pinned host
  outputs. A call copies the batch into the pinned buffer, then on the backend's own CUDA
  stream: host->device (non_blocking), normalisation on the device (x / scale - offset, into
  the engine's input; skipped for an engine that takes uint8 pixels), the engine, and
  device->host copies of the outputs (non_blocking); one synchronize, then the outputs are
  returned as float32 arrays of their own (the pinned buffers are reused by the next call).
  """

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
    # The largest batch one execution takes: the fixed batch, else the profile's maximum.
    self.max_batch = self.fixed_batch or int(
        engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
    self.heat_name, self.paf_name = _pick_outputs(
        path, [(n, engine.get_tensor_shape(n)[-1]) for n in outputs], skeleton)
    self.outputs = outputs
    types = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.UINT8: torch.uint8, trt.DataType.INT8: torch.int8,
             trt.DataType.INT32: torch.int32}
    kinds = {n: engine.get_tensor_dtype(n) for n in [self.input_name] + outputs}
    unknown = {n: str(k) for n, k in kinds.items() if k not in types}
    if unknown:
      raise InferenceError(f"{path}: unsupported tensor types {unknown}")
    self.dtypes = {n: types[k] for n, k in kinds.items()}
    self.uint8_input = self.dtypes[self.input_name] == torch.uint8
    self.stream = torch.cuda.Stream()
    in_dtype = self.dtypes[self.input_name]
    with torch.cuda.stream(self.stream):
      self.scale = torch.tensor(np.asarray(image_scale, np.float32), device="cuda").to(in_dtype)
      self.offset = torch.tensor(np.asarray(image_offset, np.float32), device="cuda").to(in_dtype)
    self._host = {}     # (B, H, W, numpy dtype) -> (pinned input, {output: pinned output})
    self._device = {}   # (b, H, W, numpy dtype) of one execution -> _TrtDeviceBuffers
    self._bound = None  # the execution shape the context's input is set to

  def __call__(self, images):
    """(B, H, W, 3) pixels (uint8, or float for a float-input engine) -> (heat, paf) float32."""
    torch = self.torch
    images = np.asarray(images)
    if self.uint8_input and images.dtype != np.uint8:
      raise InferenceError(f"this engine takes uint8 pixels, got {images.dtype}")
    b = images.shape[0]
    key = images.shape[:3] + (images.dtype.str,)
    if key not in self._host:
      host_in = torch.from_numpy(np.empty(images.shape, images.dtype)).pin_memory()
      self._host[key] = (host_in, {})
    host_in, host_out = self._host[key]
    host_in.numpy()[...] = images
    with torch.cuda.stream(self.stream):
      for start in range(0, b, self.max_batch):
        n = min(self.max_batch, b - start)
        run_b = self.fixed_batch or n               # a short fixed-batch chunk is padded
        dev = self._device_buffers((run_b,) + images.shape[1:3], images.dtype)
        dev.raw[:n].copy_(host_in[start:start + n], non_blocking=True)
        if dev.raw is not dev.input:
          dev.input.copy_(dev.raw)                  # e.g. uint8 -> float32, on the device
        if not self.uint8_input:                    # normalise on the device
          dev.input.div_(self.scale).sub_(self.offset)
        self.context.execute_async_v3(self.stream.cuda_stream)
        for name, out in dev.outputs.items():
          if name not in host_out:
            host_out[name] = torch.empty((b,) + tuple(out.shape[1:]), dtype=out.dtype,
                                         pin_memory=True)
          host_out[name][start:start + n].copy_(out[:n], non_blocking=True)
    self.stream.synchronize()
    return tuple(host_out[name].numpy().astype(np.float32)      # copies: buffers are reused
                 for name in (self.heat_name, self.paf_name))

  def _device_buffers(self, shape, dtype):
    """The device buffers of one execution at (b, H, W), made once; binds them to the context
    (the input shape only when it changes)."""
    torch = self.torch
    key = tuple(shape) + (np.dtype(dtype).str,)
    bufs = self._device.get(key)
    if bufs is None:
      full = tuple(shape) + (3,)
      self.context.set_input_shape(self.input_name, full)
      self._bound = full
      inp = torch.empty(full, dtype=self.dtypes[self.input_name], device="cuda")
      raw_dtype = torch.from_numpy(np.empty(0, dtype)).dtype
      # Pixels land in the engine's input when the types agree; else in a buffer of their own
      # (uint8 pixels for a float engine: a quarter of the bytes cross the bus).
      raw = inp if raw_dtype == inp.dtype else torch.empty(full, dtype=raw_dtype, device="cuda")
      outs = {n: torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self.dtypes[n],
                             device="cuda") for n in self.outputs}
      bufs = self._device[key] = _TrtDeviceBuffers(raw, inp, outs)
    if self._bound != tuple(bufs.input.shape):
      self.context.set_input_shape(self.input_name, tuple(bufs.input.shape))
      self._bound = tuple(bufs.input.shape)
    self.context.set_tensor_address(self.input_name, bufs.input.data_ptr())
    for n, t in bufs.outputs.items():
      self.context.set_tensor_address(n, t.data_ptr())
    return bufs


class _TrtDeviceBuffers:
  """Device tensors of one TensorRT execution shape: raw pixels as copied from the host, the
  engine's input (the same tensor when the engine takes uint8) and its outputs by name."""

  __slots__ = ("raw", "input", "outputs")

  def __init__(self, raw, engine_input, outputs):
    self.raw, self.input, self.outputs = raw, engine_input, outputs
