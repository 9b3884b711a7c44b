"""DetectNet_v2 clustering: the original's test cases (DBSCAN, NMS, HYBRID), config checks."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from bpnet_jax.detectnet_v2 import postprocess as pp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STRIDE, SCALE, OFFSET = 16, 35.0, 0.5


def encode_cells(bbox, rows, cols, box, c=0):
  """Writes class c's regression at cells [rows, cols] so that they decode to `box`."""
  r, q = np.meshgrid(np.arange(rows.start, rows.stop), np.arange(cols.start, cols.stop),
                     indexing="ij")
  px, py = STRIDE * q + OFFSET, STRIDE * r + OFFSET
  x1, y1, x2, y2 = box
  bbox[r, q, 4 * c + 0] = (px - x1) / SCALE
  bbox[r, q, 4 * c + 1] = (py - y1) / SCALE
  bbox[r, q, 4 * c + 2] = (x2 - px) / SCALE
  bbox[r, q, 4 * c + 3] = (y2 - py) / SCALE


def maps(h=64, w=64, classes=1, zero_boxes=True):
  """All-zero coverage; boxes that decode to (0, 0, 0, 0) everywhere (the original's zeros)."""
  cov = np.zeros((h, w, classes))
  bbox = np.zeros((h, w, 4 * classes))
  if zero_boxes:
    for c in range(classes):
      encode_cells(bbox, slice(0, h), slice(0, w), (0, 0, 0, 0), c)
  return cov, bbox


def config(names=("car",), **clustering):
  """The original test_clustering.py setting: threshold 0.005, eps 0.15, min_samples 1,
  min height 4, confidence threshold 0.1."""
  cfg = pp.default_postprocessing_config(names)
  for name in names:
    cc = cfg["target_class_config"][name]["clustering_config"]
    cc.update(coverage_threshold=0.005, dbscan_eps=0.15, dbscan_min_samples=1,
              minimum_bounding_box_height=4, dbscan_confidence_threshold=0.1)
    cc.update(clustering)
  return cfg


