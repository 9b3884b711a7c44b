"""The benchmark scripts run end to end in their smoke mode (the numbers are not checked)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_smoke(script):
  """stdout of `python benchmarks/<script> --smoke` (fails the test on a non-zero exit)."""
  r = subprocess.run([sys.executable, f"benchmarks/{script}", "--smoke"], cwd=ROOT,
                     capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  return r.stdout


def test_input_pipeline_benchmark_smoke():
  out = run_smoke("input_pipeline.py")
  for needle in ("host decode+pad", "host grain pipeline", "device augment+targets"):
    assert needle in out


def test_decode_benchmark_smoke():
  out = run_smoke("decode.py")
  for needle in ("bpnet_jax.decode (fast)", "reference (original-style)", "speed ratio"):
    assert needle in out


def test_export_benchmark_smoke():
  pytest.importorskip("jax2onnx")
  out = run_smoke("export.py")
  for needle in ("fp32", "fp16", "int8", "speed-up int8 vs fp32"):
    assert needle in out


def test_train_step_benchmark_smoke():
  out = run_smoke("train_step.py")
  assert "| float32 | 4 |" in out and "| bfloat16 | 4 |" in out
  assert "forward" in out and "GFLOPs per image" in out


def test_end_to_end_benchmark_smoke():
  out = run_smoke("end_to_end.py")
  for needle in ("host decode capacity", "full pipeline (train.train", "data on device",
                 "ratio full / on-device"):
    assert needle in out


def test_inference_benchmark_smoke():
  pytest.importorskip("jax2onnx")
  out = run_smoke("inference.py")
  for needle in ("| jax-fp32 | cpu | 64x64 | 2 |", "| jax-bf16 |", "| ort-fp32 |", "| ort-int8 |",
                 "| trt-fp16 |", "end to end at 64x96"):
    assert needle in out


def test_convert_speed_benchmark_smoke():
  out = run_smoke("convert_speed.py")
  for needle in ("serial, 1 worker:", "parallel, 2 workers:", "images/s",
                 "output identical to 1 worker (records, summary, masks): yes",
                 "COCO train2017 (118,287 images) on 16 cores, extrapolated"):
    assert needle in out
