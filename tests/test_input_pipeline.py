import json
import logging
import os
import shutil

import cv2
import jax
import numpy as np
import pytest

from bpnet_jax.data import convert, records, synthetic
from bpnet_jax.data import input_pipeline as ip
from bpnet_jax.skeleton import load_skeleton
from configs import demo

SK = load_skeleton()


def _make(root, seed, name):
  out = os.path.join(root, name)
  synthetic.make_synthetic(out, 16, seed=seed, width=160, height=120, test_fraction=0,
                           progress=False)
  spec = json.load(open(os.path.join(out, "dataset_spec.json")))
  spec["dataset"] = name
  spec_path = os.path.join(out, "dataset_spec.json")
  json.dump(spec, open(spec_path, "w"))
  convert.convert(spec_path, os.path.join(root, "records", name), "train", generate_masks=True,
                  workers=1)
  return out, spec_path, os.path.join(root, "records", f"{name}-fold-000-of-001")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("pipe"))
  a = _make(root, 1, "synA")
  b = _make(root, 2, "synB")
  return root, a, b


def _decoder(data, canvas=(120, 160)):
  _, a, b = data
  return ip.DecodeAndPad({"synA": a[0], "synB": b[0]}, "", canvas, 8, SK.num_joints)


def test_decode_and_pad(data):
  _, a, _ = data
  dec = _decoder(data, canvas=(128, 192))
  src = records.read_records([a[2]])
  from array_record.python import array_record_data_source
  s = dec(array_record_data_source.ArrayRecordDataSource([a[2]])[0])
  rec = src[0]
  assert s["image"].shape == (128, 192, 3) and s["mask_bits"].shape == (128, 24)
  assert int(s["has_mask"]) == 1 and int(s["rotated"]) == 0
  assert s["size"].tolist() == [120, 160]
  img = cv2.cvtColor(cv2.imread(os.path.join(a[0], rec["image_path"])), cv2.COLOR_BGR2RGB)
  np.testing.assert_array_equal(s["image"][:120, :160], img)
  assert not s["image"][120:].any() and not s["image"][:, 160:].any()
  n = min(rec["num_people"], 8)
  assert int(s["num_people"]) == n
  np.testing.assert_allclose(s["joints"][:n], rec["joints"][:n])
  assert (s["visibility"][n:] == 4).all()
  mask = cv2.imread(os.path.join(a[0], rec["mask_path"]), cv2.IMREAD_GRAYSCALE)
  np.testing.assert_array_equal(ip.unpack_mask(s)[:120, :160], mask)


def test_images_larger_than_the_canvas_are_shrunk(data):
  _, a, _ = data
  from array_record.python import array_record_data_source
  data_bytes = array_record_data_source.ArrayRecordDataSource([a[2]])[0]
  big = _decoder(data, canvas=(120, 160))(data_bytes)
  small = _decoder(data, canvas=(60, 120))(data_bytes)
  assert small["size"].tolist() == [60, 80]
  n = int(big["num_people"])
  np.testing.assert_allclose(small["joints"][:n], (big["joints"][:n] + 0.5) * 0.5 - 0.5,
                             atol=1e-4)
  np.testing.assert_allclose(small["scales"][:n], big["scales"][:n] * 0.5, rtol=1e-5)


def _ids(batch):
  return batch["image_id"].tolist()


def test_deterministic_and_reshuffled_each_epoch(data):
  _, a, _ = data
  dec = _decoder(data)
  n = len(records.read_records([a[2]]))
  first = [_ids(b) for b, _ in zip(ip.make_iterator(ip.build_dataset([a[2]], dec, 5, 10**6), 1),
                                   range(2 * n))]
  again = [_ids(b) for b, _ in zip(ip.make_iterator(ip.build_dataset([a[2]], dec, 5, 10**6), 1),
                                   range(2 * n))]
  other = [_ids(b) for b, _ in zip(ip.make_iterator(ip.build_dataset([a[2]], dec, 6, 10**6), 1),
                                   range(2 * n))]
  assert first == again and first != other
  ids = [r["image_id"] for r in records.read_records([a[2]])]
  assert sorted(sum(first[:n], [])) == sorted(ids)          # one epoch = every record once
  assert first[:n] != first[n:]                              # the next epoch is reshuffled


def test_window_shuffle_uses_the_buffer_size(data):
  _, a, _ = data
  from array_record.python import array_record_data_source
  src = array_record_data_source.ArrayRecordDataSource([a[2]])
  order = [records.decode(src[i])["image_id"] for i in range(len(src))]
  it = ip.make_iterator(ip.build_dataset([a[2]], _decoder(data), 0, 4), 1)
  got = [_ids(next(it))[0] for _ in range(8)]
  assert sorted(got[:4]) == sorted(order[:4]) and sorted(got[4:8]) == sorted(order[4:8])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_iterator_state(data, workers):
  _, a, b = data
  ds = ip.build_dataset([a[2], b[2]], _decoder(data), 3, 10**6)
  it = ip.make_iterator(ds, 4, workers)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  it.close() if hasattr(it, "close") else None
  resumed = ip.make_iterator(ds, 4, workers, state=json.loads(json.dumps(state)))
  for e in expected:
    got = next(resumed)
    for k in e:
      np.testing.assert_array_equal(got[k], e[k])
  resumed.close() if hasattr(resumed, "close") else None


