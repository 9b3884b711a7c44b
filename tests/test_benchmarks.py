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
