"""Helpers shared by the benchmark scripts: machine description, synthetic records, the train
step on device-resident data, peak FLOP/s of known accelerators.

Each benchmark prints its numbers; nothing here asserts speed.
"""

from __future__ import annotations

import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Dense peak FLOP/s by (device kind substring, compute dtype), from the vendors' data sheets
# (SXM parts). float32 on NVIDIA GPUs runs convolutions as TF32 by default in XLA.
PEAK_FLOPS = {
    ("H100", "bfloat16"): 989e12, ("H100", "float32"): 495e12,
    ("H200", "bfloat16"): 989e12, ("H200", "float32"): 495e12,
    ("A100", "bfloat16"): 312e12, ("A100", "float32"): 156e12,
}


def peak_flops(device, dtype: str, override_tflops: float | None = None) -> float | None:
  """Peak dense FLOP/s of `device` for `dtype`, or None when unknown (e.g. CPUs)."""
  if override_tflops:
    return override_tflops * 1e12
  kind = getattr(device, "device_kind", "")
  for (name, dt), value in PEAK_FLOPS.items():
    if name in kind and dt == dtype:
      return value
  return None


def machine_line() -> str:
  """One line: devices, host cores, jax version (for the docs' tables)."""
  import jax
  devs = jax.devices()
  kind = devs[0].device_kind if devs[0].platform != "cpu" else platform.processor() or "cpu"
  return (f"{len(devs)} x {devs[0].platform} ({kind}), {os.cpu_count()} host cores, "
          f"jax {jax.__version__}, python {platform.python_version()}")


def load_config(name_or_path: str, overrides=()):
  """A config from configs/<name>.py or a path, with 'a.b=value' overrides."""
  from bpnet_jax.config import load_config_file
  path = name_or_path
  if not path.split(":")[0].endswith(".py"):
    path = os.path.join(ROOT, "configs", f"{name_or_path}.py")
  return load_config_file(path, overrides)


def synthetic_records(tmp: str, num_images: int, width: int = 640, height: int = 480,
                      workers: int = 1, seed: int = 0) -> dict:
  """Synthetic COCO-like JPEG dataset converted to training records (with masks), made by the
  library's one helper (`bpnet_jax.data.synthetic_dataset`).

  Returns its paths plus 'records' (the record file) and 'num_records'.
  """
  from bpnet_jax.data import synthetic_dataset
  paths = synthetic_dataset.make_dataset(tmp, num_images, seed=seed, width=width, height=height,
                                         test_fraction=0, workers=workers)
  return dict(paths, records=os.path.join(paths["records"], synthetic_dataset.TRAIN_RECORDS),
              num_records=paths["summaries"]["train"]["records"])


def point_config_at_records(config, recs: dict):
  """The config reading the records of `synthetic_records` (no validation)."""
  from bpnet_jax.data import synthetic_dataset
  folder = dict(recs, records=os.path.dirname(recs["records"]))
  config = synthetic_dataset.point_config(config, folder, validation=False)
  config.trainer.validation_every_n_epoch = 0
  return config


def decoder_and_source(config, recs: dict):
  """(the config's host decoder, a random-access source of the records)."""
  from array_record.python import array_record_data_source

  from bpnet_jax import skeleton as skeleton_lib
  from bpnet_jax.data import input_pipeline
  sk = skeleton_lib.load_skeleton(config.dataloader.pose_config.pose_config_path)
  return (input_pipeline.decoder_from_config(config, sk),
          array_record_data_source.ArrayRecordDataSource([recs["records"]]))


def decode_rate(dec, src, count: int) -> float:
  """Images/s of `dec` over `count` records of `src` in this process (= one grain worker)."""
  dec(src[0])                                         # warm-up (first file access)
  t = time.perf_counter()
  for i in range(count):
    dec(src[i % len(src)])
  return count / (time.perf_counter() - t)


def host_batch(config, recs: dict, batch_size: int) -> dict:
  """A host batch of `batch_size` decoded samples (the records repeated as needed)."""
  import numpy as np

  from bpnet_jax import augment
  dec, src = decoder_and_source(config, recs)
  samples = [dec(src[i % len(src)]) for i in range(batch_size)]
  return {k: np.stack([s[k] for s in samples]) for k in augment.SAMPLE_FIELDS if k in samples[0]}


