"""The DetectNet_v2 record: one image and its labelled boxes, serialised with msgpack.

Records live in ArrayRecord files written and read through `bpnet_jax.data.records`
(`write_records(path, recs, encode_fn=encode)`, `read_records(paths, decode_fn=decode)`), named
`<prefix>-fold-PPP-of-NNN[-shard-SSSSS-of-TTTTT]` like the original's TFRecords (`record_file_name`
below). The image itself is not stored. A record holds (N = number of objects, possibly 0):

  source            'kitti' or 'coco'
  frame_id          '<image dir>/<file name without extension>' (the original's `frame/id`)
  image_path        the image file relative to the dataset root: posix separators, never absolute,
                    never leaving the root
  height, width     image size in pixels (KITTI: read from the image file; COCO: from the JSON)
  boxes (N, 4)      float32 x1, y1, x2, y2 in image pixels, continuous coordinates (KITTI's left,
                    top, right, bottom as written in the label file; COCO's x, y, x + w, y + h)
  classes           N class names as written in the labels, lower-cased (`target/object_class`)
  class_ids (N,)    int32 index into `class_names`; -1 = no target class (unmapped or don't-care)
  class_names       the conversion's target classes (see convert.py: `target_class_mapping`)
  truncation (N,)   float32 KITTI field 2 (0 = inside the image ... 1 = leaving it; -1 don't-care)
  occlusion (N,)    int32 KITTI field 3 (0 visible, 1 partly, 2 largely occluded, 3 unknown; -1)
  alpha (N,)        float32 KITTI field 4, the observation angle in radians
  world_bbox (N, 7) float32 KITTI fields 9-15: 3-D height, width, length (m), x, y, z (m, camera
                    frame), rotation_y (rad); unused by DetectNet_v2, kept for completeness
  dontcare (N,)     bool: a don't-care region (KITTI `DontCare`; COCO crowd boxes when converted
                    with crowd_boxes='dontcare')
  crowd (N,)        bool: COCO `iscrowd` (always False for KITTI)

COCO records carry zeros in truncation, occlusion, alpha and world_bbox (as the original).

Differences from the original: msgpack records in ArrayRecord files instead of tf.train.Example
TFRecords; the image path is stored with its extension (the original rebuilds it from `frame/id`
and the training spec's image_extension), class ids and the don't-care and crowd flags are added;
point-cloud and calibration features are not carried (DetectNet_v2 does not read them).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import msgpack
import numpy as np

from bpnet_jax.data import records as records_lib

DONTCARE = "dontcare"          # KITTI's DontCare class, lower-cased
ARRAY_FIELDS = {               # name: (dtype, per-object shape)
    "boxes": (np.float32, (4,)), "class_ids": (np.int32, ()), "truncation": (np.float32, ()),
    "occlusion": (np.int32, ()), "alpha": (np.float32, ()), "world_bbox": (np.float32, (7,)),
    "dontcare": (np.bool_, ()), "crowd": (np.bool_, ()),
}
SCALAR_FIELDS = ("source", "frame_id", "image_path", "height", "width")


def empty_arrays(n: int = 0) -> dict:
  """Zero-filled per-object arrays for n objects (what COCO records use for the KITTI extras)."""
  return {k: np.zeros((n,) + shape, dtype) for k, (dtype, shape) in ARRAY_FIELDS.items()}


def encode(rec: Mapping) -> bytes:
  """One record -> bytes. ValueError (naming the frame) for inconsistent object counts."""
  n = len(rec["classes"])
  out = {k: rec[k] for k in SCALAR_FIELDS}
  out["height"], out["width"] = int(rec["height"]), int(rec["width"])
  out["classes"] = [str(c) for c in rec["classes"]]
  out["class_names"] = [str(c) for c in rec["class_names"]]
  out["num_objects"] = n
  for k, (dtype, shape) in ARRAY_FIELDS.items():
    a = np.ascontiguousarray(rec[k], dtype)
    if a.shape != (n,) + shape:
      raise ValueError(f"record {rec['frame_id']!r}: {k} has shape {a.shape}, expected "
                       f"{(n,) + shape} for {n} objects")
    # bool as uint8: one byte per flag, and frombuffer gives it back exactly.
    out[k] = (a.astype(np.uint8) if dtype is np.bool_ else a).tobytes()
  return msgpack.packb(out, use_bin_type=True)


def decode(data: bytes) -> dict:
  """bytes -> record dict with numpy arrays (read-only views of the message; copy to modify)."""
  rec = msgpack.unpackb(data, raw=False)
  n = rec.pop("num_objects")
  for k, (dtype, shape) in ARRAY_FIELDS.items():
    if dtype is np.bool_:
      rec[k] = np.frombuffer(rec[k], np.uint8).reshape((n,) + shape).astype(bool)
    else:
      rec[k] = np.frombuffer(rec[k], dtype).reshape((n,) + shape)
  return rec


def write(path: str, recs) -> int:
  """Writes records atomically (bpnet_jax.data.records.write_records with this encoder)."""
  return records_lib.write_records(path, recs, encode_fn=encode)


def read(paths: Sequence[str]) -> list[dict]:
  """All records of the given files, decoded (tests and small tools)."""
  return records_lib.read_records(paths, decode_fn=decode)


def record_file_name(prefix: str, partition: int, num_partitions: int, shard: int = 0,
                     num_shards: int = 0) -> str:
  """The original's file naming: the fold part is omitted when num_partitions is 0, the shard
  part when num_shards is 0 (so with both 0 the file is the prefix itself)."""
  if num_partitions:
    return records_lib.shard_name(prefix, partition, num_partitions, shard, num_shards)
  if num_shards:
    return f"{prefix}-shard-{shard:05d}-of-{num_shards:05d}"
  return prefix


def target_class_ids(classes: Sequence[str], target_class_mapping: Mapping[str, str],
                     target_classes: Sequence[str]) -> np.ndarray:
  """(N,) int32: the index in target_classes of each object's mapped class, -1 if unmapped.

  The mapping is applied once: a record class name -> a target class name (the original looks
  the mapped name up a second time, which loses targets whose name is not also a key).
  """
  index = {c: i for i, c in enumerate(target_classes)}
  return np.array([index.get(target_class_mapping.get(c), -1) for c in classes], np.int32)
