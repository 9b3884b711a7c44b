"""DetectNet_v2 dataset_convert: the original's fold/shard rules, KITTI and COCO fixtures."""

import json
import os
import random

import cv2
import numpy as np
import pytest

from bpnet_jax.detectnet_v2 import convert, records
from bpnet_jax.errors import DataError

# ---------------------------------------------------------------------------------------------
# Folds and shards.


def _seqs():
  """The original's test map: sequence k (1..5) has frames range(k)."""
  return {k: list(range(k)) for k in range(1, 6)}


def r(n):
  return list(range(n))


@pytest.mark.parametrize("num_partitions,expected", [
    # The original's unit cases (test_kitti_converter_lib.py), after its fold-list reversal.
    (1, [r(1) + r(2) + r(3) + r(4) + r(5)]),
    (2, [r(4) + r(2), r(5) + r(3) + r(1)]),
    (3, [r(3), r(4) + r(1), r(5) + r(2)]),
    (5, [r(1), r(2), r(3), r(4), r(5)]),
])
def test_sequence_partitions_are_the_originals(num_partitions, expected):
  assert convert.partition_sequences(_seqs(), num_partitions) == expected


def test_sequence_partitions_zero_means_one_and_ties_break_by_name():
  assert convert.partition_sequences(_seqs(), 0) == [r(1) + r(2) + r(3) + r(4) + r(5)]
  seqs = {"b": [1, 2], "a": [3, 4], "c": [5]}
  assert convert.partition_sequences(seqs, 2) == [[1, 2], [3, 4, 5]]


