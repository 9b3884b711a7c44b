
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpnet_jax import augment as A
from bpnet_jax.skeleton import load_skeleton
from configs import coco, demo

SK = load_skeleton()
ID = A.identity_draw()


def draws(**kw):
  d = dict(ID)
  for k, v in kw.items():
    d[k] = jnp.asarray(v, jnp.bool_ if k.startswith("flip") else jnp.float32)
  return d


def m2(m):
  return np.asarray(m)[:2]


def test_person_centric_matrices_match_the_reference():
  # data.md 6.3: identity on the fixture's main person; A1 flip; A2 rotation + zoom + flip.
  m = A.person_centric_matrix(jnp.array([156.775, 266.335]), 228.41, ID, (256, 256), 0.6)
  np.testing.assert_allclose(m2(m), [[0.67247, 0, 22.57393], [0, 0.67247, -51.10161]],
                             atol=1e-4)
  # zoom = 0.6 / (scale / 256 + 1e-5) = 1  <=>  scale = 256 * (0.6 - 1e-5)
  m = A.person_centric_matrix(jnp.array([100.0, 200.0]), 256 * (0.6 - 1e-5),
                              draws(flip_lr=True), (256, 256), 0.6)
  np.testing.assert_allclose(m2(m), [[-1, 0, 228], [0, 1, -72]], atol=1e-4)
  joints = jnp.asarray(np.stack([50 + 10 * np.arange(18), np.zeros(18)], -1)[None], jnp.float32)
  xy, _ = A.transform_joints(joints, jnp.zeros((1, 18), jnp.uint8), m, jnp.bool_(True), SK)
  np.testing.assert_allclose(xy[0, :, 0], [178, 168, 128, 118, 108, 158, 148, 138, 68, 58, 48, 98,
                                           88, 78, 28, 38, 8, 18], atol=1e-3)
  m = A.person_centric_matrix(jnp.array([300.0, 200.0]), 256 * (1.2 - 1e-5),
                              draws(flip_lr=True, theta=np.deg2rad(30)), (256, 256), 0.6)
  np.testing.assert_allclose(m2(m), [[-0.43301, 0.25, 207.90381], [0.25, 0.43301, -33.60254]],
                             atol=1e-3)


@pytest.mark.parametrize("d, fixed, expected", [
    (dict(), False, [[0.4, 0, 0], [0, 0.4, 32]]),
    (dict(), True, [[0.4, 0, 0], [0, 0.53333, 0]]),
    (dict(tx=64, ty=48, zoom=2), False, [[0.8, 0, -102.4], [0, 0.8, -44.8]]),
    (dict(flip_lr=True), False, [[-0.4, 0, 256], [0, 0.4, 32]]),
    (dict(theta=np.deg2rad(30)), False, [[0.34641, -0.26667, 81.14875],
                                         [0.15, 0.34641, -3.13844]]),
    (dict(theta=np.deg2rad(30)), True, [[0.34641, -0.26667, 81.14875],
                                        [0.2, 0.46188, -46.85125]]),
])
def test_standard_matrices_match_the_reference(d, fixed, expected):
  m = A.standard_matrix((480, 640), draws(**d), (256, 256), fixed)
  np.testing.assert_allclose(m2(m), expected, atol=1e-4)


def test_portrait_standard_identity():
  m = A.standard_matrix((640, 480), ID, (256, 256), False)
  np.testing.assert_allclose(m2(m), [[0.4, 0, 32], [0, 0.4, 0]], atol=1e-5)


def test_identity_warp_reproduces_the_image_and_fills_outside():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
  canvas = np.zeros((20, 20, 3), np.uint8)
  canvas[:12, :16] = img
  out = A.warp(jnp.asarray(canvas), jnp.array([12, 16]), jnp.eye(3), (16, 20), 127.0)
  np.testing.assert_array_equal(np.asarray(out[:12, :16]), img.astype(np.float32))
  assert (np.asarray(out[12:]) == 127).all() and (np.asarray(out[:, 16:]) == 127).all()


def test_image_and_keypoints_move_together():
  # A bright dot warped by a rotation + zoom + flip lands where the keypoint goes.
  ys, xs = np.mgrid[:100, :120]
  canvas = np.exp(-((xs - 70) ** 2 + (ys - 40) ** 2) / (2 * 4.0 ** 2))[..., None] * 1000.0
  sample_xy = jnp.array([[[70.0, 40.0]]])
  for mode in ("person_centric", "standard", "standard_with_fixed_aspect_ratio"):
    p = A.AugParams(mode=mode)
    d = draws(theta=np.deg2rad(25), zoom=1.3, tx=7, ty=-5, flip_lr=True)
    m = A.sample_matrix(d, p, jnp.array([100, 120]), (64, 64), jnp.array([60.0, 50.0]), 60.0)
    out = np.asarray(A.warp(jnp.asarray(canvas), jnp.array([100, 120]), m, (64, 64), 0.0))[..., 0]
    xy = np.asarray(sample_xy[0, 0] @ m[:2, :2].T + m[:2, 2])
    ys, xs = np.nonzero(out > 1e-3)
    centroid = np.array([np.average(xs, weights=out[ys, xs]), np.average(ys, weights=out[ys, xs])])
    assert np.abs(centroid - xy).max() < 0.5, (mode, centroid, xy)


