"""dataset_convert on real COCO annotations (tests/data/coco_mini) and on hand-made cases."""

import collections
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from bpnet_jax import cli
from bpnet_jax.config import default_config
from bpnet_jax.data import convert, records, synthetic
from bpnet_jax.data.dataset_spec import SpecError, coco_spec_dict, load_spec
from bpnet_jax.data.records import Visibility
from bpnet_jax.skeleton import load_skeleton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO_MINI = os.path.join(ROOT, "tests", "data", "coco_mini")
ANN = "annotations/person_keypoints_train2017.json"


def make_spec(tmp_path, root=COCO_MINI, ann=ANN, **kw):
  d = coco_spec_dict(root, ("train2017", str(tmp_path / "masks"), ann), None, **kw)
  path = tmp_path / "spec.json"
  path.write_text(json.dumps(d))
  return str(path)


def independent_count(ann_path, min_kpts=5, min_size=32, ratio=0.3):
  """Counts written from the COCO JSON without the library (a plain reading of the rules)."""
  d = json.load(open(ann_path))
  by_image = collections.defaultdict(list)
  for a in d["annotations"]:
    by_image[a["image_id"]].append(a)
  records_per_image = {}
  for iid, anns in by_image.items():
    accepted = []
    for a in anns:
      if a["num_keypoints"] < min_kpts or a["area"] < min_size * min_size:
        continue
      x, y, w, h = a["bbox"]
      cx, cy = x + w / 2, y + h / 2
      if all(((cx - bx) ** 2 + (cy - by) ** 2) ** 0.5 >= r for bx, by, r in accepted):
        accepted.append((cx, cy, ratio * max(w, h)))
    if accepted:
      records_per_image[iid] = len(accepted)
  return dict(images=len(d["images"]), persons=sum(len(v) for v in by_image.values()),
              records=sum(records_per_image.values()), per_image=records_per_image)


def test_coco_mini_counts_match_an_independent_count(tmp_path):
  s = convert.convert(make_spec(tmp_path), str(tmp_path / "out" / "train"), "train", workers=1,
                      no_masks=True)
  ref = independent_count(os.path.join(COCO_MINI, ANN))
  assert (s["images"], s["persons"], s["records"]) == (ref["images"], ref["persons"],
                                                       ref["records"])
  assert s["images_with_records"] == len(ref["per_image"])
  assert s["files"] == ["train-fold-000-of-001"]
  recs = records.read_records([str(tmp_path / "out" / "train-fold-000-of-001")])
  assert len(recs) == ref["records"]
  per_image = collections.Counter(r["image_id"] for r in recs)
  assert per_image == ref["per_image"]
  r = recs[0]
  assert r["joints"].shape[1:] == (18, 2) and r["visibility"].shape[1] == 18
  assert r["image_path"].startswith("train2017/") and r["mask_path"] == ""
  summary = json.load(open(tmp_path / "out" / "train.summary.json"))
  assert summary["records"] == ref["records"]


def test_records_put_the_main_person_first(tmp_path):
  out = str(tmp_path / "train")
  convert.convert(make_spec(tmp_path), out, "train", workers=1, no_masks=True)
  recs = records.read_records([out + "-fold-000-of-001"])
  d = json.load(open(os.path.join(COCO_MINI, ANN)))
  anns = collections.defaultdict(list)
  for a in d["annotations"]:
    anns[a["image_id"]].append(a)
  for r in recs:
    main = anns[r["image_id"]][r["person_idx"]]
    x, y, w, h = main["bbox"]
    np.testing.assert_allclose(r["centers"][0], [x + w / 2, y + h / 2], rtol=1e-5)
    assert r["scales"][0] == pytest.approx(h)
    keypointed = sum(a["num_keypoints"] > 0 for a in anns[r["image_id"]])
    assert len(r["joints"]) == keypointed


