"""experiments/sample_calibration_images.py on the real coco_mini annotations."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
ANN = os.path.join(ROOT, "tests/data/coco_mini/annotations/person_keypoints_train2017.json")

import sample_calibration_images as s  # noqa: E402


def test_selection_rules_and_exact_count():
  data = json.load(open(ANN))
  picked = s.select(data, 5, 1, 5, False, 0)
  assert len(picked) == 5                          # exactly n (the original gave n + 1)
  counts = {}
  for a in data["annotations"]:
    if not a["iscrowd"] and a["num_keypoints"] >= 5:
      counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
  assert all(counts.get(im["id"], 0) >= 1 for im in picked)
  crowded = s.select(data, 100, 3, 5, False, 0)
  assert crowded and all(counts[im["id"]] >= 3 for im in crowded)
  a = s.select(data, 10, 1, 5, True, 1)
  assert a == s.select(data, 10, 1, 5, True, 1) and a != s.select(data, 10, 1, 5, True, 2)


def test_copies_the_images(tmp_path):
  root = os.path.join(ROOT, "tests/data/coco_mini/train2017")
  present = set(os.listdir(root))
  data = json.load(open(ANN))
  data["images"] = [im for im in data["images"] if im["file_name"] in present]
  ann = tmp_path / "ann.json"
  ann.write_text(json.dumps(data))
  out = tmp_path / "cal"
  r = subprocess.run([sys.executable, "experiments/sample_calibration_images.py", "-a", str(ann),
                      "-i", root, "-o", str(out), "-n", "3"], cwd=ROOT, capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stderr
  assert len(os.listdir(out)) == 3
  r = subprocess.run([sys.executable, "experiments/sample_calibration_images.py", "-a", str(ann),
                      "-i", root, "-o", str(out), "-n", "3"], cwd=ROOT, capture_output=True,
                     text=True)
  assert r.returncode != 0 and "is not empty" in r.stderr
