"""DetectNet_v2 synthetic KITTI scenes: deterministic, valid labels, convertible as written."""

import hashlib
import os

import cv2
import numpy as np
import pytest

from bpnet_jax.detectnet_v2 import convert, records, synthetic

W, H = 128, 96


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("s") / "synth")
  counts = synthetic.make_synthetic(out, 16, seed=5, width=W, height=H, val_fraction=0.25)
  return out, counts


def _digest(folder):
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(folder)):
    for f in sorted(files):
      h.update(os.path.relpath(os.path.join(root, f), folder).encode())
      h.update(open(os.path.join(root, f), "rb").read())
  return h.hexdigest()


def test_same_seed_same_bytes(synth, tmp_path):
  out, counts = synth
  again = str(tmp_path / "again")
  assert synthetic.make_synthetic(again, 16, seed=5, width=W, height=H,
                                  val_fraction=0.25)["objects"] == counts["objects"]
  assert _digest(again) == _digest(out)
  other = str(tmp_path / "other")
  synthetic.make_synthetic(other, 16, seed=6, width=W, height=H, val_fraction=0.25)
  assert _digest(other) != _digest(out)


def test_labels_parse_and_boxes_lie_inside_the_images(synth):
  out, counts = synth
  names = sorted(os.listdir(os.path.join(out, "images")))
  assert names == [f"{i:06d}.png" for i in range(16)]
  seen = {"car": 0, "pedestrian": 0, "cyclist": 0, "dontcare": 0}
  heights, occluded, truncated = [], 0, 0
  for name in names:
    img = cv2.imread(os.path.join(out, "images", name))
    assert img.shape == (H, W, 3)
    label = os.path.join(out, "labels", name.replace(".png", ".txt"))
    assert all(len(line.split()) == 15 for line in open(label))
    objs, skipped = convert.parse_kitti_labels(label)
    assert skipped == {}
    boxes = np.array(objs["boxes"], np.float64).reshape(-1, 4)
    assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2] <= W) and np.all(boxes[:, 3] <= H)
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
    for c, occ, trunc, box in zip(objs["classes"], objs["occlusion"], objs["truncation"], boxes):
      seen[c] += 1
      if c == "dontcare":
        assert (occ, trunc) == (-1, -1)
        continue
      assert occ in (0, 1, 2) and 0 <= trunc < 1
      heights.append(box[3] - box[1])
      occluded += occ > 0
      truncated += trunc > 0
  assert seen == {"dontcare": counts["dontcare_regions"],
                  **{c.lower(): n for c, n in counts["objects"].items()}}
  assert all(seen.values())                              # every class and DontCare appear
  assert occluded == counts["occluded"] > 0 and truncated == counts["truncated"] > 0
  assert min(heights) < 0.15 * H and max(heights) > 0.5 * H   # small and large objects


def test_the_written_spec_converts(synth, tmp_path):
  out, counts = synth
  s = convert.convert(os.path.join(out, "dataset_convert_spec.json"), str(tmp_path / "r" / "t"))
  assert [f["frames"] for f in s["folds"]] == [counts["val_images"], counts["train_images"]]
  assert counts["val_images"] == 4
  assert s["class_names"] == ["car", "pedestrian", "cyclist"]
  assert s["objects_per_class"] == {"dontcare": counts["dontcare_regions"],
                                    **{c.lower(): n for c, n in counts["objects"].items()}}
  recs = records.read([os.path.join(tmp_path, "r", f) for f in s["files"]])
  assert len(recs) == 16 and all((r["height"], r["width"]) == (H, W) for r in recs)
  for r in recs:
    np.testing.assert_array_equal(r["class_ids"] == -1, r["dontcare"])


def test_refuses_to_overwrite(synth, tmp_path):
  out, _ = synth
  with pytest.raises(FileExistsError):
    synthetic.make_synthetic(out, 2, width=W, height=H)
  jpg = str(tmp_path / "jpg")
  synthetic.make_synthetic(jpg, 2, width=W, height=H, image_format="jpg")
  assert sorted(os.listdir(os.path.join(jpg, "images"))) == ["000000.jpg", "000001.jpg"]
  c = synthetic.make_synthetic(jpg, 3, width=W, height=H, overwrite=True)
  assert c["images"] == 3 and len(os.listdir(os.path.join(jpg, "images"))) == 3
