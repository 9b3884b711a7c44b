"""Saved models: Orbax checkpoints, model directories, and loading them back.

A model directory is self-describing: it carries the resolved config (which embeds the skeleton,
`dataloader.pose_config.definition`) next to the weights, so loading needs nothing else.

  workdir/                       a training run
    config.json                  the resolved config of the run
    checkpoints/<step>/          one Orbax checkpoint (a "step dir"):
      state/                       TrainState (step, params, batch_stats, opt_state, rng)
      data/, meta/                 input-iterator position; epoch bookkeeping
      config/metadata              the resolved config that produced this step (JSON)
  pruned/                        a model directory written by `bpnet prune`:
    config.json, state/            config with the pruned `model.layer_widths`; params + stats
    prune_report.json

`load_model(path)` accepts any of: a workdir, its checkpoints/ dir, a step dir, or a pruned
model directory, and returns a `SavedModel` (config, skeleton, variables). A config passed by
the user may change inference-time settings only; an architecture key that differs from the
saved model is a one-line CheckpointError naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from bpnet_jax import config as config_lib
from bpnet_jax import fileio
from bpnet_jax import model as model_lib
from bpnet_jax.errors import CheckpointError, ConfigError
from bpnet_jax.skeleton import Skeleton, skeleton_from_config

log = logging.getLogger("bpnet.checkpoint")

CONFIG_FILE = "config.json"
ITEMS = ("state", "data", "meta", "config")
# Keys that fix the network a checkpoint holds; a config given at load time must agree on them.
ARCHITECTURE_KEYS = (
    "model.architecture", "model.stages", "model.use_self_attention", "model.use_bias",
    "model.backbone_attributes.use_bias", "model.stage1_kernel_sizes",
    "model.stageT_kernel_sizes", "model.width_multiplier", "model.padding",
    "model.backbone_downsampling", "dataloader.normalization_params.image_scale",
    "dataloader.normalization_params.image_offset")


# ----------------------------------------------------------------------------------------------
# Writing and restoring training checkpoints.

def checkpoint_manager(workdir: str, max_to_keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
      item_names=ITEMS)


def save_checkpoint(mngr: ocp.CheckpointManager, state, data_state, meta: dict, config) -> None:
  """Saves a step and, once it is complete, its integrity manifest."""
  step = int(state.step)
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}),
      meta=ocp.args.JsonSave(meta), config=ocp.args.JsonSave(json.loads(
          config_lib.to_json(config)))))
  mngr.wait_until_finished()
  step_dir = os.path.join(mngr.directory, str(step))
  if os.path.isdir(step_dir):
    write_manifest(step_dir)


def restore_latest(workdir: str, max_to_keep: int, abstract_state):
  """(manager, (state, data_state, meta, step) or None): the newest usable checkpoint.

  A checkpoint that fails its integrity check or cannot be restored (partially written, files
  missing or corrupt) is moved aside to workdir/corrupt_checkpoints/<step> with a warning
  naming it, and the one before it is tried; so a retrained step can be saved again.
  """
  while True:
    mngr = checkpoint_manager(workdir, max_to_keep)
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
      return mngr, None
    step = steps[0]
    step_dir = os.path.join(mngr.directory, str(step))
    problem = verify_manifest(step_dir)
    if problem is None:
      try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # Any failure means this checkpoint is unusable.
        problem = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if problem is None:
      if not os.path.exists(os.path.join(step_dir, MANIFEST)):
        write_manifest(step_dir)          # restored fine: vouch for it from now on
      return mngr, (restored["state"], restored["data"] or None, restored["meta"], step)
    mngr.close()
    quarantine(workdir, step, problem)


# ----------------------------------------------------------------------------------------------
# Integrity: a manifest of every file's size and hash, written after a save completes.

MANIFEST = "integrity.json"
CORRUPT_DIR = "corrupt_checkpoints"


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def write_manifest(step_dir: str) -> None:
  """step_dir/integrity.json: {relative path: {size, sha256}} of every file in the step."""
  files = {}
  for root, _, names in os.walk(step_dir):
    for name in sorted(names):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel != MANIFEST:
        files[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
  fileio.write_json(os.path.join(step_dir, MANIFEST),
                    {"format": "bpnet_jax.integrity/1", "files": files})


def verify_manifest(step_dir: str) -> str | None:
  """None if step_dir matches its manifest (or has none yet), else what is wrong."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"unreadable {MANIFEST} ({e})"
  for rel, want in sorted(files.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      return f"{rel} is missing"
    size = os.path.getsize(full)
    if size != want["size"]:
      return f"{rel} has {size} bytes, expected {want['size']}"
    if _sha256(full) != want["sha256"]:
      return f"{rel} does not match its recorded hash"
  return None


def quarantine(workdir: str, step: int, reason: str) -> str:
  """Moves checkpoints/<step> to corrupt_checkpoints/<step>[.N]; returns the new path."""
  src = os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
  dst = os.path.join(os.path.abspath(workdir), CORRUPT_DIR, str(step))
  n = 1
  while os.path.exists(dst):
    dst = os.path.join(os.path.abspath(workdir), CORRUPT_DIR, f"{step}.{n}")
    n += 1
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  os.replace(src, dst)
  log.warning("checkpoint at step %d is unusable (%s); moved to %s", step, reason, dst)
  return dst


# ----------------------------------------------------------------------------------------------
# Finding and reading a saved model.

def find_step_dir(path: str) -> str:
  """The directory holding `state/`: a step dir or pruned model dir itself, else the newest
  step of a workdir or of a checkpoints/ dir."""
  if os.path.isdir(os.path.join(path, "state")):
    return path
  for cand in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(cand):
      steps = sorted((int(d) for d in os.listdir(cand) if d.isdigit()), reverse=True)
      for step in steps:
        if os.path.isdir(os.path.join(cand, str(step), "state")):
          return os.path.join(cand, str(step))
  raise CheckpointError(f"{path}: no checkpoint found (expected a workdir, its checkpoints/ "
                        "directory, a checkpoint step directory or a pruned model directory)")


def read_state(path: str, abstract=None):
  """The saved state of a checkpoint: raw nested dicts of arrays, or, given an abstract
  TrainState, a TrainState of that structure (CheckpointError if it does not fit)."""
  step_dir = os.path.abspath(os.path.join(find_step_dir(path), "state"))
  with ocp.StandardCheckpointer() as ckptr:
    try:
      return ckptr.restore(step_dir) if abstract is None else ckptr.restore(step_dir, abstract)
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"{path}: the checkpoint does not match this config's model and "
                            f"optimizer ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                            ) from None


def saved_config_path(path: str) -> str | None:
  """The config file saved with a model: the step's own config, else the model or workdir's
  config.json (a step dir's workdir is two levels up)."""
  step_dir = find_step_dir(path)
  candidates = [os.path.join(step_dir, "config", "metadata"),
                os.path.join(step_dir, CONFIG_FILE),
                os.path.join(path, CONFIG_FILE),
                os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(step_dir))),
                             CONFIG_FILE)]
  return next((c for c in candidates if os.path.isfile(c)), None)