def test_masks_mark_crowd_and_unlabelled_people(tmp_path):
  spec = make_spec(tmp_path)
  convert.convert(spec, str(tmp_path / "train"), "train", generate_masks=True, workers=1)
  d = json.load(open(os.path.join(COCO_MINI, ANN)))
  images = {im["id"]: im for im in d["images"]}
  crowd_images = {a["image_id"] for a in d["annotations"] if a["iscrowd"]}
  checked = 0
  for iid in crowd_images:
    im = images[iid]
    h, w = im["height"], im["width"]
    mask = cv2.imread(str(tmp_path / "masks" / (im["file_name"][:-4] + ".png")),
                      cv2.IMREAD_UNCHANGED)
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
    anns = [a for a in d["annotations"] if a["image_id"] == iid]

    def decode(a):
      seg = a["segmentation"]
      rle = (mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list)
             else mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg)
      return mask_utils.decode(rle).astype(bool)
    labelled = np.zeros((h, w), bool)
    for a in anns:
      if not a["iscrowd"] and a["num_keypoints"] > 0:
        labelled |= decode(a)
    for a in anns:
      m = decode(a)
      if a["iscrowd"]:
        assert (mask[m & ~labelled] == 0).all()       # crowd pixels are ignored
        checked += int((m & ~labelled).sum())
      elif a["num_keypoints"] == 0:
        assert (mask[m] == 0).all()                    # unlabelled people are ignored
    outside = np.ones((h, w), bool)
    for a in anns:
      outside &= ~decode(a)
    assert (mask[outside] == 255).all()
  assert checked > 1000


def _fixture_annotations():
  """The ten annotations of the original's test image 1000 (data.md 6.2)."""
  rows = [(1234574, 17, 8720.29, [115.16, 152.13, 83.23, 228.41]),
          (1245349, 5, 1067.95, [405.93, 120.42, 37.13, 45.52]),
          (1259139, 17, 14372.62, [265.33, 95.86, 88.92, 315.88]),
          (1269164, 17, 11511.25, [209.23, 174.64, 99.63, 249.08]),
          (1303041, 13, 22924.64, [504.67, 191.95, 135.33, 288.05]),
          (1304800, 14, 18258.98, [410.2, 208.53, 114.9, 271.47]),
          (1306228, 14, 10821.64, [380.85, 159.91, 88.44, 319.25]),
          (1311471, 17, 17125.50, [330.07, 154.25, 83.05, 313.88]),
          (1316935, 11, 3814.87, [410.75, 107.03, 88.09, 121.16]),
          (1318642, 17, 6804.27, [183.4, 121.34, 95.77, 272.75])]
  return [{"id": i, "image_id": 1000, "category_id": 1, "iscrowd": 0, "num_keypoints": n,
           "area": area, "bbox": bbox, "keypoints": [0] * 51, "segmentation": []}
          for i, n, area, bbox in rows]


def test_interperson_distance_uses_the_accepted_persons_size():
  from bpnet_jax.data.dataset_spec import DatasetSpec
  spec = DatasetSpec(path="x", dataset="coco", root="/", splits={}, duplicate_each_person=True,
                     keypoints=(), visibility_map={}, min_height=32, min_width=32, min_kpts=5,
                     min_dist_ratio=0.3)
  # The original picked #7 (radius from the image's last annotation); the intended rule #8.
  assert convert.select_main_persons(_fixture_annotations(), spec) == [0, 1, 2, 4, 5, 8]


