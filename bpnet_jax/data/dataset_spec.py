"""The dataset spec JSON (the original's `coco_spec.json`), loaded and validated.

{
  "dataset": "coco",
  "root_directory_path": "/data/coco",          # relative paths are relative to the spec file
  "train_data": {"images_root_dir_path": "train2017", "mask_root_dir_path": "train_mask2017",
                 "annotation_root_dir_path": "annotations/person_keypoints_train2017.json"},
  "test_data":  {... the same keys ...},
  "duplicate_data_with_each_person_as_center": true,
  "categories": [{"name": "person", "keypoints": [17 COCO names], "skeleton": [...], ...}],
  "visibility_flags": {"value": {"visible": 2, "occluded": 1, "not_labeled": 0},
                       "mapping": {"visible": "visible", "occluded": "occluded",
                                   "not_labeled": "not_labeled"}},
  "data_filtering_params": {"min_acceptable_height": 32, "min_acceptable_width": 32,
                            "min_acceptable_kpts": 5, "min_acceptable_interperson_dist_ratio": 0.3}
}

Where files may be (no path from a JSON, a spec or a record reaches outside its declared root):
  - A split's images, masks and annotation paths are declared by whoever writes the spec: each is
    either absolute (anywhere: e.g. masks on another disk) or relative to the root, and then must
    not leave the root with '..' (write it absolute to mean a directory outside).
  - A COCO `file_name` is relative to the split's images dir, and its mask `<stem>.png` to the
    masks dir; each must stay inside that dir, lexically and after resolving symlinks (the dirs
    themselves may be symlinks: they are declared). `convert` rejects the JSON otherwise, before
    it writes anything.
  - A record's image_path / mask_path is relative to the dataset root (absolute only inside a
    directory the spec declares, as `convert` writes for an absolute masks dir) and must resolve
    inside the root, or inside the most specific declared directory holding it.
`resolve_inside` is the one check all three use.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

from bpnet_jax.data.records import VISIBILITY_NAMES
from bpnet_jax.errors import DataError

SpecError = DataError   # the name this module's callers use


def _inside(path: str, root: str) -> bool:
  """Whether normalised absolute `path` is `root` or below it (a string test, no file access)."""
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@functools.lru_cache(maxsize=256)
def _real_dir(path: str) -> str:
  # A declared directory's target, resolved once per process (decoding resolves it per sample).
  return os.path.realpath(path)


def resolve_inside(root: str, path, what: str, dirs: Sequence[str] = ()) -> str:
  """The absolute, normalised path of `path` (relative to `root`); DataError if it leaves it.

  `path` is accepted when it lies inside `root` both lexically ('.' and '..' collapsed, which
  is also the path returned, so what is checked is what gets opened) and after resolving symlinks
  (os.path.realpath), so neither a crafted name nor a symlink reaches a file elsewhere. `dirs`
  are further directories declared for the same data (a spec's split dirs, which may be absolute
  or symlinks themselves): a path lexically under one of them must resolve inside the most
  specific one instead, and an absolute `path` is accepted only under one of them. `root` ''
  means the current directory. The one-line message starts with `what` (the file and item the
  path came from) and names the path.
  """
  if not isinstance(path, str) or not path or "\0" in path:
    raise DataError(f"{what}: {path!r} is not a file path")
  root = os.path.abspath(root or os.curdir)
  bases = [os.path.abspath(d) for d in dirs]
  if os.path.isabs(path):
    full = os.path.normpath(path)
  else:
    full = os.path.normpath(os.path.join(root, path))
    bases.append(root)
  holders = [b for b in bases if _inside(full, b)]
  if not holders:
    why = "an absolute path" if os.path.isabs(path) else "'..' leads out of it"
    raise DataError(f"{what} {path!r} resolves outside {root} ({why}); paths must stay inside "
                    "the dataset's directories")
  base = max(holders, key=len)
  real = os.path.realpath(full)
  if not _inside(real, _real_dir(base)):
    raise DataError(f"{what} {path!r} resolves outside {base} (a symlink leads to {real}); "
                    "paths must stay inside the dataset's directories")
  return full


def _split_dir(root: str, value: str, where: str) -> str:
  """A spec's split path: absolute as given, or relative to the root and not leaving it."""
  if os.path.isabs(value):
    return os.path.normpath(value)
  full = os.path.normpath(os.path.join(root, value))
  if not _inside(full, os.path.normpath(root)):
    raise SpecError(f"{where} {value!r} resolves outside the root {root} ('..' leads out of it; "
                    "write an absolute path for a directory elsewhere)")
  return full