def saved_config(path: str) -> ml_collections.ConfigDict:
  """The resolved config saved with the model at `path` (CheckpointError if there is none)."""
  found = saved_config_path(path)
  if found is None:
    raise CheckpointError(f"{path}: no saved config (config.json) next to the checkpoint; "
                          "pass --config=FILE describing the model")
  try:
    return config_lib.read_json(found)
  except ConfigError as e:
    raise CheckpointError(str(e)) from None


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return list(node) if isinstance(node, (list, tuple)) else node


def _set(config, dotted: str, value) -> None:
  *parents, last = dotted.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[last] = tuple(value) if isinstance(value, list) else value


def merge_configs(saved, given, path: str = "the saved model"):
  """The saved config with the given config's inference settings.

  The given config must describe the same network (ARCHITECTURE_KEYS, skeleton); the first key
  that differs is a one-line CheckpointError. Its `inference` section replaces the saved one.
  """
  for key in ARCHITECTURE_KEYS:
    try:
      mine, theirs = _get(saved, key), _get(given, key)
    except KeyError:
      continue
    if mine != theirs:
      raise CheckpointError(f"config.{key}={theirs!r} but the model in {path} has {mine!r} "
                            "(a given config may only change inference settings)")
  saved_sk, given_sk = skeleton_from_config(saved), skeleton_from_config(given)
  if saved_sk.to_json() != given_sk.to_json():
    raise CheckpointError(f"config.dataloader.pose_config.pose_config_path: skeleton "
                          f"{given_sk.name!r} differs from the skeleton {saved_sk.name!r} of the "
                          f"model in {path}")
  out = saved.copy_and_resolve_references()
  out.inference = given.inference.copy_and_resolve_references()
  return out


