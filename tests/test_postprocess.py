"""Post-processing: exact parity of the windowed peak search with full-resolution upsampling,
hand-made scenes decoded to the exact keypoints, thresholds honoured, any skeleton."""

import cv2
import numpy as np
import pytest
from scipy import ndimage

from bpnet_jax import targets
from bpnet_jax.inference import postprocess as dec
from bpnet_jax.skeleton import from_json, load_skeleton

SK = load_skeleton()
# An upright person, offsets in pixels from (cx, cy): joint index -> (dx, dy).
POSE = {0: (0, -60), 1: (0, -40), 2: (-20, -40), 3: (-28, -15), 4: (-30, 10), 5: (20, -40),
        6: (28, -15), 7: (30, 10), 8: (-12, 20), 9: (-14, 55), 10: (-15, 90), 11: (12, 20),
        12: (14, 55), 13: (15, 90), 14: (-6, -66), 15: (6, -66), 16: (-12, -62), 17: (12, -62)}


def person(cx, cy, joints=POSE):
  return {j: (cx + dx, cy + dy) for j, (dx, dy) in joints.items()}


def render(people, h, w, skeleton=SK, stride=8, sigma=7.0):
  """Ideal maps (as the training targets) at network-output resolution."""
  nj = skeleton.num_joints
  joints = np.zeros((max(len(people), 1), nj, 2), np.float32)
  valid = np.zeros((max(len(people), 1), nj), bool)
  for i, p in enumerate(people):
    for j, xy in p.items():
      joints[i, j], valid[i, j] = xy, True
  hm = np.asarray(targets.heatmaps(joints, valid, (h, w), stride, sigma))
  paf = np.asarray(targets.pafs(joints, valid, skeleton, (h, w), stride, 1.0))
  return np.concatenate([hm, 1 - hm.max(-1, keepdims=True)], -1), paf


def as_array(p, nj=18):
  out = np.zeros((nj, 2))
  for j, xy in p.items():
    out[j] = xy
  return out


def test_upsampling_matches_opencv_bicubic():
  x = np.random.default_rng(0).random((7, 9)).astype(np.float32)
  for f in (8, 4, 1):
    ref = cv2.resize(x, None, fx=f, fy=f, interpolation=cv2.INTER_CUBIC)
    got = dec.upsample_matrix(7, f) @ x @ dec.upsample_matrix(9, f).T
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_smoothing_kernel_is_the_originals():
  k = np.outer(dec.smoothing_kernel_1d(), dec.smoothing_kernel_1d())
  np.testing.assert_allclose(k[0], [0.003650, 0.014834, 0.023445, 0.014834, 0.003650], atol=1e-6)
  np.testing.assert_allclose(k[2, 2], 0.150616, atol=1e-6)
  np.testing.assert_allclose(k.sum(), 1.0)


def full_resolution_peaks(heat, threshold, f):
  """The original's procedure: x f bicubic upsampling, smoothing, 3x3 NMS, threshold."""
  up = cv2.resize(heat.astype(np.float32), None, fx=f, fy=f, interpolation=cv2.INTER_CUBIC)
  up = up.reshape(up.shape[:2] + (-1,))
  k = np.outer(dec.smoothing_kernel_1d(), dec.smoothing_kernel_1d())
  found = []
  for j in range(heat.shape[-1]):
    sm = ndimage.correlate(up[..., j].astype(np.float64), k, mode="constant", cval=0.0)
    mx = ndimage.maximum_filter(sm, size=3, mode="constant", cval=-np.inf)
    ys, xs = np.nonzero((sm == mx) & (up[..., j] > threshold))
    found += [(j, y, x) for y, x in zip(ys.tolist(), xs.tolist())]
  return sorted(found)


