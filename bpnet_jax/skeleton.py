"""The pose skeleton as data: joints, limbs, flip pairs, dataset mappings, label layout.

Everything that depends on joint or limb indices (model head widths, targets, loss slices,
flipping, decoding, evaluation) asks a `Skeleton` instead of hard-coding numbers, so a custom
skeleton is a JSON file and a config change (`dataloader.pose_config.pose_config_path`).

The JSON format extends the original `bpnet_18joints.json`:
  categories[0].keypoints        joint names, in network channel order
  categories[0].skeleton         limbs as 1-based [start, end] joint pairs (PAF points start->end)
  categories[0].flip_pairs       [left_name, right_name] pairs swapped by a left-right flip
                                 (optional; default: zip of `left_*` / `right_*` names)
  categories[0].derived_keypoints  {name: [src_a, src_b]}: joints a dataset lacks, placed at the
                                 midpoint of two joints it has (the neck of COCO)
  categories[0].non_seeding_limbs  (optional) [start_name, end_name] limbs that may extend a
                                 person but never start one when decoding (the original: the
                                 last two limbs, eye->ear; default: none)
  coco_keypoints                 (optional) the COCO-17 names, in COCO order, used by evaluation

Label channel layout (for J joints and L limbs), shared by targets, loss and decoding:
  [0, 2L)            PAF, x then y component per limb
  [2L, 2L+J)         joint heatmaps
  2L+J               background (1 - max over joint heatmaps)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from bpnet_jax.errors import SkeletonError

BUILTIN_DIR = os.path.join(os.path.dirname(__file__), "skeletons")
DEFAULT_SKELETON = "bpnet_18joints"




@dataclasses.dataclass(frozen=True)
class Skeleton:
  """Joints, limbs and flip pairs of a pose model. Immutable and hashable (a jit static arg)."""
  name: str
  joints: tuple[str, ...]
  limbs: tuple[tuple[int, int], ...]        # 0-based (start, end)
  flip_pairs: tuple[tuple[int, int], ...]   # (left, right) joint indices
  derived: tuple[tuple[int, tuple[int, int]], ...] = ()   # (joint, (src_a, src_b))
  coco_keypoints: tuple[str, ...] = ()
  non_seeding_limbs: tuple[int, ...] = ()   # limb indices that cannot start a person
  supercategory: str = "person"
  category_name: str = "person"

  # ---- sizes ---------------------------------------------------------------------------------
  @property
  def num_joints(self) -> int:
    return len(self.joints)

  @property
  def num_limbs(self) -> int:
    return len(self.limbs)

  @property
  def heat_channels(self) -> int:
    """Heatmap output channels: one per joint plus background."""
    return self.num_joints + 1

  @property
  def paf_channels(self) -> int:
    """PAF output channels: an (x, y) pair per limb."""
    return 2 * self.num_limbs

  @property
  def num_channels(self) -> int:
    """Channels of the label / mask tensor (PAF + heatmaps + background)."""
    return self.paf_channels + self.heat_channels

  # ---- label layout ----------------------------------------------------------------------------
  @property
  def paf_slice(self) -> slice:
    return slice(0, self.paf_channels)

  @property
  def heatmap_slice(self) -> slice:
    return slice(self.paf_channels, self.paf_channels + self.num_joints)

  @property
  def background_channel(self) -> int:
    return self.paf_channels + self.num_joints

  @property
  def heatmap_with_background_slice(self) -> slice:
    return slice(self.paf_channels, self.num_channels)

  # ---- derived index arrays --------------------------------------------------------------------
  def joint_index(self, name: str) -> int:
    try:
      return self.joints.index(name)
    except ValueError:
      raise SkeletonError(f"skeleton {self.name!r}: no joint named {name!r}; "
                          f"joints are {list(self.joints)}") from None

  @property
  def flip_permutation(self) -> np.ndarray:
    """(J,) int: joint j of a left-right flipped image takes the label of joint perm[j]."""
    perm = np.arange(self.num_joints)
    for a, b in self.flip_pairs:
      perm[a], perm[b] = b, a
    return perm

  @property
  def limb_flip(self) -> tuple[np.ndarray, np.ndarray]:
    """For a left-right flip: (limb permutation (L,), sign (L,) of the x component).

    Flipped limb k is source limb perm[k]; if the source limb runs in the opposite joint order
    the whole vector flips sign, and a left-right mirror negates x once more.
    """
    jperm = self.flip_permutation
    index = {limb: k for k, limb in enumerate(self.limbs)}
    perm = np.zeros(self.num_limbs, np.int32)
    sx = np.ones(self.num_limbs, np.float32)
    sy = np.ones(self.num_limbs, np.float32)
    for k, (a, b) in enumerate(self.limbs):
      fa, fb = int(jperm[a]), int(jperm[b])
      if (fa, fb) in index:
        perm[k], direction = index[(fa, fb)], 1.0
      elif (fb, fa) in index:
        perm[k], direction = index[(fb, fa)], -1.0
      else:
        raise SkeletonError(f"skeleton {self.name!r}: limb {self.joints[a]}->{self.joints[b]} has "
                            f"no mirror limb {self.joints[fa]}->{self.joints[fb]}")
      sx[k], sy[k] = -direction, direction
    return perm, np.stack([sx, sy], -1)

  @property
  def topology(self) -> np.ndarray:
    """(L, 4) int rows (paf_x_channel, paf_y_channel, start_joint, end_joint), as the original."""
    return np.array([(2 * k, 2 * k + 1, a, b) for k, (a, b) in enumerate(self.limbs)], np.int32)

  def from_dataset(self, dataset_keypoints: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Name-based mapping from a dataset's keypoint order to this skeleton.

    Returns (src (J,) int, derived (J, 2) int): joint j copies dataset keypoint src[j], or is
    the midpoint of dataset keypoints derived[j] when src[j] == -1; -1 everywhere means the
    dataset cannot provide that joint.
    """
    names = list(dataset_keypoints)
    src = np.array([names.index(n) if n in names else -1 for n in self.joints], np.int32)
    derived = np.full((self.num_joints, 2), -1, np.int32)
    for j, (a, b) in self.derived:
      an, bn = self.joints[a], self.joints[b]
      if src[j] < 0 and an in names and bn in names:
        derived[j] = (names.index(an), names.index(bn))
    return src, derived

  @property
  def to_coco(self) -> np.ndarray:
    """(17,) int: COCO keypoint k takes this skeleton's joint to_coco[k] (-1 if it has none)."""
    if not self.coco_keypoints:
      raise SkeletonError(f"skeleton {self.name!r} has no coco_keypoints list; COCO evaluation "
                          "needs one")
    return np.array([self.joints.index(n) if n in self.joints else -1
                     for n in self.coco_keypoints], np.int32)

  def to_json(self) -> dict:
    """The pose config JSON (inverse of `from_json`)."""
    cat = {
        "supercategory": self.supercategory, "id": 1, "name": self.category_name,
        "num_joints": self.num_joints, "keypoints": list(self.joints),
        "skeleton": [[a + 1, b + 1] for a, b in self.limbs],
        "skeleton_edge_names": [[self.joints[a], self.joints[b]] for a, b in self.limbs],
        "flip_pairs": [[self.joints[a], self.joints[b]] for a, b in self.flip_pairs],
        "derived_keypoints": {self.joints[j]: [self.joints[a], self.joints[b]]
                              for j, (a, b) in self.derived},
        "non_seeding_limbs": [[self.joints[self.limbs[k][0]], self.joints[self.limbs[k][1]]]
                              for k in self.non_seeding_limbs],
    }
    out = {"pose_config_type": self.name, "categories": [cat]}
    if self.coco_keypoints:
      out["coco_keypoints"] = list(self.coco_keypoints)
    return out


