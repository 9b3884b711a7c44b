"""The experiment config: every key, its default, and validation.

`default_config()` is the schema: the sections of the original experiment spec (trainer,
dataloader with augmentation and label processor, model, optimizer with its learning-rate
schedule, loss, inference) holding the public TAO tutorial values (BpNetLite, 3 stages, 256x256,
L1 5e-4, soft-start 0.05/0.5 from 8e-8 to 2e-5, batch 10). Config files under `configs/` start
from it and override a few fields. `validate(config)` rejects unknown keys, wrong types and
impossible values with a one-line `ConfigError` naming the key.

The generic parts take the schema as parameters (a `default_config`-like callable and the dotted
paths of its free-form mappings), with this pose schema as the default: the key/type checker
`check_keys_and_types`, the config-file loader `load_config_file` with `apply_override`, and
`from_dict`/`read_json`. `bpnet_jax.detectnet_v2.config` is the other schema that uses them.
"""

from __future__ import annotations

import ast
import importlib.util
import numbers
import os
import sys
from typing import Any, Callable, Sequence

import ml_collections
from ml_collections import config_dict

from bpnet_jax import fileio
from bpnet_jax.errors import ConfigError
from bpnet_jax.losses import REGULARIZATION_TYPES
from bpnet_jax.model import (
  ARCHITECTURES,
  DOWNSAMPLINGS,
  KERNEL_INITIALIZERS,
  OUTPUT_STRIDE,
  PADDINGS,
)
from bpnet_jax.optimizer import OPTIMIZERS
from bpnet_jax.schedules import SCHEDULES
from bpnet_jax.skeleton import SkeletonError, skeleton_from_config

AUGMENTATION_MODES = ("person_centric", "standard", "standard_with_fixed_aspect_ratio")
ASPECT_RATIO_MODES = ("pad_image_input", "adjust_network_input", "None")
COMPUTE_DTYPES = ("float32", "bfloat16")
# Free-form mappings: their keys are the user's (patterns, dataset names, layer paths).
FREE_FORM = ("optimizer.grad_weights_dict", "dataloader.dataset_config.dataset_specs",
             "model.layer_widths", "dataloader.pose_config.definition")




def _opt(kind):
  return config_dict.placeholder(kind)