def with_skeleton(config) -> ml_collections.ConfigDict:
  """A copy of config whose `pose_config.definition` holds its skeleton's JSON, so a model
  saved with it carries the skeleton."""
  out = config.copy_and_resolve_references()
  out.dataloader.pose_config.definition = skeleton_from_config(config).to_json()
  return out


# ----------------------------------------------------------------------------------------------
# Loading a model.

@dataclasses.dataclass
class SavedModel:
  """A model ready to run: its config (with the model's own layer widths), skeleton and
  {'params', 'batch_stats'} variables, from `path`."""
  config: Any
  skeleton: Skeleton
  variables: dict
  path: str


def load_model(path: str, config=None,
               abstract_fn: Callable | None = None) -> SavedModel:
  """Loads the model at `path` (workdir, checkpoints/ dir, step dir or pruned model dir).

  config: optional; its inference settings override the saved ones (see `merge_configs`).
  abstract_fn(config, skeleton) -> abstract variables of the model the config describes
  (default: the BodyPoseNet model); the checkpoint's shapes must equal them.
  """
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such model directory")
  saved = saved_config(path) if saved_config_path(path) else None
  if saved is None and config is None:
    saved_config(path)        # raises the "no saved config" error
  if saved is None:
    resolved = config.copy_and_resolve_references()
  elif config is None:
    resolved = saved
  else:
    resolved = merge_configs(saved, config, path)
  try:
    config_lib.validate(resolved)
  except ConfigError as e:
    raise CheckpointError(f"{path}: {e}") from None
  skeleton = skeleton_from_config(resolved)
  raw = read_state(path)
  variables = {"params": raw["params"], "batch_stats": raw.get("batch_stats") or {}}
  abstract_fn = abstract_fn or _pose_abstract_variables
  check_variables(path, abstract_fn(resolved, skeleton), variables, skeleton)
  return SavedModel(resolved, skeleton, variables, path)


def _pose_abstract_variables(config, skeleton):
  return model_lib.abstract_variables(model_lib.build_model(config.model, skeleton))


def check_variables(path: str, expected, got, skeleton: Skeleton | None = None) -> None:
  """CheckpointError naming the first difference between a model's and a checkpoint's
  variables (stages, head widths, missing/unexpected parameters, shapes)."""
  flat = lambda tree: {model_lib.path_str(p): tuple(np.shape(v)) for p, v in
                       jax.tree_util.tree_flatten_with_path(tree)[0]}
  want, have = flat(expected), flat(got)
  if want == have:
    return
  stages = lambda names: max((int(n.split("/")[1][5:]) for n in names
                              if n.count("/") > 1 and n.split("/")[1].startswith("stage")
                              and n.split("/")[1][5:].isdigit()), default=0)
  if stages(want) != stages(have):
    raise CheckpointError(f"{path}: the checkpoint has {stages(have)} stages but the config's "
                          f"model has {stages(want)} (model.stages)")
  for key in ("params/heatmap_out/kernel", "params/paf_out/kernel"):
    if key in want and key in have and want[key][-1] != have[key][-1]:
      name = f"skeleton {skeleton.name!r}" if skeleton else "the skeleton"
      raise CheckpointError(f"{path}: the checkpoint's {key.split('/')[1]} has {have[key][-1]} "
                            f"channels but {name} needs {want[key][-1]}")
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  if missing or extra:
    raise CheckpointError(f"{path}: the checkpoint does not fit the config's model: missing "
                          f"{missing[:3]}, unexpected {extra[:3]}")
  diff = [k for k in want if want[k] != have[k]]
  raise CheckpointError(f"{path}: the checkpoint does not fit the config's model: {diff[0]} is "
                        f"{have[diff[0]]} in the checkpoint, {want[diff[0]]} in the model "
                        f"({len(diff)} shapes differ; model.layer_widths / width_multiplier?)")


