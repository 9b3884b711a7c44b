"""`detectnet_v2 <command>` in-process: summary pins the reference parameter counts,
make_synthetic -> dataset_convert end to end, and every bad flag is a one-line error."""

import json
import os

import pytest

from bpnet_jax.detectnet_v2 import cli, records

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs", "detectnet_v2")


def _run(capsys, *argv):
  status = cli.main(list(argv))
  out, err = capsys.readouterr()
  return status, out, err


def _one_line_error(capsys, command, *argv, match=""):
  status, _, err = _run(capsys, command, *argv)
  assert status == 2, err
  assert err.startswith(f"detectnet_v2 {command}: error: ") and err.count("\n") == 1, err
  assert match in err, err
  return err


@pytest.mark.parametrize("config, total, extra", [
    # The shipped KITTI spec: ResNet-18, all_projections, BN, car + pedestrian (25 backbone
    # convs + 2 heads).
    ("kitti_resnet18.py", "11,553,418 total, 11,541,770 trainable, 11,648 non-trainable, "
                          "27 convs", "input 384x1248 -> output grid 24x78"),
    ("kitti_resnet18.py:3class", "11,555,983 total, 11,544,335 trainable", "3 classes"),
    ("demo.py", "4,926,543 total, 4,920,655 trainable", "input 128x256 -> output grid 8x16"),
])
def test_summary_pins_the_reference_parameter_counts(capsys, config, total, extra):
  status, out, err = _run(capsys, "summary", f"--config={os.path.join(CONFIGS, config)}")
  assert status == 0, err
  assert f"params: {total}" in out and extra in out
  assert out.splitlines()[-1].split()[0] == "TOTAL" and "output_cov" in out


def test_summary_applies_overrides(capsys):
  status, out, err = _run(capsys, "summary", f"--config={CONFIGS}/kitti_resnet18.py:3class",
                          "--config.model_config.num_layers=10")
  assert status == 0, err
  assert "resnet10" in out and "params: 4,926,543 total" in out


def test_make_synthetic_then_dataset_convert(capsys, tmp_path):
  data, prefix = str(tmp_path / "synth"), str(tmp_path / "records" / "synthetic")
  status, out, err = _run(capsys, "make_synthetic", "--out", data, "--num_images", "6",
                          "--width", "96", "--height", "64", "--val_fraction", "0.34",
                          "--seed", "3")
  assert status == 0, err
  assert out.startswith("6 images (2 validation, 4 training)")
  spec = os.path.join(data, "dataset_convert_spec.json")
  assert f"conversion spec: {spec}" in out

  status, out, err = _run(capsys, "dataset_convert", "-d", spec, "-o", prefix, "-f", "0")
  assert status == 0, err
  assert out.startswith("6 frames (fold 0: 2, fold 1: 4)")
  summary = json.load(open(prefix + ".summary.json"))
  assert summary["class_names"] == ["car", "pedestrian", "cyclist"]
  assert summary["validation_fold"] == 0
  files = [os.path.join(os.path.dirname(prefix), f) for f in summary["files"]]
  assert [os.path.basename(f) for f in files] == ["synthetic-fold-000-of-002",
                                                  "synthetic-fold-001-of-002"]
  recs = records.read(files)
  assert len(recs) == 6 and all(os.path.isfile(os.path.join(data, r["image_path"]))
                                for r in recs)

  # Outputs are kept unless --overwrite.
  _one_line_error(capsys, "dataset_convert", "-d", spec, "-o", prefix,
                  match="pass --overwrite")
  status, _, err = _run(capsys, "dataset_convert", "-d", spec, "-o", prefix, "--overwrite")
  assert status == 0, err
  _one_line_error(capsys, "make_synthetic", "--out", data, "--num_images", "1",
                  match="already exists")


@pytest.mark.parametrize("command, argv, match", [
    ("make_synthetic", ["--num_images", "2"], "--out"),
    ("make_synthetic", ["--out", "{tmp}/s", "--num_images", "0"], "--num_images 0"),
    ("make_synthetic", ["--out", "{tmp}/s", "--num_images", "x"], "invalid int value"),
    ("make_synthetic", ["--out", "{tmp}/s", "--num_images", "2", "--width", "16"], "16x272"),
    ("make_synthetic", ["--out", "{tmp}/s", "--num_images", "2", "--val_fraction", "1"],
     "--val_fraction"),
    ("make_synthetic", ["--out", "{tmp}/s", "--num_images", "2", "--image_format", "bmp"],
     "invalid choice"),
    ("dataset_convert", ["-o", "{tmp}/r"], "-d/--dataset_export_spec"),
    ("dataset_convert", ["-d", "{tmp}/missing.json", "-o", "{tmp}/r"], "missing.json"),
    ("dataset_convert", ["-d", "{tmp}/spec.json", "-o", "{tmp}/r", "-f", "-1"],
     "--validation_fold -1"),
    ("summary", [], "--config=FILE is required"),
    ("summary", ["--config={tmp}/nope.py"], "does not exist"),
    ("summary", ["--config={configs}/kitti_resnet18.py", "--config.training_config.epochs=1"],
     "unknown key 'epochs'"),
    ("summary", ["--config={configs}/kitti_resnet18.py",
                 "--config.model_config.num_layers=20"], "config.model_config.num_layers"),
    ("summary", ["--config={configs}/kitti_resnet18.py", "--depth", "0"], "--depth 0"),
    ("summary", ["--config={configs}/kitti_resnet18.py:5class"], "unknown variant"),
    ("train", ["--config={configs}/kitti_resnet18.py"], "not available yet"),
    ("calibration_tensorfile", [], "not available yet"),
])
def test_bad_flags_are_one_line_errors(capsys, tmp_path, command, argv, match):
  (tmp_path / "spec.json").write_text("{}")
  argv = [a.format(tmp=tmp_path, configs=CONFIGS) for a in argv]
  _one_line_error(capsys, command, *argv, match=match)


def test_usage_and_unknown_command(capsys):
  status, out, _ = _run(capsys, "--help")
  assert status == 0 and "dataset_convert" in out and "summary" in out
  status, _, err = _run(capsys, "detect")
  assert status == 2 and err.startswith("detectnet_v2: error: unknown command 'detect'")
