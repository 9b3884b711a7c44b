"""The training input pipeline: grain on the host, augmentation and targets on the device.

Host (grain, worker processes): read a record (random access into ArrayRecord files), decode the
JPEG and the mask (PNG, or the original's JPEG: valid from MASK_THRESHOLD up), turn a portrait
image 90 degrees when that lets it onto the (landscape) canvas with less shrinking, shrink images
still larger than the canvas, pad the image to the fixed canvas, pack the binary mask to bits
(or send none: `has_mask`), pad the people to a fixed count, and batch -- each whole batch in
one worker, straight into shared memory, so the main process copies nothing before the transfer.
Shuffling is by index (globally, or in windows of `shuffle_buffer_size` records), reshuffled
every epoch; the iterator state is the number of samples consumed, which checkpoints store, so a
resumed run sees exactly the batches it would have seen (with any number of workers).

Device: `augment.make_device_preprocess` turns a host batch into normalised images, labels and
loss masks under jit + vmap; the host's turn is folded into the augmentation matrix there
(`augment.fold_turn`), so the network sees the same input and labels as without it.

Bad data, by kind: an image that cannot be read is an ignored sample (counted by
`UnreadableGuard`: more than `dataloader.max_unreadable_fraction` of an epoch stops training); a
mask that a record names but that is missing, does not decode or is not its image's size is a
DataError at once, naming the file (training it as all-valid would teach crowds and unlabelled
people as background, and dropping it would hide an incomplete mask folder); records converted
with --no_masks train without masks, which `train_dataset_from_config` logs once.
"""

from __future__ import annotations

import collections
import glob
import logging
import os
import threading
from typing import Iterator, Optional, Sequence

import cv2
import grain
import jax
import msgpack
import numpy as np
from absl import flags
from array_record.python import array_record_data_source

from bpnet_jax.data import records as records_lib
from bpnet_jax.data.dataset_spec import load_spec, resolve_inside
from bpnet_jax.data.records import Visibility
from bpnet_jax.errors import ConfigError, DataError

log = logging.getLogger("bpnet.input")


# Default of `dataloader.max_unreadable_fraction`: more unreadable samples than this in an
# epoch stop training (a wrong root or a half-copied dataset, not a few bad files).
MAX_UNREADABLE_FRACTION = 0.01

# Exceptions `records.decode` raises for damaged or inconsistent record bytes.
_RECORD_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError,
                  msgpack.UnpackException)
# Per person: (bytes per joint, per-person bytes besides joints) of each array field.
_ARRAY_FIELDS = {"joints": (8, 0), "visibility": (1, 0), "centers": (0, 8), "scales": (0, 4)}
# Mask pixels from this value up count as valid (255) when packed to bits, below it as ignore.
# The converter's PNG masks hold only 0 and 255, so their bits are exact; the original TAO
# converter's JPEG masks (`<stem>.jpg`) hold values near 0 and 255 (ringing at edges), which the
# midpoint splits back into the two classes.
MASK_THRESHOLD = 128
# Mask files stored lossily: grey values there are expected, not a sign of a foreign mask.
LOSSY_MASK_SUFFIXES = (".jpg", ".jpeg")
# Batches each decode worker keeps waiting in shared memory for the main process, besides the
# one it decodes and one read ahead in its own memory (/dev/shm: ~workers x this x batch bytes).
WORKER_BUFFER_BATCHES = 1
# Decode threads in the main process when num_workers = 0 (cv2 releases the GIL while decoding).
MAIN_PROCESS_THREADS = 2


def _with_index(index: int, data: bytes):
  # Pairs a record with its index in the source (before shuffling), so a sample names its record.
  return index, data


