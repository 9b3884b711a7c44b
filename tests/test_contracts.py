"""Contracts that keep the training step fast on an accelerator, checked on the CPU (issue 18).

(a) a training run reads device values only at summary and checkpoint steps, and its input
    iterator runs >= 2 batches ahead of the step;
(b) the compiled step donates the whole state, uses no all-gather / reduce-scatter / all-to-all,
    at most 2 all-reduces per BatchNorm layer + 1, and compiles once across epochs and
    checkpoints;
(c) under compute_dtype='bfloat16' every convolution is bf16 and every reduction is f32;
(d) augmentation + targets stay under 0.1% of the step's FLOPs and 2% of its bytes;
and the host feed's layout changes nothing the network sees: a portrait image turned onto the
landscape canvas, and a mask sent as bits, give the same input, labels and loss mask.

`jax.transfer_guard` does not fire on the CPU backend, so (a) counts the reads that reach the
host where every one does: `ArrayImpl._value` (np.asarray, float(), int(), bool(), .item(),
jax.device_get and Orbax's saves all go through it).
"""

import collections
import os
import re
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python import array_record_data_source
from conftest import tiny_train_config
from jax._src.array import ArrayImpl
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bpnet_jax import augment, optimizer, schedules, train
from bpnet_jax import model as model_lib
from bpnet_jax import skeleton as skeleton_lib
from bpnet_jax.data import input_pipeline as ip
from bpnet_jax.data import synthetic_dataset
from bpnet_jax.errors import DataError
from configs import coco

SK = skeleton_lib.load_skeleton()
# The backend's code generation does not change the HLO (fusion, partitioning, aliasing, costs
# are decided before it): skipping LLVM's optimisations makes these compiles 2-3x faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
AHEAD = 2              # batches the input pipeline must have handed over beyond the current step
WAIT_SECONDS = 5.0     # how long a probed step waits for them (a loaded machine decodes slowly)


# ----------------------------------------------------------------------------------------------
# (a) Device reads and prefetching in a real training run.

class _Probe:
  """Counts train steps dispatched, batches pulled from the input iterator, and device reads."""

  def __init__(self):
    self.lock = threading.Lock()
    self.steps = 0          # train steps dispatched so far
    self.pulled = 0         # batches taken from the input pipeline's iterator
    self.leads = []         # pulled - steps when each step is dispatched
    self.reads = collections.Counter()   # step -> device->host reads after dispatching it
    self.prefetch_sizes = []


class _CountingIterator:
  def __init__(self, it, probe):
    self.it, self.probe = it, probe

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.it)
    with self.probe.lock:
      self.probe.pulled += 1
    return batch

  def get_state(self):
    return self.it.get_state()


class _ProbedStep:
  """The jitted train step, recording the input pipeline's lead when it is dispatched.

  A slow step gives the pipeline time to run ahead: each waits (up to WAIT_SECONDS) until
  AHEAD more batches have left the iterator, and records how many had.
  """

  def __init__(self, jitted, probe):
    self.jitted, self.probe = jitted, probe

  def __call__(self, state, batch):
    step = self.probe.steps + 1
    deadline = time.monotonic() + WAIT_SECONDS
    while self.probe.pulled - step < AHEAD and time.monotonic() < deadline:
      time.sleep(0.01)
    with self.probe.lock:
      self.probe.steps = step
      self.probe.leads.append(self.probe.pulled - step)
    return self.jitted(state, batch)

  def _cache_size(self):
    return self.jitted._cache_size()


