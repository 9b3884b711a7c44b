"""Small configs for the demo and the tests: the same architecture, 1/8 of the widths, 128x128.

  get_config()        the tiny model the tests use: every prunable conv 8x narrower (backbone
                      8..64 channels, stages 16), two stages with 3x3 refinement kernels,
                      128x128 inputs with 16x16 labels (sigma 6 px), Glorot initialisation; a
                      training step of batch 8 takes ~0.1 s on 2 CPU cores.
  get_config("demo")  what `bpnet demo` trains on its synthetic people (measured in
                      docs/training.md): 64-wide refinement stages, no left-right flips (the
                      demo data's part colours fix left and right), rotations +-20 deg, Adam
                      from 1e-5 up to 2e-3 and back, 50 epochs, inference at 192x192.

Data paths are configs/coco.py's; `bpnet_jax.data.synthetic_dataset.point_config` repoints them.
Usage: --config=configs/demo.py or --config=configs/demo.py:demo
"""

from bpnet_jax import model as model_lib
from bpnet_jax.skeleton import skeleton_from_config
from configs import coco

# Refinement-stage width of the demo model: the stages run at 1/8 of the input resolution, so
# 64 costs little, and 16 channels cannot hold 19 heatmaps + 38 PAFs.
DEMO_STAGE_WIDTH = 64


def get_config(arg: str = ""):
  config = coco.get_config()
  config.model.width_multiplier = 0.125
  config.model.stages = 2
  config.model.stageT_kernel_sizes = [3, 3, 3]
  # Glorot init: with 16-wide layers, N(0, 0.01) shrinks the signal ~10x per conv.
  config.model.kernel_initializer = "xavier"
  config.dataloader.batch_size = 8
  config.dataloader.image_config.height = 128
  config.dataloader.image_config.width = 128
  config.dataloader.pose_config.target_shape = [16, 16]
  config.dataloader.label_processor_config.heatmap_gaussian_sigma = 6.0
  config.dataloader.shuffle_buffer_size = 256
  config.trainer.num_epoch = 4
  config.trainer.checkpoint_n_epoch = 2
  config.trainer.summary_every_n_steps = 2
  config.trainer.log_every_n_secs = 1
  config.trainer.max_ckpt_to_keep = 2
  config.trainer.use_stagewise_lr_multipliers = True
  s = config.optimizer.learning_rate_schedule
  s.base_learning_rate = 5e-4
  s.min_learning_rate = 5e-6
  config.inference.input_shape = [128, 128]
  if arg == "demo":
    _demo(config)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}: expected '' or 'demo'")
  return config


def _demo(config):
  config.dataloader.max_image_size = (240, 320)     # the demo's synthetic images
  config.trainer.num_epoch = 50
  config.trainer.checkpoint_n_epoch = 12
  config.trainer.validation_every_n_epoch = 12
  config.trainer.summary_every_n_steps = 5
  aug = config.dataloader.augmentation_config.spatial_aug_params
  aug.flip_lr_prob = 0.0
  aug.rotate_deg_min, aug.rotate_deg_max = -20.0, 20.0
  # Every prunable conv after the backbone is DEMO_STAGE_WIDTH wide (read off the layer spec).
  net = model_lib.build_model(config.model, skeleton_from_config(config))
  config.model.layer_widths = {
      layer.path: DEMO_STAGE_WIDTH for layer in model_lib.layer_spec(net).layers
      if layer.prunable and not layer.gates and not layer.path.startswith("backbone/")}
  config.optimizer.name = "adam"
  config.trainer.use_stagewise_lr_multipliers = False   # Adam normalises each parameter's step
  s = config.optimizer.learning_rate_schedule
  s.base_learning_rate, s.min_learning_rate = 2e-3, 1e-5
  config.inference.input_shape = (192, 192)
