"""The DetectNet_v2 experiment config: every key, its default, and validation.

`default_config()` is the schema. Its sections carry the names of the original's training spec
(`tao detectnet_v2 train -e SPEC`), so a spec translates field by field:

  random_seed              base seed of the run (the original's top-level field)
  dataset_config           data_sources: [{records_path (a glob of record files written by
                           `detectnet_v2 dataset_convert`), image_directory_path (the dataset root
                           the records' image paths are relative to), source_weight (loss
                           multiplier, > 0)}]; target_class_mapping {record class: target class};
                           validation_fold (records whose file name has `-fold-NNN-of-` are
                           validation data) or validation_data_source (separate records); neither
                           = no validation data
  augmentation_config      preprocessing (network input size, crop, scale, minimum box size in
                           pixels, enable_auto_resize), spatial_augmentation (flips, zoom,
                           translation in pixels, rotation in radians), color_augmentation (hue
                           in degrees, saturation, contrast, brightness shift)
  model_config             `model.default_model_config()` (arch, num_layers, all_projections,
                           use_batch_norm, use_pooling, freeze_blocks, freeze_bn, layer_widths)
                           + pretrained_model_file, load_graph
  bbox_rasterizer_config   `targets.default_rasterizer_config()`: coverage ellipse per class,
                           deadzone, don't-care switches
  cost_function_config     `losses.default_cost_function_config()`: per-class weights and
                           objectives, auto-weighting; its class order is the output channel order
  training_config          batch_size_per_gpu, num_epochs, learning_rate.soft_start_annealing_
                           schedule, regularizer, optimizer.adam, checkpoint_interval (epochs),
                           max_ckpt_to_keep, compute_dtype, visualizer, logging cadence
  postprocessing_config    `postprocess.default_postprocessing_config()`: clustering per class,
                           the grid stride and the box encoding (bbox_scale, bbox_offset: the
                           original's objective_set.bbox), shared by targets and decoding
  evaluation_config        `evaluate.default_evaluation_config()` + validation_period_during_
                           training, first_validation_epoch (epochs, 1-based)

Defaults: the sections owned by other modules take those modules' defaults, i.e. the original's
code defaults where they are usable (model: no BatchNorm, no projection shortcuts; post-processing:
protobuf zeros, whose DBSCAN eps 0 clusters nothing; evaluation IoU 0.5, boxes 10..9999 px; no
validation data, validation period 0) and the shipped KITTI spec's cost function and rasterizer;
augmentation and training hold the shipped KITTI spec's values, since the original's code
defaults there (batch 0, epochs 0, no schedule, no input size) are not usable. Default classes:
car, pedestrian. `configs/detectnet_v2/kitti_resnet18.py` is the shipped spec in full.

`validate(config)` rejects unknown keys and wrong types (the generic checker of
`bpnet_jax.config`, with this schema and its FREE_FORM mappings) and impossible or inconsistent
values, with a one-line `ConfigError` naming the key, e.g. `config.training_config.num_epochs:
expected an integer >= 1, got 0`. Config files load with the one loader,
`bpnet_jax.config.load_config_file(spec, overrides, free_form=FREE_FORM)`, saved configs with
`bpnet_jax.config.read_json(path, schema=default_config, free_form=FREE_FORM)`.

Differences from the original: spec keys the port does not implement are not in the schema, so
they are rejected as unknown keys (dataset image_extension: the records store each image's path
with its extension; dataloader_mode and sampling_mode: only the default MULTISOURCE loader with
user-defined mixing; output_image_min/max; enable_qat; cost_scaling (fp16 loss scaling: bf16
compute needs none); early_stopping_annealing_schedule and early_stopping_patience_steps;
objective_set: the box encoding is postprocessing_config's bbox_scale/bbox_offset and the stride
is 16). The visualizer (TensorBoard images) is not implemented: only `enabled: False` is accepted.
`rotate_degrees_compat` (spatial_augmentation) reads rotate_rad_max as degrees, as the original's
loader did; by default it is radians, as its name says. source_weight must be > 0 (the original
read 0 as 1.0). Record class names (target_class_mapping keys) must be lower case, as
dataset_convert writes them.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import ml_collections
from ml_collections import config_dict

from bpnet_jax import config as config_lib
from bpnet_jax.config import COMPUTE_DTYPES
from bpnet_jax.detectnet_v2 import evaluate as det_evaluate
from bpnet_jax.detectnet_v2 import losses as det_losses
from bpnet_jax.detectnet_v2 import model as det_model
from bpnet_jax.detectnet_v2 import postprocess as det_postprocess
from bpnet_jax.detectnet_v2 import targets as det_targets
from bpnet_jax.errors import ConfigError

CLASS_NAMES = ("car", "pedestrian")            # default target classes (the shipped KITTI spec)
OUTPUT_STRIDE = det_model.OUTPUT_STRIDE         # input pixels per output cell
# Mappings whose keys are the user's (record class names, target class names, conv names).
FREE_FORM = (
    "dataset_config.target_class_mapping",
    "model_config.layer_widths",
    "bbox_rasterizer_config.target_class_config",
    "postprocessing_config.target_class_config",
    "evaluation_config.minimum_detection_ground_truth_overlap",
    "evaluation_config.evaluation_box_config",
)
DATA_SOURCE_KEYS = ("records_path", "image_directory_path", "source_weight")
CLASS_KEYS = ("name", "class_weight", "coverage_foreground_weight", "objectives")
OBJECTIVE_KEYS = ("name", "initial_weight", "weight_target")


def default_config() -> ml_collections.ConfigDict:
  """Every config key with its default value (see the module docstring for their sources)."""
  names = list(CLASS_NAMES)
  c = ml_collections.ConfigDict()
  c.random_seed = 42

  c.dataset_config = dict(
      # Each: {"records_path": glob, "image_directory_path": dataset root, "source_weight": 1.0}.
      data_sources=(),
      # Record class name (lower case, as dataset_convert writes it) -> target class; classes
      # not listed are dropped. Every target class needs at least one source class.
      target_class_mapping={"car": "car", "van": "car", "pedestrian": "pedestrian"},
      validation_fold=config_dict.placeholder(int),
      validation_data_source=dict(records_path="", image_directory_path=""),
  )

  c.augmentation_config = dict(
      preprocessing=dict(
          output_image_width=1248,       # network input, pixels; multiples of 16
          output_image_height=384,
          output_image_channel=3,        # 3 (RGB) or 1 (grey; no colour augmentation)
          crop_left=0, crop_top=0, crop_right=0, crop_bottom=0,   # all 0: the output window
          scale_width=0.0, scale_height=0.0,    # resize factors applied first (0: off)
          min_bbox_width=1.0, min_bbox_height=1.0,   # pixels; smaller boxes are dropped
          enable_auto_resize=False,      # resize every image to the output size (boxes too)
      ),
      spatial_augmentation=dict(
          hflip_probability=0.5,
          vflip_probability=0.0,
          zoom_min=1.0,                  # zoom ratio r ~ U[min, max]; r > 1 shrinks the image
          zoom_max=1.0,
          translate_max_x=8,             # pixels, shift ~ U{-max..max}
          translate_max_y=8,
          rotate_rad_max=0.0,            # radians (see rotate_degrees_compat)
          rotate_probability=0.0,        # 0 means 1.0, as the original
          rotate_degrees_compat=False,   # read rotate_rad_max as degrees (the original's loader)
      ),
      color_augmentation=dict(
          color_shift_stddev=0.0,        # brightness offset std (image values in [0, 1])
          hue_rotation_max=25.0,         # degrees
          saturation_shift_max=0.2,      # saturation factor 1 + U(-max, max)
          contrast_scale_max=0.1,
          contrast_center=0.5,
      ),
  )

  c.model_config = det_model.default_model_config()
  c.model_config.update(
      pretrained_model_file="",          # weights copied by layer name (or a model to retrain)
      load_graph=False,                  # True: take the (pruned) architecture from that file
  )

  c.bbox_rasterizer_config = det_targets.default_rasterizer_config(names)
  c.cost_function_config = det_losses.default_cost_function_config(names)

  c.training_config = dict(
      batch_size_per_gpu=8,
      num_epochs=120,
      learning_rate=dict(soft_start_annealing_schedule=dict(
          min_learning_rate=5e-6, max_learning_rate=5e-4, soft_start=0.1, annealing=0.7)),
      regularizer=det_losses.default_regularizer_config(),   # type NO_REG | L1 | L2, weight
      optimizer=dict(adam=dict(epsilon=1e-8, beta1=0.9, beta2=0.999)),
      checkpoint_interval=10,            # epochs (and the last epoch)
      max_ckpt_to_keep=20,
      compute_dtype="float32",           # 'bfloat16': bf16 compute, float32 parameters
      summary_every_n_steps=20,          # metrics.jsonl / TensorBoard cadence (port)
      log_every_n_secs=30,               # progress-bar refresh (port)
      visualizer=dict(enabled=False),    # TensorBoard images: not implemented
  )

  c.postprocessing_config = det_postprocess.default_postprocessing_config(names)
  c.evaluation_config = det_evaluate.default_evaluation_config(names)
  c.evaluation_config.update(
      # Validate after epoch E (1-based) when E >= first_validation_epoch and (E - first) %
      # period == 0, and after the last epoch; period 0: never (no validation data needed).
      validation_period_during_training=0,
      first_validation_epoch=0,
  )
  return ml_collections.ConfigDict(c)


# ----------------------------------------------------------------------------------------------
# Derived values.

def class_names(config) -> list[str]:
  """Target classes in output channel order (cost_function_config.target_classes)."""
  return [str(entry["name"]) for entry in config.cost_function_config.target_classes]


def input_shape(config) -> tuple[int, int]:
  """(H, W) network-input pixels."""
  p = config.augmentation_config.preprocessing
  return int(p.output_image_height), int(p.output_image_width)


def output_shape(config) -> tuple[int, int]:
  """(H, W) output cells (input / 16)."""
  h, w = input_shape(config)
  return h // OUTPUT_STRIDE, w // OUTPUT_STRIDE


# ----------------------------------------------------------------------------------------------
# Validation.

def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _module_error(e: Exception, prefix: str) -> ConfigError:
  """A checker's error as 'config.<section>...: message' (one line)."""
  text = " ".join(str(e).split())
  return ConfigError(text if text.startswith("config.") else f"config.{prefix}{text}")