def check(dets, expected):
  """expected: [(class_id, box, confidence)]."""
  assert len(dets) == len(expected), dets
  for d, (cid, box, conf) in zip(dets, expected):
    assert d["class_id"] == cid
    np.testing.assert_allclose(d["box"], box, atol=1e-6)
    np.testing.assert_allclose(d["confidence"], conf, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# DBSCAN: the original's test_clustering.py cases


def test_all_zero_input_gives_nothing():
  cov, bbox = maps()
  assert pp.decode(cov, bbox, config(), ["car"]) == []


def test_no_candidates_gives_empty_list_for_every_algorithm():
  cov, bbox = maps(8, 8, 2, zero_boxes=False)
  for algo in pp.ALGORITHMS:
    assert pp.decode(cov, bbox, config(("a", "b"), clustering_algorithm=algo), ["a", "b"]) == []


def test_two_near_boxes_make_one_weighted_detection():
  cov, bbox = maps()
  cov[0:24, 0:24] = 1.0
  encode_cells(bbox, slice(0, 5), slice(0, 5), (0, 0, 16, 16))
  encode_cells(bbox, slice(5, 10), slice(5, 10), (0.1, 0.1, 16.1, 16.1))
  dets = pp.decode(cov, bbox, config(), ["car"])
  check(dets, [(0, (0.05, 0.05, 16.05, 16.05), 50.0)])
  assert dets[0]["class_name"] == "car"


def test_low_coverage_cluster_is_noise():
  cov, bbox = maps()
  cov[0:5, 0:5] = 0.01
  encode_cells(bbox, slice(0, 5), slice(0, 5), (0, 0, 16, 16))
  cov[5:10, 5:10] = 1.0
  encode_cells(bbox, slice(5, 10), slice(5, 10), (16, 16, 32, 32))
  check(pp.decode(cov, bbox, config(), ["car"]), [(0, (16, 16, 32, 32), 25.0)])


def test_minimum_height_drops_short_clusters():
  cov, bbox = maps()
  cov[0:11, 0:11] = 1.0
  encode_cells(bbox, slice(0, 5), slice(0, 5), (0, 0, 5, 5))
  encode_cells(bbox, slice(5, 10), slice(5, 10), (5, 5, 15, 15))
  encode_cells(bbox, slice(11, 12), slice(11, 12), (15, 15, 25, 25))
  cfg = config(minimum_bounding_box_height=6)
  check(pp.decode(cov, bbox, cfg, ["car"]), [(0, (5, 5, 15, 15), 25.0)])
  # Height exactly at the limit is dropped too (height <= minimum).
  cfg = config(minimum_bounding_box_height=10)
  assert pp.decode(cov, bbox, cfg, ["car"]) == []


def test_two_classes_on_different_cells():
  cov, bbox = maps(classes=2)
  cov[0:10, 0:5, 0] = 1.0
  encode_cells(bbox, slice(0, 10), slice(0, 5), (0, 0, 16, 16), c=0)
  cov[10:20, 10:15, 1] = 1.0
  encode_cells(bbox, slice(10, 20), slice(10, 15), (160, 160, 200, 220), c=1)
  dets = pp.decode(cov, bbox, config(("car", "person")), ["car", "person"])
  check(dets, [(0, (0, 0, 16, 16), 50.0), (1, (160, 160, 200, 220), 50.0)])
  assert [d["class_name"] for d in dets] == ["car", "person"]


@pytest.mark.parametrize("cells,expected", [(3, 1.2), (2, None)])
def test_core_needs_unit_coverage_mass(cells, expected):
  cov, bbox = maps(8, 8, zero_boxes=False)
  cov[0, 0:cells] = 0.4
  encode_cells(bbox, slice(0, 1), slice(0, cells), (10, 10, 60, 70))
  dets = pp.decode(cov, bbox, config(), ["car"])
  if expected is None:
    assert dets == []
  else:
    check(dets, [(0, (10, 10, 60, 70), expected)])


def test_min_samples_as_mass_option():
  cov, bbox = maps(8, 8, zero_boxes=False)
  cov[0, 0:2] = 0.4
  encode_cells(bbox, slice(0, 1), slice(0, 2), (10, 10, 60, 70))
  cfg = config(dbscan_min_samples=0.05)
  assert pp.decode(cov, bbox, cfg, ["car"]) == []            # TAO: max(int(0.05), 1) = 1
  cfg["dbscan_min_samples_as_mass"] = True
  check(pp.decode(cov, bbox, cfg, ["car"]), [(0, (10, 10, 60, 70), 0.8)])


def test_dbscan_confidence_threshold_is_inclusive():
  cov, bbox = maps(8, 8, zero_boxes=False)
  cov[0, 0:4] = 0.5
  encode_cells(bbox, slice(0, 1), slice(0, 4), (10, 10, 60, 70))
  check(pp.decode(cov, bbox, config(dbscan_confidence_threshold=2.0), ["car"]),
        [(0, (10, 10, 60, 70), 2.0)])
  assert pp.decode(cov, bbox, config(dbscan_confidence_threshold=2.01), ["car"]) == []


def test_border_point_joins_first_cluster_like_sklearn():
  # Two clusters (A1, A2) and (B2, B1) and a non-core box X within eps of A2 and B2 only:
  # scikit-learn gives X to the cluster whose first core point comes first.
  heights = [100, 108, 118, 129, 140]              # D = 1 - h_i / h_j for equal widths
  boxes = np.array([[0, 0, 100, h] for h in heights], float)
  w = np.array([0.8, 0.3, 0.05, 0.3, 0.8])         # X's mass 0.65 < 1: not a core point
  np.testing.assert_array_equal(pp.dbscan_labels(boxes, w, eps=0.1), [0, 0, 0, 1, 1])
  np.testing.assert_array_equal(pp.dbscan_labels(boxes[::-1].copy(), w[::-1].copy(), eps=0.1),
                                [0, 0, 0, 1, 1])
  np.testing.assert_array_equal(_bruteforce_dbscan(boxes, w, 0.1), [0, 0, 0, 1, 1])


def test_dbscan_matches_bruteforce_sklearn_semantics():
  rng = np.random.default_rng(0)
  for _ in range(20):
    n = int(rng.integers(1, 60))
    centres = rng.uniform(0, 200, (3, 2))
    c = centres[rng.integers(0, 3, n)] + rng.normal(0, 4, (n, 2))
    half = rng.uniform(10, 30, (n, 2))
    boxes = np.concatenate([c - half, c + half], 1)
    w = rng.uniform(0.01, 1.0, n)
    eps = float(rng.uniform(0.05, 0.5))
    np.testing.assert_array_equal(pp.dbscan_labels(boxes, w, eps), _bruteforce_dbscan(boxes, w,
                                                                                     eps))


@pytest.mark.parametrize("eps", [0.05, 0.15, 0.3, 0.6])
def test_float32_neighbours_equal_float64_near_threshold(eps):
  """dbscan_neighbours works in float32 with a float64 recheck band: pairs engineered to sit
  within 1e-12..1e-3 of the threshold, far from the origin, and thin boxes must all come out
  as the float64 formula says."""
  rng = np.random.default_rng(int(eps * 100))
  tau = 1.0 - eps
  boxes = []
  for delta in (0.0, 1e-12, -1e-12, 1e-9, -1e-9, 1e-7, -1e-7, 1e-5, -1e-5, 1e-3, -1e-3):
    x, y = rng.uniform(0, 4000, 2)
    w, h = rng.uniform(1, 300, 2)
    boxes.append((x, y, x + w, y + h))
    boxes.append((x, y, x + w, y + h / tau * (1.0 + delta)))    # IoU ~ tau (1 - delta)
  for _ in range(6):                                            # thin and tiny boxes
    x, y = rng.uniform(0, 2000, 2)
    boxes.append((x, y, x + rng.uniform(0, 1.5), y + rng.uniform(0, 40)))
    boxes.append((x, y, x, y + 10.0))                           # zero area
  boxes = np.asarray(boxes)
  got = pp.dbscan_neighbours(boxes, eps)
  n = len(boxes)
  want = np.zeros((n, n), bool)
  for i in range(n):
    for j in range(n):
      a, b = boxes[i], boxes[j]
      iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
      ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
      inter = iw * ih
      union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter + 1e-5
      want[i, j] = 1.0 - inter / union <= eps
  np.testing.assert_array_equal(got, want)


def _bruteforce_dbscan(boxes, w, eps, min_mass=1.0):
  """scikit-learn's dbscan_inner written out with loops."""
  n = len(boxes)

  def iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter + 1e-5
    return inter / ua

  nbrs = [[j for j in range(n) if 1.0 - iou(boxes[i], boxes[j]) <= eps] for i in range(n)]
  core = [sum(w[j] for j in nbrs[i]) >= min_mass for i in range(n)]
  labels = [-1] * n
  k = 0
  for i in range(n):
    if labels[i] != -1 or not core[i]:
      continue
    stack = [i]
    while stack:
      p = stack.pop()
      if labels[p] != -1:
        continue
      labels[p] = k
      if core[p]:
        stack.extend(j for j in nbrs[p] if labels[j] == -1)
    k += 1
  return np.array(labels)


def test_mean_cov_confidence_model():
  cov, bbox = maps(8, 8, zero_boxes=False)
  cov[0, 0:3, 0] = [0.6, 0.8, 0.4]
  cov[0, 3] = 0.0
  encode_cells(bbox, slice(0, 1), slice(0, 3), (10, 10, 60, 70))
  cfg = config(dbscan_confidence_threshold=0.0)
  cfg["target_class_config"]["car"]["confidence_model"] = "mean_cov"
  check(pp.decode(cov, bbox, cfg, ["car"]), [(0, (10, 10, 60, 70), 0.5)])
  # Equal coverages: (mean - min) / (max - min) would be NaN; the mean is reported.
  cov[0, 0:3] = 0.5
  check(pp.decode(cov, bbox, cfg, ["car"]), [(0, (10, 10, 60, 70), 0.5)])


# ---------------------------------------------------------------------------------------------
# NMS and HYBRID


NMS_BOXES = np.array([[0, 0, 99, 99], [10, 10, 109, 109], [50, 0, 149, 99],
                      [200, 200, 259, 259], [204, 204, 263, 263], [400, 400, 419, 419]], float)
NMS_SCORES = np.array([0.9, 0.8, 0.7, 0.3, 0.25, 0.1])


@pytest.mark.parametrize("nt,kept", [(0.3, [0, 3]), (0.5, [0, 2, 3])])
def test_nms_keep_small_example(nt, kept):
  np.testing.assert_array_equal(pp.nms_keep(NMS_BOXES, NMS_SCORES, nt, 0.2), kept)


def _nms_maps():
  """The A-F example on a 32 x 32 grid, one box per cell along row 0 (shuffled order)."""
  cov, bbox = maps(32, 32, zero_boxes=False)
  for col, i in enumerate([4, 1, 5, 0, 3, 2]):
    cov[0, col] = NMS_SCORES[i]
    encode_cells(bbox, slice(0, 1), slice(col, col + 1), NMS_BOXES[i])
  return cov, bbox


@pytest.mark.parametrize("nt,kept", [(0.3, [0, 3]), (0.5, [0, 2, 3])])
def test_nms_decode_reports_true_coverages(nt, kept):
  cov, bbox = _nms_maps()
  cfg = config(clustering_algorithm="NMS", nms_iou_threshold=nt, nms_confidence_threshold=0.2,
               minimum_bounding_box_height=0)
  check(pp.decode(cov, bbox, cfg, ["car"]),
        [(0, NMS_BOXES[i], NMS_SCORES[i]) for i in kept])


def test_nms_applies_minimum_height():
  cov, bbox = _nms_maps()
  cfg = config(clustering_algorithm="NMS", nms_iou_threshold=0.5, nms_confidence_threshold=0.2,
               minimum_bounding_box_height=60)
  # D (height 59) is dropped; A and C (height 99) stay.
  check(pp.decode(cov, bbox, cfg, ["car"]), [(0, NMS_BOXES[i], NMS_SCORES[i]) for i in (0, 2)])


def test_nms_iou_uses_plus_one_convention():
  a = np.array([[0, 0, 99, 99], [50, 0, 149, 99]], float)
  # +1 areas: inter 50 x 100, union 2 x 100 x 100 - 5000 -> 1/3 exactly; continuous: 49/149.
  np.testing.assert_array_equal(pp.nms_keep(a, np.array([0.9, 0.7]), 0.3333, 0.0), [0])
  np.testing.assert_array_equal(pp.nms_keep(a, np.array([0.9, 0.7]), 0.33334, 0.0), [0, 1])


def test_hybrid_equals_nms_on_dbscan_members():
  rng = np.random.default_rng(3)
  cov, bbox = maps(24, 24, zero_boxes=False)
  for k, box in enumerate([(20, 20, 120, 150), (200, 40, 260, 100), (60, 250, 180, 330)]):
    r0, c0 = 1 + 7 * k, 2 + 6 * k
    cov[r0:r0 + 4, c0:c0 + 4, 0] = rng.uniform(0.2, 1.0, (4, 4))
    encode_cells(bbox, slice(r0, r0 + 4), slice(c0, c0 + 4), box)
    bbox[r0:r0 + 4, c0:c0 + 4] += rng.normal(0, 0.1, (4, 4, 4))
  cov[22, 22] = 0.3                       # an isolated low-coverage cell: DBSCAN noise
  encode_cells(bbox, slice(22, 23), slice(22, 23), (340, 340, 380, 380))
  cfg = config(clustering_algorithm="HYBRID", dbscan_eps=0.3, nms_iou_threshold=0.2,
               nms_confidence_threshold=0.1, minimum_bounding_box_height=0)
  got = pp.decode(cov, bbox, cfg, ["car"])
  p = pp.resolve_postprocessing_config(cfg, ["car"]).classes[0]
  boxes, w = pp.candidate_boxes(cov[..., 0], bbox[..., :4], p.coverage_threshold)
  labels = pp.dbscan_labels(boxes, w, p.eps)
  members = np.flatnonzero(labels >= 0)
  assert len(members) == len(w) - 1
  keep = members[pp.nms_keep(boxes[members], w[members], 0.2, 0.1)]
  check(got, [(0, boxes[i], w[i]) for i in keep])
  assert len(got) >= 3


def test_confidence_threshold_swap_compat():
  cov, bbox = _nms_maps()
  cfg = config(clustering_algorithm="NMS", nms_iou_threshold=0.5, nms_confidence_threshold=0.2,
               dbscan_confidence_threshold=0.8, minimum_bounding_box_height=0)
  assert len(pp.decode(cov, bbox, cfg, ["car"])) == 3
  cfg["confidence_threshold_swap_compat"] = True     # NMS now filters with 0.8
  check(pp.decode(cov, bbox, cfg, ["car"]), [(0, NMS_BOXES[0], 0.9)])


# ---------------------------------------------------------------------------------------------
# Decoding geometry and config


def test_candidate_decoding_is_inverse_of_encoding_and_clips():
  cov, bbox = maps(6, 5, zero_boxes=False)
  cov[:] = 1.0
  encode_cells(bbox, slice(0, 6), slice(0, 5), (1.1, 21.1, 42.1, 66.666))
  boxes, w = pp.candidate_boxes(cov[..., 0], bbox[..., :4], 0.0)
  np.testing.assert_allclose(boxes, np.tile([1.1, 21.1, 42.1, 66.666], (30, 1)), atol=1e-9)
  for box, want in [((-10.1, -30, 150, 140), (0, 0, 80, 96)),
                    ((-10.1, 30.2, 50, 20.2), (0, 30.2, 50, 30.2)),
                    ((30.2, 50, 20.2, 60), (30.2, 50, 30.2, 60))]:
    encode_cells(bbox, slice(0, 6), slice(0, 5), box)
    boxes, _ = pp.candidate_boxes(cov[..., 0], bbox[..., :4], 0.0)
    np.testing.assert_allclose(boxes, np.tile(want, (30, 1)), atol=1e-9)
  # All-ones regression: x1 = clip(16c + 0.5 - 35, 0, W), x2 = clip(16c + 0.5 + 35, x1, W).
  boxes, _ = pp.candidate_boxes(cov[..., 0], np.ones((6, 5, 4)), 0.0)
  c = np.tile(np.arange(5), 6)
  r = np.repeat(np.arange(6), 5)
  np.testing.assert_allclose(boxes[:, 0], np.clip(16 * c + 0.5 - 35, 0, 80))
  np.testing.assert_allclose(boxes[:, 3], np.clip(16 * r + 0.5 + 35, boxes[:, 1], 96))


def test_matches_targets_decode_boxes_if_available():
  """Candidate decoding here (NumPy, float64, thresholded cells only) equals the training-side
  inverse of the box encoding in targets.py."""
  targets = pytest.importorskip("bpnet_jax.detectnet_v2.targets")
  if not hasattr(targets, "decode_boxes"):
    pytest.skip("targets.decode_boxes not available")
  rng = np.random.default_rng(1)
  h, w = 6, 5
  bbox = rng.normal(0, 1, (h, w, 4)).astype(np.float32)
  r, c = np.mgrid[0:h, 0:w]
  points = np.stack([STRIDE * c + OFFSET, STRIDE * r + OFFSET], -1).astype(np.float32)
  try:
    ref = np.asarray(targets.decode_boxes(bbox, points, SCALE, clip_size=(w * STRIDE,
                                                                          h * STRIDE)))
  except TypeError:
    pytest.skip("targets.decode_boxes has a different signature")
  boxes, _ = pp.candidate_boxes(np.ones((h, w)), bbox, 0.0)
  np.testing.assert_allclose(boxes, ref.reshape(-1, 4), atol=1e-4)


def test_default_config_and_geometry_from_config():
  cfg = pp.default_postprocessing_config()
  assert cfg["stride"] == 16 and cfg["bbox_scale"] == 35.0 and cfg["bbox_offset"] == 0.5
  cc = cfg["target_class_config"]["default"]["clustering_config"]
  assert cc == {"coverage_threshold": 0.0, "clustering_algorithm": "DBSCAN", "dbscan_eps": 0.0,
                "dbscan_min_samples": 0, "dbscan_confidence_threshold": 0.0,
                "minimum_bounding_box_height": 0, "nms_iou_threshold": 0.0,
                "nms_confidence_threshold": 0.0}
  pp.validate_postprocessing_config(cfg, ["a", "b"])
  # A different scale and offset (Q14: read from the config, not hard-coded).
  cov, bbox = maps(4, 4, zero_boxes=False)
  cov[1, 2] = 1.0
  bbox[1, 2] = [1.0, 1.0, 1.0, 1.0]
  cfg = config(dbscan_min_samples=1, minimum_bounding_box_height=0)
  cfg.update(stride=16, bbox_scale=10.0, bbox_offset=0.0)
  check(pp.decode(cov, bbox, cfg, ["car"]), [(0, (22, 6, 42, 26), 1.0)])


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: c["target_class_config"]["car"].update(confidence_model="mlp"),
     "confidence_model"),
    (lambda c: c["target_class_config"]["car"]["clustering_config"].update(dbscan_eps=1.5),
     "dbscan_eps"),
    (lambda c: c["target_class_config"]["car"]["clustering_config"].update(
        clustering_algorithm="KMEANS"), "clustering_algorithm"),
    (lambda c: c["target_class_config"]["car"]["clustering_config"].update(neighborhood_size=3),
     "neighborhood_size"),
    (lambda c: c["target_class_config"]["car"]["clustering_config"].update(bogus=1), "bogus"),
    (lambda c: c["target_class_config"]["car"].update(confidence_config={}),
     "confidence_config"),
    (lambda c: c["target_class_config"].pop("car"), "target_class_config.car"),
    (lambda c: c["target_class_config"].update(truck={}), "target_class_config.truck"),
    (lambda c: c.update(stride=0), "stride"),
    (lambda c: c.update(extra=1), "extra"),
    (lambda c: c["target_class_config"]["car"]["clustering_config"].update(
        minimum_bounding_box_height=2.5), "minimum_bounding_box_height"),
    (lambda c: c["target_class_config"]["car"]["clustering_config"].update(
        nms_iou_threshold="0.3"), "nms_iou_threshold"),
])
def test_validation_errors_name_the_key(mutate, needle):
  cfg = config()
  mutate(cfg)
  with pytest.raises(ValueError, match=needle) as info:
    pp.validate_postprocessing_config(cfg, ["car"])
  assert "\n" not in str(info.value)


