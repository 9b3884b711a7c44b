"""Data-side faults: ignored samples weigh nothing, unreadable data stops training, no path leaves
its root, and damaged records are one-line DataErrors (issue 15)."""

import json
import os
import shutil

import cv2
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from array_record.python import array_record_data_source

from bpnet_jax import augment, losses
from bpnet_jax.data import convert, dataset_spec, records, synthetic_dataset
from bpnet_jax.data import input_pipeline as ip
from bpnet_jax.errors import ConfigError, DataError
from bpnet_jax.skeleton import load_skeleton
from configs import demo

SK = load_skeleton()
W, H = 96, 72          # synthetic image size (px)
CANVAS = (H, W)
NUM_IMAGES = 6


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  """A tiny synthetic dataset: (data dir, spec path, train records file)."""
  root = str(tmp_path_factory.mktemp("faults_data"))
  paths = synthetic_dataset.make_dataset(root, NUM_IMAGES, seed=5, width=W, height=H,
                                         test_fraction=0, workers=1)
  return (paths["data"], paths["spec"],
          os.path.join(paths["records"], synthetic_dataset.TRAIN_RECORDS))


def _decoder(root, dirs=None):
  kw = {} if dirs is None else {"dirs": dirs}
  return ip.DecodeAndPad({"coco": root}, root, CANVAS, 4, SK.num_joints, **kw)


def _raw_records(path):
  src = array_record_data_source.ArrayRecordDataSource([path])
  return [src[i] for i in range(len(src))]


def _stack(samples):
  return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


# ----------------------------------------------------------------------------------------------
# 1. An ignored sample contributes exactly zero to every loss term.

def test_unreadable_image_gives_an_invalid_sample_of_the_same_shapes(synth, tmp_path):
  data, _, recs = synth
  raw = _raw_records(recs)[0]
  good = _decoder(data)(raw)
  bad = _decoder(str(tmp_path / "no_such_root"))(raw)
  assert int(good["valid"]) == 1 and int(bad["valid"]) == 0
  assert set(good) == set(bad)
  for k in good:
    assert np.shape(good[k]) == np.shape(bad[k]) and np.asarray(good[k]).dtype == \
        np.asarray(bad[k]).dtype, k
  assert not bad["mask_bits"].any() and int(bad["num_people"]) == 0
  assert "valid" in augment.SAMPLE_FIELDS


def _pose_batch(synth, tmp_path, kinds):
  """Host batch of decoded samples: 'v' = readable, 'i' = image missing (ignored)."""
  data, _, recs = synth
  raws = _raw_records(recs)
  good, bad = _decoder(data), _decoder(str(tmp_path / "no_such_root"))
  return _stack([(good if k == "v" else bad)(raws[i % len(raws)]) for i, k in enumerate(kinds)])


def _loss(focal: bool):
  cfg = demo.get_config()
  cfg.loss.focal_loss_params.use_focal_loss = focal
  return losses.loss_from_config(cfg, SK)


def _predictions(batch, h, w, stages=2, seed=0):
  rng = np.random.default_rng(seed)
  heats = [jnp.asarray(rng.normal(size=(batch, h, w, SK.num_joints + 1)), jnp.float32)
           for _ in range(stages)]
  pafs = [jnp.asarray(rng.normal(size=(batch, h, w, SK.paf_slice.stop - SK.paf_slice.start)),
                      jnp.float32) for _ in range(stages)]
  return heats, pafs