def cpu_seconds() -> float:
  """CPU seconds (user + system) of this process so far, all its threads, not its children."""
  import resource
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def feed_rate(iterator, put, batches: int, batch_size: int) -> dict:
  """Times `batches` host batches of `iterator` each handed to the device by `put` (waited for).

  Returns {"wall": images/s, "per_core": images per CPU second of this process}: with decoding
  in worker processes, the second is the main process's share of the feed -- what one host core
  delivers, the serial part that worker processes cannot spread.
  """
  import jax
  jax.block_until_ready(put(next(iterator)))        # start-up (worker spawn) excluded
  cpu, wall = cpu_seconds(), time.perf_counter()
  for _ in range(batches):
    jax.block_until_ready(put(next(iterator)))
  cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
  n = batches * batch_size
  return {"wall": n / wall, "per_core": n / max(cpu, 1e-9)}


class DeviceTrainStep:
  """The training loop's jitted step (augmentation + targets + forward + backward + update) for a
  config, compiled once for a global batch, on all devices of a 1-D data mesh."""

  def __init__(self, config, steps_per_epoch: int = 1000):
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from bpnet_jax import model as model_lib
    from bpnet_jax import optimizer, schedules, train
    from bpnet_jax import skeleton as skeleton_lib
    self.config = c = config
    if c.dataloader.batch_size % jax.device_count():
      sys.exit(f"global batch {c.dataloader.batch_size} is not divisible by the "
               f"{jax.device_count()} devices")
    sk = skeleton_lib.load_skeleton(c.dataloader.pose_config.pose_config_path)
    self.mesh = train.make_mesh()
    last = steps_per_epoch * c.trainer.num_epoch
    sched = schedules.from_config(c.optimizer.learning_rate_schedule, steps_per_epoch, last)
    self.model = model_lib.build_model(c.model, sk, c.trainer.compute_dtype)
    tx_fn = lambda params: optimizer.optimizer_from_config(c, params, sched)
    h, w = c.dataloader.image_config.height, c.dataloader.image_config.width
    replicated = NamedSharding(self.mesh, P())
    t = time.perf_counter()
    with jax.set_mesh(self.mesh):
      self.state = jax.jit(lambda: train.init_state(c, self.model, tx_fn, h, w),
                           out_shardings=replicated)()
    jax.block_until_ready(self.state)
    self.init_s = time.perf_counter() - t
    self.tx = tx_fn(self.state.params)
    self.jitted = train.jit_train_step(train.make_train_step(c, sk, self.model, self.tx, sched),
                                       self.mesh, self.state)
    self.compiled = None

  def put(self, batch: dict):
    from bpnet_jax import train
    return train.shard_batch(batch, self.mesh)

  def compile(self, device_batch) -> float:
    """Lowers and compiles for this batch's shapes; returns seconds."""
    t = time.perf_counter()
    self.compiled = self.jitted.lower(self.state, device_batch).compile()
    return time.perf_counter() - t

  def xla_flops(self) -> float | None:
    cost = self.compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None

  def memory_bytes(self) -> dict | None:
    """XLA's buffer assignment for one step: arguments, outputs, temporaries, peak estimate."""
    m = self.compiled.memory_analysis()
    if m is None:
      return None
    args, out = m.argument_size_in_bytes, m.output_size_in_bytes
    temp, alias = m.temp_size_in_bytes, m.alias_size_in_bytes
    return {"arguments": args, "outputs": out, "temporaries": temp, "aliased": alias,
            "peak_estimate": args + out - alias + temp}

  def run(self, device_batch, steps: int) -> float:
    """Runs `steps` steps on the same device batch; returns seconds (after the last finishes)."""
    import jax
    t = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.compiled(self.state, device_batch)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - t


def forward_flops(config) -> float:
  """XLA-counted FLOPs of one forward pass of one image at the training input size."""
  from bpnet_jax import model as model_lib
  from bpnet_jax import prune
  from bpnet_jax import skeleton as skeleton_lib
  sk = skeleton_lib.load_skeleton(config.dataloader.pose_config.pose_config_path)
  m = model_lib.build_model(config.model, sk)
  h, w = config.dataloader.image_config.height, config.dataloader.image_config.width
  return prune.flops(m, model_lib.abstract_variables(m, 64, 64), h, w)


def fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return f"{n:.1f} GiB"
