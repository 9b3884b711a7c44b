import json
import re

import numpy as np
import pytest

from bpnet_jax.skeleton import SkeletonError, load_skeleton

BPNET_JOINTS = ["nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder",
                "left_elbow", "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip",
                "left_knee", "left_ankle", "right_eye", "left_eye", "right_ear", "left_ear"]
BPNET_LIMBS = [(1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13), (1, 2), (2, 3), (3, 4),
               (2, 16), (1, 5), (5, 6), (6, 7), (5, 17), (1, 0), (0, 14), (0, 15), (14, 16),
               (15, 17)]
COCO = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
        "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
        "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"]


def five_joint_json():
  return {"pose_config_type": "stick5", "categories": [{
      "name": "person", "keypoints": ["head", "left_hand", "right_hand", "left_foot",
                                      "right_foot"],
      "skeleton": [[1, 2], [1, 3], [1, 4], [1, 5]]}]}


def test_default_skeleton_matches_reference():
  sk = load_skeleton()
  assert list(sk.joints) == BPNET_JOINTS
  assert list(sk.limbs) == BPNET_LIMBS
  assert set(sk.flip_pairs) == {(5, 2), (6, 3), (7, 4), (11, 8), (12, 9), (13, 10), (15, 14),
                                (17, 16)}
  assert (sk.heat_channels, sk.paf_channels, sk.num_channels) == (19, 38, 57)
  assert sk.paf_slice == slice(0, 38)
  assert sk.heatmap_slice == slice(38, 56)
  assert sk.background_channel == 56
  assert sk.heatmap_with_background_slice == slice(38, 57)
  assert sk.topology[14].tolist() == [28, 29, 1, 0]


def test_coco_mappings():
  sk = load_skeleton()
  src, derived = sk.from_dataset(COCO)
  assert src.tolist() == [0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]
  assert derived[1].tolist() == [5, 6]        # neck from both shoulders
  assert (derived[np.arange(18) != 1] == -1).all()
  assert sk.to_coco.tolist() == [0, 15, 14, 17, 16, 5, 2, 6, 3, 7, 4, 11, 8, 12, 9, 13, 10]


def test_flip_tables():
  sk = load_skeleton()
  perm = sk.flip_permutation
  assert (perm[perm] == np.arange(18)).all() and perm[0] == 0 and perm[1] == 1
  limb_perm, sign = sk.limb_flip
  assert limb_perm[0] == 3 and sign[0].tolist() == [-1, 1]      # neck->r_hip <-> neck->l_hip
  assert limb_perm[14] == 14                                     # neck->nose maps to itself
  assert (limb_perm[limb_perm] == np.arange(19)).all()


def test_json_round_trip(tmp_path):
  sk = load_skeleton()
  path = tmp_path / "copy.json"
  path.write_text(json.dumps(sk.to_json()))
  assert load_skeleton(str(path)) == sk


def test_custom_five_joint_skeleton(tmp_path):
  path = tmp_path / "stick5.json"
  path.write_text(json.dumps(five_joint_json()))
  sk = load_skeleton(str(path))
  assert (sk.num_joints, sk.num_limbs, sk.heat_channels, sk.paf_channels) == (5, 4, 6, 8)
  assert set(sk.flip_pairs) == {(1, 2), (3, 4)}                 # derived from left_/right_
  limb_perm, sign = sk.limb_flip
  assert limb_perm.tolist() == [1, 0, 3, 2] and (sign[:, 0] == -1).all()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["categories"][0].update(skeleton=[[1, 9]]), re.escape("skeleton[0]")),
    (lambda d: d["categories"][0].update(keypoints=["a", "a"]), "duplicate"),
    (lambda d: d["categories"][0].update(flip_pairs=[["head", "nope"]]), "unknown joint"),
    (lambda d: d.pop("categories"), "categories"),
    (lambda d: d["categories"][0].update(skeleton=[[1, 2]]), "mirror"),
])
def test_bad_pose_config(tmp_path, mutate, message):
  d = five_joint_json()
  mutate(d)
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(d))
  with pytest.raises(SkeletonError, match=message) as e:
    load_skeleton(str(path))
  assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_unknown_skeleton_name():
  with pytest.raises(SkeletonError, match="built-in"):
    load_skeleton("no_such_skeleton")
