import json
import os
import re

from bpnet_jax import config as config_lib
from bpnet_jax import demo
from bpnet_jax.inference.predictor import Predictor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_the_pipeline_into_one_folder(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(demo, "DEMO_IMAGES", 16)
  monkeypatch.setattr(demo, "DEMO_RETRAIN_EPOCHS", 1)
  cfg = config_lib.load_config_file(os.path.join(ROOT, "configs", "demo.py:demo"))
  cfg.trainer.num_epoch = cfg.trainer.checkpoint_n_epoch = 1
  cfg.trainer.validation_every_n_epoch = 1
  cfg.inference.input_shape = (128, 128)
  assert demo.run(str(tmp_path), cfg) == 0
  out = capsys.readouterr().out
  for path in ("data/dataset_spec.json", "records/train-fold-000-of-001",
               "records/test-fold-000-of-001", "data/train_mask", "train/config.json",
               "train/metrics.jsonl", "train/checkpoints", "eval/metrics.json",
               "eval/results.csv", "infer/detection.json", "infer/images_annotated",
               "pruned/prune_report.json", "pruned/config.json", "retrain/checkpoints",
               "retrain/eval/metrics.json", "export/model.onnx", "export/model.report.json",
               "export/model.config.json", "export/model_fp16.onnx", "export/model_int8.onnx",
               "export/calibration.bin", "export/eval_int8/metrics.json"):
    assert os.path.exists(tmp_path / path), path
  assert "step" in out and "loss" in out and "validation loss" in out
  assert "[eval]" in out and "[infer]" in out and "[prune]" in out and "[retrain]" in out
  assert "[export]" in out
  det = json.load(open(tmp_path / "infer" / "detection.json"))
  assert det["counts"]["images"] == len(os.listdir(tmp_path / "infer" / "images_annotated")) > 0
  # The demo shows held-out synthetic images only (its model has not seen real people).
  assert all(os.path.join("data", "test") in e["file"] for e in det["images"])
  # The demo's workdir describes itself: no config needed to use the trained model.
  p = Predictor.from_path(str(tmp_path / "train"))
  assert p.config.model.layer_widths.to_dict() == cfg.model.layer_widths.to_dict()
  assert p.input_shape == (128, 128)
  # A second run reuses the data and finds training complete (the later stages, tested above,
  # are skipped here to keep the suite fast).
  monkeypatch.setattr(demo, "evaluate_and_infer", lambda *a: {"eval": {"AP": 0.0}})
  monkeypatch.setattr(demo, "prune_and_retrain", lambda *a: None)
  monkeypatch.setattr(demo, "export_and_evaluate", lambda *a: None)
  assert demo.run(str(tmp_path), cfg) == 0
  out = capsys.readouterr().out
  assert re.search(r"\[train\] step (\d+)/\1,", out)
