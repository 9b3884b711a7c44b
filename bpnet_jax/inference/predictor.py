"""`Predictor`: RGB images -> network maps -> people in original-image pixels.

A Predictor runs a trained model (a saved model directory, an exported ONNX model, or a
TensorRT engine) with the `config.inference` settings:

  preprocess   resize per `keep_aspect_ratio_mode` (the original's three modes, bicubic), pad
               bottom/right to a multiple of the stride with the value that normalises to 0
               (`bpnet_jax.inference.preprocess`)
  network      a backend (`bpnet_jax.inference.backends`), jitted once per padded input shape
  multi-scale  each scale's maps are resampled onto the largest scale's output grid and averaged
               on the device (the original averaged x8-upsampled maps: the same up to
               interpolation)
  decode       `bpnet_jax.decode` on the selected stage's maps, then keypoints are mapped back
               to the original image (float pixels)
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from bpnet_jax import checkpoint as checkpoint_lib
from bpnet_jax import config as config_lib
from bpnet_jax import model as model_lib
from bpnet_jax.errors import InferenceError
from bpnet_jax.inference import postprocess
from bpnet_jax.inference.backends import JaxBackend, OnnxBackend, TensorRTBackend
from bpnet_jax.inference.preprocess import (
  merge_maps_jit,
  merge_params,
  pad_value,
  preprocess,
  read_image,
)
from bpnet_jax.model import OUTPUT_STRIDE
from bpnet_jax.skeleton import Skeleton, skeleton_from_config

log = logging.getLogger(__name__)
EXPORTED_SUFFIXES = (".onnx", ".engine", ".trt", ".plan")



class Predictor:
  """People from RGB images, with a model and `config.inference` settings.

    p = Predictor.from_path("workdir")                  # model dir, .onnx or .engine
    people = p.predict(rgb)                             # [{"keypoints": (J,3), "score": s}]
    for item, people in p.predict_iter(paths, load=read_image): ...

  Keypoints are original-image pixels (x, y) and the joint's heatmap score (0: not found).
  """

  def __init__(self, config, backend, skeleton: Skeleton | None = None, name: str = "model"):
    self.config = config
    self.skeleton = skeleton or skeleton_from_config(config)
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
    """From a config and {'params', 'batch_stats'} (e.g. a training state in memory)."""
    skeleton = skeleton or skeleton_from_config(config)
    model = model_lib.build_model(config.model, skeleton, config.inference.compute_dtype)
    n = config.dataloader.normalization_params
    backend = JaxBackend(model, variables, config.inference.output_stage_to_use,
                         n.image_scale, n.image_offset)
    return cls(config, backend, skeleton, name)

  @classmethod
  def from_path(cls, path: str, config=None):
    """From a saved model (workdir, checkpoints dir, step dir or pruned model dir), an exported
    .onnx model or a TensorRT .engine. The model's own saved config is used; `config`
    (optional) may change inference settings only (CheckpointError naming a key that would
    change the network)."""
    if not os.path.exists(path):
      raise InferenceError(f"{path}: no such model (expected a training workdir or checkpoint "
                           "directory, an .onnx model or a TensorRT .engine)")
    if path.endswith(EXPORTED_SUFFIXES):
      config = exported_model_config(path, config)
      skeleton = skeleton_from_config(config)
      n = config.dataloader.normalization_params
      if path.endswith(".onnx"):
        if config.inference.output_stage_to_use not in (None, config.model.stages):
          raise InferenceError(f"{path}: exported models output the last stage only; "
                               "inference.output_stage_to_use must be None")
        backend = OnnxBackend(path, skeleton, n.image_scale, n.image_offset)
      else:
        backend = TensorRTBackend(path, skeleton, n.image_scale, n.image_offset)
      return cls(config, backend, skeleton, path)
    saved = checkpoint_lib.load_model(path, config)
    return cls.from_variables(saved.config, saved.variables, saved.skeleton, path)

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


def exported_model_config(path: str, config=None):
  """The config of an exported model: OUT.config.json written next to OUT.onnx by the exporter
  (merged with `config`'s inference settings), else `config` itself."""
  saved_path = os.path.splitext(path)[0] + ".config.json"
  if os.path.isfile(saved_path):
    saved = config_lib.read_json(saved_path)
    return saved if config is None else checkpoint_lib.merge_configs(saved, config, path)
  if config is None:
    raise InferenceError(f"{path}: no {os.path.basename(saved_path)} next to the model (written "
                         "by `bpnet export`); pass --config=FILE describing it")
  return config
