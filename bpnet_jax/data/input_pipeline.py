"""The training input pipeline: grain on the host, augmentation and targets on the device.

Host (grain, worker processes): read a record (random access into ArrayRecord files), decode the
JPEG and the mask PNG, shrink images larger than the canvas, pad image and mask to a fixed canvas
and the people to a fixed count, and batch. Shuffling is by index (globally, or in windows of
`shuffle_buffer_size` records), reshuffled every epoch; the iterator state is a small dict that
checkpoints store, so a resumed run sees exactly the batches it would have seen.

Device: `augment.make_device_preprocess` turns a host batch into normalised images, labels and
loss masks under jit + vmap.
"""

from __future__ import annotations

import collections
import glob
import logging
import os
import threading
from typing import Iterator, Optional, Sequence

import cv2
import numpy as np

from bpnet_jax.data import records as records_lib
from bpnet_jax.data.records import Visibility

log = logging.getLogger("bpnet.input")


class DecodeAndPad:
  """Record bytes -> fixed-shape numpy sample (see `augment.preprocess_sample` for the keys)."""

  def __init__(self, roots: dict, default_root: str, canvas_hw, max_people: int,
               num_joints: int, skeleton_name: Optional[str] = None):
    self.roots = dict(roots)
    self.default_root = default_root
    self.canvas_hw = tuple(int(v) for v in canvas_hw)
    self.max_people = int(max_people)
    self.num_joints = int(num_joints)
    self.skeleton_name = skeleton_name

  def _root(self, dataset):
    return self.roots.get(dataset, self.default_root)

  def __call__(self, data: bytes) -> dict:
    rec = records_lib.decode(data)
    if rec["num_joints"] != self.num_joints:
      raise ValueError(f"record of image {rec['image_id']} has {rec['num_joints']} joints; the "
                       f"config's skeleton has {self.num_joints} (convert with that skeleton)")
    ch, cw = self.canvas_hw
    root = self._root(rec["dataset"])
    path = os.path.join(root, rec["image_path"])
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    out_image = np.zeros((ch, cw, 3), np.uint8)
    out_mask = np.zeros((ch, cw), np.uint8)
    p, j = self.max_people, self.num_joints
    joints = np.zeros((p, j, 2), np.float32)
    vis = np.full((p, j), int(Visibility.NOT_LABELED), np.uint8)
    centers = np.zeros((p, 2), np.float32)
    scales = np.ones((p,), np.float32)
    if image is None:
      # Unreadable at training time: an all-ignore sample (mask 0) adds nothing to the loss.
      log.warning("%s: cannot read image (record of image %s); sample ignored", path,
                  rec["image_id"])
      return dict(image=out_image, mask=out_mask, size=np.array([ch, cw], np.int32),
                  joints=joints, visibility=vis, centers=centers, scales=scales,
                  num_people=np.int32(0), image_id=np.int64(rec["image_id"]))
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if rec["mask_path"]:
      mpath = os.path.join(root, rec["mask_path"])
      mask = cv2.imread(mpath, cv2.IMREAD_GRAYSCALE)
      if mask is None or mask.shape != image.shape[:2]:
        log.warning("%s: mask missing or of the wrong size; using an all-valid mask", mpath)
        mask = np.full(image.shape[:2], 255, np.uint8)
    else:
      mask = np.full(image.shape[:2], 255, np.uint8)
    h, w = image.shape[:2]
    n = min(rec["num_people"], p)
    rj, rc, rs = rec["joints"][:n], rec["centers"][:n], rec["scales"][:n]
    scale = min(1.0, ch / h, cw / w)
    if scale < 1.0:
      # Larger than the canvas: shrink on the host (rare; the canvas fits COCO's 640 px).
      nh, nw = max(1, int(h * scale)), max(1, int(w * scale))
      image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
      mask = cv2.resize(mask, (nw, nh), interpolation=cv2.INTER_NEAREST)
      sx, sy = nw / w, nh / h
      # Pixel-centre convention: x' = (x + 0.5) * s - 0.5.
      rj = (rj + 0.5) * np.array([sx, sy], np.float32) - 0.5
      rc = (rc + 0.5) * np.array([sx, sy], np.float32) - 0.5
      rs = rs * sy
      h, w = nh, nw
    out_image[:h, :w] = image
    out_mask[:h, :w] = mask
    joints[:n], vis[:n], centers[:n], scales[:n] = rj, rec["visibility"][:n], rc, rs
    return dict(image=out_image, mask=out_mask, size=np.array([h, w], np.int32), joints=joints,
                visibility=vis, centers=centers, scales=scales, num_people=np.int32(n),
                image_id=np.int64(rec["image_id"]))


def resolve_record_paths(folder: str, names: Sequence[str]) -> list[str]:
  """Record files: each name is joined to folder and may be a glob; all must exist."""
  paths = []
  for name in names:
    pattern = os.path.join(folder, name)
    hits = sorted(glob.glob(pattern))
    if not hits:
      raise FileNotFoundError(f"no record file matches {pattern!r}")
    paths.extend(h for h in hits if not h.endswith((".tmp", ".summary.json")))
  return paths


