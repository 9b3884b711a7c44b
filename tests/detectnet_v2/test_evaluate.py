"""DetectNet_v2 AP / mAP: the original's toy cases (SAMPLE, INTEGRATE), matching rules, config."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from bpnet_jax.detectnet_v2 import evaluate as ev

NAMES = ["car"]


def cfg(mode="SAMPLE", compat=False, iou=0.5, names=NAMES, box=(0, 9999, 0, 9999)):
  c = ev.default_evaluation_config(names)
  c["average_precision_mode"] = mode
  c["ap_integrate_compat"] = compat
  for n in names:
    c["minimum_detection_ground_truth_overlap"][n] = iou
    c["evaluation_box_config"][n] = dict(zip(ev.BOX_KEYS, box))
  return c


def det(box, conf, name="car"):
  return {"class_name": name, "box": tuple(box), "confidence": conf}


def gt(box, name="car", **kw):
  return {"class_name": name, "box": tuple(box), **kw}


G1, G2, G3, G4 = (10, 10, 50, 50), (100, 10, 140, 60), (200, 100, 260, 180), (300, 50, 330, 90)
FAR = (500, 300, 540, 340)

# (detections per image, ground truth per image, SAMPLE, TAO INTEGRATE, VOC2010 INTEGRATE)
CASES = {
    "1 GT, 1 TP": ([[det(G1, 0.9)]], [[gt(G1)]], 1.0, 0.0, 1.0),
    "2 GT, TP, TP": ([[det(G1, 0.9), det(G2, 0.8)]], [[gt(G1), gt(G2)]], 1.0, 0.5, 1.0),
    "2 GT, TP, FP, TP": ([[det(G1, 0.9), det(FAR, 0.8), det(G2, 0.7)]], [[gt(G1), gt(G2)]],
                         0.848485, 0.5, 0.833333),
    "1 GT, FP, TP": ([[det(FAR, 0.9), det(G1, 0.8)]], [[gt(G1)]], 0.5, 0.0, 0.5),
    "4 GT in 2 frames, 4 TP": ([[det(G1, 0.9), det(G2, 0.8)], [det(G3, 0.7), det(G4, 0.6)]],
                               [[gt(G1), gt(G2)], [gt(G3), gt(G4)]], 1.0, 0.75, 1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_original_ap_table(case):
  dets, gts, sample, tao, voc = CASES[case]
  for (mode, compat), want in ((("SAMPLE", False), sample), (("INTEGRATE", True), tao),
                               (("INTEGRATE", False), voc)):
    r = ev.evaluate(dets, gts, cfg(mode, compat), NAMES)
    assert r["per_class"]["car"]["AP"] == pytest.approx(want, abs=1e-6), (mode, compat)
    assert r["mAP"] == pytest.approx(want, abs=1e-6)


def test_counts_and_table():
  dets, gts, *_ = CASES["2 GT, TP, FP, TP"]
  r = ev.evaluate(dets, gts, cfg(), NAMES)
  c = r["per_class"]["car"]
  assert (c["num_gt"], c["num_det"], c["num_tp"], c["num_fp"]) == (2, 3, 2, 1)
  assert c["precision"] == pytest.approx(2 / 3) and c["recall"] == 1.0
  assert r["num_images"] == 1 and r["average_precision_mode"] == "SAMPLE"
  table = ev.format_table(r)
  assert "| car " in table and "84.85" in table and "mAP (%): 84.85 (SAMPLE, 1 images)" in table


def test_duplicate_is_fp_and_no_fallback_to_next_best_gt():
  # The second detection's best GT is G1 (already matched): FP, even though it also overlaps
  # the unmatched G1b above the threshold.
  g1b = (14, 10, 54, 50)
  dets = [[det(G1, 0.9), det((12, 10, 52, 50), 0.8)]]
  r = ev.evaluate(dets, [[gt(G1), gt(g1b)]], cfg(), NAMES)
  c = r["per_class"]["car"]
  assert (c["num_tp"], c["num_fp"]) == (1, 1)


def test_iou_plus_one_convention_and_threshold_inclusive():
  a = np.array([[0, 0, 9, 9]], float)
  b = np.array([[5, 0, 14, 9]], float)
  # +1 areas: intersection 5 x 10 = 50, union 100 + 100 - 50 -> 1/3 (continuous: 40/140).
  assert ev.iou_plus_one(a, b)[0, 0] == pytest.approx(1 / 3)
  # IoU exactly 0.5 passes a 0.5 threshold: (0, 0, 9, 9) vs (0, 0, 9, 19) -> 100 / 200.
  r = ev.evaluate([[det((0, 0, 9, 19), 0.9)]], [[gt((0, 0, 9, 9))]], cfg(iou=0.5), NAMES)
  assert r["per_class"]["car"]["num_tp"] == 1
  r = ev.evaluate([[det((0, 0, 9, 19), 0.9)]], [[gt((0, 0, 9, 9))]], cfg(iou=0.51), NAMES)
  assert r["per_class"]["car"]["num_tp"] == 0


def test_coordinates_rounded_half_to_even():
  # 0.5 -> 0 and 9.5 -> 10 (half to even): the detection becomes (0, 0, 10, 9); against GT
  # (0, 0, 9, 9) the +1 IoU is 100 / 110 = 0.909, while rounding half up would give
  # (1, 0, 10, 9) and 90 / 110 = 0.818: with a 0.905 threshold only half-to-even passes.
  dets = [[det((0.5, 0.0, 9.5, 9.0), 0.9)]]
  r = ev.evaluate(dets, [[gt((0, 0, 9, 9))]], cfg(iou=0.905), NAMES)
  assert r["per_class"]["car"]["num_tp"] == 1


def test_size_filter_removes_gt_and_detections():
  small = (10, 10, 18, 40)                                     # width 8 < 10
  c = cfg(box=(10, 9999, 10, 9999))
  # GT too small: removed, not ignored -> a (big enough) detection on it is a false positive.
  r = ev.evaluate([[det((10, 10, 22, 40), 0.9)]], [[gt(small)]], c, NAMES)
  p = r["per_class"]["car"]
  assert (p["num_gt"], p["num_det"], p["num_fp"], p["AP"]) == (0, 1, 1, 0.0)
  # Detection too small: removed as well.
  r = ev.evaluate([[det(small, 0.9)], []], [[gt(G1)], [gt(G2)]], c, NAMES)
  assert r["per_class"]["car"]["num_det"] == 0 and r["per_class"]["car"]["num_gt"] == 2
  # Maximum height / width, inclusive limits (h > max is dropped, h == max kept).
  c = cfg(box=(0, 40, 0, 9999))
  r = ev.evaluate([[]], [[gt((0, 0, 10, 40)), gt((0, 0, 10, 41))]], c, NAMES)
  assert r["per_class"]["car"]["num_gt"] == 1


def test_per_class_thresholds_and_map_counts_empty_classes(caplog):
  names = ["car", "person", "bike"]
  c = cfg(names=names)
  c["minimum_detection_ground_truth_overlap"]["person"] = 0.9
  dets = [[det(G1, 0.9), det((100, 10, 140, 64), 0.8, "person")]]    # IoU 41*51/(41*55) ~ 0.93
  gts = [[gt(G1), gt(G2, "person")]]
  with caplog.at_level(logging.WARNING):
    r = ev.evaluate(dets, gts, c, names)
  assert r["per_class"]["car"]["AP"] == 1.0 and r["per_class"]["person"]["AP"] == 1.0
  assert r["per_class"]["bike"]["AP"] == 0.0 and r["mAP"] == pytest.approx(2 / 3)
  assert "bike" in caplog.text
  c["minimum_detection_ground_truth_overlap"]["person"] = 0.95
  assert ev.evaluate(dets, gts, c, names)["per_class"]["person"]["AP"] == 0.0


def test_mappings_class_ids_dontcare_and_foreign_classes():
  dets = {"b": [{"class_id": 0, "box": G2, "confidence": 0.5}],
          "a": [{"class_id": 0, "class_name": "car", "box": G1, "confidence": 0.9}]}
  gts = {"a": [gt(G1), gt(G3, dontcare=True), gt(G4, "dontcare")],
         "b": [{"class_id": 0, "box": G2}], "c": [gt(G3)]}
  r = ev.evaluate(dets, gts, cfg(), NAMES)
  p = r["per_class"]["car"]
  assert (p["num_gt"], p["num_tp"], r["num_images"]) == (3, 2, 3)
  with pytest.raises(ValueError, match="no ground-truth entry"):
    ev.evaluate({"z": []}, gts, cfg(), NAMES)


def test_empty_inputs():
  r = ev.evaluate([], [], cfg(), NAMES)
  assert r["mAP"] == 0.0 and r["per_class"]["car"]["num_det"] == 0
  r = ev.evaluate([[]], [[gt(G1)]], cfg(), NAMES)
  assert r["per_class"]["car"]["AP"] == 0.0 and r["per_class"]["car"]["recall"] == 0.0


def test_input_errors():
  with pytest.raises(ValueError, match="2 images"):
    ev.evaluate([[], []], [[]], cfg(), NAMES)
  with pytest.raises(ValueError, match="not a target class"):
    ev.evaluate([[det(G1, 0.9, "truck")]], [[]], cfg(), NAMES)
  with pytest.raises(ValueError, match="class_id"):
    ev.evaluate([[{"class_id": 3, "box": G1, "confidence": 0.9}]], [[]], cfg(), NAMES)
  with pytest.raises(ValueError, match="box"):
    ev.evaluate([[det((1, 2, 3), 0.9)]], [[]], cfg(), NAMES)


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: c.update(average_precision_mode="AREA"), "average_precision_mode"),
    (lambda c: c.update(bogus=1), "bogus"),
    (lambda c: c["minimum_detection_ground_truth_overlap"].update(car=1.5),
     "minimum_detection_ground_truth_overlap.car"),
    (lambda c: c["minimum_detection_ground_truth_overlap"].pop("car"),
     "minimum_detection_ground_truth_overlap.car"),
    (lambda c: c["evaluation_box_config"]["car"].update(minimum_height=-1), "minimum_height"),
    (lambda c: c["evaluation_box_config"]["car"].update(minimum_width=20, maximum_width=10),
     "minimum_width"),
    (lambda c: c["evaluation_box_config"]["car"].update(min_area=3), "min_area"),
    (lambda c: c["evaluation_box_config"].update(truck={}), "evaluation_box_config.truck"),
    (lambda c: c.update(ap_integrate_compat="yes"), "ap_integrate_compat"),
])
def test_config_errors_name_the_key(mutate, needle):
  c = cfg()
  mutate(c)
  with pytest.raises(ValueError, match=needle) as info:
    ev.validate_evaluation_config(c, NAMES)
  assert "\n" not in str(info.value)


def test_default_config_and_training_loop_keys():
  c = ev.default_evaluation_config()
  assert c["evaluation_box_config"]["default"] == {"minimum_height": 10, "maximum_height": 9999,
                                                   "minimum_width": 10, "maximum_width": 9999}
  c.update(validation_period_during_training=10, first_validation_epoch=1)
  ev.validate_evaluation_config(c, ["car", "person"])


def test_thresholds_compare_as_float32():
  # 0.7 is 0.699999988 as a float32 protobuf field: an IoU of 0.69999999 passes, as there.
  p = ev.resolve_evaluation_config(cfg(iou=0.7), NAMES)
  assert p.classes[0].iou_threshold == float(np.float32(0.7)) < 0.7


def test_matches_bruteforce_original_loop():
  rng = np.random.default_rng(5)
  frames_d, frames_g = [], []
  for _ in range(6):
    g = [gt(tuple(np.r_[xy, xy + wh])) for xy, wh in
         zip(rng.uniform(0, 300, (4, 2)), rng.uniform(20, 80, (4, 2)))]
    d = []
    for item in g + g[:2]:
      jitter = rng.normal(0, 6, 4)
      d.append(det(tuple(np.asarray(item["box"]) + jitter), float(rng.uniform())))
    d.append(det((400, 400, 440, 450), float(rng.uniform())))
    frames_d.append(d)
    frames_g.append(g)
  for mode in ("SAMPLE", "INTEGRATE"):
    got = ev.evaluate(frames_d, frames_g, cfg(mode, compat=True, iou=0.6), NAMES)
    assert got["per_class"]["car"]["AP"] == pytest.approx(
        _bruteforce(frames_d, frames_g, 0.6, mode), abs=1e-12)


def _bruteforce(frames_d, frames_g, thr, mode):
  """The original's loop, written out (one class, no size filter)."""
  preds = [(f, d["confidence"], *[round(v) for v in d["box"]])
           for f, ds in enumerate(frames_d) for d in ds]
  gts = {f: [[round(v) for v in g["box"]] for g in gs] for f, gs in enumerate(frames_g)}
  num_gt = sum(len(v) for v in gts.values())
  preds.sort(key=lambda p: -np.float32(p[1]))
  matched = {}
  tp = []
  for f, _, *box in preds:
    g = np.asarray(gts[f], float)
    iou = ev.iou_plus_one(np.asarray([box], float), g)[0]
    k = int(np.argmax(iou))
    if iou[k] < thr or matched.get((f, k)):
      tp.append(0)
    else:
      matched[(f, k)] = True
      tp.append(1)
  ctp = np.cumsum(tp)
  prec = ctp / np.arange(1, len(tp) + 1)
  rec = ctp / num_gt
  if mode == "SAMPLE":
    return np.mean([max(prec[rec >= t], default=0.0) for t in np.linspace(0, 1, 11)])
  levels, first = np.unique(rec, return_index=True)
  ap, best = 0.0, 0.0
  for i in range(len(levels) - 2, -1, -1):
    best = max(best, prec[first[i]:first[i + 1]].max())
    ap += best * (levels[i + 1] - levels[i])
  return ap