def test_shards_take_len_div_n_and_the_last_takes_the_remainder():
  assert convert.shard_partition(r(10), 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
  assert convert.shard_partition(r(2), 3) == [[], [], [0, 1]]
  assert convert.shard_partition(r(3), 0) == [[0, 1, 2]]
  assert convert.shard_partition([], 2) == [[], []]


def test_random_split_is_the_head_of_the_sorted_names():
  names = [f"{i:06d}" for i in range(7481)][::-1]
  val, train = convert.partition_random(names, 14)       # the shipped KITTI random split
  assert len(val) == 1047 and val == sorted(names)[:1047] and len(train) == 7481 - 1047
  assert convert.partition_random(["b", "a"], 0) == [[], ["a", "b"]]
  with pytest.raises(DataError, match="val_split"):
    convert.partition_random(["a"], 100)


def test_shuffles_reproduce_pythons_seeded_random():
  s, ref = convert.OriginalShuffler(), random.Random(42)
  x, y = r(50), r(50)
  s.shuffle(x)
  ref.shuffle(y)
  assert x == y
  # Computed: the legacy random.shuffle(x, random.random) after random.seed(42).
  s = convert.OriginalShuffler()
  x = ["000000", "000001", "000012"]
  s.shuffle_legacy(x)
  assert x == ["000012", "000000", "000001"]


def test_fold_order_is_pinned():
  # Computed with the original procedure (seed 42, shuffle per fold, then the legacy shuffle).
  names = [f"{i:06d}" for i in range(10)]
  assert convert.kitti_folds("random", 2, 20, names=names) == [
      ["000001", "000000"],
      ["000004", "000006", "000008", "000003", "000007", "000009", "000005", "000002"]]
  assert convert.kitti_folds("sequence", 0, sequence_to_frames={"0": ["a", "b", "c"]}) == \
      [["c", "a", "b"]]


def test_fold_errors():
  with pytest.raises(DataError, match="must be 2 in random mode"):
    convert.kitti_folds("random", 3, 20, names=["a"])
  with pytest.raises(DataError, match="'random' or 'sequence'"):
    convert.kitti_folds("bogus", 2)


def test_record_file_names_follow_the_original():
  assert records.record_file_name("o/p", 1, 2, 3, 10) == "o/p-fold-001-of-002-shard-00003-of-00010"
  assert records.record_file_name("o/p", 1, 2) == "o/p-fold-001-of-002"
  assert records.record_file_name("o/p", 0, 0, 2, 4) == "o/p-shard-00002-of-00004"
  assert records.record_file_name("o/p", 0, 0) == "o/p"


# ---------------------------------------------------------------------------------------------
# KITTI fixture.

# Frame 000001 of the original's converter fixture (classes, box, truncation, occlusion pinned in
# its tests; the other fields are filler).
FRAME_1 = [
    ("Truck", 0.0, 0, 599.41, 156.40, 629.75, 189.25),
    ("Car", 0.0, 0, 387.63, 181.54, 423.81, 203.12),
    ("Cyclist", 0.0, 3, 676.60, 163.95, 688.98, 193.93),
    ("DontCare", -1, -1, 503.89, 169.71, 590.61, 190.13),
    ("DontCare", -1, -1, 511.35, 174.96, 527.81, 187.45),
    ("DontCare", -1, -1, 532.37, 176.35, 542.68, 185.27),
    ("DontCare", -1, -1, 559.62, 175.83, 575.40, 183.15),
]
SIZES = {"000000": (370, 1224), "000001": (375, 1242), "000012": (375, 1242), "000099": (40, 60)}


def _line(cls, trunc, occ, x1, y1, x2, y2):
  return f"{cls} {trunc:.2f} {occ} -1.50 {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f} " \
         "1.50 1.60 3.90 1.00 1.50 20.00 0.10"


def make_kitti(root):
  """A small KITTI tree: 4 images (one with an empty label file), skipped boxes, stray files."""
  os.makedirs(root / "image_2")
  os.makedirs(root / "label_2")
  for stem, (h, w) in SIZES.items():
    cv2.imwrite(str(root / "image_2" / f"{stem}.png"), np.zeros((h, w), np.uint8))
  cv2.imwrite(str(root / "image_2" / "000005.jpg"), np.zeros((8, 8, 3), np.uint8))  # other ext
  (root / "image_2" / "notes.txt").write_text("not an image")
  (root / "label_2" / "000000.txt").write_text(
      _line("Pedestrian", 0.0, 0, 712.40, 143.00, 810.73, 307.92) + "\n")
  (root / "label_2" / "000001.txt").write_text("".join(_line(*o) + "\n" for o in FRAME_1))
  (root / "label_2" / "000012.txt").write_text("\n".join([
      _line("Car", 0.0, 0, 10.0, 20.0, 50.0, 60.0),
      "",                                                    # blank lines are ignored
      _line("Van", 0.5, 1, 100.2, 20.0, 100.9, 60.0),        # int(x1) == int(x2): skipped
      _line("Car", 0.0, 0, 10.0, 20.0, 50.0, 60.0),
      _line("car", 0.0, 2, 80.0, 40.5, 90.0, 40.7),          # int(y1) == int(y2): skipped
      _line("Van", 0.1, 1, 60.0, 20.0, 70.0, 60.0),
  ]) + "\n")
  (root / "label_2" / "000099.txt").write_text("")
  return root


def kitti_spec(root, **kw):
  kc = {"root_directory_path": str(root), "image_dir_name": "image_2",
        "label_dir_name": "label_2", "image_extension": ".png", "partition_mode": "random",
        "num_partitions": 2, "val_split": 25, "num_shards": 0}
  kc.update(kw)
  return {"kitti_config": kc, "image_directory_path": str(root)}


MAPPING = {"car": "car", "van": "car", "pedestrian": "pedestrian", "cyclist": "cyclist"}


@pytest.fixture
def kitti(tmp_path):
  return make_kitti(tmp_path / "kitti")


def test_kitti_conversion(kitti, tmp_path):
  spec = dict(kitti_spec(kitti), target_class_mapping=MAPPING)
  out = str(tmp_path / "out" / "kitti")
  s = convert.convert_kitti(spec, out)
  # Fold 0 = the first int(0.25 * 4) = 1 name; fold 1 in the pinned shuffled order.
  order = convert.kitti_folds("random", 2, 25, names=sorted(SIZES))
  assert order[0] == ["000000"]
  assert s["files"] == ["kitti-fold-000-of-002", "kitti-fold-001-of-002"]
  val = records.read([out + "-fold-000-of-002"])
  train = records.read([out + "-fold-001-of-002"])
  assert [r["frame_id"] for r in val] == ["image_2/000000"]
  assert [r["frame_id"] for r in train] == [f"image_2/{f}" for f in order[1]]
  assert s["objects_per_class"] == {"car": 3, "cyclist": 1, "dontcare": 4, "pedestrian": 1,
                                    "truck": 1, "van": 1}
  assert [f["objects_per_class"] for f in s["folds"]] == [
      {"pedestrian": 1}, {"car": 3, "cyclist": 1, "dontcare": 4, "truck": 1, "van": 1}]
  assert [f["frames"] for f in s["folds"]] == [1, 3] and s["frames"] == 4
  assert s["class_map"] == {"Car": "car", "Cyclist": "cyclist", "DontCare": "dontcare",
                            "Pedestrian": "pedestrian", "Truck": "truck", "Van": "van"}
  assert s["class_names"] == ["car", "pedestrian", "cyclist"]
  assert s["skipped"] == {"invalid_box": 2} and s["empty_folds"] == []
  assert json.load(open(out + ".summary.json")) == s

  # The warning file: label file + object index (among non-empty lines) -> int box.
  label = os.path.join(str(kitti), "label_2", "000012.txt")
  assert json.load(open(out + "_warning.json")) == {
      f"{label}_1": [100, 20, 100, 60], f"{label}_3": [80, 40, 90, 40]}

  by_id = {r["frame_id"]: r for r in val + train}
  f1 = by_id["image_2/000001"]
  assert f1["classes"] == ["truck", "car", "cyclist"] + ["dontcare"] * 4
  np.testing.assert_array_equal(f1["boxes"], np.array([o[3:] for o in FRAME_1], np.float32))
  assert f1["boxes"].dtype == np.float32 and f1["boxes"].shape == (7, 4)
  np.testing.assert_array_equal(f1["truncation"], [0, 0, 0, -1, -1, -1, -1])
  np.testing.assert_array_equal(f1["occlusion"], [0, 0, 3, -1, -1, -1, -1])
  np.testing.assert_array_equal(f1["dontcare"], [False] * 3 + [True] * 4)
  np.testing.assert_array_equal(f1["class_ids"], [-1, 0, 2, -1, -1, -1, -1])   # truck unmapped
  np.testing.assert_allclose(f1["world_bbox"][0], [1.5, 1.6, 3.9, 1.0, 1.5, 20.0, 0.1],
                             rtol=1e-6)
  assert f1["class_names"] == ["car", "pedestrian", "cyclist"] and f1["source"] == "kitti"
  assert (f1["height"], f1["width"], f1["image_path"]) == (375, 1242, "image_2/000001.png")
  f12 = by_id["image_2/000012"]
  assert f12["classes"] == ["car", "car", "van"]              # van mapped to car
  np.testing.assert_array_equal(f12["class_ids"], [0, 0, 0])
  np.testing.assert_array_equal(f12["occlusion"], [0, 0, 1])
  empty = by_id["image_2/000099"]
  assert empty["classes"] == [] and empty["boxes"].shape == (0, 4)
  assert (empty["height"], empty["width"]) == (40, 60)


def test_records_round_trip(tmp_path):
  rec = records.empty_arrays(2)
  rec.update(source="kitti", frame_id="im/a", image_path="im/a.png", height=5, width=7,
             classes=["car", "dontcare"], class_names=["car"],
             boxes=np.array([[0.5, 1, 2, 3], [1, 1, 4, 4]], np.float32),
             class_ids=np.array([0, -1]), dontcare=np.array([False, True]),
             occlusion=np.array([1, -1]), truncation=np.array([0.25, -1]))
  path = str(tmp_path / "r")
  assert records.write(path, [rec, rec]) == 2
  back = records.read([path])
  assert len(back) == 2
  for k, v in rec.items():
    if isinstance(v, np.ndarray):
      np.testing.assert_array_equal(back[0][k], v)
      assert back[0][k].dtype == records.ARRAY_FIELDS[k][0]
    else:
      assert back[0][k] == v
  with pytest.raises(ValueError, match="im/a.*boxes"):
    records.encode(dict(rec, boxes=np.zeros((3, 4))))


def test_target_class_ids_map_once():
  ids = records.target_class_ids(["person", "car", "bus"], {"person": "pedestrian", "car": "car"},
                                 ["car", "pedestrian"])
  np.testing.assert_array_equal(ids, [1, 0, -1])


def test_kitti_default_class_names_and_shards(kitti, tmp_path):
  out = str(tmp_path / "o")
  s = convert.convert_kitti(kitti_spec(kitti, num_shards=2), out)
  assert s["class_names"] == ["car", "cyclist", "pedestrian", "truck", "van"]   # no dontcare
  assert s["files"] == [f"o-fold-00{p}-of-002-shard-0000{k}-of-00002" for p in (0, 1)
                        for k in (0, 1)]
  # Fold 0 has one frame: shard 0 gets 1 // 2 = 0 frames, shard 1 the remainder.
  assert [len(records.read([os.path.join(tmp_path, f)])) for f in s["files"]] == [0, 1, 1, 2]


def test_no_overwrite_without_the_flag_and_stale_shards_go(kitti, tmp_path):
  out = str(tmp_path / "o")
  convert.convert_kitti(kitti_spec(kitti, num_shards=2), out)
  with pytest.raises(FileExistsError, match="already exists"):
    convert.convert_kitti(kitti_spec(kitti), out)
  s = convert.convert_kitti(kitti_spec(kitti), out, overwrite=True)
  left = sorted(n for n in os.listdir(tmp_path) if n.startswith("o"))
  assert left == sorted(s["files"] + ["o.summary.json", "o_warning.json"])


def test_sequence_mode_names(kitti, tmp_path):
  (kitti / "seq.json").write_text(json.dumps({"s1": ["000012", "000000"], "s0": ["000001"]}))
  s = convert.convert_kitti(kitti_spec(kitti, partition_mode="sequence", num_partitions=0,
                                       kitti_sequence_to_frames_file="seq.json"),
                            str(tmp_path / "a"))
  assert s["files"] == ["a"] and s["frames"] == 3
  frames = [r["frame_id"] for r in records.read([str(tmp_path / "a")])]
  expected = convert.kitti_folds("sequence", 0, sequence_to_frames={
      "s1": ["000012", "000000"], "s0": ["000001"]})[0]
  assert frames == [f"image_2/{f}" for f in expected]
  s = convert.convert_kitti(kitti_spec(kitti, partition_mode="sequence", num_partitions=2,
                                       kitti_sequence_to_frames_file="seq.json"),
                            str(tmp_path / "b"))
  # Longest sequence (s1) to fold 0, then the list reversed: s0 is fold 0.
  assert [f["frames"] for f in s["folds"]] == [1, 2]


def test_val_split_zero_keeps_fold_numbers(kitti, tmp_path):
  s = convert.convert_kitti(kitti_spec(kitti, val_split=0), str(tmp_path / "z"))
  assert s["empty_folds"] == [0] and [f["frames"] for f in s["folds"]] == [0, 4]
  assert records.read([str(tmp_path / "z-fold-000-of-002")]) == []


def test_sample_modifier(kitti, tmp_path):
  spec = kitti_spec(kitti)
  spec["sample_modifier_config"] = {
      "source_to_target_class_mapping": {"car": "car", "van": "car", "pedestrian": "person",
                                         "cyclist": "cyclist", "truck": "truck"},
      "filter_samples_containing_only": ["person"],
      "dominant_target_classes": ["car"], "num_duplicates": 2,
      "minimum_target_class_imbalance": {"truck": 0.5}}
  # Fold 0 (000000: only a pedestrian) is the validation fold: untouched.
  s = convert.convert_kitti(spec, str(tmp_path / "m"), validation_fold=0)
  assert [f["frames"] for f in s["folds"]] == [1, 5]
  # 000001: truck 1 > car 1 x 0.5 -> written 3 times; 000012 (cars and a van) and 000099 once.
  assert s["sample_modifier"] == {"duplicates_added": 2}
  train = records.read([str(tmp_path / "m-fold-001-of-002")])
  assert sorted(r["frame_id"] for r in train).count("image_2/000001") == 3
  # Without -f every fold is modified: the pedestrian-only frame goes.
  spec["sample_modifier_config"]["max_training_samples"] = 4
  s = convert.convert_kitti(spec, str(tmp_path / "n"))
  assert [f["frames"] for f in s["folds"]] == [0, 2]            # cap 4 // 2 folds per fold
  assert s["sample_modifier"]["filtered_frames"] == 1
  with pytest.raises(DataError, match="dominant_target_classes"):
    spec["sample_modifier_config"]["dominant_target_classes"] = ["bus"]
    convert.convert_kitti(spec, str(tmp_path / "x"))


@pytest.mark.parametrize("edit,match", [
    (lambda k: (k / "label_2" / "000000.txt").write_text(_line("Car", 0, 0, 1, 2, 3, 4) + " 0.9"),
     r"000000.txt:1: expected 15 fields"),
    (lambda k: (k / "label_2" / "000000.txt").write_text(
        _line("Car", 0, 0, 1, 2, 3, 4).replace("1.50", "x", 1)), r"000000.txt:1: fields 2-15"),
    (lambda k: (k / "label_2" / "000000.txt").unlink(), r"000000.txt: label file not found"),
    (lambda k: (k / "image_2" / "000099.png").write_bytes(b"junk"), r"000099.png: not a"),
])
def test_kitti_errors_name_the_file(kitti, tmp_path, edit, match):
  edit(kitti)
  with pytest.raises(DataError, match=match) as e:
    convert.convert_kitti(kitti_spec(kitti), str(tmp_path / "o"))
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "o.summary.json")


