"""DetectNet_v2 `dataset_convert`: KITTI label files or COCO JSON -> detection records.

The spec is the original's `DatasetExportConfig`, as JSON or in the original's protobuf text format
(`load_convert_spec`; a file whose first character is '{' is JSON, anything else is text format):

  {"kitti_config": {"root_directory_path": "/data/kitti/training",   # relative: to the spec file
                    "image_dir_name": "image_2", "label_dir_name": "label_2",
                    "image_extension": ".png",        # with the dot; "" means ".png"
                    "partition_mode": "random",       # or "sequence"
                    "num_partitions": 2,              # random: must be 2; sequence: N (0 means 1)
                    "val_split": 14,                  # percent, random mode only, < 100
                    "num_shards": 10,                 # per fold; 0: one shard, no shard suffix
                    "kitti_sequence_to_frames_file": "seq.json"},  # sequence mode, root-relative
   "image_directory_path": "/data/kitti/training",    # informational (the training spec's root)
   "target_class_mapping": {"car": "car", "van": "car"},   # optional: the records' class_ids
   "sample_modifier_config": {"filter_samples_containing_only": [...],
                              "dominant_target_classes": [...],
                              "minimum_target_class_imbalance": {"cyclist": 1.0},
                              "num_duplicates": 1, "max_training_samples": 0,
                              "source_to_target_class_mapping": {"car": "car"}}}
  or, instead of kitti_config,
  "coco_config": {"root_directory_path": ..., "img_dir_names": ["val2017", "train2017"],
                  "annotation_files": ["annotations/instances_val2017.json", ...],
                  "num_partitions": 2, "num_shards": [32, 256],     # one value or one per file
                  "crowd_boxes": "keep"}                            # port extension, see below

KITTI: one `<stem>.txt` per image, one object per line, exactly 15 whitespace-separated fields
(type, truncation, occlusion, alpha, left, top, right, bottom, 3-D h, w, l, x, y, z, rotation_y);
pixels for the box, metres and radians for the rest. Class names are lower-cased (ASCII). An
object is skipped, and listed in `<prefix>_warning.json` as "<label file>_<object index>":
[x1, y1, x2, y2], unless int(left) < int(right) and int(top) < int(bottom) (truncation toward zero,
as the original). Every image needs a label file; an empty file is a frame without objects.

Folds and shards are exactly the original's: Python's Mersenne Twister seeded with 42 once;
random mode = the first int(val_split / 100 * N) file names in sorted order are fold 0 (validation)
and the rest fold 1, each fold shuffled (`random.shuffle`), then every fold shuffled again with the
legacy `random.shuffle(x, random.random)` algorithm; sequence mode = sequences sorted by (frame
count descending, name), the k-th to fold k mod N, the fold list reversed, each fold shuffled once
(legacy). COCO: folds = annotation files, images in JSON order, no shuffling. A fold is cut into
shards of len // num_shards frames, the last shard taking the remainder.

Outputs (the directory of the prefix is created): `<prefix>-fold-PPP-of-NNN-shard-SSSSS-of-TTTTT`
record files (detectnet_v2/records.py; the fold part omitted when num_partitions is 0, the shard
part when num_shards is 0), `<prefix>_warning.json` (only when boxes were skipped) and
`<prefix>.summary.json` (written last: frames and objects per class per fold, the class map,
skipped items, files). Everything is read and checked before anything is written; existing outputs
of the prefix are refused unless overwrite=True (then stale shards of the prefix are removed).

`sample_modifier_config` acts on every fold except `validation_fold` (the original's `-f`): frames
whose (source_to_target_class_mapping-mapped) classes are all one listed class are dropped, frames
where some rare class outnumbers a dominant class times its imbalance are written 1 +
num_duplicates times, and each training fold keeps at most max_training_samples // (folds - 1)
frames (// folds without validation_fold).

`target_class_mapping` (record class name -> target class) only fills the records' class_ids and
class_names (target classes in order of first appearance among the mapping's values); names stay in
the records, so training may map differently. Without it, class_names are the sorted class names
(KITTI: those found, except 'dontcare'; COCO: all categories), which can differ between
conversions: give the mapping for ids that are stable across datasets.

Differences from the original: the records format (see records.py); fold numbers never shift (the
original's COCO path drops an empty fold and renumbers the later ones; here an empty fold keeps its
number and is written as empty files, reported in the summary's "empty_folds"); label lines with
the wrong field count, unparsable or non-finite numbers, missing label or image files, bad JSON and
unknown spec keys are one-line DataError (ValueError) messages naming the file and line or key
instead of assertions or tracebacks; a skipped object's warning key uses its own line index (the
original reuses the index of the first identical line); image paths that resolve outside the
dataset root are rejected; the per-class minimum_target_class_imbalance is honoured (the original
looks it up with a bytes key in a str-keyed map); image sizes are read from the file header without
decoding (no EXIF rotation, like the original's PIL `size`); the lidar keys point_clouds_dir and
calibrations_dir are rejected (DetectNet_v2 never reads them). Crowd boxes: kept as ordinary
objects by default, like the original (its `iscrowd` is ignored), with the flag stored in the
records; coco_config.crowd_boxes = "dontcare" flags them as don't-care regions (class_id -1) and
"skip" drops them.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import random
import re
import struct
from typing import Mapping, Optional, Sequence

import cv2
import numpy as np

from bpnet_jax import fileio
from bpnet_jax.detectnet_v2 import records as det_records
from bpnet_jax.errors import DataError

log = logging.getLogger("bpnet.detectnet_v2.convert")

SEED = 42                     # the original seeds Python's `random` with 42 once per conversion
KITTI_FIELDS = 15
CROWD_MODES = ("keep", "dontcare", "skip")

# ---------------------------------------------------------------------------------------------
# The spec: field names and types of the original's DatasetExportConfig (+ the port's
# coco_config.crowd_boxes). "[t]" = repeated, "{t}" = map<string, t>, a dict = a message.

_KITTI = {"root_directory_path": "str", "image_dir_name": "str", "label_dir_name": "str",
          "point_clouds_dir": "str", "calibrations_dir": "str",
          "kitti_sequence_to_frames_file": "str", "image_extension": "str",
          "num_partitions": "uint", "num_shards": "uint", "partition_mode": "str",
          "val_split": "float"}
_COCO = {"root_directory_path": "str", "img_dir_names": "[str]", "annotation_files": "[str]",
         "num_partitions": "uint", "num_shards": "[uint]", "crowd_boxes": "str"}
_MODIFIER = {"filter_samples_containing_only": "[str]", "dominant_target_classes": "[str]",
             "minimum_target_class_imbalance": "{float}", "num_duplicates": "uint",
             "max_training_samples": "uint", "source_to_target_class_mapping": "{str}"}
SPEC_SCHEMA = {"kitti_config": _KITTI, "coco_config": _COCO, "sample_modifier_config": _MODIFIER,
               "image_directory_path": "str", "target_class_mapping": "{str}"}
_DEFAULTS = {"str": "", "uint": 0, "float": 0.0}


def _scalar(value, kind: str, where: str):
  """A JSON or text-format value checked against a scalar kind; DataError naming `where`."""
  if kind == "str":
    if isinstance(value, str):
      return value
  elif kind == "uint":
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
      return int(value)
    if isinstance(value, float) and value.is_integer() and value >= 0:
      return int(value)
  elif kind == "float":
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
      return float(value)
  want = {"str": "a string", "uint": "an integer >= 0", "float": "a finite number"}[kind]
  raise DataError(f"{where}: expected {want}, got {value!r}")


def _check(d, schema: dict, where: str) -> dict:
  """A (sub)spec dict checked against the schema, with proto3 defaults for absent fields."""
  if not isinstance(d, dict):
    raise DataError(f"{where}: expected an object, got {type(d).__name__}")
  out = {}
  for key, value in d.items():
    path = f"{where}.{key}" if where else key
    kind = schema.get(key)
    if kind is None:
      raise DataError(f"{path}: unknown key (expected one of {', '.join(sorted(schema))})")
    if isinstance(kind, dict):
      out[key] = _check(value, kind, path)
    elif kind.startswith("["):
      if not isinstance(value, list):
        value = [value]       # a single value for a repeated field (JSON convenience)
      out[key] = [_scalar(v, kind[1:-1], f"{path}[{i}]") for i, v in enumerate(value)]
    elif kind.startswith("{"):
      if not isinstance(value, dict):
        raise DataError(f"{path}: expected an object (a map), got {value!r}")
      out[key] = {_scalar(k, "str", path): _scalar(v, kind[1:-1], f"{path}.{k}")
                  for k, v in value.items()}
    else:
      out[key] = _scalar(value, kind, path)
  for key, kind in schema.items():
    if key not in out and not isinstance(kind, dict):
      out[key] = [] if kind.startswith("[") else {} if kind.startswith("{") else _DEFAULTS[kind]
  return out


def validate_convert_spec(spec: Mapping, where: str = "spec") -> dict:
  """The spec dict checked (unknown keys, types, the kitti/coco oneof), with defaults filled."""
  d = _check(dict(spec), SPEC_SCHEMA, "")
  kinds = [k for k in ("kitti_config", "coco_config") if k in d]
  if len(kinds) != 1:
    raise DataError(f"{where}: needs exactly one of kitti_config and coco_config, got "
                    f"{kinds or 'neither'}")
  d.setdefault("sample_modifier_config", _check({}, _MODIFIER, ""))
  if "kitti_config" in d:
    for key in ("point_clouds_dir", "calibrations_dir"):
      if d["kitti_config"][key]:
        raise DataError(f"{where}: kitti_config.{key} is a lidar input DetectNet_v2 never "
                        "reads; remove it")
  return d


# A small reader for the original's protobuf text format (enough for DatasetExportConfig:
# scalars, nested messages, repeated fields written repeatedly or as [a, b], and maps written as
# repeated {key: ... value: ...} entries).
_TOKENS = re.compile(r"""
    (?P<skip>\s+|\#[^\n]*)
  | (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<punct>[{}\[\]:,;<>])
  | (?P<word>[^\s{}\[\]:,;<>"'\#]+)
""", re.X)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}


def _tokenize(text: str, where: str) -> list:
  toks, pos = [], 0
  while pos < len(text):
    m = _TOKENS.match(text, pos)
    if not m:
      line = text.count("\n", 0, pos) + 1
      raise DataError(f"{where}:{line}: cannot parse {text[pos:pos + 20]!r}")
    kind = m.lastgroup
    if kind != "skip":
      line = text.count("\n", 0, pos) + 1
      value = m.group()
      if kind == "str":
        value = re.sub(r"\\(.)", lambda e: _ESCAPES.get(e.group(1), e.group(1)), value[1:-1])
      toks.append((kind, value, line))
    pos = m.end()
  return toks


def _parse_text_format(text: str, where: str) -> dict:
  """Text format -> {name: [raw values]} trees (raw: str, or ('word', text), or a dict)."""
  toks = _tokenize(text, where)
  pos = 0

  def fail(msg):
    line = toks[min(pos, len(toks) - 1)][2] if toks else 1
    raise DataError(f"{where}:{line}: {msg}")

  def take(value=None):
    nonlocal pos
    if pos >= len(toks):
      fail("unexpected end of file")
    tok = toks[pos]
    if value is not None and tok[1] != value:
      fail(f"expected {value!r}, got {tok[1]!r}")
    pos += 1
    return tok

  def scalar():
    kind, value, _ = take()
    if kind == "str":
      return value
    if kind == "word":
      return ("word", value)
    fail(f"expected a value, got {value!r}")

  def message(end):
    fields = {}
    while True:
      if pos >= len(toks):
        if end is None:
          return fields
        fail(f"missing {end!r}")
      if toks[pos][1] == end and toks[pos][0] == "punct":
        take()
        return fields
      kind, name, _ = take()
      if kind != "word":
        fail(f"expected a field name, got {name!r}")
      values = []
      if pos < len(toks) and toks[pos][1] == ":":
        take()
      nxt = toks[pos][1] if pos < len(toks) else None
      if nxt in ("{", "<"):
        take()
        values.append(message("}" if nxt == "{" else ">"))
      elif nxt == "[":
        take()
        while True:
          if pos >= len(toks):
            fail("missing ']'")
          if toks[pos][1] == "]":
            break
          if toks[pos][1] in ("{", "<"):
            opener = take()[1]
            values.append(message("}" if opener == "{" else ">"))
          else:
            values.append(scalar())
          if pos < len(toks) and toks[pos][1] == ",":
            take()
        take("]")
      else:
        values.append(scalar())
      if pos < len(toks) and toks[pos][1] in (",", ";"):
        take()
      fields.setdefault(name, []).extend(values)

  return message(None)


def _word_value(raw, kind: str, where: str):
  """A text-format raw value -> a Python value of the schema kind."""
  if isinstance(raw, tuple):                 # an unquoted word: a number (or a bare enum name)
    text = raw[1]
    if kind == "str":
      raise DataError(f"{where}: expected a quoted string, got {text}")
    try:
      number = float(text.rstrip("fF"))
    except ValueError:
      raise DataError(f"{where}: expected a number, got {text}") from None
    return _scalar(number, kind, where)
  return raw


def _from_text(fields: dict, schema: dict, where: str) -> dict:
  out = {}
  for name, values in fields.items():
    path = f"{where}.{name}" if where else name
    kind = schema.get(name)
    if kind is None:
      raise DataError(f"{path}: unknown key (expected one of {', '.join(sorted(schema))})")
    if isinstance(kind, dict) or not kind.startswith(("[", "{")):
      if len(values) != 1:
        raise DataError(f"{path}: given {len(values)} times (not a repeated field)")
    if isinstance(kind, dict):
      if not isinstance(values[0], dict):
        raise DataError(f"{path}: expected a {{...}} block")
      out[name] = _from_text(values[0], kind, path)
    elif kind.startswith("["):
      out[name] = [_word_value(v, kind[1:-1], path) for v in values]
    elif kind.startswith("{"):
      entries = {}
      for v in values:
        if not isinstance(v, dict) or set(v) - {"key", "value"} or len(v.get("key", [])) != 1:
          raise DataError(f"{path}: map entries are written as {{ key: \"...\" value: ... }}")
        key = _word_value(v["key"][0], "str", f"{path}.key")
        entries[key] = _word_value(v.get("value", [_DEFAULTS[kind[1:-1]]])[0], kind[1:-1],
                                   f"{path}.{key}")
      out[name] = entries
    else:
      if isinstance(values[0], dict):
        raise DataError(f"{path}: expected a value, got a {{...}} block")
      out[name] = _word_value(values[0], kind, path)
  return out


def load_convert_spec(path: str) -> dict:
  """Reads a DatasetExportConfig from JSON or the original's protobuf text format (.txt).

  Relative root_directory_path values are made absolute against the spec file's directory.
  """
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    raise DataError(f"{path}: dataset_convert spec not found") from None
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read the spec ({e})") from None
  if text.lstrip().startswith("{"):
    try:
      d = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: not valid JSON ({e})") from None
  try:
    if not text.lstrip().startswith("{"):
      d = _from_text(_parse_text_format(text, path), SPEC_SCHEMA, "")
    spec = validate_convert_spec(d, path)
  except DataError as e:
    msg = str(e)
    raise DataError(msg if msg.startswith(path) else f"{path}: {msg}") from None
  base = os.path.dirname(os.path.abspath(path))
  for key in ("kitti_config", "coco_config"):
    if key in spec and spec[key]["root_directory_path"]:
      spec[key]["root_directory_path"] = os.path.join(base, spec[key]["root_directory_path"])
  return spec


# ---------------------------------------------------------------------------------------------
# Folds, shuffles and shards (the original's exact procedure).

class OriginalShuffler:
  """Python's Mersenne Twister seeded like the original, with both shuffles it uses.

  The algorithms are spelled out (not `random.shuffle`) so that the order does not depend on the
  running Python: the legacy two-argument form was removed in Python 3.11.
  """

  def __init__(self, seed: int = SEED):
    self.rng = random.Random(seed)

  def _below(self, n: int) -> int:
    """random's _randbelow: rejection sampling on n.bit_length() random bits."""
    k = n.bit_length()
    r = self.rng.getrandbits(k)
    while r >= n:
      r = self.rng.getrandbits(k)
    return r

  def shuffle(self, x: list) -> None:
    """`random.shuffle(x)` (Fisher-Yates with _randbelow), in place."""
    for i in range(len(x) - 1, 0, -1):
      j = self._below(i + 1)
      x[i], x[j] = x[j], x[i]

  def shuffle_legacy(self, x: list) -> None:
    """`random.shuffle(x, random.random)`: j = int(random() * (i + 1)), in place."""
    for i in range(len(x) - 1, 0, -1):
      j = int(self.rng.random() * (i + 1))
      x[i], x[j] = x[j], x[i]


def partition_random(names: Sequence[str], val_split: float) -> list[list]:
  """[validation fold, training fold]: the head int(val_split / 100 * N) of the sorted names.

  val_split is rounded to float32 first, as the original stores it in a protobuf float.
  """
  fraction = float(np.float32(val_split)) / 100.0
  if not 0 <= fraction < 1:
    raise DataError(f"kitti_config.val_split must be in [0, 100), got {val_split}")
  names = sorted(names)
  n_val = int(fraction * len(names))
  return [names[:n_val], names[n_val:]]


def partition_sequences(sequence_to_frames: Mapping, num_partitions: int) -> list[list]:
  """Folds from a {sequence: [frames]} map: with N > 1 folds, sequences sorted by (descending
  length, name) go round-robin to the folds, and the fold list is reversed; with N <= 1 all
  frames form one fold in the map's order."""
  if num_partitions <= 1:
    return [[f for frames in sequence_to_frames.values() for f in frames]]
  parts = [[] for _ in range(num_partitions)]
  ordered = sorted(sequence_to_frames.items(), key=lambda kv: (-len(kv[1]), kv[0]))
  for k, (_, frames) in enumerate(ordered):
    parts[k % num_partitions].extend(frames)
  return parts[::-1]


def shard_partition(frames: Sequence, num_shards: int) -> list[list]:
  """max(num_shards, 1) consecutive shards of len // num_shards; the last takes the remainder."""
  n = max(num_shards, 1)
  size = len(frames) // n
  return [list(frames[i * size:(i + 1) * size if i + 1 < n else len(frames)]) for i in range(n)]


def kitti_folds(partition_mode: str, num_partitions: int, val_split: float = 0.0,
                names: Sequence[str] = (), sequence_to_frames: Optional[Mapping] = None,
                where: str = "kitti_config") -> list[list]:
  """The final frame order of every fold, exactly as the original writes them."""
  shuffler = OriginalShuffler()
  if partition_mode == "random":
    if num_partitions != 2:
      raise DataError(f"{where}.num_partitions must be 2 in random mode, got {num_partitions}")
    parts = partition_random(names, val_split)
    for p in parts:                # inside the original's partition step
      shuffler.shuffle(p)
  elif partition_mode == "sequence":
    parts = partition_sequences(sequence_to_frames or {}, num_partitions)
  else:
    raise DataError(f"{where}.partition_mode must be 'random' or 'sequence', got "
                    f"{partition_mode!r}")
  for p in parts:                  # the converter's own shuffle before writing
    shuffler.shuffle_legacy(p)
  return parts


# ---------------------------------------------------------------------------------------------
# Files.

def image_size(path: str) -> tuple[int, int]:
  """(height, width) from a PNG or JPEG header (no decoding), else by decoding with OpenCV."""
  try:
    with open(path, "rb") as f:
      head = f.read(26)
      if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return int(h), int(w)
      if head[:2] == b"\xff\xd8":
        size = _jpeg_size(f)
        if size:
          return size
  except FileNotFoundError:
    raise DataError(f"{path}: image not found") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read the image ({e})") from None
  img = cv2.imread(path, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
  if img is None:
    raise DataError(f"{path}: not a readable image")
  return int(img.shape[0]), int(img.shape[1])


def _jpeg_size(f) -> Optional[tuple[int, int]]:
  """Walks the JPEG markers up to the first start-of-frame; None if the stream is odd."""
  pos = 2
  while True:
    f.seek(pos)
    hdr = f.read(4)
    if len(hdr) < 4 or hdr[0] != 0xFF:
      return None
    marker = hdr[1]
    if marker == 0xFF:                                   # fill byte
      pos += 1
      continue
    if marker == 0x01 or 0xD0 <= marker <= 0xD8:         # markers without a length
      pos += 2
      continue
    if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
      data = f.read(5)
      if len(data) < 5:
        return None
      h, w = struct.unpack(">HH", data[1:5])
      return (int(h), int(w)) if h and w else None
    pos += 2 + int.from_bytes(hdr[2:4], "big")


def _ascii_lower(name: str) -> str:
  # The original lower-cases the UTF-8 bytes, which changes ASCII letters only.
  return "".join(c.lower() if c.isascii() else c for c in name)


def parse_kitti_labels(path: str) -> tuple[dict, dict]:
  """One KITTI label file -> (objects, skipped).

  objects: per-object lists (classes lower-cased, boxes, truncation, occlusion, alpha,
  world_bbox, class names as written); skipped: {"<path>_<index>": [int x1, y1, x2, y2]} for
  objects failing int(x1) < int(x2) and int(y1) < int(y2), index = position among non-empty lines.
  """
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    raise DataError(f"{path}: label file not found (every image needs one)") from None
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read the label file ({e})") from None
  objs = {"classes": [], "raw_classes": [], "boxes": [], "truncation": [], "occlusion": [],
          "alpha": [], "world_bbox": []}
  skipped = {}
  index = -1
  for lineno, line in enumerate(lines, 1):
    fields = line.split()
    if not fields:
      continue
    index += 1
    if len(fields) != KITTI_FIELDS:
      raise DataError(f"{path}:{lineno}: expected {KITTI_FIELDS} fields (KITTI: type, "
                      f"truncation, occlusion, alpha, 4 box, 3 dimensions, 3 location, "
                      f"rotation_y), got {len(fields)}")
    try:
      values = [float(v) for v in fields[1:]]
    except ValueError:
      raise DataError(f"{path}:{lineno}: fields 2-15 must be numbers, got "
                      f"{' '.join(fields[1:])!r}") from None
    if not all(math.isfinite(v) for v in values):
      raise DataError(f"{path}:{lineno}: non-finite number in {' '.join(fields[1:])!r}")
    x1, y1, x2, y2 = values[3:7]
    if not (int(x1) < int(x2) and int(y1) < int(y2)):
      skipped[f"{path}_{index}"] = [int(x1), int(y1), int(x2), int(y2)]
      continue
    objs["raw_classes"].append(fields[0])
    objs["classes"].append(_ascii_lower(fields[0]))
    objs["truncation"].append(values[0])
    objs["occlusion"].append(int(values[1]))
    objs["alpha"].append(values[2])
    objs["boxes"].append(values[3:7])
    objs["world_bbox"].append(values[7:14])
  return objs, skipped


def _inside_root(root: str, path: str, what: str) -> str:
  """`path` (absolute, or relative to root) as a normalised root-relative posix path.

  DataError naming `what` when it resolves (lexically, so symlinks inside the root may point
  anywhere) outside the root.
  """
  full = os.path.normpath(os.path.join(root, path))
  rel = os.path.relpath(full, root)
  if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
    raise DataError(f"{what}: image path {path!r} resolves outside the dataset root {root} "
                    "(records store paths relative to it)")
  return rel.replace(os.sep, "/")


# ---------------------------------------------------------------------------------------------
# Sample modification (training folds only).

class SampleModifier:
  """The original's filtering, duplication and cap of training frames (see the module doc)."""

  def __init__(self, cfg: Mapping, validation_fold: Optional[int], num_folds: int):
    self.mapping = dict(cfg["source_to_target_class_mapping"])
    self.filter_only = list(cfg["filter_samples_containing_only"])
    self.dominant = list(cfg["dominant_target_classes"])
    self.imbalance = dict(cfg["minimum_target_class_imbalance"])
    self.num_duplicates = int(cfg["num_duplicates"])
    self.validation_fold = validation_fold
    targets = set(self.mapping.values())
    for key, names in (("dominant_target_classes", self.dominant),
                       ("filter_samples_containing_only", self.filter_only)):
      missing = sorted(set(names) - targets)
      if missing:
        raise DataError(f"sample_modifier_config.{key}: {missing} are not values of "
                        "source_to_target_class_mapping")
    self.cap = 0
    if cfg["max_training_samples"]:
      training_folds = num_folds - (validation_fold is not None)
      if training_folds < 1:
        raise DataError("sample_modifier_config.max_training_samples needs at least one "
                        "training fold")
      self.cap = cfg["max_training_samples"] // training_folds
    self.kept = collections.Counter()
    self.stats = collections.Counter()

  def modify(self, rec: dict, fold: int) -> list[dict]:
    """The records to write for one frame (none, itself, or itself with duplicates)."""
    if fold == self.validation_fold:
      return [rec]
    targets = [self.mapping[c] for c in rec["classes"] if c in self.mapping]
    out = [rec]
    if self.filter_only and len(set(targets)) == 1 and targets[0] in self.filter_only:
      out = []
      self.stats["filtered_frames"] += 1
    elif self.dominant and targets:
      counts = collections.Counter(targets)
      rare = [t for t in counts if t not in self.dominant]
      if any(counts[r] > counts[d] * self.imbalance.get(r, 1.0)
             for r in rare for d in self.dominant):
        out = out + [rec] * self.num_duplicates
        self.stats["duplicates_added"] += self.num_duplicates
    if self.cap:
      room = max(self.cap - self.kept[fold], 0)
      if len(out) > room:
        self.stats["capped_records"] += len(out) - room
        out = out[:room]
      self.kept[fold] += len(out)
    return out


# ---------------------------------------------------------------------------------------------
# Writing (shared by both formats).

def _class_vocabulary(recs_by_fold, mapping: Mapping[str, str], default_names) -> list[str]:
  """The records' class_names: the mapping's targets in order, else default_names sorted, else
  the sorted names of all objects that are not don't-care."""
  if mapping:
    return list(dict.fromkeys(mapping.values()))
  if default_names is not None:
    return sorted(default_names)
  names = {c for recs in recs_by_fold for r in recs
           for c, dc in zip(r["classes"], r["dontcare"]) if not dc}
  return sorted(names)


def _assign_class_ids(recs_by_fold, class_names: list[str], mapping: Mapping[str, str]):
  """Fills class_ids/class_names: through the mapping if given, else by name; -1 = none."""
  lookup = dict(mapping) if mapping else {c: c for c in class_names}
  for recs in recs_by_fold:
    for r in recs:
      ids = det_records.target_class_ids(r["classes"], lookup, class_names)
      if not mapping:
        ids[r["dontcare"]] = -1
      ids[r["dontcare"] & r["crowd"]] = -1     # crowd boxes converted as don't-care regions
      r["class_ids"] = ids
      r["class_names"] = class_names


_OUTPUT_RE = r"(-fold-\d{3}-of-\d{3})?(-shard-\d{5}-of-\d{5})?"


def _existing_outputs(prefix: str) -> list[str]:
  """Files a previous conversion with this prefix may have left (records, warning, summary)."""
  folder, base = os.path.split(os.path.abspath(prefix))
  if not os.path.isdir(folder):
    return []
  pattern = re.compile(re.escape(base) + _OUTPUT_RE + "$")
  extra = {base + "_warning.json", base + ".summary.json"}
  return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                if pattern.match(n) or n in extra)


def _write_output(recs_by_fold: list[list[dict]], output_prefix: str, fold_names: int,
                  shards: Sequence[int], modifier: SampleModifier, warnings: dict,
                  summary: dict, overwrite: bool) -> dict:
  prefix = os.path.abspath(output_prefix)
  existing = _existing_outputs(prefix)
  fileio.check_can_write(existing[:1], overwrite)
  os.makedirs(os.path.dirname(prefix), exist_ok=True)
  for path in existing:           # stale shards of an earlier run must not be globbed in
    os.remove(path)
  files, folds, total = [], [], collections.Counter()
  written = 0
  for p, recs in enumerate(recs_by_fold):
    fold_count, fold_frames, fold_files = collections.Counter(), 0, []
    for s, shard in enumerate(shard_partition(recs, shards[p])):
      out = [m for r in shard for m in modifier.modify(r, p)]
      for r in out:
        fold_count.update(r["classes"])
      name = det_records.record_file_name(prefix, p, fold_names, s, shards[p])
      det_records.write(name, out)
      fold_frames += len(out)
      fold_files.append(os.path.basename(name))
    if not recs:
      log.warning("%s: fold %d has no frames (written as empty files)", output_prefix, p)
    log.info("fold %d: %d frames, objects %s", p, fold_frames, dict(sorted(fold_count.items())))
    folds.append({"fold": p, "frames": fold_frames, "frames_read": len(recs),
                  "objects_per_class": dict(sorted(fold_count.items())), "files": fold_files})
    files += fold_files
    total.update(fold_count)
    written += fold_frames
  warning_file = None
  if warnings:
    warning_file = prefix + "_warning.json"
    fileio.write_json(warning_file, warnings, indent=2)
    log.warning("%d objects skipped (top-left not above-left of bottom-right); listed in %s",
                len(warnings), warning_file)
  summary.update(
      frames=written, frames_read=sum(len(r) for r in recs_by_fold),
      objects_per_class=dict(sorted(total.items())), folds=folds,
      empty_folds=[f["fold"] for f in folds if not f["frames_read"]],
      sample_modifier=dict(sorted(modifier.stats.items())),
      skipped_boxes=len(warnings),
      warning_file=os.path.basename(warning_file) if warning_file else None, files=files)
  summary["skipped"] = dict(sorted({"invalid_box": len(warnings),
                                    **summary.get("skipped", {})}.items()))
  log.info("Class map (label in file: label in records): %s", summary.get("class_map"))
  fileio.write_json(prefix + ".summary.json", summary, indent=2)
  return summary


def _check_validation_fold(validation_fold, num_folds: int):
  if validation_fold is not None and not 0 <= validation_fold < num_folds:
    raise DataError(f"validation_fold must be in [0, {num_folds}), got {validation_fold}")


# ---------------------------------------------------------------------------------------------
# KITTI.

def convert_kitti(spec: Mapping, output_prefix: str, overwrite: bool = False,
                  validation_fold: Optional[int] = None) -> dict:
  """Converts a KITTI dataset (spec: a DatasetExportConfig dict with kitti_config); returns the
  summary (also written to `<output_prefix>.summary.json`)."""
  spec = validate_convert_spec(spec)
  if "kitti_config" not in spec:
    raise DataError("spec: convert_kitti needs kitti_config (use convert_coco for coco_config)")
  kc = spec["kitti_config"]
  if not kc["root_directory_path"]:
    raise DataError("kitti_config.root_directory_path is empty")
  root = os.path.abspath(kc["root_directory_path"])
  if not os.path.isdir(root):
    raise DataError(f"{root}: kitti_config.root_directory_path is not a directory")
  ext = kc["image_extension"] or ".png"
  if not ext.startswith("."):
    raise DataError(f"kitti_config.image_extension must start with '.', got {ext!r}")
  images_dir = os.path.join(root, kc["image_dir_name"])
  labels_dir = os.path.join(root, kc["label_dir_name"])
  mode = kc["partition_mode"]
  names, seq = (), None
  if mode == "random":
    if not os.path.isdir(images_dir):
      raise DataError(f"{images_dir}: kitti_config.image_dir_name is not a directory")
    names = [os.path.splitext(n)[0] for n in sorted(os.listdir(images_dir)) if n.endswith(ext)]
  elif mode == "sequence":
    if not kc["kitti_sequence_to_frames_file"]:
      raise DataError("kitti_config.kitti_sequence_to_frames_file is required in sequence mode "
                      "(a JSON {sequence: [frame ids]} relative to the root)")
    seq = _read_sequence_file(os.path.join(root, kc["kitti_sequence_to_frames_file"]))
  parts = kitti_folds(mode, kc["num_partitions"], kc["val_split"], names, seq)
  num_folds = len(parts)
  _check_validation_fold(validation_fold, num_folds)
  modifier = SampleModifier(spec["sample_modifier_config"], validation_fold, num_folds)

  warnings, class_map = {}, {}
  recs_by_fold = []
  for frames in parts:
    recs = []
    for stem in frames:
      stem = str(stem)
      image_file = os.path.join(images_dir, stem + ext)
      rel = _inside_root(root, image_file, image_file)
      h, w = image_size(image_file)
      objs, skipped = parse_kitti_labels(os.path.join(labels_dir, stem + ".txt"))
      warnings.update(skipped)
      class_map.update(zip(objs["raw_classes"], objs["classes"]))
      n = len(objs["classes"])
      rec = det_records.empty_arrays(n)
      rec.update(
          source="kitti", frame_id=_posix_join(kc["image_dir_name"], stem), image_path=rel,
          height=h, width=w, classes=objs["classes"],
          boxes=np.array(objs["boxes"], np.float32).reshape(n, 4),
          truncation=np.array(objs["truncation"], np.float32),
          occlusion=np.array(objs["occlusion"], np.int32),
          alpha=np.array(objs["alpha"], np.float32),
          world_bbox=np.array(objs["world_bbox"], np.float32).reshape(n, 7),
          dontcare=np.array([c == det_records.DONTCARE for c in objs["classes"]], bool))
      recs.append(rec)
    recs_by_fold.append(recs)
  if not any(recs_by_fold):
    where = images_dir if mode == "random" else kc["kitti_sequence_to_frames_file"]
    raise DataError(f"{where}: no frames to convert (image_extension {ext!r}); nothing written")

  mapping = spec["target_class_mapping"]
  class_names = _class_vocabulary(recs_by_fold, mapping, None)
  _assign_class_ids(recs_by_fold, class_names, mapping)
  summary = {
      "format": "kitti", "root": root, "image_directory_path": spec["image_directory_path"],
      "partition_mode": mode, "num_partitions": kc["num_partitions"],
      "val_split": kc["val_split"], "num_shards": kc["num_shards"],
      "validation_fold": validation_fold, "class_map": dict(sorted(class_map.items())),
      "class_names": class_names, "target_class_mapping": dict(mapping),
  }
  return _write_output(recs_by_fold, output_prefix, kc["num_partitions"],
                       [kc["num_shards"]] * num_folds, modifier, warnings, summary, overwrite)


def _posix_join(a: str, b: str) -> str:
  return f"{a.rstrip('/')}/{b}" if a else b


def _read_sequence_file(path: str) -> dict:
  d = fileio.read_json(path, "kitti_sequence_to_frames_file")
  if not isinstance(d, dict) or not all(isinstance(v, list) for v in d.values()):
    raise DataError(f"{path}: expected an object {{sequence name: [frame ids]}}")
  return d


# ---------------------------------------------------------------------------------------------
# COCO.

def _load_coco(path: str) -> dict:
  d = fileio.read_json(path, "COCO annotation file")
  if not isinstance(d, dict):
    raise DataError(f"{path}: expected a COCO object with images, annotations and categories")
  for key in ("images", "annotations", "categories"):
    if not isinstance(d.get(key), list) or not d[key]:
      raise DataError(f"{path}: '{key}' is missing or empty")
  return d


def convert_coco(spec: Mapping, output_prefix: str, overwrite: bool = False,
                 validation_fold: Optional[int] = None) -> dict:
  """Converts COCO detection JSONs, one fold per annotation file (spec: a DatasetExportConfig
  dict with coco_config); returns the summary (also written to `<output_prefix>.summary.json`)."""
  spec = validate_convert_spec(spec)
  if "coco_config" not in spec:
    raise DataError("spec: convert_coco needs coco_config (use convert_kitti for kitti_config)")
  cc = spec["coco_config"]
  root = os.path.abspath(cc["root_directory_path"] or ".")
  dirs, files, n = cc["img_dir_names"], cc["annotation_files"], cc["num_partitions"]
  if not n or len(dirs) != n or len(files) != n:
    raise DataError(f"coco_config: num_partitions ({n}) must be >= 1 and equal the number of "
                    f"img_dir_names ({len(dirs)}) and annotation_files ({len(files)})")
  shards = cc["num_shards"] or [0]
  if len(shards) == 1:
    shards = shards * n
  elif len(shards) != n:
    raise DataError(f"coco_config.num_shards: {len(shards)} values for {n} partitions (give one "
                    "value or one per partition)")
  crowd_mode = cc["crowd_boxes"] or "keep"
  if crowd_mode not in CROWD_MODES:
    raise DataError(f"coco_config.crowd_boxes must be one of {CROWD_MODES}, got {crowd_mode!r}")
  _check_validation_fold(validation_fold, n)
  modifier = SampleModifier(spec["sample_modifier_config"], validation_fold, n)

  warnings, class_map, skipped = {}, {}, collections.Counter()
  recs_by_fold, cat_ids, categories = [], None, {}
  for img_dir, ann_name in zip(dirs, files):
    path = os.path.join(root, ann_name)
    d = _load_coco(path)
    cats = {}
    for i, c in enumerate(d["categories"]):
      if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("name"), str):
        raise DataError(f"{path}: categories[{i}] needs an id and a name")
      cats[c["id"]] = c["name"].replace(" ", "")
    if cat_ids is not None and set(cats) != cat_ids:
      raise DataError(f"{path}: category ids differ from those of {files[0]} (all annotation "
                      "files must share them)")
    cat_ids = set(cats)
    categories.update(cats)
    images = {}
    for i, im in enumerate(d["images"]):
      if not isinstance(im, dict) or not all(k in im for k in ("id", "file_name", "width",
                                                                "height")):
        raise DataError(f"{path}: images[{i}] needs id, file_name, width and height")
      if im["id"] in images:
        raise DataError(f"{path}: images[{i}]: duplicate image id {im['id']}")
      if not all(isinstance(im[k], int) and not isinstance(im[k], bool) and im[k] > 0
                 for k in ("width", "height")):
        raise DataError(f"{path}: images[{i}]: width and height must be positive integers")
      images[im["id"]] = im
    per_image = collections.defaultdict(list)
    for i, a in enumerate(d["annotations"]):
      if not isinstance(a, dict) or not all(k in a for k in ("id", "image_id", "category_id",
                                                            "bbox")):
        raise DataError(f"{path}: annotations[{i}] needs id, image_id, category_id and bbox")
      bbox = a["bbox"]
      if not (isinstance(bbox, list) and len(bbox) == 4
              and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                      and math.isfinite(v) for v in bbox)):
        raise DataError(f"{path}: annotation {a['id']}: bbox must be 4 finite numbers [x, y, "
                        f"w, h], got {bbox!r}")
      if a["category_id"] not in cats:
        raise DataError(f"{path}: annotation {a['id']}: unknown category_id {a['category_id']}")
      if a["image_id"] not in images:
        skipped["unknown_image_id"] += 1
        log.warning("%s: annotation %s skipped: unknown image_id %s", path, a["id"],
                    a["image_id"])
        continue
      per_image[a["image_id"]].append(a)
    recs = []
    for iid, im in images.items():
      where = f"{path}: image {iid}"
      rel = _inside_root(root, os.path.join(img_dir, str(im["file_name"])), where)
      classes, boxes, crowd = [], [], []
      for a in per_image.get(iid, []):
        x, y, bw, bh = (float(v) for v in a["bbox"])
        x2, y2 = x + bw, y + bh
        if not (int(x) < int(x2) and int(y) < int(y2)):
          warnings[str(a["id"])] = [int(x), int(y), int(x2), int(y2)]
          continue
        is_crowd = bool(a.get("iscrowd", 0))
        if is_crowd and crowd_mode == "skip":
          skipped["crowd"] += 1
          continue
        name = cats[a["category_id"]]
        class_map[name] = _ascii_lower(name)
        classes.append(_ascii_lower(name))
        boxes.append([x, y, x2, y2])
        crowd.append(is_crowd)
      k = len(classes)
      rec = det_records.empty_arrays(k)
      crowd_arr = np.array(crowd, bool)
      stem = str(im["file_name"]).rsplit(".", 1)[0]
      rec.update(source="coco", frame_id=_posix_join(img_dir, stem), image_path=rel,
                 height=im["height"], width=im["width"],
                 classes=classes, boxes=np.array(boxes, np.float32).reshape(k, 4),
                 crowd=crowd_arr, dontcare=crowd_arr & (crowd_mode == "dontcare"))
      recs.append(rec)
    recs_by_fold.append(recs)

  mapping = spec["target_class_mapping"]
  class_names = _class_vocabulary(recs_by_fold, mapping,
                                  {_ascii_lower(c) for c in categories.values()})
  _assign_class_ids(recs_by_fold, class_names, mapping)
  summary = {
      "format": "coco", "root": root, "image_directory_path": spec["image_directory_path"],
      "annotation_files": list(files), "img_dir_names": list(dirs), "num_partitions": n,
      "num_shards": list(shards), "crowd_boxes": crowd_mode, "validation_fold": validation_fold,
      "class_map": dict(sorted(class_map.items())), "class_names": class_names,
      "target_class_mapping": dict(mapping), "skipped": dict(skipped),
  }
  return _write_output(recs_by_fold, output_prefix, n, shards, modifier, warnings, summary,
                       overwrite)


def convert(spec, output_prefix: str, overwrite: bool = False,
            validation_fold: Optional[int] = None) -> dict:
  """`dataset_convert`: spec = a spec file path or dict; dispatches on kitti_config/coco_config."""
  if isinstance(spec, (str, os.PathLike)):
    spec = load_convert_spec(os.fspath(spec))
  spec = validate_convert_spec(spec)
  fn = convert_kitti if "kitti_config" in spec else convert_coco
  return fn(spec, output_prefix, overwrite=overwrite, validation_fold=validation_fold)
