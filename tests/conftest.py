"""Test setup: 4 forced host devices (multi-device code runs on CPU), repo root on sys.path."""

import os
import sys

# 4 host devices; LLVM at -O0: the suite compiles far more than it runs, and -O0 compiles ~30%
# faster; results may differ from -O3 by float rounding only, inside every test's tolerance.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the run (this process and the CLI/benchmark subprocesses
# it starts): many tests compile the same tiny networks through fresh jit objects, and XLA's CPU
# compile dominates their time. A new directory per run, so nothing stale is ever reused.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="bpnet_jax_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
  if _OWN_CACHE:
    import shutil
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def synth_records(tmp_path_factory):
  """A small synthetic dataset converted to records: (data dir, spec path, records dir)."""
  from bpnet_jax.data import synthetic_dataset
  root = tmp_path_factory.mktemp("synth_records")
  paths = synthetic_dataset.make_dataset(str(root), 20, seed=11, width=160, height=120,
                                         test_fraction=0.2, workers=1)
  return paths["data"], paths["spec"], paths["records"]


def tiny_train_config(synth, **trainer):
  """configs/demo.py at 64x64 on the synthetic records (fast to compile and run on CPU)."""
  from bpnet_jax.data import synthetic_dataset
  from configs import demo
  data, spec, records = synth
  c = synthetic_dataset.point_config(demo.get_config(), {
      "data": data, "spec": spec, "records": records, "summaries": {"train": {}, "test": {}}})
  d = c.dataloader
  d.max_image_size = (120, 160)
  d.max_people = 8
  d.image_config.height = d.image_config.width = 64
  d.pose_config.target_shape = (8, 8)
  d.label_processor_config.heatmap_gaussian_sigma = 4.0
  c.inference.input_shape = (64, 64)
  c.trainer.validation_every_n_epoch = 0
  c.trainer.log_every_n_secs = 0
  c.trainer.summary_every_n_steps = 1
  for k, v in trainer.items():
    c.trainer[k] = v
  return c


@pytest.fixture(scope="session")
def trained_workdir(synth_records, tmp_path_factory):
  """(config, workdir) of a tiny model trained for one epoch (2 steps) on the synthetic data."""
  from bpnet_jax import train
  config = tiny_train_config(synth_records, num_epoch=1, checkpoint_n_epoch=1)
  workdir = str(tmp_path_factory.mktemp("trained"))
  train.train(config, workdir, progress=False)
  return config, workdir


def write_config_file(config, path) -> str:
  """A config file whose get_config() returns `config` (for command-line tests)."""
  import json
  with open(path, "w") as f:
    f.write("import json\nimport ml_collections\n\n\ndef get_config():\n"
            f"  return ml_collections.ConfigDict(json.loads({json.dumps(config.to_dict())!r}))\n")
  return str(path)
