"""Training: one jitted, data-parallel train step; Orbax checkpoints with exact resume; logging.

`train(config, workdir)` trains into workdir:
  workdir/config.json          the resolved config
  workdir/checkpoints/<step>/  Orbax: train state (step, params, batch_stats, opt_state, rng) and
                               the input pipeline's iterator state
  workdir/checkpoints/best/    with trainer.evaluation: the state with the best COCO AP so far
                               (a model directory: config + params + batch stats; best.json)
  workdir/metrics.jsonl        a line every summary_every_n_steps (and val_loss when validating,
                               eval_AP, eval_AP50, ... when evaluating)
  workdir/tensorboard/         the same scalars for TensorBoard

Data parallelism: a 1-D mesh over all devices; the batch is sharded on its leading axis,
parameters and optimizer state are replicated, and the state buffers are donated. BatchNorm
statistics are computed over the global batch (XLA inserts the cross-device reductions), as
single-device training on that batch would. Multi-host: every process runs the same command after
`jax.distributed.initialize()` (main.py --multihost) and feeds its own slice of the records.

Re-running the same command resumes from the newest readable checkpoint: the step, optimizer,
RNG and the exact position in the data, so the result equals an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tensorboardX import SummaryWriter

from bpnet_jax import augment, fileio, losses, schedules
from bpnet_jax import checkpoint as checkpoint_lib
from bpnet_jax import config as config_lib
from bpnet_jax import model as model_lib
from bpnet_jax import optimizer as optimizer_lib
from bpnet_jax import skeleton as skeleton_lib
from bpnet_jax.data import dataset_spec, input_pipeline
from bpnet_jax.data import records as records_lib
from bpnet_jax.errors import DataError, TrainingError
from bpnet_jax.inference.coco_eval import CocoEvaluator

log = logging.getLogger("bpnet.train")
BEST, BEST_FILE = "best", "best.json"   # workdir/checkpoints/best/best.json




@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array          # raw key data; the augmentation key of step s is fold_in(rng, s)


@dataclasses.dataclass
class Setup:
  """Everything derived from the config that the loop needs."""
  config: Any
  skeleton: Any
  model: Any
  schedule: Any
  mesh: Mesh
  steps_per_epoch: int
  last_step: int
  dataset: Any
  num_records: int


def _steps(config, num_records):
  global_batch = config.dataloader.batch_size
  spe = num_records // global_batch
  if spe < 1:
    raise TrainingError(f"{num_records} training records are fewer than one batch of "
                        f"dataloader.batch_size={global_batch}")
  return spe, spe * config.trainer.num_epoch


def make_mesh(devices=None) -> Mesh:
  return Mesh(np.array(devices if devices is not None else jax.devices()), ("data",))


def init_state(config, model, tx_fn, height, width) -> TrainState:
  """Fresh train state (parameters from the seed); tx_fn(params) -> optax transformation."""
  rng = jax.random.key(config.trainer.random_seed)
  variables = model_lib.init_variables(model, rng, height, width)
  params = variables["params"]
  tx = tx_fn(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.fold_in(rng, 1)))


def make_train_step(config, skeleton, model, tx, schedule):
  """train_step(state, host_batch) -> (state, metrics): augmentation, targets, loss, update."""
  aug = augment.AugParams.from_config(config.dataloader.augmentation_config)
  lab = augment.LabelParams.from_config(config)
  loss_fn_config = losses.loss_from_config(config, skeleton)

  def train_step(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    data = augment.preprocess_batch(key, batch, aug, lab, skeleton)

    def loss_fn(params):
      (heats, pafs), new_vars = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, data["image"], train=True,
          mutable=["batch_stats"])
      total, terms = loss_fn_config(params, heats, pafs, data["labels"], data["mask"])
      return total, (terms, new_vars["batch_stats"])

    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(terms, loss=loss, lr=schedule(state.step))
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), metrics
  return train_step


def make_eval_loss(config, skeleton, model):
  """eval_loss(state, host_batch) -> loss terms without augmentation (validation)."""
  aug = augment.AugParams.from_config(config.dataloader.augmentation_config, enabled=False)
  lab = augment.LabelParams.from_config(config)
  loss_fn_config = losses.loss_from_config(config, skeleton)

  def eval_loss(state, batch):
    data = augment.preprocess_batch(jax.random.key(0), batch, aug, lab, skeleton, augment=False)
    heats, pafs = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                              data["image"], train=False)
    total, terms = loss_fn_config(state.params, heats, pafs, data["labels"], data["mask"])
    return dict(terms, loss=total)
  return eval_loss


def shard_batch(batch: dict, mesh: Mesh):
  """Host batch (this process's rows) -> global arrays sharded over the 'data' axis."""
  sharding = NamedSharding(mesh, P("data"))
  batch = {k: np.asarray(v) for k, v in batch.items()}
  if jax.process_count() == 1:
    # The local batch is the global one: one transfer call for every array halves the host's
    # time per batch against one call per array (the feed's main-process share).
    return jax.device_put(batch, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def jit_train_step(train_step, mesh: Mesh, state_example):
  replicated = NamedSharding(mesh, P())
  state_sharding = jax.tree_util.tree_map(lambda _: replicated, state_example)
  return jax.jit(train_step, in_shardings=(state_sharding, NamedSharding(mesh, P("data"))),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))


# ----------------------------------------------------------------------------------------------
# Logging.

class MetricsLog:
  """metrics.jsonl lines and TensorBoard scalars (process 0 only)."""

  def __init__(self, workdir: str, resume_step: int, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not enabled:
      return
    if os.path.exists(self.path):
      # Lines written after the checkpoint we resume from belong to the abandoned run.
      with open(self.path) as f:
        keep = [line for line in f
                if line.strip() and json.loads(line)["step"] <= resume_step]
      fileio.write_text(self.path, "".join(keep))
    self.file = open(self.path, "a")
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def write(self, step: int, values: dict):
    if not self.enabled:
      return
    self.file.write(json.dumps(dict(step=step, **values)) + "\n")
    self.file.flush()
    if self.tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)) and k != "epoch":
          self.tb.add_scalar(k if k in ("lr", "images_per_sec") else f"loss/{k}", v, step)
      self.tb.flush()

  def close(self):
    if self.enabled:
      self.file.close()
      if self.tb is not None:
        self.tb.close()