def from_json(data: dict, name: str = "custom", where: str = "<pose config>") -> Skeleton:
  """Builds a Skeleton from a pose config dict, validating every field."""
  def fail(msg):
    raise SkeletonError(f"{where}: {msg}")

  if not isinstance(data, dict) or not isinstance(data.get("categories"), list) \
      or not data["categories"] or not isinstance(data["categories"][0], dict):
    fail("expected an object with a non-empty 'categories' list")
  cat = data["categories"][0]
  joints = cat.get("keypoints")
  if not isinstance(joints, list) or not joints or not all(isinstance(j, str) for j in joints):
    fail("categories[0].keypoints must be a non-empty list of joint names")
  if len(set(joints)) != len(joints):
    fail("categories[0].keypoints has duplicate names")
  if "num_joints" in cat and cat["num_joints"] != len(joints):
    fail(f"categories[0].num_joints is {cat['num_joints']} but {len(joints)} keypoints are listed")
  limbs = cat.get("skeleton")
  if not isinstance(limbs, list) or not limbs:
    fail("categories[0].skeleton must be a non-empty list of 1-based [start, end] pairs")
  limbs0 = []
  for i, pair in enumerate(limbs):
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2
        or not all(isinstance(v, int) and 1 <= v <= len(joints) for v in pair)
        or pair[0] == pair[1]):
      fail(f"categories[0].skeleton[{i}] = {pair!r}: expected two different 1-based joint "
           f"indices in 1..{len(joints)}")
    limbs0.append((pair[0] - 1, pair[1] - 1))
  if len(set(limbs0)) != len(limbs0):
    fail("categories[0].skeleton has duplicate limbs")

  def idx(n, field):
    if n not in joints:
      fail(f"categories[0].{field}: unknown joint name {n!r}")
    return joints.index(n)

  if "flip_pairs" in cat:
    flips = [(idx(a, "flip_pairs"), idx(b, "flip_pairs")) for a, b in cat["flip_pairs"]]
  else:
    lefts = [j for j in joints if j.startswith("left_")]
    flips = [(joints.index(l), joints.index("right_" + l[5:])) for l in lefts
             if "right_" + l[5:] in joints]
  flat = [j for p in flips for j in p]
  if len(set(flat)) != len(flat):
    fail("categories[0].flip_pairs uses a joint twice")
  derived = []
  for n, srcs in (cat.get("derived_keypoints") or {}).items():
    if not isinstance(srcs, list) or len(srcs) != 2:
      fail(f"categories[0].derived_keypoints.{n}: expected [joint_a, joint_b]")
    derived.append((idx(n, "derived_keypoints"),
                    (idx(srcs[0], "derived_keypoints"), idx(srcs[1], "derived_keypoints"))))
  non_seeding = []
  for i, pair in enumerate(cat.get("non_seeding_limbs") or []):
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
      fail(f"categories[0].non_seeding_limbs[{i}]: expected [start_joint, end_joint]")
    limb = (idx(pair[0], "non_seeding_limbs"), idx(pair[1], "non_seeding_limbs"))
    if limb not in limbs0:
      fail(f"categories[0].non_seeding_limbs[{i}] = {pair!r} is not a limb of the skeleton")
    non_seeding.append(limbs0.index(limb))
  coco = data.get("coco_keypoints") or ()
  skel = Skeleton(name=str(data.get("pose_config_type", name)), joints=tuple(joints),
                  limbs=tuple(limbs0), flip_pairs=tuple(flips), derived=tuple(derived),
                  coco_keypoints=tuple(coco), non_seeding_limbs=tuple(sorted(set(non_seeding))),
                  supercategory=str(cat.get("supercategory", "person")),
                  category_name=str(cat.get("name", "person")))
  try:
    _ = skel.limb_flip  # Every limb needs a mirror limb under the flip pairs.
  except SkeletonError as e:
    fail(str(e))
  return skel


