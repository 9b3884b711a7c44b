"""COCO evaluation: GT keypoints written as detections give AP 1.0; output files; float coords."""

import csv
import json
import os

import numpy as np
import pytest

from bpnet_jax.inference import coco_eval
from bpnet_jax.skeleton import load_skeleton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANNOTATIONS = os.path.join(ROOT, "tests/data/coco_mini/annotations/person_keypoints_train2017.json")
SK = load_skeleton()


def gt_people(shift=0.0):
  """The annotated people of coco_mini as 18-joint decoder output (neck from the shoulders)."""
  data = json.load(open(ANNOTATIONS))
  names = data["categories"][0]["keypoints"]
  src, derived = SK.from_dataset(names)
  out = {im["id"]: [] for im in data["images"]}
  for a in data["annotations"]:
    if a["iscrowd"] or not a["num_keypoints"]:
      continue
    k = np.asarray(a["keypoints"], np.float64).reshape(-1, 3)
    kp = np.zeros((SK.num_joints, 3))
    for j in range(SK.num_joints):
      if src[j] >= 0 and k[src[j], 2] > 0:
        kp[j] = (k[src[j], 0] + shift, k[src[j], 1] + shift, 1.0)
      elif src[j] < 0 and derived[j, 0] >= 0 and (k[derived[j], 2] > 0).all():
        kp[j] = (*(k[derived[j], :2].mean(0) + shift), 1.0)
    out[a["image_id"]].append({"keypoints": kp, "score": 1.0})
  return out


def test_gt_as_detections_gives_ap_1(tmp_path):
  people = gt_people()
  results = coco_eval.coco_results(people, SK)
  assert len(results) == sum(len(v) for v in people.values()) == 86
  assert all(len(r["keypoints"]) == 51 for r in results)
  metrics = coco_eval.coco_eval(ANNOTATIONS, results, verbose=False)
  assert metrics["AP"] == pytest.approx(1.0) and metrics["AR"] == pytest.approx(1.0)
  assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP75"] == pytest.approx(1.0)
  coco_eval.write_results(str(tmp_path), metrics, results)
  assert set(json.load(open(tmp_path / "metrics.json"))) == set(coco_eval.METRICS)
  rows = list(csv.DictReader(open(tmp_path / "results.csv")))
  assert [r["metric"] for r in rows] == ["AP"] * 5 + ["AR"] * 5
  assert [r["area"] for r in rows[:5]] == ["all", "all", "all", "medium", "large"]
  assert rows[1]["IoU"] == "0.50" and rows[0]["maxDets"] == "20"
  assert float(rows[0]["score"]) == pytest.approx(1.0)
  assert json.load(open(tmp_path / "detections_coco.json")) == results


def test_float_coordinates_are_kept_and_errors_cost_ap():
  exact = coco_eval.coco_results(gt_people(0.4), SK)
  assert any(v % 1 for r in exact for v in r["keypoints"])     # sub-pixel values survive
  shifted = coco_eval.coco_eval(ANNOTATIONS, coco_eval.coco_results(gt_people(6.0), SK),
                               verbose=False)
  assert shifted["AP"] < 0.9
  assert coco_eval.coco_eval(ANNOTATIONS, [], verbose=False)["AP"] == 0.0


def test_neck_is_dropped_and_joints_map_by_name():
  kp = np.zeros((18, 3))
  kp[1] = (50, 50, 0.9)            # neck: not a COCO joint
  kp[15] = (10, 20, 0.8)           # left_eye -> COCO index 1
  (r,) = coco_eval.coco_results({7: [{"keypoints": kp, "score": 0.5}]}, SK)
  k = np.asarray(r["keypoints"]).reshape(17, 3)
  assert k[1].tolist() == [10, 20, 1] and (k[np.arange(17) != 1] == 0).all()
  assert r["image_id"] == 7 and r["category_id"] == 1 and r["score"] == 0.5
