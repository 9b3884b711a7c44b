"""The training record: one (image, main person) pair, serialised with msgpack in ArrayRecord files.

ArrayRecord files give random access by index from any host without TensorFlow, which is what
grain's index-shuffled, checkpointable pipeline needs. A record holds:

  image_id, height, width     COCO image id and the JSON's image size (pixels)
  image_path, mask_path       relative to the dataset root; mask_path '' means "no mask: all valid"
  no_masks                    True when converted with --no_masks (then mask_path is ''); records
                              of older conversions lack it (their '' mask_path meant the same)
  dataset                     dataset name (selects the root directory when datasets are mixed)
  skeleton                    name of the skeleton the joints are expressed in
  joints  (N, J, 2) float32   x, y in source-image pixels (pixel-centre convention)
  visibility (N, J) uint8     `Visibility` values; person 0 is the main person
  centers (N, 2) float32      bbox centres; scales (N,) float32: bbox heights (person-centric zoom)
  person_idx                  the main person's index among the image's annotations
"""

from __future__ import annotations

import enum
from typing import Iterable, Sequence

import msgpack
import numpy as np
from array_record.python import array_record_data_source, array_record_module

from bpnet_jax import fileio
from bpnet_jax.errors import DataError


class Visibility(enum.IntEnum):
  """Joint visibility (the original's JointVisibility). Values below TRUNCATED are labelled."""
  VISIBLE = 0
  ANNOTATABLE = 1
  OCCLUDED = 2
  TRUNCATED = 3
  NOT_LABELED = 4
  NOT_LABELED_IN_DATASET = 5


VISIBILITY_NAMES = {"visible": 0, "annotatable": 1, "occluded": 2, "truncated": 3,
                    "not_labeled": 4, "not_labeled_in_dataset": 5}
LABELED_BELOW = int(Visibility.TRUNCATED)   # a joint is used for targets when visibility < 3


def encode(rec: dict) -> bytes:
  joints = np.ascontiguousarray(rec["joints"], np.float32)
  n, j, _ = joints.shape
  out = {k: rec[k] for k in ("image_id", "height", "width", "image_path", "mask_path", "dataset",
                             "skeleton", "person_idx")}
  out.update(no_masks=bool(rec.get("no_masks", False)), num_people=n, num_joints=j,
             joints=joints.tobytes(),
             visibility=np.ascontiguousarray(rec["visibility"], np.uint8).tobytes(),
             centers=np.ascontiguousarray(rec["centers"], np.float32).tobytes(),
             scales=np.ascontiguousarray(rec["scales"], np.float32).tobytes())
  return msgpack.packb(out, use_bin_type=True)


def decode(data: bytes) -> dict:
  rec = msgpack.unpackb(data, raw=False)
  n, j = rec["num_people"], rec["num_joints"]
  rec["joints"] = np.frombuffer(rec["joints"], np.float32).reshape(n, j, 2)
  rec["visibility"] = np.frombuffer(rec["visibility"], np.uint8).reshape(n, j)
  rec["centers"] = np.frombuffer(rec["centers"], np.float32).reshape(n, 2)
  rec["scales"] = np.frombuffer(rec["scales"], np.float32).reshape(n)
  rec.setdefault("no_masks", rec.get("mask_path") == "")    # older records: see the docstring
  return rec


def write_records(path: str, records: Iterable[dict], encode_fn=None) -> int:
  """Writes records to an ArrayRecord file atomically (temp name, then rename).

  encode_fn(record) -> bytes serialises one record (default: this module's pose `encode`);
  other models' records (e.g. DetectNet_v2's) pass their own.
  """
  encode_fn = encode_fn or encode
  n = 0
  with fileio.atomic_path(path) as tmp:
    # group_size:1 makes every record individually seekable (true random access).
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    try:
      for rec in records:
        writer.write(encode_fn(rec))
        n += 1
    finally:
      writer.close()
  return n


def open_source(paths: Sequence[str]):
  """A random-access ArrayRecord source over `paths`; DataError naming the first file that is
  missing, truncated or not an ArrayRecord file (instead of the reader's own exception)."""
  paths = list(paths)
  try:
    return array_record_data_source.ArrayRecordDataSource(paths)
  except Exception:  # The reader raises several types; find which file it was, in one line.
    pass
  for path in paths:
    try:
      array_record_data_source.ArrayRecordDataSource([path])
    except Exception as e:
      reason = str(e).strip().splitlines()[-1][:160] if str(e).strip() else type(e).__name__
      raise DataError(f"{path}: not a readable record file ({reason}); convert the data again "
                      "with dataset_convert") from None
  raise DataError(f"record files {paths} cannot be opened together")


def read_records(paths: Sequence[str], decode_fn=None) -> list[dict]:
  """All records of the given files, decoded (for tests and small tools)."""
  decode_fn = decode_fn or decode
  src = open_source(paths)
  return [decode_fn(src[i]) for i in range(len(src))]


def shard_name(base: str, partition: int, num_partitions: int, shard: int = 0,
               num_shards: int = 0) -> str:
  """The original's naming: BASE-fold-PPP-of-NNN[-shard-SSSSS-of-TTTTT]."""
  name = f"{base}-fold-{partition:03d}-of-{num_partitions:03d}"
  if num_shards:
    name += f"-shard-{shard:05d}-of-{num_shards:05d}"
  return name