def _check_entries(items, where: str, keys: tuple, required: tuple) -> list[dict]:
  """A list of mappings with only `keys` (and every `required` one); returns plain dicts."""
  if not isinstance(items, (list, tuple)):
    raise ConfigError(f"config.{where}: expected a list, got {items!r}")
  out = []
  for i, item in enumerate(items):
    if isinstance(item, ml_collections.ConfigDict):
      item = item.to_dict()
    if not isinstance(item, Mapping):
      raise ConfigError(f"config.{where}[{i}]: expected a mapping with keys {list(keys)}, "
                        f"got {item!r}")
    for key in item:
      if key not in keys:
        raise ConfigError(f"config.{where}[{i}].{key}: unknown key (valid keys: {list(keys)})")
    for key in required:
      if key not in item:
        raise ConfigError(f"config.{where}[{i}].{key}: missing")
    out.append(dict(item))
  return out


def _validate_cost_function(cfg) -> list[str]:
  """Checks cost_function_config; returns the class names (output channel order)."""
  where = "cost_function_config.target_classes"
  entries = _check_entries(cfg.target_classes, where, CLASS_KEYS, CLASS_KEYS)
  if not entries:
    raise ConfigError(f"config.{where}: expected at least one target class")
  names = []
  for i, e in enumerate(entries):
    at = f"config.{where}[{i}]"
    if not isinstance(e["name"], str) or not e["name"]:
      raise ConfigError(f"{at}.name: expected a class name, got {e['name']!r}")
    if e["name"] in names:
      raise ConfigError(f"{at}.name: duplicate target class {e['name']!r}")
    names.append(e["name"])
    if not _is_number(e["class_weight"]) or not e["class_weight"] > 0:
      raise ConfigError(f"{at}.class_weight: expected a number > 0, got {e['class_weight']!r}")
    fg = e["coverage_foreground_weight"]
    if not _is_number(fg) or not 0 < fg < 1:
      raise ConfigError(f"{at}.coverage_foreground_weight: expected a number in (0, 1), got "
                        f"{fg!r}")
    objectives = _check_entries(e["objectives"], f"{where}[{i}].objectives", OBJECTIVE_KEYS,
                                OBJECTIVE_KEYS)
    seen = []
    for j, o in enumerate(objectives):
      if o["name"] not in det_losses.OBJECTIVES or o["name"] in seen:
        raise ConfigError(f"{at}.objectives[{j}].name: expected one of "
                          f"{det_losses.OBJECTIVES}, each once, got {o['name']!r}")
      seen.append(o["name"])
      for key in ("initial_weight", "weight_target"):
        if not _is_number(o[key]) or o[key] < 0:
          raise ConfigError(f"{at}.objectives[{j}].{key}: expected a number >= 0, got "
                            f"{o[key]!r}")
    if not any(o["initial_weight"] > 0 for o in objectives):
      raise ConfigError(f"{at}.objectives: expected an objective with initial_weight > 0")
  lo, hi = cfg.min_objective_weight, cfg.max_objective_weight
  if not 0 <= lo <= 1:
    raise ConfigError(f"config.cost_function_config.min_objective_weight: expected a number "
                      f"in [0, 1], got {lo!r}")
  if not lo <= hi <= 1:
    raise ConfigError(f"config.cost_function_config.max_objective_weight: expected a number "
                      f"in [min_objective_weight ({lo}), 1], got {hi!r}")
  return names


