"""Inference: RGB images -> network maps -> people in original-image pixels.

`Predictor` runs a trained model (an Orbax checkpoint, an exported ONNX model, or a TensorRT
engine) with the `config.inference` settings:

  preprocess   resize per `keep_aspect_ratio_mode` (the original's three modes, bicubic), pad
               bottom/right to a multiple of the stride with the value that normalises to 0
  network      jitted once per padded input shape; normalisation runs on the device
  multi-scale  each scale's maps are resampled onto the largest scale's output grid and averaged
               on the device (the original averaged x8-upsampled maps: the same up to
               interpolation)
  decode       `bpnet_jax.decode` on the selected stage's maps, then keypoints are mapped back
               to the original image (float pixels)

Coordinates follow the half-pixel convention of OpenCV's resize: network-input pixel x is
original pixel (x + 0.5) / fx - 0.5 - pad_left (the original omitted the half-pixel terms).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np

from bpnet_jax.inference import postprocess
from bpnet_jax.model import OUTPUT_STRIDE
from bpnet_jax.skeleton import Skeleton, load_skeleton

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class InferenceError(ValueError):
  """A model, config or input that inference cannot use (reported in one line)."""


# ----------------------------------------------------------------------------------------------
# Geometry and preprocessing.

@dataclasses.dataclass(frozen=True)
class Geometry:
  """Where an original image sits in the network input.

  scale (fy, fx): network-input pixels per padded-original pixel; offset (left, top): pixels
  added to the original's left/top (pad_image_input); size (h, w): the resized content;
  padded (H, W): the network input, `size` padded bottom/right to a multiple of the stride.
  """
  scale: tuple[float, float]
  offset: tuple[int, int]
  size: tuple[int, int]
  padded: tuple[int, int]

  def to_original(self, xy: np.ndarray) -> np.ndarray:
    """(..., 2) network-input pixels (x, y) -> original-image pixels."""
    xy = np.asarray(xy, np.float64)
    x = (xy[..., 0] + 0.5) / self.scale[1] - 0.5 - self.offset[0]
    y = (xy[..., 1] + 0.5) / self.scale[0] - 0.5 - self.offset[1]
    return np.stack([x, y], -1)

  def to_input(self, xy: np.ndarray) -> np.ndarray:
    """(..., 2) original-image pixels (x, y) -> network-input pixels."""
    xy = np.asarray(xy, np.float64)
    x = (xy[..., 0] + 0.5 + self.offset[0]) * self.scale[1] - 0.5
    y = (xy[..., 1] + 0.5 + self.offset[1]) * self.scale[0] - 0.5
    return np.stack([x, y], -1)


def pad_value(image_scale, image_offset) -> np.ndarray:
  """(3,) uint8 pixel value that normalises to ~0 (128 for the default x/256 - 0.5)."""
  return np.clip(np.round(np.asarray(image_scale) * np.asarray(image_offset)), 0, 255
                 ).astype(np.uint8)


def preprocess(image: np.ndarray, input_shape: Sequence[float], mode: str,
               fill: np.ndarray | Sequence[int] = (128, 128, 128),
               multiple: int = OUTPUT_STRIDE) -> tuple[np.ndarray, Geometry]:
  """Resizes (and pads) an (H, W, 3) uint8 image for the network.

  Modes (as the original): 'adjust_network_input' scales uniformly so the image covers
  input_shape (the network input takes the image's aspect ratio); 'pad_image_input' pads the
  image to input_shape's aspect ratio (centred, `fill`) and resizes to input_shape; 'None'
  resizes to input_shape, each axis on its own. input_shape may be fractional (scaled for
  multi-scale inference). Returns the (H, W, 3) uint8 network input and its Geometry.
  """
  h0, w0 = image.shape[:2]
  in_h, in_w = float(input_shape[0]), float(input_shape[1])
  fill = np.asarray(fill, np.uint8)
  left = top = 0
  if mode == "adjust_network_input":
    s = in_h / h0 if w0 / h0 > in_w / in_h else in_w / w0
    out_h, out_w = max(1, round(h0 * s)), max(1, round(w0 * s))
  elif mode == "pad_image_input":
    ar = in_w / in_h
    if w0 / h0 > ar:        # wider than the target: pad the height
      pad = int(w0 / ar - h0)
      top = int(pad / 2)
      image = _pad(image, top, pad - top, 0, 0, fill)
    elif w0 / h0 < ar:
      pad = int(h0 * ar - w0)
      left = int(pad / 2)
      image = _pad(image, 0, 0, left, pad - left, fill)
    out_h, out_w = max(1, round(in_h)), max(1, round(in_w))
  elif mode == "None":
    out_h, out_w = max(1, round(in_h)), max(1, round(in_w))
  else:
    raise InferenceError(f"keep_aspect_ratio_mode {mode!r}: expected 'adjust_network_input', "
                         "'pad_image_input' or 'None'")
  ph, pw = image.shape[:2]
  if (out_h, out_w) != (ph, pw):
    image = cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_CUBIC)
  big_h, big_w = -(-out_h // multiple) * multiple, -(-out_w // multiple) * multiple
  image = _pad(image, 0, big_h - out_h, 0, big_w - out_w, fill)
  return image, Geometry((out_h / ph, out_w / pw), (left, top), (out_h, out_w), (big_h, big_w))


def _pad(image, top, bottom, left, right, fill):
  if not (top or bottom or left or right):
    return image
  out = np.empty((image.shape[0] + top + bottom, image.shape[1] + left + right, 3), np.uint8)
  out[...] = fill
  out[top:top + image.shape[0], left:left + image.shape[1]] = image
  return out


def read_image(path: str) -> np.ndarray:
  """(H, W, 3) uint8 RGB; InferenceError if the file is missing or not a readable image."""
  if not os.path.isfile(path):
    raise InferenceError(f"{path}: no such file")
  data = np.fromfile(path, np.uint8)
  bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
  if bgr is None:
    raise InferenceError(f"{path}: not a readable image")
  return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# ----------------------------------------------------------------------------------------------
# Multi-scale merging.

def merge_params(geoms: Sequence[Geometry], grid_shape: tuple[int, int], ref: int,
                 stride: int = OUTPUT_STRIDE) -> np.ndarray:
  """(S, 4) (scale_y, scale_x, translate_y, translate_x) of `jax.image.scale_and_translate`
  resampling each scale's output grid onto the reference scale's output grid.

  Output cell R of the reference grid is original pixel y = (stride R + stride/2) / fy_ref -
  0.5 - top_ref, which is cell r = ((y + 0.5 + top_s) fy_s - stride/2) / stride of scale s.
  """
  g0 = geoms[ref]
  out = []
  for g in geoms:
    row = []
    for axis, off_axis in ((0, 1), (1, 0)):
      a = g.scale[axis] / g0.scale[axis]
      b = ((stride / 2 / g0.scale[axis] - g0.offset[off_axis] + g.offset[off_axis])
           * g.scale[axis] - stride / 2) / stride
      k = 1.0 / a                              # r + 0.5 = (R + 0.5 - t) / k
      row.append((k, 0.5 - k * (b + 0.5)))
    out.append((row[0][0], row[1][0], row[0][1], row[1][1]))
  return np.asarray(out, np.float32)


def _merge_maps(maps, params, grid_shape):
  """Mean over scales of maps resampled (bicubic) onto the reference grid. maps: tuple of
  (1, h_s, w_s, C) arrays."""
  import jax
  import jax.numpy as jnp
  total = 0.0
  for m, p in zip(maps, params):
    total = total + jax.image.scale_and_translate(
        m.astype(jnp.float32), (m.shape[0],) + tuple(grid_shape) + (m.shape[-1],), (1, 2),
        p[:2], p[2:], method="cubic", antialias=False)
  return total / len(maps)


@functools.lru_cache(maxsize=1)
def merge_maps_jit():
  """`_merge_maps` jitted (grid shape static), for maps computed off the JAX device."""
  import jax
  return jax.jit(_merge_maps, static_argnums=2)


# ----------------------------------------------------------------------------------------------
# Backends: (B, H, W, 3) uint8 network inputs -> selected-stage (heat, paf) maps.

class JaxBackend:
  """A Flax model and its variables; one jitted function per input shape (and scale set)."""

  def __init__(self, model, variables, stage: int | None, image_scale, image_offset):
    import jax
    import jax.numpy as jnp
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
      heat = _merge_maps(tuple(o[0] for o in outs), params, grid_shape)
      paf = _merge_maps(tuple(o[1] for o in outs), params, grid_shape)
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


# ----------------------------------------------------------------------------------------------
# The predictor.

def model_config_for(config, path: str):
  """The config whose model matches the checkpoint at `path`: a pruned model directory (from
  `bpnet prune`) or a retrain run (trainer.load_graph) brings its own layer widths."""
  from bpnet_jax import prune as prune_lib
  config = config.copy_and_resolve_references()
  try:
    if not prune_lib.apply_pruned_model(config, path) and config.trainer.load_graph:
      prune_lib.apply_pruned_model(config, config.trainer.pretrained_weights)
  except prune_lib.PruneError as e:
    raise InferenceError(str(e)) from None
  return config


def load_model(config, path: str):
  """(config with the model's layer widths, {'params', 'batch_stats'}) of a checkpoint, a
  pruned model directory or a retrain workdir; InferenceError if it does not fit the config."""
  config = model_config_for(config, path)
  sk = load_skeleton(config.dataloader.pose_config.pose_config_path)
  return config, checkpoint_variables(config, sk, path)


def checkpoint_variables(config, skeleton: Skeleton, path: str):
  """{'params', 'batch_stats'} of a training checkpoint, checked against the config's model."""
  from bpnet_jax import model as model_lib, train as train_lib
  try:
    raw = train_lib.read_checkpoint_state(path)
  except train_lib.TrainingError as e:
    raise InferenceError(str(e)) from None
  variables = {"params": raw["params"], "batch_stats": raw.get("batch_stats") or {}}
  model = model_lib.build_model(config.model, skeleton)
  check_variables(path, config, skeleton, model_lib.abstract_variables(model), variables)
  return variables


def check_variables(path, config, skeleton, expected, got):
  """InferenceError naming the first difference between a model's and a checkpoint's variables."""
  import jax
  from bpnet_jax.model import path_str
  want = {path_str(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  have = {path_str(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_flatten_with_path(got)[0]}
  if want == have:
    return
  stages = lambda names: max((int(n.split("/")[1][5:]) for n in names
                              if n.split("/")[1].startswith("stage")), default=0)
  s_want, s_have = stages(want), stages(have)
  if s_want != s_have:
    raise InferenceError(f"{path}: the checkpoint has {s_have} stages but the config's model has "
                         f"{s_want} (model.stages)")
  for key in ("params/heatmap_out/kernel", "params/paf_out/kernel"):
    if key in want and key in have and want[key][-1] != have[key][-1]:
      raise InferenceError(
          f"{path}: the checkpoint's {key.split('/')[1]} has {have[key][-1]} channels but "
          f"skeleton {skeleton.name!r} needs {want[key][-1]}")
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  if missing or extra:
    raise InferenceError(f"{path}: the checkpoint does not fit the config's model "
                         f"({config.model.architecture}): missing {missing[:3]}, unexpected "
                         f"{extra[:3]}")
  diff = [k for k in want if want[k] != have[k]]
  raise InferenceError(f"{path}: the checkpoint does not fit the config's model: {diff[0]} is "
                       f"{have[diff[0]]} in the checkpoint, {want[diff[0]]} in the model "
                       f"({len(diff)} shapes differ; model.layer_widths / width_multiplier?)")


class Predictor:
  """People from RGB images, with a model and `config.inference` settings.

    p = Predictor.from_path(config, "workdir")          # checkpoint dir, .onnx or .engine
    people = p.predict(rgb)                             # [{"keypoints": (J,3), "score": s}]
    for item, people in p.predict_iter(paths, load=read_image): ...

  Keypoints are original-image pixels (x, y) and the joint's heatmap score (0: not found).
  """

  def __init__(self, config, backend, skeleton: Skeleton | None = None, name: str = "model"):
    self.config = config
    self.skeleton = skeleton or load_skeleton(config.dataloader.pose_config.pose_config_path)
    self.backend = backend
    self.name = name
    inf = config.inference
    n = config.dataloader.normalization_params
    self.fill = pad_value(n.image_scale, n.image_offset)
    self.input_shape = tuple(inf.input_shape)
    self.mode = inf.keep_aspect_ratio_mode
    self.scales = sorted(inf.scales) if inf.multi_scale_inference else [1.0]
    self.multiple = inf.input_size_multiple
    fixed = getattr(backend, "fixed_hw", None)
    if fixed is not None:
      if fixed[0] % OUTPUT_STRIDE or fixed[1] % OUTPUT_STRIDE:
        raise InferenceError(f"{name}: the model's fixed input {fixed[0]}x{fixed[1]} is not a "
                             f"multiple of the stride {OUTPUT_STRIDE}")
      self.multiple = OUTPUT_STRIDE
      # A fixed-size model (an exported ONNX model or engine): like the original, pad images to
      # its input and run one scale.
      if self.input_shape != tuple(fixed) or self.mode == "adjust_network_input" or \
          len(self.scales) > 1:
        log.warning("%s has a fixed %dx%d input: using input_shape=%s, "
                    "keep_aspect_ratio_mode='pad_image_input', one scale", name, fixed[0],
                    fixed[1], list(fixed))
      self.input_shape = tuple(fixed)
      if self.mode == "adjust_network_input":
        self.mode = "pad_image_input"
      self.scales = [1.0]
    self.decode_kwargs = dict(
        skeleton=self.skeleton, stride=OUTPUT_STRIDE, upsample=tuple(inf.output_upsampling_factor),
        heatmap_threshold=inf.heatmap_threshold, paf_threshold=inf.paf_threshold,
        paf_num_samples=inf.paf_num_samples, paf_sample_ratio=inf.paf_sample_ratio,
        min_parts=inf.min_parts, min_mean_score=inf.min_mean_score)

  # ---- construction ----------------------------------------------------------------------------
  @classmethod
  def from_variables(cls, config, variables, skeleton: Skeleton | None = None, name="model"):
    from bpnet_jax import model as model_lib
    sk = skeleton or load_skeleton(config.dataloader.pose_config.pose_config_path)
    model = model_lib.build_model(config.model, sk, config.inference.compute_dtype)
    n = config.dataloader.normalization_params
    backend = JaxBackend(model, variables, config.inference.output_stage_to_use,
                         n.image_scale, n.image_offset)
    return cls(config, backend, sk, name)

  @classmethod
  def from_path(cls, config, path: str):
    """From a checkpoint (workdir, checkpoints dir or step dir), an .onnx model or an .engine."""
    sk = load_skeleton(config.dataloader.pose_config.pose_config_path)
    n = config.dataloader.normalization_params
    if not os.path.exists(path):
      raise InferenceError(f"{path}: no such model (expected a training workdir or checkpoint "
                           "directory, an .onnx model or a TensorRT .engine)")
    if path.endswith(".onnx"):
      if config.inference.output_stage_to_use not in (None, config.model.stages):
        raise InferenceError(f"{path}: exported models output the last stage only; "
                             "inference.output_stage_to_use must be None")
      return cls(config, OnnxBackend(path, sk, n.image_scale, n.image_offset), sk, path)
    if path.endswith((".engine", ".trt", ".plan")):
      return cls(config, TensorRTBackend(path, sk, n.image_scale, n.image_offset), sk, path)
    config, variables = load_model(config, path)
    return cls.from_variables(config, variables, sk, path)

  # ---- one image -------------------------------------------------------------------------------
  def prepare(self, image: np.ndarray):
    """Host work for one RGB uint8 image: [(network input (H, W, 3), Geometry)] per scale."""
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise InferenceError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} "
                           f"{image.shape}")
    return [preprocess(image, (self.input_shape[0] * s, self.input_shape[1] * s), self.mode,
                       self.fill, self.multiple) for s in self.scales]

  def dispatch(self, prepared):
    """Starts the network on one prepared image; returns a handle for `finish` (asynchronous
    for the JAX backend: the device runs while the host prepares the next image)."""
    if len(prepared) == 1:
      image, g = prepared[0]
      return self.backend(image[None]), [g]
    geoms = [g for _, g in prepared]
    ref = len(prepared) - 1                       # the largest scale (scales are sorted)
    grid = tuple(d // OUTPUT_STRIDE for d in geoms[ref].padded)
    params = merge_params(geoms, grid, ref)
    images = [im[None] for im, _ in prepared]
    if hasattr(self.backend, "multi_scale"):
      return self.backend.multi_scale(images, params, grid), [geoms[ref]]
    maps = [self.backend(im) for im in images]
    merge = merge_maps_jit()
    return (merge(tuple(m[0] for m in maps), params, grid),
            merge(tuple(m[1] for m in maps), params, grid)), [geoms[ref]]

  def finish(self, handle) -> list[dict]:
    """Decodes a dispatched image: people in original-image pixels."""
    heat, paf, g = _crop(handle)
    people = postprocess.decode(heat, paf, **self.decode_kwargs)
    for p in people:
      kp = p["keypoints"]
      found = kp[:, 2] > 0
      kp[found, :2] = g.to_original(kp[found, :2])
    return people

  def maps(self, image: np.ndarray):
    """(heat (h, w, J+1), paf (h, w, 2L), Geometry) of the grid the decoder sees."""
    return _crop(self.dispatch(self.prepare(image)))

  def predict(self, image: np.ndarray) -> list[dict]:
    """People in one (H, W, 3) uint8 RGB image, in its pixels."""
    return self.finish(self.dispatch(self.prepare(image)))

  def predict_batch(self, images: Sequence[np.ndarray]) -> list[list[dict]]:
    """People per image; same-size network inputs share one network call."""
    prepared = [self.prepare(im) for im in images]
    out: list = [None] * len(images)
    groups = collections.defaultdict(list)
    for i, p in enumerate(prepared):
      if len(p) == 1:
        groups[p[0][0].shape].append(i)
      else:
        out[i] = self.finish(self.dispatch(p))
    for idx in groups.values():
      people = self._finish_batch(self.backend(np.stack([prepared[i][0][0] for i in idx])),
                                  [prepared[i][0][1] for i in idx])
      for k, i in enumerate(idx):
        out[i] = people[k]
    return out

  def predict_iter(self, items: Iterable, load: Callable = read_image, workers: int = 2,
                   depth: int = 2, batch_size: int = 1) -> Iterator[tuple]:
    """Yields (item, people, None) or (item, None, error) for each item, in order.

    `load(item)` returns an RGB image. Loading and resizing run in `workers` threads ahead of
    the network; consecutive images with the same network-input shape go through the network
    `batch_size` at a time; decoding (peak search, assembly) runs in another `workers` threads,
    so the host decodes batch k while the device runs batch k+1 (up to `depth` batches in
    flight). InferenceErrors from `load` (unreadable images) are yielded, not raised.
    """
    workers, batch_size = max(1, workers), max(1, batch_size)
    loader = concurrent.futures.ThreadPoolExecutor(workers)
    decoder = concurrent.futures.ThreadPoolExecutor(workers)
    try:
      loading = collections.deque()            # (item, future of prepared inputs)
      done = collections.deque()               # (item, future of [people per image], k, error)
      it = iter(items)

      def fill():
        while len(loading) < 2 * workers * batch_size:
          try:
            item = next(it)
          except StopIteration:
            return
          loading.append((item, loader.submit(lambda i: self.prepare(load(i)), item)))

      def group():
        """Up to batch_size ready images of one shape (multi-scale images go alone)."""
        out = []
        while loading and len(out) < batch_size:
          item, fut = loading[0]
          try:
            prepared = fut.result()
          except InferenceError as e:
            if out:                            # keep the order: send the group first
              break
            loading.popleft()
            done.append((item, None, 0, e))
            continue
          if out and (len(prepared) > 1 or prepared[0][0].shape != out[0][1][0][0].shape):
            break
          loading.popleft()
          out.append((item, prepared))
          if len(prepared) > 1:
            break
        fill()
        return out

      fill()
      while loading or done:
        if loading and len(done) < depth * batch_size:
          batch = group()
          if len(batch) == 1:
            item, prepared = batch[0]
            handle = self.dispatch(prepared)
            done.append((item, decoder.submit(lambda h: [self.finish(h)], handle), 0, None))
          elif batch:
            maps = self.backend(np.stack([p[0][0] for _, p in batch]))
            fut = decoder.submit(self._finish_batch, maps, [p[0][1] for _, p in batch])
            done.extend((item, fut, k, None) for k, (item, _) in enumerate(batch))
          continue
        item, fut, k, err = done.popleft()
        yield (item, None, err) if err else (item, fut.result()[k], None)
    finally:
      loader.shutdown(wait=False, cancel_futures=True)
      decoder.shutdown(wait=False, cancel_futures=True)

  def _finish_batch(self, maps, geoms) -> list[list[dict]]:
    heat, paf = np.asarray(maps[0]), np.asarray(maps[1])
    return [self.finish(((heat[k:k + 1], paf[k:k + 1]), [g])) for k, g in enumerate(geoms)]


def _crop(handle):
  """(heat, paf, Geometry) of a dispatched image, cropped to the cells that cover the resized
  image (the bottom/right padding has no people)."""
  (heat, paf), (g,) = handle
  h, w = -(-g.size[0] // OUTPUT_STRIDE), -(-g.size[1] // OUTPUT_STRIDE)
  return np.asarray(heat)[0, :h, :w], np.asarray(paf)[0, :h, :w], g


def people_to_json(people: list[dict], skeleton: Skeleton) -> list[dict]:
  """JSON-ready people: {"score", "keypoints": {joint name: [x, y, score]}} (0,0,0 = missing)."""
  return [{"score": round(float(p["score"]), 6),
           "keypoints": {name: [round(float(v), 3) for v in p["keypoints"][j]]
                         for j, name in enumerate(skeleton.joints)}} for p in people]