@pytest.mark.parametrize("focal", [False, True])
def test_ignored_sample_contributes_exactly_zero_to_every_loss_term(synth, tmp_path, focal):
  cfg = demo.get_config()
  aug = augment.AugParams.from_config(cfg.dataloader.augmentation_config)
  lab = augment.LabelParams(input_hw=(64, 64), target_hw=(8, 8), sigma=3.0,
                            ortho_dist_thresh=1.0)
  batch = _pose_batch(synth, tmp_path, "vivi")
  out = augment.preprocess_batch(jax.random.key(3), batch, aug, lab, SK)
  mask = np.asarray(out["mask"])
  assert mask[0].any() and mask[2].any()
  assert not mask[1].any() and not mask[3].any()     # the warp's fill does not count as valid
  heats, pafs = _predictions(4, 8, 8)
  loss = _loss(focal)
  _, terms = loss(None, heats, pafs, out["labels"], out["mask"])
  stage_terms = [k for k in terms if "_stage" in k]
  assert len(stage_terms) == 4
  # The ignored rows alone: every term is exactly zero.
  def pick(xs, rows):
    return [x[rows] for x in xs]
  inv = np.array([1, 3])
  _, t_inv = loss(None, pick(heats, inv), pick(pafs, inv), out["labels"][inv], out["mask"][inv])
  for k in stage_terms + ["data_loss"]:
    assert float(t_inv[k]) == 0.0, k
  # The batch's terms are the valid rows' terms (sums over the batch; data_loss / batch size).
  val = np.array([0, 2])
  _, t_val = loss(None, pick(heats, val), pick(pafs, val), out["labels"][val], out["mask"][val])
  for k in stage_terms:
    np.testing.assert_allclose(float(terms[k]), float(t_val[k]), rtol=1e-5)
  np.testing.assert_allclose(float(terms["data_loss"]) * 4, float(t_val["data_loss"]) * 2,
                             rtol=1e-5)


def test_all_ignored_batch_has_zero_loss_and_zero_gradient(synth, tmp_path):
  cfg = demo.get_config()
  aug = augment.AugParams.from_config(cfg.dataloader.augmentation_config)
  lab = augment.LabelParams(input_hw=(64, 64), target_hw=(8, 8), sigma=3.0,
                            ortho_dist_thresh=1.0)
  batch = _pose_batch(synth, tmp_path, "ii")
  out = augment.make_device_preprocess(aug, lab, SK)(jax.random.key(0), batch)
  assert not np.asarray(out["mask"]).any()
  heats, pafs = _predictions(2, 8, 8)
  loss = _loss(False)
  total, terms = loss(None, heats, pafs, out["labels"], out["mask"])
  assert float(total) == 0.0 and all(float(v) == 0.0 for v in terms.values())
  g = jax.grad(lambda hs: loss(None, hs, pafs, out["labels"], out["mask"])[0])(heats)
  assert all(not np.asarray(x).any() for x in g)