@pytest.fixture(scope="module")
def probed_run(synth_records, tmp_path_factory):
  """(config, train.train's result, probe) of 2 epochs with device reads counted: summaries
  every 3 steps, a checkpoint after each epoch (of 5 steps: batch 8 of 40-odd records)."""
  probe = _Probe()
  mp = pytest.MonkeyPatch()
  value = ArrayImpl.__dict__["_value"].fget

  def counted_value(self):
    if self._npy_value is None:        # a cached value costs no transfer
      with probe.lock:
        probe.reads[probe.steps] += 1
    return value(self)

  real_jit, real_prefetch = train.jit_train_step, ip.prefetch_to_device

  def jit_train_step(step, mesh, state):
    return _ProbedStep(real_jit(step, mesh, state), probe)

  def prefetch_to_device(iterator, size=2, put=None, check=None):
    probe.prefetch_sizes.append(size)
    return real_prefetch(_CountingIterator(iterator, probe), size, put, check)

  cfg = tiny_train_config(synth_records, num_epoch=2, checkpoint_n_epoch=1,
                          summary_every_n_steps=3)
  mp.setattr(ArrayImpl, "_value", property(counted_value))
  mp.setattr(train, "jit_train_step", jit_train_step)
  mp.setattr(ip, "prefetch_to_device", prefetch_to_device)
  try:
    out = train.train(cfg, str(tmp_path_factory.mktemp("probed")), progress=False)
  finally:
    mp.undo()
  return cfg, out, probe


def test_training_reads_the_device_only_at_summaries_and_checkpoints(probed_run):
  cfg, out, probe = probed_run
  spe, last = out["steps_per_epoch"], out["last_step"]
  assert last == 2 * spe and probe.steps == last and spe > 3
  every = cfg.trainer.summary_every_n_steps
  ckpt = {s for s in range(1, last + 1) if s % (cfg.trainer.checkpoint_n_epoch * spe) == 0}
  summary = {s for s in range(1, last + 1) if s % every == 0} | ckpt
  assert ckpt == {spe, last} and len(summary) < last - 3     # steps that must not read
  # Step 0 = setup (restoring, the start step), before the loop.
  reading = {s for s, n in probe.reads.items() if n and s > 0}
  assert reading <= summary, (f"device->host reads after steps {sorted(reading - summary)}, "
                              f"which are neither summary nor checkpoint steps: {probe.reads}")
  assert {3, 6, spe} <= reading             # the probe sees the summaries' fetches


def test_input_iterator_runs_at_least_two_batches_ahead(probed_run):
  _, _, probe = probed_run
  assert probe.prefetch_sizes and min(probe.prefetch_sizes) >= 2
  # When step s is dispatched, batches s + 1 and s + 2 have left the input pipeline already
  # (pulled and handed to the device: prefetch_to_device puts a batch before it queues it).
  assert len(probe.leads) == probe.steps and min(probe.leads) >= AHEAD, probe.leads


def test_one_compilation_across_epochs_and_checkpoints(probed_run):
  _, out, _ = probed_run
  assert out["train_step_compilations"] == 1


# ----------------------------------------------------------------------------------------------
# (b), (c) The lowered / compiled train step.

def _step_and_batch(cfg, devices=None):
  """(jitted train step as train.train builds it, its state, one sharded host batch)."""
  s = train.setup(cfg, devices)
  tx_fn = lambda p: optimizer.optimizer_from_config(cfg, p, s.schedule)  # noqa: E731
  h, w = cfg.dataloader.image_config.height, cfg.dataloader.image_config.width
  with jax.set_mesh(s.mesh):
    state = jax.jit(lambda: train.init_state(cfg, s.model, tx_fn, h, w),
                    out_shardings=NamedSharding(s.mesh, P()))()
  step = train.jit_train_step(train.make_train_step(cfg, s.skeleton, s.model,
                                                    tx_fn(state.params), s.schedule),
                              s.mesh, state)
  it = ip.make_iterator(s.dataset, cfg.dataloader.batch_size)
  batch = train.shard_batch(augment.sample_fields(next(it)), s.mesh)   # as train.train puts it
  it.close()
  return step, state, batch


def _instructions(hlo: str):
  """[(name, result type text, opcode, operand names)] of every HLO instruction in the text."""
  out = []
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$", line)
    if m and not m.group(2).startswith("{"):
      operands = re.findall(r"%?([\w.\-]+)(?=[,)])", m.group(4).split("), ")[0] + ")")
      out.append((m.group(1), m.group(2), m.group(3), operands))
  return out