def _record_problem(data: bytes) -> tuple:
  """(image id or '?', what is wrong) for record bytes that `records.decode` rejected."""
  try:
    d = msgpack.unpackb(data, raw=False)
  except Exception as e:  # msgpack raises several types for damaged bytes.
    return "?", f"not a pose record ({type(e).__name__}: {e})"
  if not isinstance(d, dict):
    return "?", f"not a pose record (a msgpack {type(d).__name__}, not a map)"
  iid = d.get("image_id", "?")
  for key in ("num_people", "num_joints", *_ARRAY_FIELDS):
    if key not in d:
      return iid, f"field {key!r} is missing"
  n, j = d["num_people"], d["num_joints"]
  if not (isinstance(n, int) and isinstance(j, int) and n >= 0 and j > 0):
    return iid, f"num_people {n!r} and num_joints {j!r} are not counts"
  for key, (per_joint, extra) in _ARRAY_FIELDS.items():
    v, per_person = d[key], per_joint * j + extra
    if not isinstance(v, bytes):
      return iid, f"field {key!r} is a {type(v).__name__}, not an array"
    if len(v) != n * per_person:
      return iid, (f"num_people {n} with num_joints {j} needs {n * per_person} bytes of {key}, "
                   f"the record holds {len(v)} (arrays for {len(v) / per_person:g} people)")
  return iid, "fields that do not fit together"


def canvas_fit(h: int, w: int, canvas_hw) -> tuple:
  """(shrink factor <= 1, turn): how an h x w image goes onto a canvas (Hc, Wc).

  An image is turned 90 degrees only when the turn lets it keep more of its size (a portrait
  image on a landscape canvas that it does not fit upright); ties keep it upright.
  """
  ch, cw = canvas_hw
  upright = min(1.0, ch / h, cw / w)
  turned = min(1.0, ch / w, cw / h)
  return (turned, True) if turned > upright else (upright, False)


def mask_bytes_per_row(canvas_w: int) -> int:
  """Bytes of one canvas row of a bit-packed mask (`np.packbits`: 8 pixels a byte)."""
  return (int(canvas_w) + 7) // 8


_warned_grey_mask = False


def _pack_mask(mask: np.ndarray, out: np.ndarray, lossy: bool = False) -> None:
  """Packs a 0/255 mask (h, w) into the top-left of out (Hc, ceil(Wc / 8)): bit 1 = valid
  (value >= MASK_THRESHOLD). lossy: a JPEG mask, whose grey values are expected (no warning)."""
  global _warned_grey_mask
  if not lossy and not _warned_grey_mask and cv2.countNonZero(cv2.inRange(mask, 1, 254)):
    _warned_grey_mask = True      # once per process: the data, not a sample, is the problem
    log.warning("a mask holds values other than 0 and 255; they are sent as valid from %d up "
                "(masks are binary: dataset_convert writes 0 and 255)", MASK_THRESHOLD)
  bits = np.packbits(mask >= MASK_THRESHOLD, axis=1)
  out[:bits.shape[0], :bits.shape[1]] = bits


def read_mask(path: str, image_hw, where: str) -> np.ndarray:
  """The (h, w) uint8 mask file a record names, for an image of image_hw (h, w).

  A DataError in one line naming the file when it is missing, does not decode, or is not the
  image's size: a record that names a mask is never trained as all-valid.
  """
  # Checked first so that OpenCV does not print its own warning for a missing file.
  mask = cv2.imread(path, cv2.IMREAD_GRAYSCALE) if os.path.exists(path) else None
  if mask is None:
    problem = "does not decode" if os.path.exists(path) else "is missing"
  elif mask.shape != tuple(image_hw):
    problem = (f"is {mask.shape[1]}x{mask.shape[0]} px, its image "
               f"{image_hw[1]}x{image_hw[0]}")
  else:
    return mask
  raise DataError(f"{path}: the mask of {where} {problem}; restore the masks dir, or convert "
                  "again with dataset_convert (--generate_masks, or --no_masks to train without "
                  "masks)")