def default_config() -> ml_collections.ConfigDict:
  """Every config key with its default value (the TAO tutorial's COCO training spec)."""
  c = ml_collections.ConfigDict()

  c.trainer = dict(
      checkpoint_n_epoch=5,          # save every N epochs (and at the end)
      num_epoch=20,
      summary_every_n_steps=20,      # metrics.jsonl / TensorBoard cadence
      log_every_n_secs=30,           # progress-bar refresh
      validation_every_n_epoch=5,    # evaluate on the validation split every N epochs (0: never)
      # COCO keypoint AP of the in-memory state on a dataset spec's test split every N epochs
      # (and at the end); the best state by AP is kept in checkpoints/best.
      evaluation=dict(
          every_n_epochs=0,          # 0: never
          dataset_spec="",           # "": the one entry of dataloader.dataset_config.dataset_specs
          batch_size=1,              # images per network call
          workers=2,                 # image loading / decoding threads
      ),
      max_ckpt_to_keep=100,
      random_seed=42,
      pretrained_weights=_opt(str),  # checkpoint (or pruned model dir) to load parameters from
      load_graph=False,              # True: rebuild the (pruned) architecture stored with it
      regularize_pruned=False,       # keep weight regularisation when load_graph is True
      finetuning_config=dict(
          is_finetune_exp=False,
          checkpoint_path=_opt(str),
          ckpt_epoch_num=0,
      ),
      use_stagewise_lr_multipliers=True,
      compute_dtype="float32",       # 'bfloat16': bf16 compute, float32 parameters
  )

  c.dataloader = dict(
      batch_size=10,                 # global batch (split over all devices)
      pose_config=dict(
          target_shape=(32, 32),     # label grid (H, W): image size / output stride
          pose_config_path="bpnet_18joints",  # built-in skeleton name or pose config JSON path
          # The pose config JSON itself; filled in when a model is saved so that the model
          # directory carries its skeleton. When set it wins over pose_config_path.
          definition={},
      ),
      image_config=dict(height=256, width=256, channels=3, image_encoding="jpg"),
      dataset_config=dict(
          root_data_path="",
          train_records_folder_path="",
          train_records_path=(),
          val_records_folder_path="",
          val_records_path=(),
          dataset_specs={},          # {dataset name: dataset spec JSON path}
      ),
      normalization_params=dict(
          image_scale=(256.0, 256.0, 256.0),   # network input = pixel / scale - offset (RGB)
          image_offset=(0.5, 0.5, 0.5),
          mask_scale=(255.0,),
          mask_offset=(0.0,),
      ),
      augmentation_config=dict(
          spatial_augmentation_mode="person_centric",
          spatial_aug_params=dict(
              flip_lr_prob=0.5,
              flip_tb_prob=0.0,
              rotate_deg_max=40.0,
              rotate_deg_min=-40.0,
              zoom_prob=0.0,
              zoom_ratio_min=1.0,
              zoom_ratio_max=1.0,
              translate_max_x=40.0,  # pixels of the source image
              translate_min_x=-40.0,
              translate_max_y=40.0,
              translate_min_y=-40.0,
              use_translate_ratio=False,
              translate_ratio_max=0.2,
              translate_ratio_min=-0.2,
              target_person_scale=0.6,
          ),
      ),
      label_processor_config=dict(
          paf_gaussian_sigma=0.03,       # unused by the original too; kept for spec parity
          heatmap_gaussian_sigma=7.0,    # input pixels
          paf_ortho_dist_thresh=1.0,     # output cells
      ),
      shuffle_buffer_size=20000,     # records; >= the dataset size shuffles globally, 0 never
      num_workers=-1,                # host decode processes (0: in the main process; -1: all
                                     # host cores but two with an accelerator, 0 on the CPU)
      max_image_size=(480, 640),     # host canvas (H, W): portrait images are turned onto it,
                                     # larger ones shrunk (COCO's 640x480s fit whole)
      max_people=20,                 # people per record kept (main person first)
      # More unreadable samples than this share of an epoch stop training (a wrong root?).
      max_unreadable_fraction=0.01,
  )

  c.model = dict(
      architecture="BpNetLiteModel",
      backbone_attributes=dict(architecture="vgg", nlayers=19, use_bias=False),
      stages=3,
      use_self_attention=False,
      data_format="channels_last",
      use_bias=True,
      regularization_type="l1",
      kernel_regularization_factor=5e-4,
      bias_regularization_factor=0.0,
      kernel_initializer="random_normal",
      stage1_kernel_sizes=(3, 3, 3),
      stageT_kernel_sizes=(7, 7, 7, 7, 7),
      width_multiplier=1.0,          # scales every prunable conv width (tiny test models)
      layer_widths={},               # {conv path: filters}, e.g. a pruned architecture
      # 'symmetric': every conv pads k//2 on each side, as the original; 'same_lax': lax 'SAME'
      # (bottom/right only for the stride-2 backbone convs; models trained before 0.3).
      padding="symmetric",
      # 'strided_conv' (the original) or 'max_pool' (2x2 max pools before blocks 2a/3a/4a, as
      # VGG19: ImageNet VGG19 weights then apply exactly).
      backbone_downsampling="strided_conv",
  )

  c.optimizer = dict(
      name="sgd",                    # 'sgd' (momentum SGD, the original) or 'adam' (opt-in)
      momentum=0.9,                  # SGD momentum; Adam's b1
      use_nesterov=False,
      grad_weights_dict={},          # {glob over parameter paths: LR multiplier}
      weight_default_value=1.0,
      learning_rate_schedule=dict(
          type="softstart_annealing",
          base_learning_rate=2e-5,
          min_learning_rate=8e-8,
          soft_start=0.05,
          annealing=0.5,
          # exponential_decay only:
          learning_rate=2e-5,
          decay_epochs=17.0,
          decay_rate=0.333,
          staircase=True,
      ),
  )

  c.loss = dict(
      focal_loss_params=dict(use_focal_loss=False, alpha=0.1, beta=0.02, bkg_thresh=0.01,
                             gamma=1.0),
  )

  c.inference = dict(
      input_shape=(368, 368),        # (H, W), multiples of 8
      # Network inputs are padded (bottom/right, grey) to multiples of this: fewer distinct
      # shapes, fewer compilations in adjust_network_input mode. A multiple of 8.
      input_size_multiple=32,
      keep_aspect_ratio_mode="adjust_network_input",
      output_stage_to_use=_opt(int),  # 1-based; None: last stage
      output_upsampling_factor=(8, 8),
      heatmap_threshold=0.1,
      paf_threshold=0.05,
      multi_scale_inference=False,
      scales=(0.5, 1.0, 1.5, 2.0),
      paf_num_samples=10,            # line-integral samples, endpoints included
      paf_sample_ratio=0.8,          # a limb needs > ratio * samples above paf_threshold
      min_parts=4,                   # a person needs at least this many joints
      min_mean_score=0.4,            # ... and this mean score per joint
      compute_dtype="float32",       # JAX backend: 'bfloat16' runs the network in bf16
  )
  return ml_collections.ConfigDict(c)


