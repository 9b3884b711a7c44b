import os

from bpnet_jax import demo


def test_demo_runs_the_pipeline_into_one_folder(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(demo, "DEMO_IMAGES", 16)
  monkeypatch.setattr(demo, "DEMO_EPOCHS", 1)
  monkeypatch.setattr(demo, "DEMO_RETRAIN_EPOCHS", 1)
  monkeypatch.setattr(demo, "DEMO_INFERENCE_SHAPE", (128, 128))
  assert demo.run(str(tmp_path)) == 0
  out = capsys.readouterr().out
  for path in ("data/dataset_spec.json", "data/records/train-fold-000-of-001",
               "data/records/test-fold-000-of-001", "data/train_mask", "train/config.json",
               "train/metrics.jsonl", "train/checkpoints", "eval/metrics.json",
               "eval/results.csv", "infer/detection.json", "infer/images_annotated",
               "pruned/prune_report.json", "pruned/model.json", "retrain/checkpoints",
               "retrain/eval/metrics.json", "export/model.onnx", "export/model.report.json",
               "export/model_fp16.onnx", "export/model_int8.onnx", "export/calibration.bin",
               "export/eval_int8/metrics.json"):
    assert os.path.exists(tmp_path / path), path
  assert "step" in out and "loss" in out and "validation loss" in out
  assert "[eval]" in out and "[infer]" in out and "[prune]" in out and "[retrain]" in out
  assert "[export]" in out
  import json
  det = json.load(open(tmp_path / "infer" / "detection.json"))
  assert det["counts"]["images"] == len(os.listdir(tmp_path / "infer" / "images_annotated")) > 6
  assert any("coco_mini" in e["file"] for e in det["images"])
  # A second run reuses the data and finds training complete (the later stages, tested above,
  # are skipped here to keep the suite fast).
  monkeypatch.setattr(demo, "evaluate_and_infer", lambda *a: {"eval": {"AP": 0.0}})
  monkeypatch.setattr(demo, "prune_and_retrain", lambda *a: None)
  monkeypatch.setattr(demo, "export_and_evaluate", lambda *a: None)
  assert demo.run(str(tmp_path)) == 0
  out = capsys.readouterr().out
  import re
  assert "[data] 12 train" not in out and re.search(r"\[train\] step (\d+)/\1,", out)