class DecodeAndPad:
  """Record bytes, or (record index, bytes), -> one fixed-shape numpy sample.

  Keys: those `augment.preprocess_sample` reads -- image (Hc, Wc, 3) uint8 canvas, mask_bits
  (Hc, ceil(Wc / 8)) uint8 (the mask's rows as `np.packbits`, 1 = valid; all zero when
  has_mask is 0), has_mask () uint8 (0: the record has no mask, mask_path '': every
  pixel is valid), rotated () uint8 (1: the image is on the canvas turned 90 degrees clockwise,
  in its top-left (w, h); see `canvas_fit`, `augment.fold_turn`), size (2,) int32 (h, w of the
  image upright, after any shrinking: the frame of the joints), joints (P, J, 2) float32 px,
  visibility (P, J) uint8, centers (P, 2) float32 px, scales (P,) float32 px, num_people ()
  int32, valid () uint8 -- plus image_id () int64 and record_index () int64 (the record's index
  in its source; -1 when called with bare bytes). The canvas outside the image is zero.
  valid is 0 for a sample whose image could not be read: image all zero, no mask, no people,
  and the device step gives it an all-zero loss mask; `UnreadableGuard` counts these.

  A record's image_path / mask_path must resolve inside its dataset's root or a directory its
  spec declares (`dirs`: {dataset: absolute dirs}; `dataset_spec.resolve_inside`); otherwise, or
  when its fields do not fit together, a DataError names the record (damaged data is not skipped
  silently: it stops training). So does a mask the record names that cannot be used
  (`read_mask`); masks are read with MASK_THRESHOLD (JPEG masks too).
  """

  def __init__(self, roots: dict, default_root: str, canvas_hw, max_people: int,
               num_joints: int, skeleton_name: Optional[str] = None,
               dirs: Optional[dict] = None):
    self.roots = dict(roots)
    self.default_root = default_root
    self.canvas_hw = tuple(int(v) for v in canvas_hw)
    self.max_people = int(max_people)
    self.num_joints = int(num_joints)
    self.skeleton_name = skeleton_name
    self.dirs = {name: tuple(v) for name, v in (dirs or {}).items()}

  def _root(self, dataset):
    return self.roots.get(dataset, self.default_root)

  def decode(self, data: bytes, index: int = -1) -> dict:
    """records.decode, with every inconsistency a one-line DataError naming the record."""
    where = f"record {index}" if index >= 0 else "record"
    try:
      rec = records_lib.decode(data)
    except _RECORD_ERRORS:
      iid, problem = _record_problem(data)
      raise DataError(f"{where} of image {iid}: {problem}; convert the data again with "
                      "dataset_convert") from None
    iid = rec.get("image_id", "?")
    n = rec["num_people"]
    if not (isinstance(n, int) and n >= 0 and rec["joints"].shape[0] == n):
      raise DataError(f"{where} of image {iid}: num_people {n!r} does not fit its arrays")
    for key in ("image_id", "dataset", "image_path", "mask_path"):
      kind = int if key == "image_id" else str
      if not isinstance(rec.get(key), kind) or isinstance(rec.get(key), bool):
        raise DataError(f"{where} of image {iid}: field {key!r} is {rec.get(key)!r}, not "
                        f"{'an integer' if kind is int else 'a string'}")
    if rec["num_joints"] != self.num_joints:
      raise DataError(f"{where} of image {iid} has {rec['num_joints']} joints; the config's "
                      f"skeleton has {self.num_joints} (convert with that skeleton)")
    return rec

  def paths(self, rec: dict, index: int = -1) -> tuple:
    """(image path, mask path or '') of a decoded record, each checked inside its root."""
    root = self._root(rec["dataset"])
    dirs = self.dirs.get(rec["dataset"], ())
    where = f"record {index} of image {rec['image_id']}" if index >= 0 else \
        f"record of image {rec['image_id']}"
    image = resolve_inside(root, rec["image_path"], f"{where}: image_path", dirs)
    mask = (resolve_inside(root, rec["mask_path"], f"{where}: mask_path", dirs)
            if rec["mask_path"] else "")
    return image, mask

  def __call__(self, data) -> dict:
    index = -1
    if isinstance(data, tuple):      # (index, bytes) from `build_dataset`
      index, data = data
    rec = self.decode(data, index)
    path, mpath = self.paths(rec, index)
    ch, cw = self.canvas_hw
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    out_image = np.zeros((ch, cw, 3), np.uint8)
    out_bits = np.zeros((ch, mask_bytes_per_row(cw)), np.uint8)
    p, j = self.max_people, self.num_joints
    joints = np.zeros((p, j, 2), np.float32)
    vis = np.full((p, j), int(Visibility.NOT_LABELED), np.uint8)
    centers = np.zeros((p, 2), np.float32)
    scales = np.ones((p,), np.float32)
    ids = dict(image_id=np.int64(rec["image_id"]), record_index=np.int64(index))
    if image is None:
      # Unreadable at training time: flagged invalid, so its loss mask is all zeros on the device
      # and `UnreadableGuard` can stop a run where many are.
      log.warning("%s: cannot read image (record of image %s); sample ignored", path,
                  rec["image_id"])
      return dict(image=out_image, mask_bits=out_bits, has_mask=np.uint8(0),
                  rotated=np.uint8(0), size=np.array([ch, cw], np.int32), joints=joints,
                  visibility=vis, centers=centers, scales=scales, num_people=np.int32(0),
                  valid=np.uint8(0), **ids)
    mask = None
    if mpath:
      mask = read_mask(mpath, image.shape[:2], f"record {index} (image {rec['image_id']})"
                       if index >= 0 else f"the record of image {rec['image_id']}")
    h, w = image.shape[:2]
    n = min(rec["num_people"], p)
    rj, rc, rs = rec["joints"][:n], rec["centers"][:n], rec["scales"][:n]
    scale, turn = canvas_fit(h, w, self.canvas_hw)
    if scale < 1.0:
      # Larger than the canvas even turned: shrink on the host (rare: 480x640 holds COCO).
      nh, nw = max(1, int(h * scale)), max(1, int(w * scale))
      image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
      if mask is not None:
        mask = cv2.resize(mask, (nw, nh), interpolation=cv2.INTER_NEAREST)
      sx, sy = nw / w, nh / h
      # Pixel-centre convention: x' = (x + 0.5) * s - 0.5.
      rj = (rj + 0.5) * np.array([sx, sy], np.float32) - 0.5
      rc = (rc + 0.5) * np.array([sx, sy], np.float32) - 0.5
      rs = rs * sy
      h, w = nh, nw
    if turn:
      # Joints, centres and scales stay upright; the device folds the turn into its warp.
      image = cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
      if mask is not None:
        mask = cv2.rotate(mask, cv2.ROTATE_90_CLOCKWISE)
    # BGR -> RGB straight onto the canvas (one pass; numpy's reversed-channel copy is 20x slower).
    roi = out_image[:image.shape[0], :image.shape[1]]
    res = cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=roi)
    if not np.shares_memory(res, roi):      # OpenCV wrote elsewhere: copy it over
      roi[...] = res
    if mask is not None:
      _pack_mask(mask, out_bits, lossy=mpath.lower().endswith(LOSSY_MASK_SUFFIXES))
    joints[:n], vis[:n], centers[:n], scales[:n] = rj, rec["visibility"][:n], rc, rs
    return dict(image=out_image, mask_bits=out_bits, has_mask=np.uint8(mask is not None),
                rotated=np.uint8(turn), size=np.array([h, w], np.int32), joints=joints,
                visibility=vis, centers=centers, scales=scales, num_people=np.int32(n),
                valid=np.uint8(1), **ids)