@pytest.mark.parametrize("f", [8, 4])
def test_windowed_peaks_equal_full_resolution_peaks(f):
  rng = np.random.default_rng(1)
  # Two people (one cut by the left border), plus noise that makes spurious small peaks.
  hm, _ = render([person(100, 120), person(8, 130)], 32, 40)
  heat = hm[..., :18] + 0.08 * rng.random(hm[..., :18].shape)
  joint, y, x, value = dec.find_peaks(heat, 0.1, (f, f))
  got = list(zip(joint.tolist(), y.tolist(), x.tolist()))
  assert got == full_resolution_peaks(heat, 0.1, f)   # same set, same (joint, row, col) order
  up = cv2.resize(heat.astype(np.float32), None, fx=f, fy=f, interpolation=cv2.INTER_CUBIC)
  np.testing.assert_allclose(value, up[y, x, joint], atol=1e-5)


def test_close_joints_of_one_type_are_all_found():
  """Two joints of the same type 1-3 cells apart: the weaker one is often no low-res maximum,
  yet a peak of the upsampled, smoothed map (a 3x3-cell search around maxima missed ~10%)."""
  rng = np.random.default_rng(5)
  heat = np.zeros((40, 40, 30), np.float32)
  ys, xs = (np.mgrid[0:40, 0:40] * 8 + 3.5)
  for j in range(30):
    for k in range(2):
      x0, y0 = 60 + 120 * k + rng.uniform(0, 40), 150 + rng.uniform(-20, 20)
      x1 = x0 + rng.uniform(8, 24) * np.cos(a := rng.uniform(0, np.pi))
      y1 = y0 + rng.uniform(8, 24) * np.sin(a)
      for (x, y), v in (((x0, y0), 1.0), ((x1, y1), rng.uniform(0.5, 1.0))):
        g = v * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 7.0 ** 2))
        heat[..., j] = np.maximum(heat[..., j], g)
  joint, y, x, _ = dec.find_peaks(heat, 0.1, (8, 8))
  assert list(zip(joint.tolist(), y.tolist(), x.tolist())) == full_resolution_peaks(heat, 0.1, 8)


def test_two_people_with_crossing_arms_decode_exactly():
  a = person(100, 120)
  b = person(190, 124)
  # a's right arm reaches across b's left arm: the two forearms cross.
  a[3], a[4] = (130, 90), (170, 70)
  b[6], b[7] = (160, 100), (140, 60)
  hm, paf = render([a, b], 32, 40)
  people = dec.decode(hm, paf)
  assert len(people) == 2
  got = sorted((p["keypoints"] for p in people), key=lambda k: k[1, 0])
  for kp, truth in zip(got, (a, b)):
    np.testing.assert_array_equal(kp[:, :2], as_array(truth))   # exact input pixels
    assert (kp[:, 2] > 0.9).all()
  for p in people:
    assert 0.375 <= p["score"] < 1 and isinstance(p["score"], float)


def test_stride_and_upsampling_set_the_coordinate_convention():
  hm, paf = render([person(100, 120)], 32, 40)
  ref = dec.decode(hm, paf)[0]["keypoints"]
  # Upsampling x4: pixel X of the x4 map is input pixel (X + 0.5) * 2 - 0.5, within 1 px.
  coarse = dec.decode(hm, paf, upsample=4)[0]["keypoints"]
  assert np.abs(coarse[:, :2] - ref[:, :2]).max() <= 1.0
  assert np.allclose((coarse[:, :2] + 0.5) / 2 - 0.5, np.round((coarse[:, :2] + 0.5) / 2 - 0.5))


def test_thresholds_and_filters_are_honoured():
  p = person(100, 120)
  hm, paf = render([p], 32, 40)
  hm = hm.copy()
  hm[..., 4] *= 0.5                                      # right wrist peaks at 0.5
  base = dec.decode(hm, paf)[0]["keypoints"]
  assert base[4, 2] == pytest.approx(0.5, abs=0.02)
  higher = dec.decode(hm, paf, heatmap_threshold=0.6)[0]["keypoints"]
  assert higher[4].tolist() == [0, 0, 0] and (higher[[0, 1, 2, 3], 2] > 0.9).all()
  assert dec.decode(hm, paf, min_parts=19) == []
  assert dec.decode(hm, paf, min_mean_score=3.0) == []  # total / joints is below 3
  # Halved PAFs score ~0.5 along the limbs: a PAF threshold above that keeps nothing.
  assert len(dec.decode(hm, paf * 0.5)) == 1
  assert dec.decode(hm, paf * 0.5, paf_threshold=0.6) == []
  assert len(dec.decode(hm, paf, paf_num_samples=5, paf_sample_ratio=0.5)) == 1