def test_spec_errors_name_the_key(kitti, tmp_path):
  out = str(tmp_path / "o")
  for kw, match in ((dict(partition_mode="folds"), "partition_mode"),
                    (dict(num_partitions=3), "num_partitions must be 2"),
                    (dict(val_split=100), "val_split"),
                    (dict(num_shards=-1), r"kitti_config.num_shards: expected an integer"),
                    (dict(image_extension="png"), "image_extension must start with"),
                    (dict(point_clouds_dir="velodyne"), "point_clouds_dir"),
                    (dict(image_dirname="x"), r"kitti_config.image_dirname: unknown key")):
    with pytest.raises(DataError, match=match):
      convert.convert_kitti(kitti_spec(kitti, **kw), out)
  with pytest.raises(DataError, match="exactly one of kitti_config and coco_config"):
    convert.convert_kitti({"image_directory_path": "x"}, out)


def test_paths_outside_the_root_are_rejected(kitti, tmp_path):
  (kitti / "seq.json").write_text(json.dumps({"s": ["000000", "../../elsewhere/000001"]}))
  spec = kitti_spec(kitti, partition_mode="sequence", num_partitions=1,
                    kitti_sequence_to_frames_file="seq.json")
  with pytest.raises(DataError, match=r"elsewhere/000001.png: image path .* resolves outside "
                                      r"the dataset root") as e:
    convert.convert_kitti(spec, str(tmp_path / "o"))
  assert "\n" not in str(e.value)
  outside = tmp_path / "outside_images"
  outside.mkdir()
  cv2.imwrite(str(outside / "000000.png"), np.zeros((4, 4), np.uint8))
  with pytest.raises(DataError, match="resolves outside the dataset root"):
    convert.convert_kitti(kitti_spec(kitti, image_dir_name="../outside_images"),
                          str(tmp_path / "o"))
  with pytest.raises(DataError, match="resolves outside the dataset root"):
    convert.convert_kitti(kitti_spec(kitti, image_dir_name=str(outside)), str(tmp_path / "o"))
  assert sorted(os.listdir(tmp_path)) == ["kitti", "outside_images"]