def test_17_to_18_conversion_and_the_neck(tmp_path):
  spec = load_spec(make_spec(tmp_path))
  sk = load_skeleton()
  kp = np.zeros((3, 17, 3))
  kp[:, :, 0] = np.arange(17) * 10 + 1
  kp[:, :, 1] = np.arange(17) * 10 + 2
  kp[:, :, 2] = 2
  kp[1, 5, 2] = 0            # person 1: left shoulder not labelled
  kp[2, 6, 2] = 1            # person 2: right shoulder occluded
  joints, vis = convert.convert_keypoints(kp.reshape(3, -1), spec, sk)
  src = [0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]
  for j, s in enumerate(src):
    if s >= 0:
      np.testing.assert_allclose(joints[0, j], kp[0, s, :2])
  neck = sk.joint_index("neck")
  np.testing.assert_allclose(joints[0, neck], (kp[0, 5, :2] + kp[0, 6, :2]) / 2)
  assert vis[0, neck] == Visibility.VISIBLE
  assert vis[1, neck] == Visibility.NOT_LABELED           # the original drew it anyway
  assert vis[2, neck] == Visibility.OCCLUDED              # the weaker shoulder
  assert vis[1, sk.joint_index("left_shoulder")] == Visibility.NOT_LABELED
  assert vis[2, sk.joint_index("right_shoulder")] == Visibility.OCCLUDED


def _write_ann(tmp_path, mutate):
  d = json.load(open(os.path.join(COCO_MINI, ANN)))
  mutate(d)
  path = tmp_path / "ann.json"
  path.write_text(json.dumps(d))
  return make_spec(tmp_path, ann=str(path))


def test_bad_annotations_are_skipped_and_counted(tmp_path):
  def mutate(d):
    good = [a for a in d["annotations"] if a["num_keypoints"] >= 10]
    good[0]["keypoints"] = good[0]["keypoints"][:-3]       # 16 keypoints
    good[1]["image_id"] = 123456789                          # unknown image
    del good[2]["bbox"]
  s = convert.convert(_write_ann(tmp_path, mutate), str(tmp_path / "o"), "train", workers=1,
                      no_masks=True)
  assert s["skipped"]["bad_keypoints_length"] == 1
  assert s["skipped"]["unknown_image_id"] == 1
  assert s["skipped"]["missing_bbox"] == 1


def test_empty_result_fails_and_writes_nothing(tmp_path):
  spec = make_spec(tmp_path, min_kpts=100)
  with pytest.raises(SpecError, match="no records left"):
    convert.convert(spec, str(tmp_path / "out" / "train"), "train", workers=1, no_masks=True)
  assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


@pytest.mark.parametrize("content, message", [("{not json", "not valid JSON"),
                                              ('{"images": []}', "'annotations'")])
def test_malformed_annotation_file(tmp_path, content, message):
  path = tmp_path / "bad.json"
  path.write_text(content)
  with pytest.raises(SpecError, match=message) as e:
    convert.convert(make_spec(tmp_path, ann=str(path)), str(tmp_path / "o"), "train")
  assert str(path) in str(e.value)


def test_check_files_drops_missing_and_undecodable_images(tmp_path):
  root = tmp_path / "root"
  shutil.copytree(COCO_MINI, root)
  present = sorted(os.listdir(root / "train2017"))
  (root / "train2017" / present[0]).write_bytes(b"not a jpeg")
  spec = make_spec(tmp_path, root=str(root))
  s = convert.convert(spec, str(tmp_path / "o"), "train", check_files=True, workers=2,
                      no_masks=True)
  ref = independent_count(os.path.join(COCO_MINI, ANN))
  d = json.load(open(os.path.join(COCO_MINI, ANN)))
  names = {im["id"]: im["file_name"] for im in d["images"]}
  with_records = set(ref["per_image"])
  missing = sum(1 for i in with_records if names[i] not in present)
  assert s["skipped"]["image_missing"] == missing
  assert s["skipped"]["image_unreadable"] == (1 if any(names[i] == present[0]
                                                       for i in with_records) else 0)
  kept = {i for i in with_records if names[i] in present[1:]}
  assert s["records"] == sum(ref["per_image"][i] for i in kept)