def _validate_dataset(data, names: list[str]) -> None:
  sources = _check_entries(data.data_sources, "dataset_config.data_sources", DATA_SOURCE_KEYS,
                           ("records_path", "image_directory_path"))
  for i, s in enumerate(sources):
    at = f"config.dataset_config.data_sources[{i}]"
    for key in ("records_path", "image_directory_path"):
      if not isinstance(s[key], str) or not s[key]:
        raise ConfigError(f"{at}.{key}: expected a non-empty path, got {s[key]!r}")
    weight = s.get("source_weight", 1.0)
    if not _is_number(weight) or not weight > 0:
      raise ConfigError(f"{at}.source_weight: expected a number > 0, got {weight!r}")
  mapping = data.target_class_mapping
  for key, value in mapping.items():
    at = f"config.dataset_config.target_class_mapping.{key}"
    if key != key.lower():
      raise ConfigError(f"{at}: record class names are lower case (dataset_convert lower-cases "
                        f"them); expected {key.lower()!r}")
    if value not in names:
      raise ConfigError(f"{at}: {value!r} is not a target class (cost_function_config classes: "
                        f"{names})")
  for name in names:
    if name not in mapping.values():
      raise ConfigError(f"config.dataset_config.target_class_mapping: no record class maps to "
                        f"target class {name!r}, which would never get training targets")
  fold, source = data.validation_fold, data.validation_data_source
  if fold is not None and fold < 0:
    raise ConfigError(f"config.dataset_config.validation_fold: expected None or an integer "
                      f">= 0, got {fold!r}")
  if fold is not None and source.records_path:
    raise ConfigError("config.dataset_config.validation_data_source: expected it unset when "
                      "validation_fold is set (one of the two)")
  if source.records_path and not source.image_directory_path:
    raise ConfigError("config.dataset_config.validation_data_source.image_directory_path: "
                      "expected the dataset root of its records")