# ----------------------------------------------------------------------------------------------
# Validation.

def _type_ok(value, ref) -> bool:
  if isinstance(ref, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(ref, bool)
  if isinstance(ref, numbers.Integral):
    return isinstance(value, numbers.Integral)
  if isinstance(ref, numbers.Real):
    return isinstance(value, numbers.Real)
  if isinstance(ref, (list, tuple)):
    return isinstance(value, (list, tuple))
  return isinstance(value, type(ref))


def _type_name(ref) -> str:
  if isinstance(ref, bool):
    return "a bool"
  if isinstance(ref, numbers.Integral):
    return "an integer"
  if isinstance(ref, numbers.Real):
    return "a number"
  if isinstance(ref, (list, tuple)):
    return "a list"
  return f"a {type(ref).__name__}"


def _check_keys_and_types(cfg, ref, prefix, placeholders, free_form: Sequence[str] = FREE_FORM):
  """Unknown keys and wrong types of `cfg` against the schema instance `ref`; keys under
  `prefix` (dotted, ending with '.'); `placeholders` from `_placeholders`; `free_form` lists the
  mappings whose keys are the user's (only checked to be mappings)."""
  for key in cfg.keys():
    path = f"{prefix}{key}"
    if key not in ref:
      raise ConfigError(f"config.{path}: unknown key (valid keys in config.{prefix or ''}: "
                        f"{sorted(ref.keys())})".replace("config.:", "config:"))
    value, default = cfg[key], ref[key]
    if path in free_form:
      if not isinstance(value, (dict, ml_collections.ConfigDict)):
        raise ConfigError(f"config.{path}: expected a mapping, got {value!r}")
      continue
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"config.{path}: expected a section with keys {sorted(default.keys())},"
                          f" got {value!r}")
      _check_keys_and_types(value, default, path + ".", placeholders, free_form)
      continue
    if path in placeholders:
      if value is not None and not isinstance(value, placeholders[path]):
        raise ConfigError(f"config.{path}: expected {placeholders[path].__name__} or None, "
                          f"got {value!r}")
      continue
    if not _type_ok(value, default):
      raise ConfigError(f"config.{path}: expected {_type_name(default)}, got {value!r}")


def _placeholders(schema: Callable[[], ml_collections.ConfigDict] = default_config):
  """{path: type} of the keys of `schema()` whose default is None (they also accept None)."""
  ref = schema()
  out = {}

  def walk(cfg, prefix):
    for key in cfg.keys():
      field = cfg.get_ref(key) if not isinstance(cfg[key], ml_collections.ConfigDict) else None
      if field is None:
        walk(cfg[key], f"{prefix}{key}.")
      elif cfg[key] is None:
        out[f"{prefix}{key}"] = field.get_type()
  walk(ref, "")
  return out


def check_keys_and_types(config, schema: Callable[[], ml_collections.ConfigDict] = default_config,
                         free_form: Sequence[str] = FREE_FORM) -> None:
  """The generic half of validation, for any schema: ConfigError (one line, naming the key) for
  a key `schema()` does not have or a value of another type than its default (None defaults
  take their placeholder's type or None). Mappings listed in `free_form` (dotted paths) hold
  the user's keys and are only checked to be mappings."""
  _check_keys_and_types(config, schema(), "", _placeholders(schema), free_form)