def test_partitions_and_shards(tmp_path):
  s = convert.convert(make_spec(tmp_path), str(tmp_path / "o"), "train", num_partitions=2,
                      num_shards=2, workers=1, no_masks=True)
  assert s["files"] == ["o-fold-000-of-002-shard-00000-of-00002",
                        "o-fold-000-of-002-shard-00001-of-00002",
                        "o-fold-001-of-002-shard-00000-of-00002",
                        "o-fold-001-of-002-shard-00001-of-00002"]
  total = sum(len(records.read_records([str(tmp_path / f)])) for f in s["files"])
  assert total == s["records"]


def test_cli_dataset_convert(tmp_path):
  spec = make_spec(tmp_path)
  cmd = [sys.executable, "-m", "bpnet_jax.cli", "dataset_convert", "-d", spec, "-o",
         str(tmp_path / "r" / "train"), "--generate_masks", "--num_workers", "2"]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert r.returncode == 0, r.stderr
  assert "records from" in r.stdout
  assert len(os.listdir(tmp_path / "masks")) == 36
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert r.returncode == 2 and "already exists" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# Strict masks, people beyond max_people, parallel conversion (issue 14), on a tiny synthetic
# dataset (crowds and unlabelled people included).

SYN_W, SYN_H, SYN_IMAGES = 96, 72, 10
SYN_ANN = "annotations/person_keypoints_train.json"


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
  """A tiny synthetic COCO-layout dataset without masks: its data dir."""
  data = str(tmp_path_factory.mktemp("syn") / "data")
  synthetic.make_synthetic(data, SYN_IMAGES, seed=3, width=SYN_W, height=SYN_H,
                           test_fraction=0, progress=False)
  return data


def syn_spec(data, tmp_path, masks):
  """A spec of the synthetic data's train split with masks in `masks` (absolute)."""
  d = coco_spec_dict(data, ("train", str(masks), SYN_ANN), None, min_size=8)
  path = tmp_path / f"spec_{os.path.basename(str(masks))}.json"
  path.write_text(json.dumps(d))
  return str(path)


def _tree(path):
  """{relative path: bytes} of every file under path."""
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      full = os.path.join(root, f)
      out[os.path.relpath(full, path)] = open(full, "rb").read()
  return out


def test_missing_masks_fail_in_one_line_without_no_masks(syn, tmp_path):
  spec = syn_spec(syn, tmp_path, tmp_path / "masks")
  with pytest.raises(SpecError) as e:
    convert.convert(spec, str(tmp_path / "out" / "train"), "train", workers=1)
  msg = str(e.value)
  d = json.load(open(os.path.join(syn, SYN_ANN)))
  first = d["images"][0]      # every synthetic image has records; the first is named
  assert "\n" not in msg and "split 'train'" in msg and f"image {first['id']}" in msg
  assert first["file_name"] in msg and "--generate_masks" in msg and "--no_masks" in msg
  stem = os.path.splitext(first["file_name"])[0]
  assert str(tmp_path / "masks" / (stem + ".png")) in msg and stem + ".jpg" in msg
  assert not (tmp_path / "out").exists() and not (tmp_path / "masks").exists()


def test_cli_missing_masks_is_one_line_and_writes_nothing(syn, tmp_path, capsys):
  spec = syn_spec(syn, tmp_path, tmp_path / "masks")
  out = tmp_path / "r" / "train"
  status = cli.main(["dataset_convert", "-d", spec, "-o", str(out), "--num_workers", "1"])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1
  assert "bpnet dataset_convert: error:" in err[0] and "--no_masks" in err[0]
  assert not (tmp_path / "r").exists()
  status = cli.main(["dataset_convert", "-d", spec, "-o", str(out), "--no_masks",
                     "--generate_masks"])
  assert status == 2 and "contradict" in capsys.readouterr().err