def test_image_size_reads_png_and_jpeg_headers(tmp_path):
  for ext in (".png", ".jpg", ".bmp"):
    p = str(tmp_path / f"a{ext}")
    cv2.imwrite(p, np.zeros((13, 29, 3), np.uint8))
    assert convert.image_size(p) == (13, 29)
  with pytest.raises(DataError, match="image not found"):
    convert.image_size(str(tmp_path / "none.png"))


# ---------------------------------------------------------------------------------------------
# Spec files.

KITTI_TXT = """# the original's text format
kitti_config {
  root_directory_path: "kitti"
  image_dir_name: "image_2"
  label_dir_name: 'label_2'
  image_extension: ".png"
  partition_mode: "random"
  num_partitions: 2
  val_split: 25
  num_shards: 0
}
image_directory_path: "kitti"
target_class_mapping { key: "car" value: "car" }
target_class_mapping { key: "van" value: "car" }
sample_modifier_config {
  filter_samples_containing_only: ["person"]
  dominant_target_classes: "car"
  minimum_target_class_imbalance { key: "truck" value: 0.5 }
  num_duplicates: 1
  source_to_target_class_mapping { key: "pedestrian" value: "person" }
  source_to_target_class_mapping { key: "car" value: "car" }
}
"""


def test_text_format_spec_equals_json(kitti, tmp_path):
  (tmp_path / "spec.txt").write_text(KITTI_TXT)
  spec = convert.load_convert_spec(str(tmp_path / "spec.txt"))
  as_json = {
      "kitti_config": {"root_directory_path": "kitti", "image_dir_name": "image_2",
                       "label_dir_name": "label_2", "image_extension": ".png",
                       "partition_mode": "random", "num_partitions": 2, "val_split": 25,
                       "num_shards": 0},
      "image_directory_path": "kitti",
      "target_class_mapping": {"car": "car", "van": "car"},
      "sample_modifier_config": {
          "filter_samples_containing_only": ["person"], "dominant_target_classes": ["car"],
          "minimum_target_class_imbalance": {"truck": 0.5}, "num_duplicates": 1,
          "source_to_target_class_mapping": {"pedestrian": "person", "car": "car"}}}
  (tmp_path / "spec.json").write_text(json.dumps(as_json))
  assert convert.load_convert_spec(str(tmp_path / "spec.json")) == spec
  assert spec["kitti_config"]["root_directory_path"] == os.path.join(str(tmp_path), "kitti")
  s = convert.convert(str(tmp_path / "spec.txt"), str(tmp_path / "out" / "t"))
  # The modifier acts on every fold (no validation_fold): the pedestrian-only frame is dropped.
  assert s["frames"] == 3 and s["class_names"] == ["car"]