# ----------------------------------------------------------------------------------------------
# The loop.

def setup(config, devices=None) -> Setup:
  config_lib.validate(config)
  if config.trainer.load_graph:
    # Retraining a pruned model: its architecture (layer widths) comes with its weights.
    config = checkpoint_lib.architecture_from(config.trainer.pretrained_weights, config)
  # The saved config carries the skeleton, so the workdir and its checkpoints describe
  # themselves.
  config = checkpoint_lib.with_skeleton(config)
  sk = skeleton_lib.skeleton_from_config(config)
  mesh = make_mesh(devices)
  n_dev = mesh.devices.size
  if config.dataloader.batch_size % n_dev:
    raise TrainingError(f"dataloader.batch_size={config.dataloader.batch_size} is not divisible "
                        f"by the {n_dev} devices")
  try:
    ds = input_pipeline.train_dataset_from_config(config, sk, jax.process_index(),
                                                  jax.process_count())
  except FileNotFoundError as e:
    raise DataError(str(e)) from None
  except ValueError as e:
    raise TrainingError(str(e)) from None
  d = config.dataloader.dataset_config
  paths = input_pipeline.resolve_record_paths(d.train_records_folder_path, d.train_records_path)
  num_records = len(records_lib.open_source(paths))
  spe, last = _steps(config, num_records)
  sched = schedules.from_config(config.optimizer.learning_rate_schedule, spe, last)
  model = model_lib.build_model(config.model, sk, config.trainer.compute_dtype)
  return Setup(config, sk, model, sched, mesh, spe, last, ds, num_records)