def unpack_mask(sample: dict) -> np.ndarray:
  """The 0/255 mask (Hc, Wc) uint8 of a decoded sample (or (B, Hc, Wc) of a batch), as a tool
  for tests and visualisation: `mask_bits` unpacked, all 255 where has_mask is 0."""
  wc = sample["image"].shape[-2]
  mask = np.unpackbits(sample["mask_bits"], axis=-1, count=wc) * np.uint8(255)
  has = np.asarray(sample["has_mask"]).reshape(np.shape(sample["has_mask"]) + (1, 1))
  return np.where(has > 0, mask, np.uint8(255))


class RecordImagePaths:
  """describe(record_index, image_id) -> the image file of that record, for error messages.

  Opens the record files on first use (only when `UnreadableGuard` reports), so it costs
  nothing while training goes well; falls back to "image <id>" when the record cannot be read.
  """

  def __init__(self, record_paths: Sequence[str], decoder: DecodeAndPad):
    self.record_paths = list(record_paths)
    self.decoder = decoder
    self._source = None

  def __call__(self, record_index: int, image_id: int) -> str:
    try:
      if self._source is None:
        self._source = array_record_data_source.ArrayRecordDataSource(self.record_paths)
      rec = self.decoder.decode(self._source[int(record_index)], int(record_index))
      return self.decoder.paths(rec, int(record_index))[0]
    except Exception:  # Only naming a file for a message: never hide the error being reported.
      return f"image {image_id}"