@pytest.mark.parametrize("text,match", [
    ("kitti_config { num_shards: 1 num_shards: 2 }", r"spec.txt: kitti_config.num_shards: given 2"),
    ("kitti_config { val_split: abc }", r"spec.txt: kitti_config.val_split: expected a number"),
    ("kitti_config { image_dir_name: 3 }", "expected a quoted string"),
    ("kitti_config { bogus: 1 }", r"kitti_config.bogus: unknown key"),
    ("kitti_config { num_shards: 1 ", r"spec.txt:1: missing '}'"),
    ('{"kitti_config": ', r"spec.txt: not valid JSON"),
])
def test_spec_file_errors(tmp_path, text, match):
  (tmp_path / "spec.txt").write_text(text)
  with pytest.raises(DataError, match=match):
    convert.load_convert_spec(str(tmp_path / "spec.txt"))


# ---------------------------------------------------------------------------------------------
# COCO fixture.

def make_coco(root):
  cats = [{"id": 1, "name": "Traffic Light"}, {"id": 3, "name": "car"}]
  val = {"images": [{"id": 7, "file_name": "a.jpg", "width": 64, "height": 48},
                    {"id": 8, "file_name": "sub/b.v2.jpg", "width": 32, "height": 32}],
         "annotations": [
             {"id": 70, "image_id": 7, "category_id": 3, "bbox": [1.5, 2, 10, 20], "iscrowd": 0},
             {"id": 71, "image_id": 7, "category_id": 1, "bbox": [5, 5, 0.5, 9]},   # skipped
             {"id": 72, "image_id": 7, "category_id": 3, "bbox": [20, 10, 30, 30], "iscrowd": 1},
             {"id": 73, "image_id": 99, "category_id": 3, "bbox": [0, 0, 5, 5]}],   # no image
         "categories": cats}
  train = {"images": [{"id": i, "file_name": f"{i:03d}.jpg", "width": 40, "height": 30}
                      for i in range(5)],
           "annotations": [{"id": 100 + i, "image_id": i, "category_id": 1 + 2 * (i % 2),
                            "bbox": [i, i, 4, 6]} for i in range(4)],
           "categories": cats[::-1]}
  os.makedirs(root / "annotations")
  (root / "annotations" / "val.json").write_text(json.dumps(val))
  (root / "annotations" / "train.json").write_text(json.dumps(train))
  return root


