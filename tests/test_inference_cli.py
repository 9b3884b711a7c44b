"""`bpnet inference` and `bpnet evaluate` end to end on a tiny trained checkpoint."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from bpnet_jax import cli
from bpnet_jax.skeleton import load_skeleton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO_IMAGES = os.path.join(ROOT, "tests/data/coco_mini/train2017")


def run_cli(*args):
  """Runs `bpnet` in-process; returns (exit status, stdout, stderr) via capsys by the caller."""
  return cli.main(list(args))


@pytest.fixture(scope="module")
def setup(trained_workdir, synth_records, tmp_path_factory):
  config, workdir = trained_workdir
  from conftest import write_config_file
  cfg_path = write_config_file(config, os.path.join(workdir, "config_test.py"))
  return cfg_path, workdir, synth_records[0], tmp_path_factory.mktemp("inference")


def test_inference_on_a_folder_writes_detections_and_drawings(setup, capsys):
  cfg, workdir, data, out = setup
  images = out / "images"
  shutil.copytree(os.path.join(data, "test"), images)
  shutil.copy(os.path.join(COCO_IMAGES, sorted(os.listdir(COCO_IMAGES))[0]), images / "coco.jpg")
  (images / "broken.png").write_bytes(b"\x89PNG not really")
  (images / "notes.txt").write_text("ignored: not an image extension")
  results = out / "r1"
  assert run_cli("inference", f"--config={cfg}", f"--workdir={workdir}", "--input_type=dir",
                 f"--input={images}", f"--results_dir={results}", "--dump_visualizations",
                 "--no_progress") == 0
  det = json.load(open(results / "detection.json"))
  n_images = len([f for f in os.listdir(images) if not f.endswith(".txt")])
  assert det["format"] == "bpnet_jax.detection/1"
  assert det["counts"]["images"] == n_images - 1 and det["counts"]["skipped"] == 1
  assert det["skipped"][0]["file"].endswith("broken.png")
  assert "not a readable image" in det["skipped"][0]["error"]
  sk = load_skeleton()
  assert det["skeleton"]["categories"][0]["keypoints"] == list(sk.joints)
  assert det["inference"]["input_shape"] == [64, 64]
  for entry in det["images"]:
    assert {"file", "width", "height", "people", "visualization"} <= set(entry)
    assert os.path.isfile(results / entry["visualization"])
    for p in entry["people"]:
      assert 0 < p["score"] < 1 and list(p["keypoints"]) == list(sk.joints)
      assert all(len(v) == 3 for v in p["keypoints"].values())
  assert len(os.listdir(results / "images_annotated")) == n_images - 1
  assert "people in" in capsys.readouterr().out
  # Batched network calls give the same detections.
  assert run_cli("inference", f"--config={cfg}", f"--workdir={workdir}", "--input_type=dir",
                 f"--input={images}", f"--results_dir={out / 'r1b'}", "--batch_size=4",
                 "--no_progress") == 0
  batched = json.load(open(out / "r1b" / "detection.json"))
  assert [e["file"] for e in batched["images"]] == [e["file"] for e in det["images"]]
  assert [len(e["people"]) for e in batched["images"]] == [len(e["people"]) for e in det["images"]]
  assert batched["counts"] == det["counts"]
  # Running again does not overwrite without being asked.
  assert run_cli("inference", f"--config={cfg}", f"--workdir={workdir}", "--input_type=dir",
                 f"--input={images}", f"--results_dir={results}") == 2
  err = capsys.readouterr().err
  assert "detection.json already exists" in err and len(err.strip().splitlines()) == 1


def test_inference_json_list_and_single_image(setup, capsys):
  cfg, workdir, data, out = setup
  names = sorted(os.listdir(os.path.join(data, "test")))[:2]
  lst = out / "list.json"
  lst.write_text(json.dumps({"images": [{"full_image_path": n} for n in names]}))
  assert run_cli("inference", f"--config={cfg}", f"--workdir={workdir}", "--input_type=json",
                 f"--input={lst}", f"--image_root_path={os.path.join(data, 'test')}",
                 f"--results_dir={out / 'r2'}", "--no_progress") == 0
  det = json.load(open(out / "r2" / "detection.json"))
  assert [os.path.basename(e["file"]) for e in det["images"]] == names
  assert run_cli("inference", f"--config={cfg}", f"--workdir={workdir}", "--input_type=image",
                 f"--input={os.path.join(data, 'test', names[0])}",
                 f"--results_dir={out / 'r3'}", "--no_progress") == 0
  assert json.load(open(out / "r3" / "detection.json"))["counts"]["images"] == 1


def test_evaluate_writes_metrics(setup, capsys):
  cfg, workdir, data, out = setup
  spec = os.path.join(data, "dataset_spec.json")
  r = out / "eval"
  assert run_cli("evaluate", f"--config={cfg}", f"--workdir={workdir}", f"--dataset_spec={spec}",
                 f"--results_dir={r}", "--no_progress") == 0
  metrics = json.load(open(r / "metrics.json"))
  assert set(metrics) == {"AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"}
  assert all(0 <= v <= 1 for v in metrics.values())
  assert (r / "results.csv").read_text().startswith("metric,IoU,area,maxDets,score\n")
  assert isinstance(json.load(open(r / "detections_coco.json")), list)
  assert "AP" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--config.inference.input_shape=[100,100]"], "config.inference.input_shape"),
    (["--config.model.stages=3"], "config.model.stages=3 but the model in"),
    (["--input_type=video"], "argument --input_type: invalid choice"),
    (["--batch_size=0"], "--batch_size 0: expected an integer >= 1"),
    (["--model=/nonexistent/model.onnx"], "no such model"),
])
def test_bad_input_is_one_line(setup, args, message):
  cfg, workdir, data, out = setup
  base = {"--input_type": "dir", "--input": os.path.join(data, "test"),
          "--results_dir": str(out / "bad")}
  for a in args:
    base.pop(a.split("=")[0], None)
  argv = [sys.executable, "-m", "bpnet_jax.cli", "inference", f"--config={cfg}",
          f"--workdir={workdir}"] + [f"{k}={v}" for k, v in base.items()] + args
  r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], r.stderr
  assert not os.path.exists(out / "bad" / "detection.json")