def record_image_paths(record_paths: Sequence[str], decoder: DecodeAndPad) -> RecordImagePaths:
  return RecordImagePaths(record_paths, decoder)


class UnreadableGuard:
  """Stops training when more than `max_fraction` of an epoch's samples could not be read.

  `update(host_batch)` takes every host batch (numpy, as `prefetch_to_device(check=...)` passes
  it), counts samples with valid == 0, and raises a one-line DataError naming a few of their
  files once the current epoch's count exceeds max_fraction * steps_per_epoch * batch_size.
  Batch k after construction is training step start_step + k, in epoch
  (start_step + k) // steps_per_epoch + 1 (1-based); a resumed run counts its epoch from the
  resume step. batch_size is this process's share (each process guards its own samples).
  describe(record_index, image_id) -> str names a file; it runs only when raising.
  """

  EXAMPLES = 3

  def __init__(self, steps_per_epoch: int, batch_size: int,
               max_fraction: float = MAX_UNREADABLE_FRACTION, start_step: int = 0,
               describe=None):
    fraction = float(max_fraction)
    if not 0.0 <= fraction <= 1.0:     # also rejects NaN
      raise ConfigError(f"dataloader.max_unreadable_fraction must be in [0, 1], got "
                        f"{max_fraction!r}")
    self.steps_per_epoch = max(1, int(steps_per_epoch))
    self.samples_per_epoch = self.steps_per_epoch * int(batch_size)
    self.max_fraction = fraction
    self.start_step = int(start_step)
    self.describe = describe or (lambda record_index, image_id: f"image {image_id}")
    self.batches = 0
    self.epoch = None
    self.count = 0
    self.examples = []    # (record_index, image_id) of the epoch's first unreadable samples

  def update(self, batch: dict) -> None:
    epoch = (self.start_step + self.batches) // self.steps_per_epoch
    self.batches += 1
    if epoch != self.epoch:
      self.epoch, self.count, self.examples = epoch, 0, []
    if "valid" not in batch:
      return
    bad = np.flatnonzero(np.asarray(batch["valid"]).reshape(-1) == 0)
    if not bad.size:
      return
    self.count += int(bad.size)
    ids = np.asarray(batch["image_id"]).reshape(-1)
    idx = np.asarray(batch.get("record_index", np.full(ids.shape, -1))).reshape(-1)
    for i in bad[:max(0, self.EXAMPLES - len(self.examples))]:
      self.examples.append((int(idx[i]), int(ids[i])))
    if self.count > self.max_fraction * self.samples_per_epoch:
      raise DataError(self.message())

  def message(self) -> str:
    names = list(dict.fromkeys(self.describe(i, iid) for i, iid in self.examples))
    return (f"{self.count} of {self.samples_per_epoch} samples in epoch {self.epoch + 1} could "
            f"not be read (more than {100 * self.max_fraction:g}%, "
            f"dataloader.max_unreadable_fraction), e.g. {', '.join(names)}; check "
            "dataloader.dataset_config (root_data_path, dataset_specs) and the spec's "
            "root_directory_path")


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
  return {name: load_spec(path).root for name, path in dict(dataset_config.dataset_specs).items()}