def coco_spec(root, **kw):
  cc = {"root_directory_path": str(root), "img_dir_names": ["val2017", "train2017"],
        "annotation_files": ["annotations/val.json", "annotations/train.json"],
        "num_partitions": 2, "num_shards": [0, 2]}
  cc.update(kw)
  return {"coco_config": cc}


def test_coco_conversion(tmp_path):
  root = make_coco(tmp_path / "coco")
  out = str(tmp_path / "out" / "coco")
  s = convert.convert_coco(coco_spec(root), out)
  assert s["files"] == ["coco-fold-000-of-002", "coco-fold-001-of-002-shard-00000-of-00002",
                        "coco-fold-001-of-002-shard-00001-of-00002"]
  assert s["class_map"] == {"TrafficLight": "trafficlight", "car": "car"}
  assert s["class_names"] == ["car", "trafficlight"]
  assert s["objects_per_class"] == {"car": 4, "trafficlight": 2}
  assert s["skipped"] == {"invalid_box": 1, "unknown_image_id": 1}
  assert json.load(open(out + "_warning.json")) == {"71": [5, 5, 5, 14]}
  val = records.read([out + "-fold-000-of-002"])
  assert [r["frame_id"] for r in val] == ["val2017/a", "val2017/sub/b.v2"]   # JSON order
  assert [r["image_path"] for r in val] == ["val2017/a.jpg", "val2017/sub/b.v2.jpg"]
  a = val[0]
  np.testing.assert_array_equal(a["boxes"], [[1.5, 2, 11.5, 22], [20, 10, 50, 40]])
  assert a["classes"] == ["car", "car"] and (a["height"], a["width"]) == (48, 64)
  np.testing.assert_array_equal(a["crowd"], [False, True])
  np.testing.assert_array_equal(a["dontcare"], [False, False])     # crowd kept, as the original
  np.testing.assert_array_equal(a["class_ids"], [0, 0])
  assert a["source"] == "coco" and a["occlusion"].tolist() == [0, 0]
  train = records.read([os.path.join(tmp_path, "out", f) for f in s["files"][1:]])
  assert [r["frame_id"] for r in train] == [f"train2017/{i:03d}" for i in range(5)]  # no shuffle
  assert [len(r["classes"]) for r in train] == [1, 1, 1, 1, 0]