def test_neighborhood_size_zero_and_default_entry_accepted():
  cfg = pp.default_postprocessing_config()
  cfg["target_class_config"]["default"]["clustering_config"]["neighborhood_size"] = 0
  pp.validate_postprocessing_config(cfg, ["car", "person"])


def test_shape_errors():
  cov, bbox = maps(4, 4, 2, zero_boxes=False)
  with pytest.raises(ValueError, match="cov"):
    pp.decode(cov, bbox, config(), ["car"])
  with pytest.raises(ValueError, match="bbox"):
    pp.decode(cov, bbox[..., :4], config(("a", "b")), ["a", "b"])


def test_decode_batch_and_float32_maps():
  cov, bbox = maps()
  cov[0:24, 0:24] = 1.0
  encode_cells(bbox, slice(0, 5), slice(0, 5), (0, 0, 16, 16))
  batch = pp.decode_batch(np.stack([cov, np.zeros_like(cov)]).astype(np.float32),
                          np.stack([bbox, bbox]).astype(np.float32), config(), ["car"])
  assert len(batch) == 2 and batch[1] == []
  np.testing.assert_allclose(batch[0][0]["box"], (0, 0, 16, 16), atol=1e-4)
  assert batch[0][0]["confidence"] == pytest.approx(25.0)


def test_benchmark_smoke():
  r = subprocess.run([sys.executable, "benchmarks/detectnet_v2_clustering.py", "--smoke"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  for needle in ("postprocess.decode", "reference (loops)", "speed-up", "same detections"):
    assert needle in r.stdout