def train(config, workdir: str, devices=None, progress: bool = True) -> dict:
  """Trains (or resumes) into workdir. Returns a summary dict (final step, last metrics)."""
  os.makedirs(workdir, exist_ok=True)
  job = setup(config, devices)
  cfg, trainer = job.config, job.config.trainer
  h, w = cfg.dataloader.image_config.height, cfg.dataloader.image_config.width
  main_process = jax.process_index() == 0
  if main_process:
    checkpoint_lib.save_run_config(cfg, workdir)

  tx_fn = lambda params: optimizer_lib.optimizer_from_config(cfg, params, job.schedule)
  replicated = NamedSharding(job.mesh, P())
  with jax.set_mesh(job.mesh):
    state = jax.jit(lambda: init_state(cfg, job.model, tx_fn, h, w), out_shardings=replicated)()
  tx = tx_fn(state.params)
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
  mngr, restored = checkpoint_lib.restore_latest(workdir, trainer.max_ckpt_to_keep, abstract)
  data_state = None
  if restored is not None:
    state, data_state, meta, step = restored
    print(f"resuming from checkpoint step {step} (epoch {meta.get('epoch')})", file=sys.stderr)
  elif trainer.finetuning_config.is_finetune_exp:
    state = checkpoint_lib.read_state(trainer.finetuning_config.checkpoint_path, abstract)
    first_step = trainer.finetuning_config.ckpt_epoch_num * job.steps_per_epoch
    state = state.replace(step=jnp.asarray(first_step, jnp.int32))
    print(f"fine-tuning from {trainer.finetuning_config.checkpoint_path} at epoch "
          f"{trainer.finetuning_config.ckpt_epoch_num}", file=sys.stderr)
  elif trainer.pretrained_weights:
    tree = checkpoint_lib.read_state(trainer.pretrained_weights)
    params, rp = checkpoint_lib.load_by_name(state.params, tree.get("params", {}))
    stats, rs = checkpoint_lib.load_by_name(state.batch_stats, tree.get("batch_stats", {}))
    if trainer.load_graph and (rp["missing"] or rp["shape_mismatch"] or rs["missing"]
                         or rs["shape_mismatch"]):
      bad = rp["missing"] + rp["shape_mismatch"] + rs["missing"] + rs["shape_mismatch"]
      raise TrainingError(f"{trainer.pretrained_weights}: the pruned weights do not fit the model "
                          f"rebuilt from its config.json ({len(bad)} parameters, e.g. {bad[:2]})")
    state = state.replace(params=jax.device_put(params, replicated),
                          batch_stats=jax.device_put(stats, replicated),
                          opt_state=jax.device_put(tx.init(params), replicated))
    print(f"pretrained weights from {trainer.pretrained_weights}: loaded {len(rp['loaded'])} "
          f"params + {len(rs['loaded'])} batch stats; skipped {len(rp['missing'])} absent "
          f"(e.g. {rp['missing'][:3]}), {len(rp['shape_mismatch'])} with another shape "
          f"{rp['shape_mismatch'][:3]}", file=sys.stderr)

  start = int(state.step)
  train_step = jit_train_step(make_train_step(cfg, job.skeleton, job.model, tx, job.schedule),
                              job.mesh, state)
  per_process_batch = cfg.dataloader.batch_size // jax.process_count()
  it = input_pipeline.make_iterator(job.dataset, per_process_batch, cfg.dataloader.num_workers,
                                    state=data_state)
  guard = input_pipeline.unreadable_guard_from_config(cfg, job.skeleton, job.steps_per_epoch,
                                                      per_process_batch, start)
  metrics_log = MetricsLog(workdir, start, enabled=main_process)
  ckpt_every = trainer.checkpoint_n_epoch * job.steps_per_epoch
  bar = None
  if main_process and progress:
    bar = tqdm.tqdm(total=job.last_step, initial=start, unit="step", file=sys.stderr,
               mininterval=max(0.1, trainer.log_every_n_secs), dynamic_ncols=True)
  last = {}
  window_start, window_steps = time.perf_counter(), 0
  val = _validation(cfg, job, workdir) if trainer.validation_every_n_epoch else None
  evaluation = _Evaluation(cfg, job, workdir)
  try:
    # Only the fields the step reads go to the device (not image_id / record_index: the guard
    # reads those on the host).
    batches = input_pipeline.prefetch_to_device(
        it, 2, lambda b: shard_batch(augment.sample_fields(b), job.mesh), check=guard.update)
    step = start
    pending = []
    while step < job.last_step:
      batch, data_state = next(batches)
      state, metrics = train_step(state, batch)
      step += 1
      window_steps += 1
      pending.append(metrics)
      is_ckpt = step % ckpt_every == 0 or step == job.last_step
      if step % trainer.summary_every_n_steps == 0 or is_ckpt:
        per_step = _fetch_metrics(pending)            # one device->host transfer
        first_step = step - len(pending) + 1
        pending = []
        bad = np.flatnonzero(~np.isfinite(per_step["loss"]))
        if bad.size:
          _stop_on_non_finite(mngr, workdir, first_step + int(bad[0]),
                              float(per_step["loss"][bad[0]]), job.steps_per_epoch)
        values = {k: float(np.mean(v)) for k, v in per_step.items()}
        now = time.perf_counter()
        values.update(epoch=round(step / job.steps_per_epoch, 4),
                      images_per_sec=round(window_steps * cfg.dataloader.batch_size
                                           / max(now - window_start, 1e-9), 2))
        window_start, window_steps = now, 0
        last = values
        metrics_log.write(step, values)
        if bar is not None:
          bar.set_postfix(epoch=f"{values['epoch']:.2f}", loss=f"{values['loss']:.4g}",
                          lr=f"{values['lr']:.3g}", img_s=f"{values['images_per_sec']:.0f}",
                          refresh=False)
      if bar is not None:
        bar.update(1)
      if val is not None and step % (trainer.validation_every_n_epoch * job.steps_per_epoch) == 0:
        vloss = val(state)
        metrics_log.write(step, {"epoch": round(step / job.steps_per_epoch, 4),
                                 "val_loss": vloss})
      if evaluation.due(step):
        ap = evaluation.run(state, step)
        metrics_log.write(step, {"epoch": round(step / job.steps_per_epoch, 4),
                                 **{f"eval_{k}": v for k, v in ap.items()}})
        if bar is not None:
          bar.set_postfix(epoch=f"{step / job.steps_per_epoch:.2f}", AP=f"{ap['AP']:.3f}",
                          best_AP=f"{evaluation.best_ap:.3f}", refresh=False)
      if is_ckpt:
        if not bool(all_finite(state)):
          _stop_on_non_finite(mngr, workdir, step + 1, float("nan"), job.steps_per_epoch,
                              what="parameters or optimizer state")
        checkpoint_lib.save_checkpoint(
            mngr, state, _jsonable(data_state),
            {"epoch": step // job.steps_per_epoch, "steps_per_epoch": job.steps_per_epoch,
             "num_records": job.num_records}, cfg)
  finally:
    if bar is not None:
      bar.close()
    mngr.wait_until_finished()
    mngr.close()
    metrics_log.close()
    if hasattr(it, "close"):
      it.close()
  return {"step": int(state.step), "last_step": job.last_step,
          "steps_per_epoch": job.steps_per_epoch, "metrics": last, "state": state,
          # Compilations of the step: 1 unless something (a shape, a dtype, a sharding) changed.
          "train_step_compilations": train_step._cache_size(),
          "evaluation": evaluation.history,
          "evaluation_compilations": evaluation.compilations()}