def _validate_augmentation(aug) -> None:
  def need(ok, key, expected, value):
    if not ok:
      raise ConfigError(f"config.augmentation_config.{key}: expected {expected}, got {value!r}")

  pre = aug.preprocessing
  for key in ("output_image_width", "output_image_height"):
    v = pre[key]
    need(v >= OUTPUT_STRIDE and v % OUTPUT_STRIDE == 0, f"preprocessing.{key}",
         f"a positive multiple of {OUTPUT_STRIDE}", v)
  need(pre.output_image_channel in (1, 3), "preprocessing.output_image_channel", "1 or 3",
       pre.output_image_channel)
  crop = (pre.crop_left, pre.crop_top, pre.crop_right, pre.crop_bottom)
  need(all(v >= 0 for v in crop), "preprocessing.crop_left", "crop values >= 0", crop)
  if any(crop):
    need(pre.crop_right > pre.crop_left, "preprocessing.crop_right",
         f"> crop_left ({pre.crop_left})", pre.crop_right)
    need(pre.crop_bottom > pre.crop_top, "preprocessing.crop_bottom",
         f"> crop_top ({pre.crop_top})", pre.crop_bottom)
  for key in ("scale_width", "scale_height", "min_bbox_width", "min_bbox_height"):
    need(pre[key] >= 0, f"preprocessing.{key}", "a number >= 0", pre[key])
  spatial = aug.spatial_augmentation
  for key in ("hflip_probability", "vflip_probability", "rotate_probability"):
    need(0 <= spatial[key] <= 1, f"spatial_augmentation.{key}", "a probability in [0, 1]",
         spatial[key])
  need(spatial.zoom_min > 0, "spatial_augmentation.zoom_min", "a number > 0", spatial.zoom_min)
  need(spatial.zoom_max >= spatial.zoom_min, "spatial_augmentation.zoom_max",
       f">= zoom_min ({spatial.zoom_min})", spatial.zoom_max)
  for key in ("translate_max_x", "translate_max_y", "rotate_rad_max"):
    need(spatial[key] >= 0, f"spatial_augmentation.{key}", "a number >= 0", spatial[key])
  color = aug.color_augmentation
  need(color.color_shift_stddev >= 0, "color_augmentation.color_shift_stddev", "a number >= 0",
       color.color_shift_stddev)
  need(0 <= color.hue_rotation_max <= 180, "color_augmentation.hue_rotation_max",
       "degrees in [0, 180]", color.hue_rotation_max)
  need(0 <= color.saturation_shift_max <= 1, "color_augmentation.saturation_shift_max",
       "a number in [0, 1]", color.saturation_shift_max)
  need(color.contrast_scale_max >= 0, "color_augmentation.contrast_scale_max", "a number >= 0",
       color.contrast_scale_max)
  need(0 <= color.contrast_center <= 1, "color_augmentation.contrast_center",
       "a number in [0, 1]", color.contrast_center)