def validate(config) -> ml_collections.ConfigDict:
  """Raises ConfigError (one line, naming the key) unless `config` is usable; returns it."""
  check_keys_and_types(config)

  def need(ok, key, expected, value=None):
    if not ok:
      v = value if value is not None else _get(config, key)
      raise ConfigError(f"config.{key}: expected {expected}, got {v!r}")

  trainer, data, model = config.trainer, config.dataloader, config.model
  optim, inference = config.optimizer, config.inference
  # Trainer.
  need(trainer.num_epoch >= 1, "trainer.num_epoch", "an integer >= 1")
  need(trainer.checkpoint_n_epoch >= 1, "trainer.checkpoint_n_epoch", "an integer >= 1")
  need(trainer.checkpoint_n_epoch <= trainer.num_epoch, "trainer.checkpoint_n_epoch",
       f"at most trainer.num_epoch ({trainer.num_epoch})")
  need(trainer.summary_every_n_steps >= 1, "trainer.summary_every_n_steps", "an integer >= 1")
  need(trainer.max_ckpt_to_keep >= 1, "trainer.max_ckpt_to_keep", "an integer >= 1")
  need(trainer.validation_every_n_epoch >= 0, "trainer.validation_every_n_epoch", "an integer >= 0")
  ev = trainer.evaluation
  need(ev.every_n_epochs >= 0, "trainer.evaluation.every_n_epochs", "an integer >= 0")
  need(ev.batch_size >= 1, "trainer.evaluation.batch_size", "an integer >= 1")
  need(ev.workers >= 1, "trainer.evaluation.workers", "an integer >= 1")
  need(not ev.every_n_epochs or ev.dataset_spec
       or len(config.dataloader.dataset_config.dataset_specs) == 1,
       "trainer.evaluation.dataset_spec", "a dataset spec JSON path (dataloader.dataset_config."
       "dataset_specs does not have exactly one entry to default to)")
  need(trainer.log_every_n_secs >= 0, "trainer.log_every_n_secs", "a number >= 0")
  need(trainer.compute_dtype in COMPUTE_DTYPES, "trainer.compute_dtype", f"one of {COMPUTE_DTYPES}")
  need(not trainer.load_graph or trainer.pretrained_weights, "trainer.load_graph",
       "False unless trainer.pretrained_weights is set")
  finetune = trainer.finetuning_config
  need(not finetune.is_finetune_exp or finetune.checkpoint_path,
       "trainer.finetuning_config.checkpoint_path",
       "a checkpoint path when is_finetune_exp is True")
  need(finetune.ckpt_epoch_num >= 0, "trainer.finetuning_config.ckpt_epoch_num", "an integer >= 0")

  # Data.
  need(data.batch_size >= 1, "dataloader.batch_size", "an integer >= 1")
  image = data.image_config
  for key in ("height", "width"):
    v = image[key]
    need(v >= OUTPUT_STRIDE and v % OUTPUT_STRIDE == 0, f"dataloader.image_config.{key}",
         f"a positive multiple of {OUTPUT_STRIDE}")
  need(image.channels == 3, "dataloader.image_config.channels", "3 (RGB)")
  need(image.image_encoding in ("jpg", "png"), "dataloader.image_config.image_encoding",
       "'jpg' or 'png'")
  target_shape = data.pose_config.target_shape
  need(len(target_shape) == 2 and all(isinstance(v, int) and v > 0 for v in target_shape),
       "dataloader.pose_config.target_shape", "[height, width] positive integers")
  need(target_shape[0] * OUTPUT_STRIDE == image.height
       and target_shape[1] * OUTPUT_STRIDE == image.width,
       "dataloader.pose_config.target_shape",
       f"image size / {OUTPUT_STRIDE} = [{image.height // OUTPUT_STRIDE}, "
       f"{image.width // OUTPUT_STRIDE}] (the model's output stride)")
  need(isinstance(data.pose_config.pose_config_path, str) and data.pose_config.pose_config_path,
       "dataloader.pose_config.pose_config_path", "a skeleton name or JSON path")
  norm = data.normalization_params
  need(len(norm.image_scale) == 3 and all(v > 0 for v in norm.image_scale),
       "dataloader.normalization_params.image_scale", "3 positive numbers")
  need(len(norm.image_offset) == 3, "dataloader.normalization_params.image_offset", "3 numbers")
  need(len(norm.mask_scale) == 1 and norm.mask_scale[0] > 0,
       "dataloader.normalization_params.mask_scale", "[one positive number]")
  need(len(norm.mask_offset) == 1, "dataloader.normalization_params.mask_offset", "[one number]")
  need(data.shuffle_buffer_size >= 0, "dataloader.shuffle_buffer_size", "an integer >= 0")
  need(data.num_workers >= -1, "dataloader.num_workers", "an integer >= 0, or -1 (automatic)")
  need(len(data.max_image_size) == 2
       and all(isinstance(v, int) and v >= 8 for v in data.max_image_size),
       "dataloader.max_image_size", "[height, width] integers >= 8")
  need(data.max_people >= 1, "dataloader.max_people", "an integer >= 1")
  need(0 <= data.max_unreadable_fraction <= 1, "dataloader.max_unreadable_fraction",
       "a number in [0, 1]")
  aug = data.augmentation_config
  need(aug.spatial_augmentation_mode in AUGMENTATION_MODES,
       "dataloader.augmentation_config.spatial_augmentation_mode", f"one of {AUGMENTATION_MODES}")
  spatial = aug.spatial_aug_params
  pre = "dataloader.augmentation_config.spatial_aug_params."
  for key in ("flip_lr_prob", "flip_tb_prob", "zoom_prob"):
    need(0.0 <= spatial[key] <= 1.0, pre + key, "a probability in [0, 1]")
  for lo, hi in (("rotate_deg_min", "rotate_deg_max"), ("zoom_ratio_min", "zoom_ratio_max"),
                 ("translate_min_x", "translate_max_x"), ("translate_min_y", "translate_max_y"),
                 ("translate_ratio_min", "translate_ratio_max")):
    need(spatial[lo] <= spatial[hi], pre + lo, f"<= {hi} ({spatial[hi]})")
  need(spatial.zoom_ratio_min > 0, pre + "zoom_ratio_min", "a positive number")
  need(spatial.target_person_scale > 0, pre + "target_person_scale", "a positive number")
  labels = data.label_processor_config
  need(labels.heatmap_gaussian_sigma > 0,
       "dataloader.label_processor_config.heatmap_gaussian_sigma",
       "a positive number (input pixels)")
  need(labels.paf_ortho_dist_thresh > 0, "dataloader.label_processor_config.paf_ortho_dist_thresh",
       "a positive number (output cells)")

  # Model.
  need(model.architecture in ARCHITECTURES, "model.architecture", f"one of {ARCHITECTURES}")
  need(model.backbone_attributes.architecture == "vgg", "model.backbone_attributes.architecture",
       "'vgg' (the only backbone implemented)")
  need(model.backbone_attributes.nlayers == 19, "model.backbone_attributes.nlayers", "19 (VGG19)")
  need(2 <= model.stages <= 7, "model.stages", "an integer in 2..7")
  need(model.padding in PADDINGS, "model.padding", f"one of {PADDINGS}")
  need(model.backbone_downsampling in DOWNSAMPLINGS, "model.backbone_downsampling",
       f"one of {DOWNSAMPLINGS}")
  need(model.data_format == "channels_last", "model.data_format", "'channels_last' (NHWC)")
  need(model.regularization_type in REGULARIZATION_TYPES, "model.regularization_type",
       f"one of {REGULARIZATION_TYPES}")
  need(model.kernel_regularization_factor >= 0, "model.kernel_regularization_factor",
       "a number >= 0")
  need(model.bias_regularization_factor >= 0, "model.bias_regularization_factor", "a number >= 0")
  need(model.kernel_initializer in KERNEL_INITIALIZERS, "model.kernel_initializer",
       f"one of {KERNEL_INITIALIZERS}")
  for key in ("stage1_kernel_sizes", "stageT_kernel_sizes"):
    v = model[key]
    need(len(v) >= 1 and all(isinstance(k, int) and k >= 1 and k % 2 == 1 for k in v),
         f"model.{key}", "a non-empty list of odd positive kernel sizes")
  need(model.width_multiplier > 0, "model.width_multiplier", "a positive number")
  for key, v in model.layer_widths.items():
    need(isinstance(v, int) and v >= 1, f"model.layer_widths.{key}", "a positive integer", v)

  # Optimizer.
  need(optim.name in OPTIMIZERS, "optimizer.name", f"one of {OPTIMIZERS}")
  need(0 <= optim.momentum < 1, "optimizer.momentum", "a number in [0, 1)")
  need(optim.weight_default_value >= 0, "optimizer.weight_default_value", "a number >= 0")
  for key, v in optim.grad_weights_dict.items():
    need(isinstance(v, numbers.Real) and not isinstance(v, bool) and v >= 0,
         f"optimizer.grad_weights_dict.{key}", "a multiplier >= 0", v)
  schedule = optim.learning_rate_schedule
  pre = "optimizer.learning_rate_schedule."
  need(schedule.type in SCHEDULES, pre + "type", f"one of {SCHEDULES}")
  if schedule.type == "softstart_annealing":
    need(schedule.min_learning_rate > 0, pre + "min_learning_rate", "a positive number")
    need(schedule.base_learning_rate >= schedule.min_learning_rate, pre + "base_learning_rate",
         f">= min_learning_rate ({schedule.min_learning_rate})")
    need(0 <= schedule.soft_start <= 1, pre + "soft_start", "a number in [0, 1]")
    need(schedule.soft_start <= schedule.annealing <= 1, pre + "annealing",
         f"a number in [soft_start ({schedule.soft_start}), 1]")
  else:
    need(schedule.learning_rate > 0, pre + "learning_rate", "a positive number")
    need(schedule.decay_epochs > 0, pre + "decay_epochs", "a positive number")
    need(0 < schedule.decay_rate <= 1, pre + "decay_rate", "a number in (0, 1]")
    need(schedule.min_learning_rate >= 0, pre + "min_learning_rate", "a number >= 0")

  # Loss.
  focal = config.loss.focal_loss_params
  need(focal.gamma >= 0, "loss.focal_loss_params.gamma", "a number >= 0")

  # Inference.
  need(len(inference.input_shape) == 2
       and all(isinstance(v, int) and v > 0 and v % OUTPUT_STRIDE == 0
                                         for v in inference.input_shape),
       "inference.input_shape", f"[height, width], positive multiples of {OUTPUT_STRIDE}")
  need(inference.input_size_multiple >= OUTPUT_STRIDE
       and inference.input_size_multiple % OUTPUT_STRIDE == 0,
       "inference.input_size_multiple", f"a positive multiple of {OUTPUT_STRIDE}")
  need(all(isinstance(v, int) for v in inference.output_upsampling_factor),
       "inference.output_upsampling_factor", "[fy, fx] integers")
  need(inference.keep_aspect_ratio_mode in ASPECT_RATIO_MODES, "inference.keep_aspect_ratio_mode",
       f"one of {ASPECT_RATIO_MODES}")
  need(inference.output_stage_to_use is None or 1 <= inference.output_stage_to_use <= model.stages,
       "inference.output_stage_to_use", f"None or a stage in 1..{model.stages}")
  need(len(inference.output_upsampling_factor) == 2
       and all(v >= 1 for v in inference.output_upsampling_factor),
       "inference.output_upsampling_factor", "[fy, fx] >= 1")
  need(0 <= inference.heatmap_threshold < 1, "inference.heatmap_threshold", "a number in [0, 1)")
  need(-1 <= inference.paf_threshold < 1, "inference.paf_threshold", "a number in [-1, 1)")
  need(len(inference.scales) >= 1 and all(v > 0 for v in inference.scales), "inference.scales",
       "a non-empty list of positive numbers")
  need(inference.paf_num_samples >= 2, "inference.paf_num_samples", "an integer >= 2")
  need(0 <= inference.paf_sample_ratio <= 1, "inference.paf_sample_ratio", "a number in [0, 1]")
  need(inference.min_parts >= 1, "inference.min_parts", "an integer >= 1")
  need(inference.min_mean_score >= 0, "inference.min_mean_score", "a number >= 0")
  need(inference.compute_dtype in COMPUTE_DTYPES, "inference.compute_dtype",
       f"one of {COMPUTE_DTYPES}")

  try:
    skeleton_from_config(config)
  except SkeletonError as e:
    raise ConfigError(f"config.dataloader.pose_config.pose_config_path: {e}") from None
  return config