def test_a_mask_the_record_names_must_be_usable(synth, tmp_path):
  """Missing, undecodable or wrongly sized: a one-line DataError naming the file (never an
  all-valid mask, and not an ignored sample: see docs/reliability.md)."""
  data, _, recs = synth
  copy = tmp_path / "data"
  shutil.copytree(data, copy)
  raw = _raw_records(recs)[0]
  rec = records.decode(raw)
  mask = copy / rec["mask_path"]
  dec = _decoder(str(copy))
  cases = {"is missing": lambda: os.remove(mask),
           "does not decode": lambda: mask.write_bytes(b"not a png"),
           f"is {W // 2}x{H} px": lambda: cv2.imwrite(str(mask), np.zeros((H, W // 2), np.uint8))}
  for problem, damage in cases.items():
    damage()
    with pytest.raises(DataError) as e:
      dec((0, raw))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(mask)) and problem in msg, msg
    assert f"record 0 (image {rec['image_id']})" in msg


def test_missing_mask_stops_the_training_pipeline_naming_the_file(synth, tmp_path):
  data, _, recs = synth
  copy = tmp_path / "data"
  shutil.copytree(data, copy)
  first = records.decode(_raw_records(recs)[0])
  os.remove(copy / first["mask_path"])
  ds = ip.build_dataset([recs], _decoder(str(copy)), seed=0, shuffle_buffer_size=0,
                        shuffle=False)
  with pytest.raises(DataError, match=str(copy / first["mask_path"])):
    next(ip.make_iterator(ds, 2, num_workers=0))


# ----------------------------------------------------------------------------------------------
# 2. Too many unreadable samples in an epoch stop training.

def _host_batch(valid, start_id=0):
  valid = np.asarray(valid, np.uint8)
  n = len(valid)
  return {"valid": valid, "image_id": np.arange(start_id, start_id + n, dtype=np.int64),
          "record_index": np.arange(start_id, start_id + n, dtype=np.int64)}


def test_guard_counts_per_epoch_and_stops_past_the_fraction():
  # 2 steps of 4 samples per epoch; 25% allowed -> at most 2 unreadable per epoch.
  guard = ip.UnreadableGuard(2, 4, 0.25, describe=lambda idx, iid: f"/data/img{iid}.jpg")
  guard.update(_host_batch([1, 0, 1, 1]))
  guard.update(_host_batch([1, 1, 1, 0]))            # epoch 1: 2 of 8 -- not more than 25%
  guard.update(_host_batch([0, 1, 1, 1], 10))        # epoch 2 starts afresh
  with pytest.raises(DataError) as e:
    guard.update(_host_batch([0, 0, 1, 1], 20))      # epoch 2: 3 of 8
  msg = str(e.value)
  assert "\n" not in msg
  assert "3 of 8 samples in epoch 2" in msg and "25%" in msg
  assert "/data/img10.jpg" in msg and "/data/img20.jpg" in msg
  assert "dataloader.max_unreadable_fraction" in msg


def test_guard_epochs_follow_the_resumed_step():
  guard = ip.UnreadableGuard(2, 2, 0.0, start_step=5)   # step 5 is in epoch 3 (1-based)
  with pytest.raises(DataError, match="1 of 4 samples in epoch 3"):
    guard.update(_host_batch([1, 0]))


def test_guard_rejects_a_fraction_outside_0_1():
  for bad in (-0.1, 1.5, float("nan")):
    with pytest.raises(ConfigError, match="max_unreadable_fraction"):
      ip.UnreadableGuard(2, 2, bad)


def test_prefetch_check_errors_surface_as_the_data_error():
  batches = iter([{"x": np.zeros((2,))}, {"x": np.ones((2,))}])

  class It:
    def __iter__(self):
      return self

    def __next__(self):
      return next(batches)

    def get_state(self):
      return {}

  def check(batch):
    if batch["x"].any():
      raise DataError("bad batch")
  got = ip.prefetch_to_device(It(), 1, check=check)
  next(got)
  with pytest.raises(DataError, match="bad batch"):
    next(got)


def test_all_images_missing_stops_training_naming_files(synth, tmp_path):
  """The issue's case: a spec root that does not exist. One line naming unreadable files."""
  data, _, recs = synth
  missing = str(tmp_path / "moved_away")
  dec = _decoder(missing)
  ds = ip.build_dataset([recs], dec, seed=0, shuffle_buffer_size=0)
  batch = 2
  spe = NUM_IMAGES // batch
  guard = ip.UnreadableGuard(spe, batch, ip.MAX_UNREADABLE_FRACTION,
                             describe=ip.record_image_paths([recs], dec))
  it = ip.make_iterator(ds, batch)
  with pytest.raises(DataError) as e:
    for _ in ip.prefetch_to_device(it, 2, check=guard.update):
      pass
  msg = str(e.value)
  assert "\n" not in msg and "could not be read" in msg and f"of {spe * batch} samples" in msg
  assert missing in msg and ".jpg" in msg
  named = [p for p in msg.replace(",", " ").split() if p.startswith(missing)]
  assert named and all(not os.path.exists(p) for p in named)


def test_guard_from_config_uses_the_default_fraction(synth):
  data, spec, recs = synth
  cfg = synthetic_dataset.point_config(demo.get_config(), {
      "data": data, "spec": spec, "records": os.path.dirname(recs),
      "summaries": {"train": {}}})
  guard = ip.unreadable_guard_from_config(cfg, SK, steps_per_epoch=3, batch_size=2)
  assert guard.max_fraction == ip.MAX_UNREADABLE_FRACTION == 0.01
  cfg.dataloader.max_unreadable_fraction = 0.5
  guard = ip.unreadable_guard_from_config(cfg, SK, steps_per_epoch=3, batch_size=2)
  assert guard.max_fraction == 0.5
  guard.update(_host_batch([0, 1]))
  guard.update(_host_batch([0, 1]))
  guard.update(_host_batch([1, 0]))                   # 3 of 6: not more than 50%


# ----------------------------------------------------------------------------------------------
# 3. No path from a JSON, a spec or a record resolves outside its root.

def test_resolve_inside(tmp_path):
  root = tmp_path / "root"
  (root / "sub").mkdir(parents=True)
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "x.jpg").write_bytes(b"x")
  os.symlink(outside / "x.jpg", root / "sub" / "link.jpg")
  os.symlink(outside, root / "linkdir")
  ok = dataset_spec.resolve_inside(str(root), "sub/a.jpg", "what")
  assert ok == str(root / "sub" / "a.jpg")
  assert dataset_spec.resolve_inside(str(root), "sub/../b.jpg", "w") == str(root / "b.jpg")
  for bad in ("../outside/x.jpg", str(outside / "x.jpg"), "sub/link.jpg", "linkdir/x.jpg",
              "sub/../../outside/x.jpg"):
    with pytest.raises(DataError, match="outside") as e:
      dataset_spec.resolve_inside(str(root), bad, "image 7")
    assert "image 7" in str(e.value) and bad in str(e.value) and "\n" not in str(e.value)
  # A declared directory (e.g. a spec's absolute masks dir) may lie elsewhere or be a symlink.
  assert dataset_spec.resolve_inside(str(root), str(outside / "y.png"), "w",
                                     dirs=[str(outside)]) == str(outside / "y.png")
  assert dataset_spec.resolve_inside(str(root), "linkdir/x.jpg", "w",
                                     dirs=[str(root / "linkdir")]) == str(root / "linkdir/x.jpg")


def _coco_copy(synth, tmp_path):
  """A copy of the synthetic data dir (images, JSON, spec) without masks: (root, spec, json)."""
  data, _, _ = synth
  root = tmp_path / "ds"
  shutil.copytree(data, root, ignore=shutil.ignore_patterns("*_mask"))
  return root, str(root / "dataset_spec.json"), root / "annotations" / "person_keypoints_train.json"


def _set_file_name(ann_path, index, name):
  d = json.loads(ann_path.read_text())
  d["images"][index]["file_name"] = name
  ann_path.write_text(json.dumps(d))
  return d["images"][index]["id"]


def _files(path):
  return sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path)
                for f in fs)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "image_symlink", "mask_dir_symlink"])
