"""`Predictor`: RGB images -> network maps -> people in original-image pixels.

A Predictor runs a trained model (a saved model directory, an exported ONNX model, or a
TensorRT engine) with the `config.inference` settings:

  preprocess   resize per `keep_aspect_ratio_mode` (the original's three modes, bicubic), pad
               bottom/right to a multiple of the stride with the value that normalises to 0
               (`bpnet_jax.inference.preprocess`)
  network      a backend (`bpnet_jax.inference.backends`), jitted once per padded input shape;
               `predict_iter` buckets images by that shape and pads partial batches, so a
               stream of mixed aspect ratios compiles once per shape, not per batch size
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


def default_workers() -> int:
  """Host threads for loading/resizing (and as many for decoding) in `predict_iter` when the
  caller does not say: one per core, at most 8 (a COCO JPEG takes ~2.7 ms to decode and its
  people ~1.75 ms on one core, so 8 threads of each keep up with ~2,000 images/s)."""
  return max(1, min(8, os.cpu_count() or 1))


class Predictor:
  """People from RGB images, with a model and `config.inference` settings.

    p = Predictor.from_path("workdir")                  # model dir, .onnx or .engine
    people = p.predict(rgb)                             # [{"keypoints": (J,3), "score": s}]
    for item, people, error in p.predict_iter(paths, batch_size=8, workers=8): ...

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
                   depth: int = 2, batch_size: int = 1,
                   max_buffered: int | None = None) -> Iterator[tuple]:
    """Yields (item, people, None) or (item, None, error) for each item, in input order.

    `load(item)` returns an RGB image. Loading and resizing run in `workers` threads ahead of
    the network. Prepared images wait in one bucket per network-input shape; a bucket goes
    through the network when it holds `batch_size` images. Partial buckets (at the end, or the
    one holding the oldest unfinished item once `max_buffered` items are pending) are padded to
    `batch_size` by repeating their last image, and the padding rows' maps are dropped: every
    network call has `batch_size` images, so the jitted network compiles at most once per
    distinct input shape, whatever the order of the images. Multi-scale images go through the
    network alone. Decoding (peak search, assembly) runs in another `workers` threads while the
    device runs the next batch (up to `depth` batches in flight); results wait in a reorder
    buffer until every earlier item's are out. InferenceErrors from `load` (unreadable images)
    are yielded in their place, not raised.

    max_buffered: the most items read but not yet yielded (default max(4 * batch_size *
    workers, 64)); it bounds the images held in memory: prepared inputs, and whatever `load`
    keeps for the caller until its item is yielded.
    """
    workers, batch_size = max(1, workers), max(1, batch_size)
    cap = max(batch_size, max_buffered or max(4 * batch_size * workers, 64))
    loader = concurrent.futures.ThreadPoolExecutor(workers)
    decoder = concurrent.futures.ThreadPoolExecutor(workers)
    it = iter(items)
    loading = collections.deque()      # (position, item, future of prepared inputs), in order
    buckets: dict = {}                 # network-input (H, W, 3) -> [(position, input, Geometry)]
    slots: dict[int, _Slot] = {}       # the reorder buffer: position -> an item read, not yielded
    in_flight = collections.deque()    # decode futures of the batches sent, oldest first
    next_in = next_out = 0             # positions of the next item to read / to yield
    exhausted = False

    def read_ahead():
      nonlocal next_in, exhausted
      while not exhausted and next_in - next_out < cap and len(loading) < 2 * workers * batch_size:
        try:
          item = next(it)
        except StopIteration:
          exhausted = True
          return
        loading.append((next_in, item, loader.submit(lambda i: self.prepare(load(i)), item)))
        next_in += 1

    def wait_for_depth():
      """Frees a place among the `depth` batches in flight (their decoding errors surface)."""
      while in_flight and (in_flight[0].done() or len(in_flight) >= depth):
        in_flight.popleft().result()

    def send(shape):
      """One bucket through the network, padded to batch_size with its last image."""
      entries = buckets.pop(shape)
      wait_for_depth()
      pad = [entries[-1][1]] * (batch_size - len(entries))
      maps = self.backend(np.stack([e[1] for e in entries] + pad))
      fut = decoder.submit(self._finish_batch, maps, [e[2] for e in entries])
      in_flight.append(fut)
      for k, (pos, _, _) in enumerate(entries):
        slots[pos].future, slots[pos].row = fut, k

    def place(pos, item, fut):
      """A loaded item into its shape's bucket (sent when full), alone through the network
      (multi-scale), or into the reorder buffer as an error (unreadable)."""
      slot = slots[pos] = _Slot(item)
      try:
        prepared = fut.result()
      except InferenceError as e:
        slot.error = e
        return
      if len(prepared) > 1:
        wait_for_depth()
        slot.future = decoder.submit(lambda h: [self.finish(h)], self.dispatch(prepared))
        in_flight.append(slot.future)
        return
      image, g = prepared[0]
      slot.shape = image.shape
      bucket = buckets.setdefault(image.shape, [])
      bucket.append((pos, image, g))
      if len(bucket) == batch_size:
        send(image.shape)

    def emit(block: bool):
      """Yields the finished items at the head of the input order (block: wait for the
      oldest, which must have been sent)."""
      nonlocal next_out
      while next_out in slots:
        slot = slots[next_out]
        if slot.error is None and (slot.future is None or not (block or slot.future.done())):
          return
        block = False
        del slots[next_out]
        next_out += 1
        yield ((slot.item, None, slot.error) if slot.error is not None
               else (slot.item, slot.future.result()[slot.row], None))

    try:
      while True:
        read_ahead()
        if loading:
          place(*loading.popleft())
          yield from emit(block=False)
        elif not exhausted:                 # max_buffered items pending: move the oldest
          slot = slots[next_out]
          if slot.error is None and slot.future is None:
            send(slot.shape)
          yield from emit(block=True)
        else:                               # the end: partial buckets, oldest first
          for shape in sorted(buckets, key=lambda s: buckets[s][0][0]):
            send(shape)
          while slots:
            yield from emit(block=True)
          return
    finally:
      loader.shutdown(wait=False, cancel_futures=True)
      decoder.shutdown(wait=False, cancel_futures=True)

  def _finish_batch(self, maps, geoms) -> list[list[dict]]:
    heat, paf = np.asarray(maps[0]), np.asarray(maps[1])
    return [self.finish(((heat[k:k + 1], paf[k:k + 1]), [g])) for k, g in enumerate(geoms)]


class _Slot:
  """An item `predict_iter` has read and not yet yielded: its decode future and row once sent
  through the network, or its load error; `shape` names its bucket while it waits there."""

  __slots__ = ("item", "future", "row", "error", "shape")

  def __init__(self, item):
    self.item, self.future, self.row, self.error, self.shape = item, None, 0, None, None


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