@pytest.mark.parametrize("mode,ids,dontcare,n", [("dontcare", [0, -1], [False, True], 2),
                                                 ("skip", [0], [False], 1)])
def test_coco_crowd_modes(tmp_path, mode, ids, dontcare, n):
  root = make_coco(tmp_path / "coco")
  s = convert.convert_coco(coco_spec(root, crowd_boxes=mode, num_shards=0), str(tmp_path / "o"))
  a = records.read([str(tmp_path / "o-fold-000-of-002")])[0]
  assert len(a["classes"]) == n
  np.testing.assert_array_equal(a["class_ids"], ids)
  np.testing.assert_array_equal(a["dontcare"], dontcare)
  assert s["crowd_boxes"] == mode


def test_coco_errors(tmp_path):
  root = make_coco(tmp_path / "coco")
  out = str(tmp_path / "o")
  with pytest.raises(DataError, match=r"num_shards: 3 values for 2 partitions"):
    convert.convert_coco(coco_spec(root, num_shards=[1, 2, 3]), out)
  with pytest.raises(DataError, match=r"num_partitions \(3\) must be"):
    convert.convert_coco(coco_spec(root, num_partitions=3), out)
  d = json.load(open(root / "annotations" / "val.json"))
  d["images"][1]["file_name"] = "../../../etc/passwd.jpg"
  (root / "annotations" / "val.json").write_text(json.dumps(d))
  with pytest.raises(DataError, match=r"val.json: image 8: image path .* resolves outside"):
    convert.convert_coco(coco_spec(root), out)
  d["images"][1]["file_name"] = "b.jpg"
  d["categories"] = d["categories"][:1]
  d["annotations"] = d["annotations"][1:2]
  (root / "annotations" / "val.json").write_text(json.dumps(d))
  with pytest.raises(DataError, match=r"train.json: category ids differ"):
    convert.convert_coco(coco_spec(root), out)
  assert not os.path.exists(out + ".summary.json")