def _validate_training(train) -> None:
  def need(ok, key, expected, value):
    if not ok:
      raise ConfigError(f"config.training_config.{key}: expected {expected}, got {value!r}")

  need(train.batch_size_per_gpu >= 1, "batch_size_per_gpu", "an integer >= 1",
       train.batch_size_per_gpu)
  need(train.num_epochs >= 1, "num_epochs", "an integer >= 1", train.num_epochs)
  s = train.learning_rate.soft_start_annealing_schedule
  pre = "learning_rate.soft_start_annealing_schedule."
  need(s.min_learning_rate > 0, pre + "min_learning_rate", "a number > 0", s.min_learning_rate)
  need(s.max_learning_rate >= s.min_learning_rate, pre + "max_learning_rate",
       f">= min_learning_rate ({s.min_learning_rate})", s.max_learning_rate)
  need(0 <= s.soft_start <= 1, pre + "soft_start", "a number in [0, 1]", s.soft_start)
  need(s.soft_start <= s.annealing <= 1, pre + "annealing",
       f"a number in [soft_start ({s.soft_start}), 1]", s.annealing)
  reg = train.regularizer
  types = tuple(det_losses.REGULARIZER_TYPES)
  need(reg.type in types, "regularizer.type", f"one of {types}", reg.type)
  need(reg.weight >= 0, "regularizer.weight", "a number >= 0", reg.weight)
  adam = train.optimizer.adam
  need(adam.epsilon > 0, "optimizer.adam.epsilon", "a number > 0", adam.epsilon)
  for key in ("beta1", "beta2"):
    need(0 <= adam[key] < 1, f"optimizer.adam.{key}", "a number in [0, 1)", adam[key])
  need(train.checkpoint_interval >= 1, "checkpoint_interval", "an integer >= 1 (epochs)",
       train.checkpoint_interval)
  need(train.max_ckpt_to_keep >= 1, "max_ckpt_to_keep", "an integer >= 1",
       train.max_ckpt_to_keep)
  need(train.compute_dtype in COMPUTE_DTYPES, "compute_dtype", f"one of {COMPUTE_DTYPES}",
       train.compute_dtype)
  need(train.summary_every_n_steps >= 1, "summary_every_n_steps", "an integer >= 1",
       train.summary_every_n_steps)
  need(train.log_every_n_secs >= 0, "log_every_n_secs", "a number >= 0", train.log_every_n_secs)
  need(not train.visualizer.enabled, "visualizer.enabled",
       "False (TensorBoard images are not implemented; scalars are always logged)",
       train.visualizer.enabled)


