"""Self-describing model directories: every CLI task runs on a trained workdir, its pruned model
and its ONNX export without --config, and `train --workdir` alone resumes the saved run."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from bpnet_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_task_runs_on_a_workdir_without_config(trained_workdir, synth_records, tmp_path,
                                                     capsys):
  config, workdir = trained_workdir
  data, spec, _ = synth_records
  images = os.path.join(data, "test")
  assert cli.main(["summary", f"--model={workdir}"]) == 0
  assert "params:" in capsys.readouterr().out
  assert cli.main(["inference", f"--model={workdir}", "--input_type=dir", f"--input={images}",
                   f"--results_dir={tmp_path / 'infer'}", "--no_progress"]) == 0
  det = json.load(open(tmp_path / "infer" / "detection.json"))
  assert det["counts"]["images"] == len(os.listdir(images))
  assert det["inference"]["input_shape"] == list(config.inference.input_shape)
  # --config.* alone overrides the saved config's inference settings.
  assert cli.main(["inference", f"--model={workdir}", "--input_type=dir", f"--input={images}",
                   f"--results_dir={tmp_path / 'infer96'}", "--no_progress",
                   "--config.inference.input_shape=[96,96]"]) == 0
  assert json.load(open(tmp_path / "infer96" / "detection.json"))["inference"][
      "input_shape"] == [96, 96]
  # ... but not the network.
  assert cli.main(["inference", f"--model={workdir}", "--input_type=dir", f"--input={images}",
                   f"--results_dir={tmp_path / 'bad'}", "--config.model.stages=3"]) == 2
  assert "config.model.stages=3 but the model in" in capsys.readouterr().err
  assert cli.main(["evaluate", f"--model={workdir}", f"--dataset_spec={spec}",
                   f"--results_dir={tmp_path / 'eval'}", "--no_progress"]) == 0
  assert "AP" in json.load(open(tmp_path / "eval" / "metrics.json"))
  pruned = tmp_path / "pruned"
  assert cli.main(["prune", f"--model={workdir}", f"-o={pruned}", "-pth=0.5", "-nf=2",
                   "-pg=2"]) == 0
  assert cli.main(["evaluate", f"--model={pruned}", f"--dataset_spec={spec}",
                   f"--results_dir={tmp_path / 'eval_pruned'}", "--no_progress"]) == 0
  pytest.importorskip("jax2onnx")
  onnx_path = tmp_path / "pruned.onnx"
  assert cli.main(["export", f"--model={pruned}", f"-o={onnx_path}"]) == 0
  assert (tmp_path / "pruned.config.json").exists()
  assert cli.main(["inference", f"--model={onnx_path}", "--input_type=dir", f"--input={images}",
                   f"--results_dir={tmp_path / 'infer_onnx'}", "--no_progress"]) == 0


def test_train_resumes_from_the_workdir_config_alone(trained_workdir, tmp_path, capsys):
  _, workdir = trained_workdir
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  last = max(int(d) for d in os.listdir(copy / "checkpoints") if d.isdigit())  # one epoch
  assert cli.main(["train", f"--workdir={copy}", "--no_progress"]) == 0
  out = capsys.readouterr().out
  assert f"trained to step {last}/{last}" in out
  # Overrides apply to the saved config: one more epoch continues the same run.
  assert cli.main(["train", f"--workdir={copy}", "--no_progress",
                   "--config.trainer.num_epoch=2"]) == 0
  assert f"trained to step {2 * last}/{2 * last}" in capsys.readouterr().out
  assert cli.main(["train", f"--workdir={tmp_path / 'empty'}"]) == 2
  assert "--config=FILE is required" in capsys.readouterr().err
  # main.py is `bpnet train`: the same resume, as a separate process.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={copy}"],
                     capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr
  assert f"trained to step {2 * last}/{2 * last}" in r.stdout