def test_convert_rejects_paths_out_of_the_root_before_writing(synth, tmp_path, kind):
  root, spec, ann = _coco_copy(synth, tmp_path)
  victim = tmp_path / "victim"
  victim.mkdir()
  for name in ("x.png", "x.jpg", "y.png", "z.png"):
    (victim / name).write_bytes(b"precious")
  if kind == "dotdot":
    name = "../../victim/x.jpg"
  elif kind == "absolute":
    name = str(victim / "y.jpg")
  elif kind == "image_symlink":
    shutil.copy(root / "train" / "000000000001.jpg", victim / "real.jpg")
    os.symlink(victim / "real.jpg", root / "train" / "link.jpg")
    name = "link.jpg"
  else:
    (root / "train_mask").mkdir()
    os.symlink(victim, root / "train_mask" / "sub")
    name = "sub/z.jpg"
  iid = _set_file_name(ann, 1, name)
  before = _files(root)
  with pytest.raises(DataError) as e:
    convert.convert(spec, str(tmp_path / "out" / "train"), "train", generate_masks=True,
                    workers=1)
  msg = str(e.value)
  assert "\n" not in msg and str(ann) in msg and f"image {iid}" in msg and name in msg
  for f in ("x.png", "x.jpg", "y.png", "z.png"):
    assert (victim / f).read_bytes() == b"precious"
  assert sorted(os.listdir(victim)) == sorted(["x.png", "x.jpg", "y.png", "z.png"]
                                              + (["real.jpg"] if kind == "image_symlink" else []))
  assert _files(root) == before                      # no mask written anywhere
  assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_spec_dirs_relative_must_stay_inside_the_root_absolute_allowed(tmp_path):
  def spec(images, masks, ann="annotations/a.json"):
    d = dataset_spec.coco_spec_dict(str(tmp_path / "root"), (images, masks, ann), None)
    p = tmp_path / "spec.json"
    p.write_text(json.dumps(d))
    return str(p)
  s = dataset_spec.load_spec(spec("train", str(tmp_path / "elsewhere" / "masks")))
  assert s.split("train").masks_dir == str(tmp_path / "elsewhere" / "masks")
  for images, masks, ann in (("../train", "m", "a.json"), ("train", "m/../../m", "a.json"),
                             ("train", "m", "../a.json")):
    with pytest.raises(DataError, match="outside") as e:
      dataset_spec.load_spec(spec(images, masks, ann))
    assert "train_data." in str(e.value)


def _record_bytes(raw, **changes):
  d = msgpack.unpackb(raw, raw=False)
  d.update(changes)
  return msgpack.packb(d, use_bin_type=True)