def load_skeleton(path_or_name: str = DEFAULT_SKELETON) -> Skeleton:
  """Loads a built-in skeleton by name (e.g. 'bpnet_18joints') or a pose config JSON by path."""
  path = path_or_name
  if not os.path.exists(path):
    builtin = os.path.join(BUILTIN_DIR, path_or_name + ("" if path.endswith(".json") else ".json"))
    if os.path.exists(builtin):
      path = builtin
    else:
      names = sorted(f[:-5] for f in os.listdir(BUILTIN_DIR) if f.endswith(".json"))
      raise SkeletonError(f"pose config {path_or_name!r}: no such file, and not a built-in "
                          f"skeleton (built-ins: {names})")
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise SkeletonError(f"{path}: cannot read pose config JSON ({e})") from None
  return from_json(data, name=os.path.splitext(os.path.basename(path))[0], where=path)


def skeleton_from_config(config) -> Skeleton:
  """The skeleton a config describes: `dataloader.pose_config.definition` (the pose config JSON
  a saved model carries) if set, else `pose_config_path` (a built-in name or a JSON path)."""
  pc = config.dataloader.pose_config
  definition = pc.get("definition") or {}
  if definition:
    if hasattr(definition, "to_dict"):
      definition = definition.to_dict()
    name = os.path.splitext(os.path.basename(str(pc.pose_config_path)))[0] or "custom"
    return from_json(definition, name=name, where="config.dataloader.pose_config.definition")
  return load_skeleton(pc.pose_config_path)