def _validate_per_class_rasterizer(cfg, names: list[str]) -> None:
  """Entry keys of bbox_rasterizer_config.target_class_config (the targets module reads them
  without checking for unknown or missing ones)."""
  keys = tuple(det_targets.default_rasterizer_config(["x"])["target_class_config"]["x"])
  for name, entry in cfg.target_class_config.items():
    at = f"config.bbox_rasterizer_config.target_class_config.{name}"
    if name not in names:
      raise ConfigError(f"{at}: not a target class (classes: {names})")
    if not isinstance(entry, (Mapping, ml_collections.ConfigDict)):
      raise ConfigError(f"{at}: expected a mapping with keys {list(keys)}, got {entry!r}")
    for key in entry.keys():
      if key not in keys:
        raise ConfigError(f"{at}.{key}: unknown key (valid keys: {list(keys)})")
    for key in keys:
      if key not in entry:
        raise ConfigError(f"{at}.{key}: missing")
      if not _is_number(entry[key]):
        raise ConfigError(f"{at}.{key}: expected a number, got {entry[key]!r}")


def validate(config) -> ml_collections.ConfigDict:
  """Raises ConfigError (one line, naming the key) unless `config` is usable; returns it."""
  config_lib.check_keys_and_types(config, default_config, FREE_FORM)
  if config.random_seed < 0:
    raise ConfigError(f"config.random_seed: expected an integer >= 0, got {config.random_seed}")
  names = _validate_cost_function(config.cost_function_config)
  _validate_dataset(config.dataset_config, names)
  _validate_augmentation(config.augmentation_config)
  _validate_training(config.training_config)

  model_cfg = config.model_config
  if model_cfg.load_graph and not model_cfg.pretrained_model_file:
    raise ConfigError("config.model_config.load_graph: expected False unless "
                      "pretrained_model_file is set")
  if model_cfg.freeze_blocks and not model_cfg.pretrained_model_file:
    raise ConfigError("config.model_config.freeze_blocks: expected empty unless "
                      "pretrained_model_file is set (frozen random weights never train)")
  try:
    det_model.build_model(model_cfg.to_dict(), len(names), config.training_config.compute_dtype)
  except ConfigError as e:
    raise ConfigError(" ".join(str(e).replace("model.", "config.model_config.", 1).split())
                      ) from None

  _validate_per_class_rasterizer(config.bbox_rasterizer_config, names)
  try:
    det_targets.TargetParams.from_config(config.bbox_rasterizer_config.to_dict(), names,
                                         output_shape(config), input_shape=input_shape(config))
  except ValueError as e:
    raise _module_error(e, "bbox_rasterizer_config: ") from None

  post = config.postprocessing_config
  if post.stride != OUTPUT_STRIDE:
    raise ConfigError(f"config.postprocessing_config.stride: expected {OUTPUT_STRIDE} (the "
                      f"model's output stride), got {post.stride!r}")
  try:
    det_postprocess.validate_postprocessing_config(post.to_dict(), names)
  except ConfigError as e:
    raise _module_error(e, "") from None

  evaluation = config.evaluation_config
  try:
    det_evaluate.validate_evaluation_config(evaluation.to_dict(), names)
  except ConfigError as e:
    raise _module_error(e, "") from None
  period = evaluation.validation_period_during_training
  if period < 0:
    raise ConfigError(f"config.evaluation_config.validation_period_during_training: expected "
                      f"an integer >= 0 (epochs; 0: never), got {period}")
  if evaluation.first_validation_epoch < 0:
    raise ConfigError(f"config.evaluation_config.first_validation_epoch: expected an integer "
                      f">= 0, got {evaluation.first_validation_epoch}")
  data = config.dataset_config
  if period and data.validation_fold is None and not data.validation_data_source.records_path:
    raise ConfigError("config.evaluation_config.validation_period_during_training: expected 0 "
                      "without validation data (set dataset_config.validation_fold or "
                      "validation_data_source)")
  return config