def dataset_roots(dataset_config) -> dict:
  """{dataset name: root directory} from `dataset_specs`."""
  from bpnet_jax.data.dataset_spec import load_spec
  return {name: load_spec(path).root for name, path in dict(dataset_config.dataset_specs).items()}


def build_dataset(record_paths: Sequence[str], decoder: DecodeAndPad, seed: int,
                  shuffle_buffer_size: int, process_index: int = 0, process_count: int = 1,
                  shuffle: bool = True, repeat: bool = True):
  """grain MapDataset of decoded, padded samples (this process's share, shuffled, repeated)."""
  import grain
  from array_record.python import array_record_data_source
  source = array_record_data_source.ArrayRecordDataSource(list(record_paths))
  if len(source) == 0:
    raise ValueError(f"record files {list(record_paths)} hold no records")
  ds = grain.MapDataset.source(source)
  if shuffle and shuffle_buffer_size > 0:
    if shuffle_buffer_size >= len(source):
      ds = ds.shuffle(seed=seed)
    else:
      ds = grain.experimental.WindowShuffleMapDataset(ds, window_size=shuffle_buffer_size,
                                                      seed=seed)
  if repeat:
    ds = ds.repeat(None)
  if process_count > 1:
    ds = ds[process_index::process_count]
  return ds.map(decoder)


def auto_num_workers(platform: Optional[str] = None, cores: Optional[int] = None) -> int:
  """Host decode processes for `dataloader.num_workers=-1`.

  With an accelerator, all host cores but two (the training loop and the batching/transfer
  thread), at most 32: one worker decodes ~330 640x480 JPEGs/s, so a 16-core host feeds ~4,000
  images/s. On the CPU backend the same cores run the model, and worker processes measured
  slower than decoding in the main process, so none.
  """
  if platform is None:
    import jax
    platform = jax.default_backend()
  if cores is None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  if platform == "cpu":
    return 0
  return max(1, min(int(cores) - 2, 32))


def make_iterator(ds, batch_size: int, num_workers: int = 0, state: Optional[dict] = None):
  """Iterator of batches (dicts of stacked arrays) over `ds`, restored from `state`.

  With workers, samples are decoded in `num_workers` processes and batched in this one: moving
  single samples between processes is cheaper than moving whole batches. num_workers=-1: see
  `auto_num_workers`.
  """
  import grain
  if num_workers < 0:
    num_workers = auto_num_workers()
  from absl import flags
  if not flags.FLAGS.is_parsed():   # grain reads absl flags; library users may not parse any.
    flags.FLAGS.mark_as_parsed()
  it_ds = ds.to_iter_dataset()
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(2, batch_size // num_workers)))
  it = iter(it_ds.batch(batch_size, drop_remainder=True))
  if state is not None:
    it.set_state(state)
  return it


def decoder_from_config(config, skeleton) -> DecodeAndPad:
  d = config.dataloader
  return DecodeAndPad(dataset_roots(d.dataset_config), d.dataset_config.root_data_path,
                      tuple(d.max_image_size), d.max_people, skeleton.num_joints, skeleton.name)


def train_dataset_from_config(config, skeleton, process_index: int = 0, process_count: int = 1):
  """The training MapDataset of this process's samples, from `config.dataloader`."""
  d = config.dataloader
  paths = resolve_record_paths(d.dataset_config.train_records_folder_path,
                               d.dataset_config.train_records_path)
  if d.batch_size % process_count:
    raise ValueError(f"dataloader.batch_size {d.batch_size} is not divisible by the "
                     f"{process_count} processes")
  return build_dataset(paths, decoder_from_config(config, skeleton), config.trainer.random_seed,
                       d.shuffle_buffer_size, process_index, process_count)


def prefetch_to_device(iterator: Iterator, size: int = 2, put=None):
  """Yields (device batch, iterator state after it), `size` batches ahead.

  A background thread pulls host batches and calls `jax.device_put` (asynchronous), so the
  accelerator's next batch is in flight while the current step runs. The state paired with each
  batch is what a checkpoint taken after consuming that batch must store (the thread runs ahead).
  """
  import jax
  queue = collections.deque()
  lock = threading.Condition()
  done = object()

  put = put or (lambda batch: jax.tree_util.tree_map(jax.device_put, batch))

  def worker():
    try:
      for batch in iterator:
        item = (put(batch), iterator.get_state())
        with lock:
          while len(queue) >= size:
            lock.wait()
          queue.append(item)
          lock.notify_all()
    except BaseException as e:  # Re-raised in the consumer.
      with lock:
        queue.append(e)
        lock.notify_all()
      return
    with lock:
      queue.append(done)
      lock.notify_all()

  threading.Thread(target=worker, daemon=True).start()
  while True:
    with lock:
      while not queue:
        lock.wait()
      item = queue.popleft()
      lock.notify_all()
    if item is done:
      return
    if isinstance(item, BaseException):
      raise item
    yield item