def _sample(hw=(64, 64), people=2):
  rng = np.random.default_rng(3)
  p = 4
  joints = rng.uniform(8, 56, (p, SK.num_joints, 2)).astype(np.float32)
  vis = np.where(rng.uniform(size=(p, SK.num_joints)) < 0.8, 0, 4).astype(np.uint8)
  return dict(image=jnp.asarray(rng.integers(0, 256, hw + (3,), dtype=np.uint8)),
              mask=jnp.full(hw, 255, jnp.uint8), size=jnp.array(hw, jnp.int32),
              joints=jnp.asarray(joints), visibility=jnp.asarray(vis),
              centers=jnp.full((p, 2), 32.0), scales=jnp.full((p,), 40.0),
              num_people=jnp.int32(people))


def test_flip_consistency_augment_then_target_equals_target_then_flip():
  lab = A.LabelParams(input_hw=(64, 64), target_hw=(8, 8), sigma=3.0, ortho_dist_thresh=1.0)
  p = A.AugParams(mode="standard")
  s = _sample()
  plain = A.preprocess_sample(None, s, p, lab, SK, draws=draws())
  flipped = A.preprocess_sample(None, s, p, lab, SK, draws=draws(flip_lr=True))
  # Expected: mirror the unflipped labels horizontally and swap left/right channels.
  ref = np.asarray(plain["labels"])[:, ::-1]
  heat = ref[..., SK.heatmap_slice][..., SK.flip_permutation]
  limb_perm, sign = SK.limb_flip
  paf = ref[..., SK.paf_slice].reshape(8, 8, -1, 2)[:, :, limb_perm] * sign
  expected = np.concatenate([paf.reshape(8, 8, -1), heat, ref[..., -1:]], -1)
  np.testing.assert_allclose(np.asarray(flipped["labels"]), expected, atol=1e-5)
  np.testing.assert_allclose(np.asarray(flipped["image"]), np.asarray(plain["image"])[:, ::-1],
                             atol=1e-5)


def test_padding_rows_and_unlabelled_joints_make_no_targets():
  lab = A.LabelParams(input_hw=(64, 64), target_hw=(8, 8), sigma=3.0, ortho_dist_thresh=1.0)
  s = _sample(people=0)
  out = A.preprocess_sample(None, s, A.AugParams(mode="standard"), lab, SK, draws=draws())
  assert not np.asarray(out["labels"][..., :-1]).any()
  np.testing.assert_allclose(out["labels"][..., -1], 1.0)


def test_device_preprocess_batch_ranges_and_single_compile():
  cfg = demo.get_config()
  aug = A.AugParams.from_config(cfg.dataloader.augmentation_config)
  lab = A.LabelParams.from_config(cfg)
  fn = A.make_device_preprocess(aug, lab, SK)
  s = _sample((80, 96))
  s["mask"] = s["mask"].at[:40].set(0)
  batch = jax.tree_util.tree_map(lambda x: jnp.stack([x, x, x]), s)
  out = fn(jax.random.key(0), batch)
  out2 = fn(jax.random.key(1), batch)
  assert fn._cache_size() == 1
  assert out["image"].shape == (3, 128, 128, 3) and out["labels"].shape == (3, 16, 16, 57)
  assert out["mask"].shape == (3, 16, 16, 1)
  assert float(out["image"].min()) >= -0.5 and float(out["image"].max()) < 0.5
  assert 0 <= float(out["mask"].min()) and float(out["mask"].max()) <= 1
  assert float(out["mask"].min()) < 0.5                     # the masked-out half shows
  assert not np.allclose(out["image"], out2["image"])       # different keys, different draws
  assert not np.allclose(out["image"][0], out["image"][1])  # per-sample draws


def test_aug_params_from_config():
  p = A.AugParams.from_config(coco.get_config().dataloader.augmentation_config)
  assert p.flip_lr_prob == 0.5 and p.rotate_deg_min == -40 and p.translate_max_x == 40
  off = A.AugParams.from_config(coco.get_config().dataloader.augmentation_config, enabled=False)
  assert off.flip_lr_prob == 0 and off.rotate_deg_max == 0 and off.mode == "person_centric"


def test_affine_inverse_is_closed_form_and_exact():
  rng = np.random.default_rng(3)
  for _ in range(10):
    m = np.eye(3, dtype=np.float32)
    m[:2, :2] = rng.normal(size=(2, 2))
    m[:2, 2] = rng.normal(size=2) * 50
    np.testing.assert_allclose(np.asarray(A.affine_inverse(jnp.asarray(m))), np.linalg.inv(m),
                               rtol=1e-5, atol=1e-4)
  # No LU factorisation (and its while loop) in the warp.
  jaxpr = str(jax.make_jaxpr(lambda img, mat: A.warp(img, (8, 8), mat, (8, 8), 0.0))(
      jnp.zeros((8, 8, 3)), jnp.eye(3)))
  assert not re.search(r"\blu\b", jaxpr) and "while" not in jaxpr
