"""The benchmark scripts run end to end in their smoke mode (the numbers are not checked)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_input_pipeline_benchmark_smoke():
  r = subprocess.run([sys.executable, "benchmarks/input_pipeline.py", "--smoke"], cwd=ROOT,
                     capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  for needle in ("host decode+pad", "host grain pipeline", "device augment+targets"):
    assert needle in r.stdout


def test_decode_benchmark_smoke():
  r = subprocess.run([sys.executable, "benchmarks/decode.py", "--smoke"], cwd=ROOT,
                     capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  for needle in ("bpnet_jax.decode (fast)", "reference (original-style)", "speed ratio"):
    assert needle in r.stdout


def test_export_benchmark_smoke():
  pytest.importorskip("jax2onnx")
  r = subprocess.run([sys.executable, "benchmarks/export.py", "--smoke"], cwd=ROOT,
                     capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  for needle in ("fp32", "fp16", "int8", "speed-up int8 vs fp32"):
    assert needle in r.stdout
