import json

import jax
import jax.numpy as jnp
import numpy as np
from test_skeleton import five_joint_json

from bpnet_jax import targets
from bpnet_jax.skeleton import load_skeleton

SK = load_skeleton()
NOSE = SK.joint_index("nose")


def one_person(points):
  """points: {joint index: (x, y)} -> joints (1, J, 2), valid (1, J)."""
  joints = np.zeros((1, SK.num_joints, 2), np.float32)
  valid = np.zeros((1, SK.num_joints), bool)
  for j, xy in points.items():
    joints[0, j], valid[0, j] = xy, True
  return joints, valid


def labels_256(joints, valid):
  return np.asarray(targets.make_labels(jnp.asarray(joints), jnp.asarray(valid), SK, (32, 32), 8,
                                        7.0, 1.0))


def test_heatmap_reference_vector_h1():
  # data.md 6.3 H1: nose at (100, 60), 256 -> 32, sigma 7.
  lab = labels_256(*one_person({NOSE: (100.0, 60.0)}))
  ch = lab[..., SK.heatmap_slice.start + NOSE]
  assert np.unravel_index(ch.argmax(), ch.shape) == (7, 12)
  np.testing.assert_allclose(ch[7, 10:15], [0.06200, 0.47721, 0.99491, 0.56184, 0.08594],
                             atol=1e-5)
  np.testing.assert_allclose(ch[5:10, 12], ch[7, 10:15], atol=1e-6)
  assert (ch > 0).sum() == 37
  np.testing.assert_allclose(ch.sum(), 4.80856, atol=1e-4)
  bkg = lab[..., SK.background_channel]
  np.testing.assert_allclose(bkg[7, 12], 0.0050890, atol=1e-6)
  np.testing.assert_allclose(bkg.sum(), 1019.19144, atol=1e-3)
  others = np.delete(lab, [SK.heatmap_slice.start + NOSE, SK.background_channel], axis=-1)
  assert not others.any()


def test_heatmap_max_not_sum_h3():
  joints = np.zeros((2, SK.num_joints, 2), np.float32)
  valid = np.zeros((2, SK.num_joints), bool)
  joints[0, NOSE], joints[1, NOSE] = (100, 60), (104, 60)
  valid[:, NOSE] = True
  ch = labels_256(joints, valid)[..., SK.heatmap_slice.start + NOSE]
  np.testing.assert_allclose(ch[7, 11:15], [0.47721, 0.99491, 0.88025, 0.25871], atol=1e-5)


def test_paf_horizontal_limb_p1():
  # Limb 0 neck (40, 40) -> right_hip (120, 40): rows 4-5, cols 4..15 get (1, 0).
  neck, rhip = SK.joint_index("neck"), SK.joint_index("right_hip")
  lab = labels_256(*one_person({neck: (40.0, 40.0), rhip: (120.0, 40.0)}))
  expected = np.zeros((32, 32))
  expected[4:6, 4:16] = 1.0
  np.testing.assert_array_equal(lab[..., 0], expected)
  assert not lab[..., 1].any() and not lab[..., 2:38].any()


def test_paf_overlapping_people_are_averaged():
  neck, rhip = SK.joint_index("neck"), SK.joint_index("right_hip")
  joints = np.zeros((2, SK.num_joints, 2), np.float32)
  valid = np.zeros((2, SK.num_joints), bool)
  joints[0, neck], joints[0, rhip] = (40, 40), (120, 40)     # horizontal
  joints[1, neck], joints[1, rhip] = (83.5, 10), (83.5, 100)  # vertical through cell col 10
  valid[:, [neck, rhip]] = True
  lab = labels_256(joints, valid)
  np.testing.assert_allclose(lab[4, 10, 0:2], [0.5, 0.5])   # both people cover this cell
  np.testing.assert_allclose(lab[4, 5, 0:2], [1.0, 0.0])    # only the horizontal limb
  np.testing.assert_allclose(lab[9, 10, 0:2], [0.0, 1.0])   # only the vertical limb


def test_zero_length_and_unlabelled_limbs_are_skipped():
  neck, rhip = SK.joint_index("neck"), SK.joint_index("right_hip")
  lab = labels_256(*one_person({neck: (40.0, 40.0), rhip: (40.0, 40.0)}))
  assert not lab[..., :38].any()
  joints, valid = one_person({neck: (40.0, 40.0), rhip: (120.0, 40.0)})
  valid[0, rhip] = False
  assert not labels_256(joints, valid)[..., :38].any()


def test_mask_is_area_averaged():
  m = np.ones((16, 16), np.float32)
  m[0:8, 0:4] = 0.0          # half of the top-left block
  m[8:16, 8:16] = 0.0        # the whole bottom-right block
  d = np.asarray(targets.downsample_mask(jnp.asarray(m), 8))
  np.testing.assert_allclose(d[..., 0], [[0.5, 1.0], [1.0, 0.0]])


def test_batched_under_jit_and_vmap():
  fn = jax.jit(jax.vmap(lambda j, v: targets.make_labels(j, v, SK, (8, 8), 8, 2.0, 1.0)))
  joints = jnp.asarray(np.random.default_rng(0).uniform(0, 64, (3, 5, SK.num_joints, 2)),
                       jnp.float32)
  valid = jnp.ones((3, 5, SK.num_joints), bool)
  out = fn(joints, valid)
  assert out.shape == (3, 8, 8, 57)
  np.testing.assert_allclose(out[1], targets.make_labels(joints[1], valid[1], SK, (8, 8), 8, 2.0,
                                                         1.0), atol=1e-6)


def test_targets_for_a_five_joint_skeleton(tmp_path):
  path = tmp_path / "stick5.json"
  path.write_text(json.dumps(five_joint_json()))
  sk = load_skeleton(str(path))
  joints = jnp.asarray([[[32, 10], [10, 30], [54, 30], [25, 60], [40, 60]]], jnp.float32)
  lab = targets.make_labels(joints, jnp.ones((1, 5), bool), sk, (8, 8), 8, 3.0, 1.0)
  assert lab.shape == (8, 8, 8 + 5 + 1)
  hm = np.asarray(lab[..., sk.heatmap_slice])
  for j, (x, y) in enumerate(np.asarray(joints[0])):
    r, c = np.unravel_index(hm[..., j].argmax(), (8, 8))
    assert abs(c * 8 + 3.5 - x) <= 4 and abs(r * 8 + 3.5 - y) <= 4
  paf = np.asarray(lab[..., sk.paf_slice]).reshape(8, 8, 4, 2)
  norms = np.linalg.norm(paf, axis=-1).reshape(-1, 4)
  np.testing.assert_allclose(norms.max(axis=0), 1.0, atol=1e-6)    # every limb is drawn