@dataclasses.dataclass(frozen=True)
class Split:
  images_dir: str        # absolute
  masks_dir: str         # absolute
  annotations: str       # absolute
  images_rel: str        # as in the spec (records store paths relative to the root)
  masks_rel: str


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  path: str
  dataset: str
  root: str
  splits: dict
  duplicate_each_person: bool
  keypoints: tuple
  visibility_map: dict    # dataset flag value -> Visibility value
  min_height: float
  min_width: float
  min_kpts: int
  min_dist_ratio: float

  def split(self, mode: str) -> Split:
    key = "train_data" if mode == "train" else "test_data"
    if key not in self.splits:
      raise SpecError(f"{self.path}: no '{key}' section for mode {mode!r}")
    return self.splits[key]


def load_spec(path: str) -> DatasetSpec:
  try:
    with open(path) as f:
      d = json.load(f)
  except FileNotFoundError:
    raise SpecError(f"{path}: dataset spec not found") from None
  except (OSError, json.JSONDecodeError) as e:
    raise SpecError(f"{path}: not valid JSON ({e})") from None

  def need(obj, key, kind, where):
    if not isinstance(obj, dict) or key not in obj:
      raise SpecError(f"{path}: missing key '{where}{key}'")
    v = obj[key]
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
      raise SpecError(f"{path}: '{where}{key}' must be {getattr(kind, '__name__', kind)}, "
                      f"got {v!r}")
    return v

  root = need(d, "root_directory_path", str, "")
  if not os.path.isabs(root):
    root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), root))
  splits = {}
  for key in ("train_data", "test_data"):
    if key not in d:
      continue
    s = need(d, key, dict, "")
    images = need(s, "images_root_dir_path", str, key + ".")
    masks = need(s, "mask_root_dir_path", str, key + ".")
    ann = need(s, "annotation_root_dir_path", str, key + ".")
    where = f"{path}: '{key}."
    splits[key] = Split(_split_dir(root, images, where + "images_root_dir_path'"),
                        _split_dir(root, masks, where + "mask_root_dir_path'"),
                        _split_dir(root, ann, where + "annotation_root_dir_path'"), images, masks)
  if not splits:
    raise SpecError(f"{path}: needs a 'train_data' or 'test_data' section")
  cats = need(d, "categories", list, "")
  if not cats or not isinstance(cats[0], dict):
    raise SpecError(f"{path}: 'categories' must hold at least one category object")
  kpts = need(cats[0], "keypoints", list, "categories[0].")
  flags = need(d, "visibility_flags", dict, "")
  values = need(flags, "value", dict, "visibility_flags.")
  mapping = need(flags, "mapping", dict, "visibility_flags.")
  vis_map = {}
  for name, value in values.items():
    target = mapping.get(name)
    if target not in VISIBILITY_NAMES:
      raise SpecError(f"{path}: visibility_flags.mapping.{name} must be one of "
                      f"{sorted(VISIBILITY_NAMES)}, got {target!r}")
    vis_map[int(value)] = VISIBILITY_NAMES[target]
  filt = need(d, "data_filtering_params", dict, "")
  num = (int, float)
  return DatasetSpec(
      path=path, dataset=str(d.get("dataset", "coco")), root=root, splits=splits,
      duplicate_each_person=bool(d.get("duplicate_data_with_each_person_as_center", True)),
      keypoints=tuple(kpts), visibility_map=vis_map,
      min_height=float(need(filt, "min_acceptable_height", num, "data_filtering_params.")),
      min_width=float(need(filt, "min_acceptable_width", num, "data_filtering_params.")),
      min_kpts=int(need(filt, "min_acceptable_kpts", num, "data_filtering_params.")),
      min_dist_ratio=float(need(filt, "min_acceptable_interperson_dist_ratio", num,
                                "data_filtering_params.")))


COCO_KEYPOINTS = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
                  "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
                  "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"]
COCO_SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7],
                 [6, 8], [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6],
                 [5, 7]]


def coco_spec_dict(root: str, train: tuple | None, test: tuple | None, dataset: str = "coco",
                   duplicate: bool = True, min_kpts: int = 5, min_size: int = 32,
                   dist_ratio: float = 0.3) -> dict:
  """A COCO-keypoints dataset spec; train/test are (images_dir, masks_dir, annotation_json)."""
  d = {"dataset": dataset, "root_directory_path": root}
  for key, split in (("train_data", train), ("test_data", test)):
    if split:
      d[key] = {"images_root_dir_path": split[0], "mask_root_dir_path": split[1],
                "annotation_root_dir_path": split[2]}
  d.update({
      "duplicate_data_with_each_person_as_center": duplicate,
      "categories": [{"supercategory": "person", "id": 1, "name": "person", "num_joints": 17,
                      "keypoints": COCO_KEYPOINTS, "skeleton": COCO_SKELETON}],
      "visibility_flags": {"value": {"visible": 2, "occluded": 1, "not_labeled": 0},
                           "mapping": {"visible": "visible", "occluded": "occluded",
                                       "not_labeled": "not_labeled"}},
      "data_filtering_params": {"min_acceptable_height": min_size,
                                "min_acceptable_width": min_size,
                                "min_acceptable_kpts": min_kpts,
                                "min_acceptable_interperson_dist_ratio": dist_ratio},
  })
  return d