def test_training_record_paths_out_of_the_root_are_data_errors(synth, tmp_path):
  data, _, recs = synth
  raw = _raw_records(recs)[0]
  rec = records.decode(raw)
  root = tmp_path / "root"
  shutil.copytree(data, root)
  outside = tmp_path / "outside"
  outside.mkdir()
  shutil.copy(root / rec["image_path"], outside / "x.jpg")
  os.symlink(outside / "x.jpg", root / "train" / "link.jpg")
  dec = _decoder(str(root))
  assert int(dec(raw)["valid"]) == 1
  cases = [dict(image_path="../outside/x.jpg"), dict(image_path=str(outside / "x.jpg")),
           dict(image_path="train/link.jpg"), dict(mask_path="../outside/x.jpg"),
           dict(mask_path=str(outside / "x.jpg"))]
  for change in cases:
    with pytest.raises(DataError, match="outside") as e:
      dec(_record_bytes(raw, **change))
    msg = str(e.value)
    assert f"image {rec['image_id']}" in msg and next(iter(change.values())) in msg, msg
  # An absolute path inside a directory the spec declares (an absolute masks dir) is fine.
  shutil.copy(root / rec["mask_path"], outside / "m.png")
  dec = _decoder(str(root), dirs={"coco": [str(outside)]})
  s = dec(_record_bytes(raw, mask_path=str(outside / "m.png")))
  assert int(s["valid"]) == 1


def test_decoder_from_config_allows_the_specs_declared_dirs(synth, tmp_path):
  data, _, _ = synth
  masks = tmp_path / "abs_masks"
  d = json.load(open(os.path.join(data, "dataset_spec.json")))
  d["root_directory_path"] = data
  d["train_data"]["mask_root_dir_path"] = str(masks)
  spec = tmp_path / "spec.json"
  spec.write_text(json.dumps(d))
  cfg = demo.get_config()
  cfg.dataloader.dataset_config.dataset_specs = {"coco": str(spec)}
  dec = ip.decoder_from_config(cfg, SK)
  assert str(masks) in [str(p) for p in dec.dirs["coco"]]


# ----------------------------------------------------------------------------------------------
# 4. Damaged records are DataErrors naming the record.

def test_inconsistent_record_fields_are_one_line_data_errors(synth):
  data, _, recs = synth
  raw = _raw_records(recs)[0]
  rec = records.decode(raw)
  dec = _decoder(data)
  with pytest.raises(DataError) as e:
    dec(_record_bytes(raw, num_people=99))
  msg = str(e.value)
  assert f"image {rec['image_id']}" in msg and "num_people 99" in msg and "\n" not in msg
  for bad in (_record_bytes(raw, num_joints=-1), _record_bytes(raw, image_path=5),
              b"\x00garbage", msgpack.packb([1, 2, 3]), _record_bytes(raw, dataset=None)):
    with pytest.raises(DataError, match="record"):
      dec(bad)
  d = msgpack.unpackb(raw, raw=False)
  del d["joints"]
  with pytest.raises(DataError, match="joints"):
    dec(msgpack.packb(d, use_bin_type=True))


def test_record_with_other_joint_count_is_a_data_error(synth):
  data, _, recs = synth
  raw = _raw_records(recs)[0]
  dec = ip.DecodeAndPad({"coco": data}, data, CANVAS, 4, SK.num_joints + 1)
  with pytest.raises(DataError, match="joints"):
    dec(raw)


def test_pipeline_samples_carry_their_record_index(synth):
  data, _, recs = synth
  ds = ip.build_dataset([recs], _decoder(data), seed=0, shuffle_buffer_size=0, shuffle=False,
                        repeat=False)
  got = [int(ds[i]["record_index"]) for i in range(len(ds))]
  assert got == list(range(len(_raw_records(recs))))
  ids = [records.decode(r)["image_id"] for r in _raw_records(recs)]
  assert [int(ds[i]["image_id"]) for i in range(len(ds))] == ids
  assert ip.record_image_paths([recs], _decoder(data))(0, ids[0]) == os.path.join(
      data, records.decode(_raw_records(recs)[0])["image_path"])
  img = cv2.imread(ip.record_image_paths([recs], _decoder(data))(0, ids[0]))
  assert img is not None
