import hashlib
import json
import os

import numpy as np
import pytest

from bpnet_jax.data import convert, records, synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("s") / "synth")
  counts = synthetic.make_synthetic(out, 40, seed=7, width=160, height=120, progress=False)
  return out, counts


def _digest(out):
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(out)):
    for f in sorted(files):
      h.update(f.encode())
      h.update(open(os.path.join(root, f), "rb").read())
  return h.hexdigest()


def test_deterministic_from_the_seed(synth, tmp_path):
  out, _ = synth
  again = str(tmp_path / "again")
  synthetic.make_synthetic(again, 40, seed=7, width=160, height=120, progress=False)
  assert _digest(out) == _digest(again)
  other = str(tmp_path / "other")
  synthetic.make_synthetic(other, 40, seed=8, width=160, height=120, progress=False)
  assert _digest(out) != _digest(other)


def test_contents_cover_what_training_must_handle(synth):
  out, counts = synth
  assert counts["train"]["images"] == 32 and counts["test"]["images"] == 8
  d = json.load(open(os.path.join(out, "annotations", "person_keypoints_train.json")))
  per_image = {}
  vis = []
  for a in d["annotations"]:
    per_image.setdefault(a["image_id"], []).append(a)
    assert len(a["keypoints"]) == 51 and len(a["bbox"]) == 4 and a["area"] > 0
    k = np.array(a["keypoints"]).reshape(17, 3)
    assert a["num_keypoints"] == int((k[:, 2] > 0).sum())
    if not a["iscrowd"]:
      assert isinstance(a["segmentation"], list) and a["segmentation"]
      vis.extend(k[:, 2].tolist())
    else:
      assert isinstance(a["segmentation"]["counts"], list)
  people = [sum(not a["iscrowd"] for a in v) for v in per_image.values()]
  assert 1 <= min(people) and max(people) <= 6
  assert counts["train"]["unlabelled_people"] > 0 and counts["train"]["crowd_regions"] > 0
  assert {0, 1, 2} <= set(vis)            # out-of-image, occluded and visible joints
  heights = [a["bbox"][3] / 120 for a in d["annotations"] if a["num_keypoints"] >= 10]
  assert min(heights) < 0.3 and max(heights) > 0.5
  for im in d["images"]:
    assert os.path.exists(os.path.join(out, "train", im["file_name"]))


def test_converts_through_the_coco_path(synth, tmp_path):
  out, _ = synth
  s = convert.convert(os.path.join(out, "dataset_spec.json"), str(tmp_path / "train"), "train",
                      generate_masks=True, check_files=True, workers=1)
  assert s["records"] > 20 and not {"image_missing", "image_unreadable"} & set(s["skipped"])
  recs = records.read_records([str(tmp_path / "train-fold-000-of-001")])
  assert all(r["mask_path"].startswith("train_mask/") for r in recs)
  t = convert.convert(os.path.join(out, "dataset_spec.json"), str(tmp_path / "test"), "test",
                      workers=1, no_masks=True)
  assert t["images"] == 8


def test_refuses_to_overwrite(synth):
  out, _ = synth
  with pytest.raises(FileExistsError):
    synthetic.make_synthetic(out, 2, progress=False)


def test_demo_style_has_few_large_part_coloured_people(tmp_path):
  import cv2
  out = str(tmp_path / "demo")
  counts = synthetic.make_synthetic(out, 10, seed=3, width=320, height=240, test_fraction=0,
                                    progress=False, style="demo")
  c = counts["train"]
  assert c["unlabelled_people"] == 0 and c["crowd_regions"] == 0
  d = json.load(open(os.path.join(out, "annotations", "person_keypoints_train.json")))
  per_image = {}
  for a in d["annotations"]:
    per_image.setdefault(a["image_id"], []).append(a)
  assert all(1 <= len(v) <= 3 for v in per_image.values()) and len(per_image) == 10
  assert np.median([a["bbox"][3] / 240 for a in d["annotations"]]) > 0.35
  # The largest (last-drawn) person's limbs show their part colours (JPEG: within 60 per channel).
  names = {n: i for i, n in enumerate(synthetic.COCO_KEYPOINTS)}
  hits = total = 0
  for im in d["images"]:
    img = cv2.imread(os.path.join(out, "train", im["file_name"])).astype(int)
    a = max(per_image[im["id"]], key=lambda a: a["bbox"][3])
    k = np.array(a["keypoints"]).reshape(17, 3)
    for seg in synthetic.SEGMENTS[:8]:
      i, j = names[seg[0]], names[seg[1]]
      if k[i, 2] == 2 and k[j, 2] == 2:
        x, y = np.round((k[i, :2] + k[j, :2]) / 2).astype(int)
        total += 1
        hits += int(np.abs(img[y, x] - synthetic.PART_COLOURS[seg]).max() <= 60)
  assert total >= 20 and hits >= 0.7 * total
  with pytest.raises(ValueError, match="style"):
    synthetic.make_synthetic(str(tmp_path / "x"), 2, style="nope", progress=False)