def _jsonable(x):
  return json.loads(json.dumps(x, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


@jax.jit
def _stack_metrics(items):
  return jax.tree_util.tree_map(lambda *values: jnp.stack(values), *items)


def _fetch_metrics(items) -> dict:
  """{name: (n,) float64} of n steps' metrics, stacked on the device and fetched at once."""
  return {k: np.asarray(v, np.float64) for k, v in jax.device_get(_stack_metrics(items)).items()}


@jax.jit
def all_finite(tree) -> jax.Array:
  """True if every floating-point leaf of `tree` is finite (one scalar to fetch)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _stop_on_non_finite(mngr, workdir: str, step: int, loss: float, steps_per_epoch: int,
                        what: str = "loss"):
  """Raises TrainingError after moving aside every checkpoint that cannot be trusted.

  The loss of step n is computed with the parameters saved at step n - 1, so a non-finite loss
  at step n condemns every checkpoint at or after step n - 1; the message names the newest
  checkpoint kept, which is what a rerun resumes from.
  """
  mngr.wait_until_finished()
  for saved in sorted(mngr.all_steps()):
    if saved >= step - 1:
      checkpoint_lib.quarantine(workdir, saved,
                                f"its parameters give a non-finite loss at step {step}")
  mngr.reload()
  kept = mngr.latest_step()
  where = f"step {kept}" if kept is not None else "none: a rerun starts from scratch"
  if what != "loss":
    step -= 1               # the state after this step is the non-finite one
  detail = f"became {loss}" if what == "loss" else "became non-finite"
  raise TrainingError(f"the {what} {detail} at step {step} (epoch {step / steps_per_epoch:.2f}); "
                      f"stopping. Checkpoint kept: {where}. Lower the learning rate or check "
                      "the data")


class _Evaluation:
  """trainer.evaluation: COCO AP of the in-memory state every N epochs and at the last step;
  the best state by AP goes to workdir/checkpoints/best (kept across resumes)."""

  def __init__(self, config, job: Setup, workdir: str):
    ev = config.trainer.evaluation
    self.every = ev.every_n_epochs * job.steps_per_epoch
    self.last_step, self.steps_per_epoch = job.last_step, job.steps_per_epoch
    self.config = config
    self.best_dir = os.path.join(workdir, "checkpoints", BEST)
    self.history: list[dict] = []
    self.evaluator = None
    self.best_ap = -1.0
    if not self.every:
      return
    if jax.process_count() > 1:
      # The best-state copy is written by one process; Orbax saves are collective.
      log.warning("trainer.evaluation is not run in multi-process training; evaluate the "
                  "checkpoints with `bpnet evaluate`")
      return
    spec = ev.dataset_spec or next(iter(config.dataloader.dataset_config.dataset_specs.values()))
    split = dataset_spec.load_spec(spec).split("test")
    self.evaluator = CocoEvaluator(config, job.skeleton, split.annotations, split.images_dir,
                                   ev.batch_size, ev.workers)
    best = os.path.join(self.best_dir, BEST_FILE)
    if os.path.exists(best):                      # a resumed run keeps the best so far
      self.best_ap = fileio.read_json(best)["metrics"]["AP"]

  def due(self, step: int) -> bool:
    return self.evaluator is not None and (step % self.every == 0 or step == self.last_step)

  def compilations(self) -> int:
    """Compilations of the evaluated network (1 when every evaluation reused it), or 0."""
    predictor = self.evaluator.predictor if self.evaluator is not None else None
    return predictor.backend._forward._cache_size() if predictor is not None else 0

  def run(self, state, step: int) -> dict:
    metrics = self.evaluator({"params": state.params, "batch_stats": state.batch_stats})
    epoch = step / self.steps_per_epoch
    self.history.append({"step": step, "epoch": epoch, **metrics})
    if metrics["AP"] > self.best_ap:
      self.best_ap = metrics["AP"]
      variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
      checkpoint_lib.save_model_dir(
          self.best_dir, variables, self.config, overwrite=True,
          extra_json={BEST_FILE: {"step": step, "epoch": epoch, "metrics": metrics}})
    return metrics


def _validation(config, job: Setup, workdir):
  """val(state) -> mean validation loss per image over the validation records, or None."""
  d = config.dataloader.dataset_config
  if not d.val_records_path:
    log.warning("trainer.validation_every_n_epoch is set but dataloader.dataset_config has no "
                "val_records_path; no validation")
    return None
  paths = input_pipeline.resolve_record_paths(d.val_records_folder_path, d.val_records_path)
  ds = input_pipeline.build_dataset(paths, input_pipeline.decoder_from_config(config, job.skeleton),
                                    0, 0, jax.process_index(), jax.process_count(),
                                    shuffle=False, repeat=False)
  eval_loss = jax.jit(make_eval_loss(config, job.skeleton, job.model))
  batch = config.dataloader.batch_size // jax.process_count()

  def val(state):
    it = input_pipeline.make_iterator(ds, batch)
    total, n = 0.0, 0
    for b in it:
      out = eval_loss(state, shard_batch(b, job.mesh))
      total += float(out["data_loss"]) * config.dataloader.batch_size
      n += config.dataloader.batch_size
    return total / max(n, 1)
  return val