def load_by_name(target, source):
  """Copies every leaf of `source` whose path and shape match into `target`.

  Returns (new target, report) with report = {'loaded': [...], 'missing': [...],
  'shape_mismatch': [...]} of parameter paths.
  """
  flat_src = {model_lib.path_str(p): v for p, v in
              jax.tree_util.tree_flatten_with_path(source)[0]}
  report = {"loaded": [], "missing": [], "shape_mismatch": []}

  def pick(path, x):
    name = model_lib.path_str(path)
    if name not in flat_src:
      report["missing"].append(name)
      return x
    value = flat_src[name]
    if tuple(value.shape) != tuple(x.shape):
      report["shape_mismatch"].append(f"{name} {tuple(value.shape)} vs {tuple(x.shape)}")
      return x
    report["loaded"].append(name)
    return jnp.asarray(value, x.dtype)
  return jax.tree_util.tree_map_with_path(pick, target), report


def architecture_from(path: str, config):
  """`config` with the network of the saved model at `path` (its layer widths and width
  multiplier): how a pruned model is retrained (`trainer.load_graph`). The saved model's other
  architecture keys must equal the config's (CheckpointError naming the first that differs)."""
  saved = saved_config(path)
  for key in ARCHITECTURE_KEYS:
    if key == "model.width_multiplier":
      continue
    if _get(saved, key) != _get(config, key):
      raise CheckpointError(f"{path}: the saved model has config.{key}={_get(saved, key)!r} "
                            f"but the config has {_get(config, key)!r}")
  out = config.copy_and_resolve_references()
  out.model.width_multiplier = float(saved.model.width_multiplier)
  out.model.layer_widths = {str(k): int(v) for k, v in dict(saved.model.layer_widths).items()}
  return out


# ----------------------------------------------------------------------------------------------
# Writing a model directory (a pruned model).

def save_model_dir(out_dir: str, variables, config, extra_json: dict | None = None,
                   overwrite: bool = False) -> None:
  """OUT_DIR/state (Orbax: params + batch stats), OUT_DIR/config.json (with the skeleton) and
  any `extra_json` {file name: object}; written to a temporary directory, then renamed."""
  out_dir = os.path.abspath(out_dir)
  fileio.check_can_write([out_dir], overwrite)
  with fileio.atomic_path(out_dir) as tmp:
    os.makedirs(tmp)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, "state"), variables)
    fileio.write_text(os.path.join(tmp, CONFIG_FILE), config_lib.to_json(with_skeleton(config)))
    for name, obj in (extra_json or {}).items():
      fileio.write_json(os.path.join(tmp, name), obj)


def save_run_config(config, workdir: str) -> None:
  """workdir/config.json; a different config already there is kept as config.N.json."""
  path = os.path.join(workdir, CONFIG_FILE)
  text = config_lib.to_json(config)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
    n = 1
    while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
      n += 1
    os.replace(path, os.path.join(workdir, f"config.{n}.json"))
    log.warning("the config differs from the one this workdir last ran with; the old one is "
                "kept as config.%d.json", n)
  fileio.write_text(path, text)
