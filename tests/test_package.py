import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_is_light_and_fast():
  code = ("import time, sys; t = time.time(); import bpnet_jax; dt = time.time() - t; "
          "bad = [m for m in ('tensorflow', 'torch', 'tensorrt', 'onnxruntime') if m in sys.modules]; "
          "print(dt, bad); "
          "assert callable(bpnet_jax.build_model) and callable(bpnet_jax.pose_loss); "
          "assert callable(bpnet_jax.build_optimizer) and bpnet_jax.load_skeleton().num_joints == 18")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                     env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=60)
  assert r.returncode == 0, r.stderr
  dt, bad = r.stdout.split(" ", 1)
  # A sanity bound only (speed is measured by benchmarks): ~2 s on an idle 2-core machine.
  assert float(dt) < 15.0 and bad.strip() == "[]"


def test_ci_runs_the_readme_test_command():
  readme = open(os.path.join(ROOT, "README.md")).read()
  commands = re.findall(r"```(?:bash|sh)\n(.*?)\n```", readme, re.S)
  assert commands, "README has no command block"
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  test_cmd = [c for c in commands[:2] if "pytest" in c]
  assert test_cmd and test_cmd[0].strip() in ci


def test_builtin_skeleton_ships_with_the_package():
  import bpnet_jax.skeleton as s
  assert os.path.exists(os.path.join(s.BUILTIN_DIR, "bpnet_18joints.json"))