def _get(config, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


# ----------------------------------------------------------------------------------------------
# Loading: config files (the one loader for main.py and every command) and saved configs.

def _import_root(path: str) -> str:
  """The folder above the outermost package (a folder with __init__.py) holding the file, or
  the file's grandparent when its folder is not a package."""
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isfile(os.path.join(folder, "__init__.py")):
    return os.path.dirname(folder)
  while os.path.isfile(os.path.join(os.path.dirname(folder), "__init__.py")):
    folder = os.path.dirname(folder)
  return os.path.dirname(folder)


def load_config_file(spec: str, overrides: Sequence[str] = (),
                     free_form: Sequence[str] = FREE_FORM) -> ml_collections.ConfigDict:
  """`get_config()` of a Python config file, then 'a.b.c=value' overrides.

  spec is `path.py` or `path.py:arg` (big_vision style): the part after the colon is passed to
  `get_config(arg)`, so one file holds its variants. The folder above the file's outermost
  package (its grandparent when its folder is no package) goes on sys.path so variants can
  `from configs import coco` or `from configs.detectnet_v2 import kitti_resnet18` however the
  command is launched. `free_form`: the schema's mappings that overrides may add keys to
  (the pose schema's by default).
  """
  path, _, arg = spec.partition(":") if not os.path.isfile(spec) else (spec, "", "")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  root = _import_root(path)
  if root not in sys.path:
    sys.path.insert(0, root)
  try:
    module_spec = importlib.util.spec_from_file_location("_bpnet_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise ConfigError(f"config file {path!r} has no get_config() function")
    config = module.get_config(arg) if arg else module.get_config()
  except ConfigError:
    raise
  except Exception as e:  # An error inside the user's config file: report it in one line.
    raise ConfigError(f"config file {spec!r} failed to load: {type(e).__name__}: {e}") from None
  for item in overrides:
    apply_override(config, item, free_form)
  return config


def apply_override(config, item: str, free_form: Sequence[str] = FREE_FORM) -> None:
  """Sets 'section.key=value' (value parsed as a Python literal, else kept as a string); only
  the mappings in `free_form` take new keys."""
  if "=" not in item:
    raise ConfigError(f"override {item!r}: expected key=value")
  key, raw = item.split("=", 1)
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  node = config
  parts = key.split(".")
  for part in parts[:-1]:
    if part not in node:
      raise ConfigError(f"override config.{key}: unknown key {part!r}")
    node = node[part]
  # Free-form mappings (dataset specs, layer widths, ...) take new keys; sections do not.
  if parts[-1] not in node and ".".join(parts[:-1]) not in free_form:
    raise ConfigError(f"override config.{key}: unknown key {parts[-1]!r}")
  try:
    node[parts[-1]] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"override config.{key}={raw}: {e}") from None


def from_dict(data: dict, where: str = "config",
              schema: Callable[[], ml_collections.ConfigDict] = default_config,
              free_form: Sequence[str] = FREE_FORM) -> ml_collections.ConfigDict:
  """A config from its JSON form (a saved config.json): `schema()`'s defaults, then every saved
  value (lists become tuples where the schema has tuples; the mappings in `free_form` are taken
  whole); unknown keys are a ConfigError."""
  config = schema()

  def merge(node, values, prefix):
    for key, value in values.items():
      path = f"{prefix}{key}"
      if key not in node:
        raise ConfigError(f"{where}: unknown key config.{path}")
      if path in free_form:
        node[key] = dict(value or {})
      elif isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
        merge(node[key], value, path + ".")
      else:
        if isinstance(value, list) and isinstance(node[key], tuple):
          value = tuple(value)
        try:
          node[key] = value
        except (TypeError, ValueError) as e:
          raise ConfigError(f"{where}: config.{path}={value!r}: {e}") from None
  merge(config, data, "")
  return config


def read_json(path: str, schema: Callable[[], ml_collections.ConfigDict] = default_config,
              free_form: Sequence[str] = FREE_FORM) -> ml_collections.ConfigDict:
  """A config saved as JSON (a model directory's config.json), as a ConfigDict of `schema`."""
  data = fileio.read_json(path, "config JSON", ConfigError)
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: expected a JSON object of config sections")
  return from_dict(data, where=path, schema=schema, free_form=free_form)


def to_json(config) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)