def test_two_datasets_are_mixed_with_their_own_roots(data):
  _, a, b = data
  ds = ip.build_dataset([a[2], b[2]], _decoder(data), 0, 10**6, repeat=False)
  recs = records.read_records([a[2], b[2]])
  assert len(ds) == len(recs)
  assert {r["dataset"] for r in recs} == {"synA", "synB"}
  # The same image id exists in both datasets; each record must read its own root's file.
  for i in range(len(ds)):
    s = ds[i]
    rec = next(r for r in recs if r["image_id"] == s["image_id"]
               and np.allclose(r["joints"][0], s["joints"][0]))
    root = a[0] if rec["dataset"] == "synA" else b[0]
    img = cv2.cvtColor(cv2.imread(os.path.join(root, rec["image_path"])), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(s["image"][:120, :160], img)


def test_unreadable_image_becomes_an_ignored_sample(data, tmp_path):
  _, a, _ = data
  rec = records.read_records([a[2]])[0]
  rec = dict(rec, image_path="does/not/exist.jpg")
  path = str(tmp_path / "r")
  records.write_records(path, [rec])
  from array_record.python import array_record_data_source
  s = _decoder(data)(array_record_data_source.ArrayRecordDataSource([path])[0])
  assert int(s["num_people"]) == 0 and int(s["valid"]) == 0 and not s["mask_bits"].any()


def test_prefetch_to_device_pairs_batches_with_states(data):
  _, a, _ = data
  ds = ip.build_dataset([a[2]], _decoder(data), 0, 10**6)
  it = ip.make_iterator(ds, 2)
  got = list(zip(ip.prefetch_to_device(it, 2), range(4)))
  (batch, state), _ = got[1]
  assert isinstance(batch["image"], jax.Array)
  resumed = ip.make_iterator(ds, 2, state=state)
  np.testing.assert_array_equal(next(resumed)["image"], np.asarray(got[2][0][0]["image"]))


def test_train_dataset_from_config(data):
  root, a, b = data
  cfg = demo.get_config()
  dc = cfg.dataloader.dataset_config
  dc.train_records_folder_path = os.path.join(root, "records")
  dc.train_records_path = ["syn*-fold-000-of-001"]
  dc.dataset_specs = {"synA": a[1], "synB": b[1]}
  cfg.dataloader.max_image_size = [120, 160]
  ds = ip.train_dataset_from_config(cfg, SK)
  batch = next(ip.make_iterator(ds, cfg.dataloader.batch_size))
  assert batch["image"].shape == (cfg.dataloader.batch_size, 120, 160, 3)
  dc.train_records_path = ["missing-fold-000-of-001"]
  with pytest.raises(FileNotFoundError, match="missing-fold"):
    ip.train_dataset_from_config(cfg, SK)


def test_auto_num_workers_scales_with_cores_on_accelerators():
  assert ip.auto_num_workers("cpu", 16) == 0        # the CPU backend decodes in the main process
  assert ip.auto_num_workers("gpu", 16) == 14
  assert ip.auto_num_workers("gpu", 2) == 1
  assert ip.auto_num_workers("tpu", 240) == 32


def test_jpeg_masks_of_the_original_are_read_with_the_threshold(data, tmp_path, monkeypatch,
                                                                 caplog):
  """The original TAO converter's lossy `<stem>.jpg` masks: valid where >= MASK_THRESHOLD."""
  _, a, _ = data
  rec = records.read_records([a[2]])[0]
  shutil.copy(os.path.join(a[0], rec["image_path"]), tmp_path / "img.jpg")
  ignore = np.zeros((120, 160), bool)
  ignore[33:87, 45:101] = True            # off the 8x8 JPEG blocks: ringing on every edge
  ignore[10:20, 120:150] = True
  expected = np.where(ignore, 0, 255).astype(np.uint8)
  cv2.imwrite(str(tmp_path / "m.jpg"), expected, [cv2.IMWRITE_JPEG_QUALITY, 95])
  jpeg = cv2.imread(str(tmp_path / "m.jpg"), cv2.IMREAD_GRAYSCALE)
  assert not set(np.unique(jpeg)) <= {0, 255}                 # really lossy
  raw = records.encode(dict(rec, image_path="img.jpg", mask_path="m.jpg"))
  monkeypatch.setattr(ip, "_warned_grey_mask", False)
  dec = ip.DecodeAndPad({"synA": str(tmp_path)}, "", (120, 160), 8, SK.num_joints)
  with caplog.at_level(logging.WARNING, logger="bpnet.input"):
    s = dec(raw)
  assert int(s["has_mask"]) == 1
  mask = ip.unpack_mask(s)[:120, :160]
  np.testing.assert_array_equal(mask, np.where(jpeg >= ip.MASK_THRESHOLD, 255, 0))
  np.testing.assert_array_equal(mask, expected)               # the regions come back exactly
  assert not caplog.records                 # grey values are expected in a JPEG mask


def test_training_without_masks_is_logged_once(data, tmp_path, caplog):
  root, a, b = data
  nm = str(tmp_path / "nomask")
  convert.convert(a[1], nm, "train", no_masks=True, workers=1)
  cfg = demo.get_config()
  dc = cfg.dataloader.dataset_config
  dc.train_records_folder_path = os.path.join(root, "records")
  dc.train_records_path = ["synA-fold-000-of-001", nm + "-fold-000-of-001"]  # absolute: joined
  dc.dataset_specs = {"synA": a[1], "synB": b[1]}
  with caplog.at_level(logging.WARNING, logger="bpnet.input"):
    ip.train_dataset_from_config(cfg, SK)
  logged = [r.getMessage() for r in caplog.records if "without masks" in r.getMessage()]
  assert len(logged) == 1
  assert logged[0].startswith("training without masks of unlabelled people: nomask-fold")
  assert "synA" not in logged[0]
  caplog.clear()
  dc.train_records_path = ["synA-fold-000-of-001"]
  with caplog.at_level(logging.WARNING, logger="bpnet.input"):
    ip.train_dataset_from_config(cfg, SK)
  assert not caplog.records
