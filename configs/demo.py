"""Tiny config for the demo and the tests: the same architecture, 1/8 of the widths, 128x128.

Every prunable conv is 8x narrower (backbone 8..64 channels, stages 16), two stages with 3x3
refinement kernels, 128x128 inputs with 16x16 labels (sigma 6 px), Glorot initialisation and a
learning rate suited to the narrow model; a training step of batch 8 takes ~0.1 s on 2 CPU cores.
"""

from configs import coco


def get_config():
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
  return config