def test_no_masks_records_and_summary_say_so(syn, tmp_path, capsys):
  spec = syn_spec(syn, tmp_path, tmp_path / "masks")
  out = tmp_path / "r" / "train"
  assert cli.main(["dataset_convert", "-d", spec, "-o", str(out), "--no_masks",
                   "--num_workers", "1"]) == 0
  assert "masks: none (--no_masks)" in capsys.readouterr().out
  s = json.load(open(str(out) + ".summary.json"))
  assert s["no_masks"] is True and s["masks"] == "none" and s["mask_sources"] == {"none": 10}
  recs = records.read_records([str(out) + "-fold-000-of-001"])
  assert recs and all(r["no_masks"] is True and r["mask_path"] == "" for r in recs)


def test_existing_png_and_original_jpg_masks_are_used(syn, tmp_path):
  masks = tmp_path / "masks"
  spec = syn_spec(syn, tmp_path, masks)
  convert.convert(spec, str(tmp_path / "gen" / "train"), "train", generate_masks=True,
                  workers=1)
  pngs = sorted(os.listdir(masks))
  # Half the masks as the original TAO converter left them: lossy JPEG under the image's name.
  for name in pngs[::2]:
    m = cv2.imread(str(masks / name), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(masks / (name[:-4] + ".jpg")), m, [cv2.IMWRITE_JPEG_QUALITY, 95])
    os.remove(masks / name)
  s = convert.convert(spec, str(tmp_path / "out" / "train"), "train", workers=1)
  assert s["masks"] == "files" and s["no_masks"] is False
  assert s["mask_sources"] == {"jpg": len(pngs[::2]), "png": len(pngs[1::2])}
  recs = records.read_records([str(tmp_path / "out" / "train-fold-000-of-001")])
  stems = {n[:-4]: n for n in os.listdir(masks)}
  for r in recs:
    stem = os.path.splitext(os.path.basename(r["image_path"]))[0]
    assert r["mask_path"] == os.path.join(str(masks), stems[stem]) and not r["no_masks"]


def test_max_people_overflow_is_counted(syn, tmp_path):
  spec = syn_spec(syn, tmp_path, tmp_path / "masks")
  s = convert.convert(spec, str(tmp_path / "o"), "train", workers=1, no_masks=True,
                      max_people=2)
  recs = records.read_records([str(tmp_path / "o-fold-000-of-001")])
  people = [len(r["joints"]) for r in recs]          # records keep every person
  assert s["max_people"] == 2 and s["records_over_max_people"] == sum(n > 2 for n in people)
  assert s["people_over_max_people"] == sum(max(0, n - 2) for n in people) > 0
  default = convert.convert(spec, str(tmp_path / "d"), "train", workers=1, no_masks=True)
  assert default["max_people"] == default_config().dataloader.max_people
  assert default["people_over_max_people"] == 0


def test_parallel_conversion_equals_serial_byte_for_byte(syn, tmp_path, monkeypatch):
  monkeypatch.setattr(convert, "MIN_IMAGES_FOR_WORKERS", 1)     # workers even for 10 images
  in_this_process = []
  real = convert.convert_image
  monkeypatch.setattr(convert, "convert_image",
                      lambda ctx, job: in_this_process.append(job.image_id) or real(ctx, job))
  masks, out = tmp_path / "masks", tmp_path / "out"
  spec = syn_spec(syn, tmp_path, masks)
  outputs = {}
  for workers in (1, 2):      # the same paths both times: records name their masks' paths
    in_this_process.clear()
    convert.convert(spec, str(out / "train"), "train", generate_masks=True, num_partitions=2,
                    workers=workers)
    assert len(in_this_process) == (SYN_IMAGES if workers == 1 else 0)   # 2: all in workers
    outputs[workers] = (_tree(out), _tree(masks))
    shutil.rmtree(out)
    shutil.rmtree(masks)
  (recs1, masks1), (recs2, masks2) = outputs[1], outputs[2]
  assert len(masks1) == SYN_IMAGES and len(recs1) == 3       # 2 record files + the summary
  assert recs1 == recs2 and masks1 == masks2