def dataset_dirs(dataset_config) -> dict:
  """{dataset name: the directories its spec declares (every split's images and masks dir)}.

  Record paths may lead into these even where they are absolute or symlinks out of the root.
  """
  out = {}
  for name, path in dict(dataset_config.dataset_specs).items():
    spec = load_spec(path)
    out[name] = tuple(d for split in spec.splits.values() for d in (split.images_dir,
                                                                    split.masks_dir))
  return out


def build_dataset(record_paths: Sequence[str], decoder: DecodeAndPad, seed: int,
                  shuffle_buffer_size: int, process_index: int = 0, process_count: int = 1,
                  shuffle: bool = True, repeat: bool = True):
  """grain MapDataset of decoded, padded samples (this process's share, shuffled, repeated)."""
  source = records_lib.open_source(record_paths)
  if len(source) == 0:
    raise ValueError(f"record files {list(record_paths)} hold no records")
  ds = grain.MapDataset.source(source).map_with_index(_with_index)
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

  With an accelerator, all host cores but two (the training loop and the receive/transfer
  thread), at most 32: one worker decodes ~330 640x480 JPEGs/s, so a 16-core host feeds ~4,000
  images/s. On the CPU backend the same cores run the model, and worker processes measured
  slower than decoding in the main process, so none.
  """
  if platform is None:
    platform = jax.default_backend()
  if cores is None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  if platform == "cpu":
    return 0
  return max(1, min(int(cores) - 2, 32))


def samples_consumed(state: dict) -> int:
  """Samples a saved iterator state had consumed: {"samples": n}, or an older run's grain state.

  Before batches were made in the workers, checkpoints stored grain's own per-sample state:
  {"next_index": n} without workers, and one {"next_index": n_i} per worker (summed) with them.
  """
  if not isinstance(state, dict):
    raise DataError(f"the checkpoint's data position {state!r} is not an iterator state")
  if "samples" in state:
    return int(state["samples"])
  if "next_index" in state:
    return int(state["next_index"])
  if "iterators_in_use_states" in state:
    return sum(int(w["next_index"]) for w in state["iterators_in_use_states"])
  raise DataError(f"the checkpoint's data position {sorted(state)} is not one this input "
                  "pipeline wrote; resume from a checkpoint of this version or start afresh")


class BatchIterator:
  """Batches (dicts of (B, ...) numpy arrays) of a MapDataset of samples, from sample `start`.

  Batch k holds samples start + [k B, (k + 1) B): grain batches the MapDataset by index, so the
  order is the same with any number of workers. With workers, each batch is decoded and stacked
  by one worker process into shared memory (grain copies a batch there once; the main process
  maps it without a copy), and up to num_workers x WORKER_BUFFER_BATCHES batches wait ready.
  get_state() -> {"samples": n consumed}, which `make_iterator(state=...)` resumes from.
  """

  def __init__(self, ds, batch_size: int, num_workers: int = 0, start: int = 0):
    self.batch_size = int(batch_size)
    self.samples = int(start)
    if start:
      ds = ds[start:]
    batched = ds.batch(self.batch_size, drop_remainder=True)
    if num_workers > 0:
      # One decode thread per worker and one batch read ahead: workers are the parallelism, and
      # every batch ahead holds its whole size in memory.
      it_ds = batched.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=num_workers, per_worker_buffer_size=WORKER_BUFFER_BATCHES))
    else:
      it_ds = batched.to_iter_dataset(grain.ReadOptions(
          num_threads=MAIN_PROCESS_THREADS, prefetch_buffer_size=MAIN_PROCESS_THREADS))
    self._it = iter(it_ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._it)
    self.samples += self.batch_size
    return batch

  def get_state(self) -> dict:
    return {"samples": self.samples}

  def close(self) -> None:
    if hasattr(self._it, "close"):
      self._it.close()


def make_iterator(ds, batch_size: int, num_workers: int = 0,
                  state: Optional[dict] = None) -> BatchIterator:
  """`BatchIterator` over the MapDataset `ds`, resumed from `state` (a `get_state()` dict).

  num_workers=-1: see `auto_num_workers`. Batches are made whole in the workers rather than
  from single samples in this process: receiving samples one by one cost the main process ~10x
  more per image (one shared-memory block each) than receiving whole batches.
  """
  if num_workers < 0:
    num_workers = auto_num_workers()
  if not flags.FLAGS.is_parsed():   # grain reads absl flags; library users may not parse any.
    flags.FLAGS.mark_as_parsed()
  start = samples_consumed(state) if state is not None else 0
  return BatchIterator(ds, batch_size, num_workers, start)


def decoder_from_config(config, skeleton) -> DecodeAndPad:
  d = config.dataloader
  return DecodeAndPad(dataset_roots(d.dataset_config), d.dataset_config.root_data_path,
                      tuple(d.max_image_size), d.max_people, skeleton.num_joints, skeleton.name,
                      dirs=dataset_dirs(d.dataset_config))


def unreadable_guard_from_config(config, skeleton, steps_per_epoch: int, batch_size: int,
                                 start_step: int = 0) -> UnreadableGuard:
  """The training records' `UnreadableGuard`, with `dataloader.max_unreadable_fraction`.

  batch_size: this process's batch (the host batch the guard sees).
  """
  d = config.dataloader
  fraction = d.get("max_unreadable_fraction", MAX_UNREADABLE_FRACTION)
  paths = resolve_record_paths(d.dataset_config.train_records_folder_path,
                               d.dataset_config.train_records_path)
  return UnreadableGuard(steps_per_epoch, batch_size, fraction, start_step,
                         RecordImagePaths(paths, decoder_from_config(config, skeleton)))


def files_without_masks(record_paths: Sequence[str]) -> list[str]:
  """The record files whose records carry no mask (converted with --no_masks, or by an older
  version without masks), judged by each file's first record: a conversion gives all its
  records a mask or none."""
  out = []
  for path in record_paths:
    try:
      source = array_record_data_source.ArrayRecordDataSource([path])
      if len(source) and records_lib.decode(source[0])["no_masks"]:
        out.append(path)
    except Exception:  # Only for a log line: damaged files are reported where they are read.
      continue
  return out


def log_training_without_masks(record_paths: Sequence[str]) -> list[str]:
  """Logs (one warning) which training record files have no masks; returns them."""
  without = files_without_masks(record_paths)
  if without:
    names = ", ".join(os.path.basename(p) for p in without[:3])
    more = f" and {len(without) - 3} more" if len(without) > 3 else ""
    log.warning("training without masks of unlabelled people: %s%s hold records converted "
                "with --no_masks, so crowds and people without keypoints count as background "
                "there", names, more)
  return without


def train_dataset_from_config(config, skeleton, process_index: int = 0, process_count: int = 1):
  """The training MapDataset of this process's samples, from `config.dataloader`.

  Logs once (`log_training_without_masks`) when record files have no masks.
  """
  d = config.dataloader
  paths = resolve_record_paths(d.dataset_config.train_records_folder_path,
                               d.dataset_config.train_records_path)
  log_training_without_masks(paths)
  if d.batch_size % process_count:
    raise ValueError(f"dataloader.batch_size {d.batch_size} is not divisible by the "
                     f"{process_count} processes")
  return build_dataset(paths, decoder_from_config(config, skeleton), config.trainer.random_seed,
                       d.shuffle_buffer_size, process_index, process_count)


def prefetch_to_device(iterator: Iterator, size: int = 2, put=None, check=None):
  """Yields (device batch, iterator state after it), `size` batches ahead.

  A background thread pulls host batches and calls `jax.device_put` (asynchronous), so the
  accelerator's next batch is in flight while the current step runs. The state paired with each
  batch is what a checkpoint taken after consuming that batch must store (the thread runs ahead).
  check(host batch), if given, runs on each host batch before its transfer (e.g.
  `UnreadableGuard.update`); an exception from it, or from the iterator, is raised unchanged
  (same type) in the consumer at that batch's turn, after the batches before it.
  """
  queue = collections.deque()
  lock = threading.Condition()
  done = object()

  put = put or (lambda batch: jax.tree_util.tree_map(jax.device_put, batch))

  def worker():
    try:
      for batch in iterator:
        if check is not None:
          check(batch)
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