def _dtypes(type_text: str) -> set:
  return set(re.findall(r"\b(pred|[subf]\d+|bf16|f8\w*)\[", type_text))


def _batchnorm_layers(batch_stats) -> int:
  """BatchNorm layers in a model's batch_stats (each holds a 'mean' and a 'var')."""
  paths = [tuple(str(k) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(
      batch_stats)[0]]
  return sum(1 for p in paths if "mean" in p[-1])


def test_compiled_step_donates_the_state_and_only_all_reduces(synth_records):
  assert len(jax.devices()) == 4
  step, state, batch = _step_and_batch(tiny_train_config(synth_records))
  hlo = step.lower(state, batch).compile(FAST_COMPILE).as_text()
  header = hlo.split("\n", 1)[0]
  aliases = re.findall(r"\{[\d, ]*\}: \(\d+, \{[\d, ]*\}, (?:may|must)-alias\)", header)
  assert len(aliases) == len(jax.tree_util.tree_leaves(state)), header[:300]
  ops = collections.Counter(op.removesuffix("-start") for _, _, op, _ in _instructions(hlo))
  for banned in ("all-gather", "reduce-scatter", "all-to-all"):
    assert ops[banned] == 0, f"{ops[banned]} {banned} in the step: parameters must stay replicated"
  bn = _batchnorm_layers(state.batch_stats)
  # At most one all-reduce per gradient leaf, plus BatchNorm's batch moments (2 per layer,
  # forward) and their gradients (2 per layer, backward), plus the loss terms reported as
  # metrics: nothing else crosses devices. Recent XLA combines them (<= 2 * bn + 1 in all with
  # jax 0.10: at most 23 here); XLA:CPU of jax 0.7 leaves them separate (100 here).
  grads = len(jax.tree_util.tree_leaves(state.params))
  assert bn > 0 and 0 < ops["all-reduce"] <= grads + 4 * bn + 16, (ops["all-reduce"], grads, bn)


def test_bfloat16_step_convolves_in_bf16_and_reduces_in_f32(synth_records):
  cfg = tiny_train_config(synth_records, compute_dtype="bfloat16")
  step, state, batch = _step_and_batch(cfg, jax.devices()[:1])
  # The program as written (before XLA:CPU, which has no bf16 convolutions, upcasts them).
  hlo = step.lower(state, batch).as_text(dialect="hlo")
  inst = _instructions(hlo)
  types = {name: t for name, t, _, _ in inst}
  convs = [(n, t, ops) for n, t, op, ops in inst if op == "convolution"]
  assert len(convs) >= 3 * 11, len(convs)       # forward + both backward convs of each layer
  for name, t, operands in convs:
    got = _dtypes(t) | set().union(*(_dtypes(types[o]) for o in operands if o in types))
    assert got == {"bf16"}, (name, t, [types.get(o) for o in operands])
  reduces = [(n, t) for n, t, op, _ in inst if op == "reduce"]
  floats = [(n, t) for n, t in reduces if _dtypes(t) & {"f16", "bf16", "f32", "f64"}]
  assert floats and all(_dtypes(t) <= {"f32", "s32", "pred"} for _, t in floats), \
      [(n, t) for n, t in floats if _dtypes(t) - {"f32", "s32", "pred"}]


# ----------------------------------------------------------------------------------------------
# (d) Augmentation + targets against the whole step, at the shipped config.

def _abstract_batch(cfg, batch_size: int) -> dict:
  """ShapeDtypeStructs of a host batch as `DecodeAndPad` + batching make it for cfg."""
  d, S = cfg.dataloader, jax.ShapeDtypeStruct
  ch, cw = d.max_image_size
  p, j, b = d.max_people, SK.num_joints, batch_size
  return dict(image=S((b, ch, cw, 3), jnp.uint8),
              mask_bits=S((b, ch, ip.mask_bytes_per_row(cw)), jnp.uint8),
              has_mask=S((b,), jnp.uint8), rotated=S((b,), jnp.uint8),
              size=S((b, 2), jnp.int32), joints=S((b, p, j, 2), jnp.float32),
              visibility=S((b, p, j), jnp.uint8), centers=S((b, p, 2), jnp.float32),
              scales=S((b, p), jnp.float32), num_people=S((b,), jnp.int32),
              valid=S((b,), jnp.uint8))


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else cost


def test_augmentation_and_targets_are_a_small_part_of_the_step():
  cfg = coco.get_config()
  sk = skeleton_lib.skeleton_from_config(cfg)
  model = model_lib.build_model(cfg.model, sk, cfg.trainer.compute_dtype)
  sched = schedules.from_config(cfg.optimizer.learning_rate_schedule, 100, 1000)
  tx_fn = lambda p: optimizer.optimizer_from_config(cfg, p, sched)  # noqa: E731
  h, w = cfg.dataloader.image_config.height, cfg.dataloader.image_config.width
  state = jax.eval_shape(lambda: train.init_state(cfg, model, tx_fn, h, w))
  batch = _abstract_batch(cfg, 2)
  step = jax.jit(train.make_train_step(cfg, sk, model, tx_fn(state.params), sched),
                 donate_argnums=0)
  whole = _cost(step.lower(state, batch).compile(FAST_COMPILE))
  aug = augment.AugParams.from_config(cfg.dataloader.augmentation_config)
  lab = augment.LabelParams.from_config(cfg)
  pre = jax.jit(lambda key, b: augment.preprocess_batch(key, b, aug, lab, sk))
  part = _cost(pre.lower(jax.random.key(0), batch).compile(FAST_COMPILE))
  flops = part["flops"] / whole["flops"]
  moved = part["bytes accessed"] / whole["bytes accessed"]
  assert flops < 0.001, f"augmentation + targets are {100 * flops:.3f}% of the step's FLOPs"
  assert moved < 0.02, f"augmentation + targets are {100 * moved:.2f}% of the step's bytes"


# ----------------------------------------------------------------------------------------------
# The host feed's layout is invisible to the network.

@pytest.fixture(scope="module")
def portrait(tmp_path_factory):
  """(data dir, records file) of synthetic portrait images, 96 wide x 128 high, with masks."""
  root = str(tmp_path_factory.mktemp("portrait"))
  paths = synthetic_dataset.make_dataset(root, 6, seed=4, width=96, height=128,
                                         test_fraction=0, workers=1)
  return paths["data"], os.path.join(paths["records"], synthetic_dataset.TRAIN_RECORDS)


def _preprocess(aug, lab, batch):
  """augment.preprocess_batch compiled for this batch's shapes: fn(key) -> outputs."""
  fields = augment.sample_fields(batch)
  fn = jax.jit(lambda key, b: augment.preprocess_batch(key, b, aug, lab, SK))
  compiled = fn.lower(jax.random.key(0), fields).compile(FAST_COMPILE)
  return lambda key: compiled(key, fields)


def _host_batch(data, records, canvas):
  dec = ip.DecodeAndPad({"coco": data}, data, canvas, 4, SK.num_joints)
  src = array_record_data_source.ArrayRecordDataSource([records])
  samples = [dec((i, src[i])) for i in range(len(src))]
  return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


@pytest.mark.parametrize("mode, turned_canvas, upright_canvas", [
    ("person_centric", (96, 128), (128, 128)),   # fits once turned: no shrinking either way
    ("standard", (96, 128), (128, 128)),
    ("person_centric", (48, 64), (64, 64)),       # shrunk by 0.5 either way, then turned
])
def test_turned_portrait_gives_the_same_input_and_labels(portrait, mode, turned_canvas,
                                                         upright_canvas):
  data, records = portrait
  turned = _host_batch(data, records, turned_canvas)
  upright = _host_batch(data, records, upright_canvas)
  assert turned["rotated"].all() and not upright["rotated"].any()
  np.testing.assert_array_equal(turned["size"], upright["size"])
  assert turned["has_mask"].all() and not ip.unpack_mask(upright).all()   # masks with holes
  aug = augment.AugParams(mode=mode, flip_lr_prob=0.5, rotate_deg_min=-40, rotate_deg_max=40,
                          translate_min_x=-10, translate_max_x=10, translate_min_y=-10,
                          translate_max_y=10, zoom_prob=0.5, zoom_ratio_min=0.7,
                          zoom_ratio_max=1.3)
  lab = augment.LabelParams(input_hw=(64, 64), target_hw=(8, 8), sigma=3.0,
                            ortho_dist_thresh=1.0)
  fa, fb = _preprocess(aug, lab, turned), _preprocess(aug, lab, upright)
  for seed in range(3):
    a, b = fa(jax.random.key(seed)), fb(jax.random.key(seed))
    np.testing.assert_allclose(a["image"], b["image"], atol=2e-4)   # 0.05 grey levels
    np.testing.assert_allclose(a["labels"], b["labels"], atol=1e-6)
    np.testing.assert_allclose(a["mask"], b["mask"], atol=1e-4)


def test_mask_bits_equal_the_full_mask(portrait):
  data, records = portrait
  batch = _host_batch(data, records, (128, 128))
  full = {k: v for k, v in batch.items() if k not in ("mask_bits", "has_mask")}
  full["mask"] = ip.unpack_mask(batch)
  cfg = coco.get_config()
  aug = augment.AugParams.from_config(cfg.dataloader.augmentation_config)
  lab = augment.LabelParams(input_hw=(64, 64), target_hw=(8, 8), sigma=3.0,
                            ortho_dist_thresh=1.0)
  a = _preprocess(aug, lab, batch)(jax.random.key(1))
  b = _preprocess(aug, lab, full)(jax.random.key(1))
  # Equal up to the order XLA fuses the arithmetic in (float rounding).
  np.testing.assert_allclose(a["mask"], b["mask"], atol=1e-6)
  np.testing.assert_allclose(a["image"], b["image"], atol=1e-5)
  # A record without a mask: all valid, with nothing sent.
  none = dict(batch, has_mask=np.zeros_like(batch["has_mask"]),
              mask_bits=np.zeros_like(batch["mask_bits"]))
  np.testing.assert_allclose(_preprocess(aug, lab, none)(jax.random.key(1))["mask"], 1.0)


def test_feed_is_smaller_than_the_old_square_canvas():
  cfg = coco.get_config()
  batch = _abstract_batch(cfg, 1)
  per_sample = sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in batch.values())
  old = 640 * 640 * 4          # image + full-resolution mask on the old 640x640 canvas
  assert tuple(cfg.dataloader.max_image_size) == (480, 640)
  assert per_sample < 0.6 * old, per_sample


def test_resume_position_is_in_samples_and_reads_older_states(portrait):
  data, records = portrait
  dec = ip.DecodeAndPad({"coco": data}, data, (96, 128), 4, SK.num_joints)
  ds = ip.build_dataset([records], dec, 3, 10**6)
  it = ip.make_iterator(ds, 2)
  seen = [next(it)["record_index"].tolist() for _ in range(4)]
  assert it.get_state() == {"samples": 8}
  it.close()
  # Any batch size resumes at the same sample; so do the per-sample states grain wrote before
  # batches were made in the workers (without workers, and summed over 2 workers).
  flat = sum(seen, [])
  for state, size in (({"samples": 4}, 4), ({"next_index": 4}, 2),
                      ({"iterators_in_use_states": [{"next_index": 2}, {"next_index": 2}]}, 2)):
    resumed = ip.make_iterator(ds, size, state=state)
    assert next(resumed)["record_index"].tolist() == flat[4:4 + size], state
    resumed.close()
  with pytest.raises(DataError, match="data position"):
    ip.make_iterator(ds, 2, state={"something": 1})