def test_eye_ear_limbs_cannot_start_a_person():
  face = {j: POSE[j] for j in (14, 15, 16, 17)}         # eyes and ears only
  hm, paf = render([person(100, 100, face)], 32, 40)
  assert dec.decode(hm, paf, min_parts=2) == []
  with_nose = {j: POSE[j] for j in (0, 14, 15, 16, 17)}
  hm, paf = render([person(100, 100, with_nose)], 32, 40)
  (p,) = dec.decode(hm, paf, min_parts=2)
  assert (p["keypoints"][[0, 14, 15, 16, 17], 2] > 0.9).all()


def test_any_skeleton():
  sk = from_json({"categories": [{"keypoints": ["head", "left_hand", "right_hand", "tail"],
                                  "skeleton": [[1, 2], [1, 3], [1, 4]]}]})
  people = [{0: (40, 40), 1: (20, 60), 2: (60, 60), 3: (40, 90)},
            {0: (120, 40), 1: (100, 64), 2: (140, 60), 3: (121, 95)}]
  hm, paf = render(people, 16, 24, skeleton=sk)
  got = dec.decode(hm, paf, skeleton=sk)
  assert len(got) == 2
  got = sorted((p["keypoints"] for p in got), key=lambda k: k[0, 0])
  for kp, truth in zip(got, people):
    np.testing.assert_array_equal(kp[:, :2], as_array(truth, 4))


def test_empty_and_bad_maps():
  assert dec.decode(np.zeros((8, 8, 19)), np.zeros((8, 8, 38))) == []
  with pytest.raises(ValueError, match=r"heatmap: expected shape \(h, w, 19\)"):
    dec.decode(np.zeros((8, 8, 18)), np.zeros((8, 8, 38)))
  with pytest.raises(ValueError, match="paf: expected shape"):
    dec.decode(np.zeros((8, 8, 19)), np.zeros((8, 9, 38)))
  with pytest.raises(ValueError, match="upsample"):
    dec.decode(np.zeros((8, 8, 19)), np.zeros((8, 8, 38)), upsample=1.5)


def test_greedy_rounds_equal_the_sorted_greedy_walk():
  rng = np.random.default_rng(3)
  for _ in range(20):
    n = 60
    limb = rng.integers(0, 3, n)
    a, b = rng.integers(0, 6, n), rng.integers(6, 12, n)
    score = rng.integers(0, 8, n) / 8.0     # many exact ties
    got = dec._greedy_match(limb, a, b, score)
    walk = []
    for k in range(3):
      used_a, used_b = set(), set()
      for i in sorted(np.flatnonzero(limb == k), key=lambda i: (-score[i], -i)):
        if a[i] not in used_a and b[i] not in used_b:
          walk.append(i)
          used_a.add(a[i])
          used_b.add(b[i])
    assert got.tolist() == walk


def test_crowd_prefilter_keeps_the_result():
  people = [person(45 + 85 * (i % 4), 110 + 150 * (i // 4)) for i in range(8)]
  hm, paf = render(people, 46, 46)
  saved = dec.PREFILTER_POINTS
  try:
    results = []
    for points in (0, 10 ** 9):             # always / never probe a few samples first
      dec.PREFILTER_POINTS = points
      results.append(dec.decode(hm, paf))
  finally:
    dec.PREFILTER_POINTS = saved
  assert len(results[0]) == len(results[1]) == 8
  for p, q in zip(*results):
    np.testing.assert_array_equal(p["keypoints"], q["keypoints"])