def test_decode_output_feeds_evaluate():
  from bpnet_jax.detectnet_v2 import postprocess as pp
  names = ["car", "person"]
  cov = np.zeros((16, 16, 2), np.float32)
  bbox = np.zeros((16, 16, 8), np.float32)
  truth = [(0, (20, 30, 100, 90), slice(2, 5), slice(2, 5)),
           (1, (150, 100, 190, 200), slice(8, 11), slice(10, 12))]
  for c, (x1, y1, x2, y2), rows, cols in truth:
    r, q = np.mgrid[rows, cols]
    px, py = 16 * q + 0.5, 16 * r + 0.5
    cov[rows, cols, c] = 0.9
    bbox[rows, cols, 4 * c:4 * c + 4] = np.stack(
        [(px - x1) / 35, (py - y1) / 35, (x2 - px) / 35, (y2 - py) / 35], -1)
  post = pp.default_postprocessing_config(names)
  for n in names:
    post["target_class_config"][n]["clustering_config"].update(
        coverage_threshold=0.005, dbscan_eps=0.15, dbscan_min_samples=1)
  dets = pp.decode(cov, bbox, post, names)
  assert len(dets) == 2
  gts = [{"class_id": c, "box": box} for c, box, _, _ in truth]
  r = ev.evaluate([dets], [gts], cfg(names=names, iou=0.7), names)
  assert r["mAP"] == 1.0
