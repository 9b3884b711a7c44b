"""The original repository's `experiment_spec_coco.yaml`: the full two-branch BpNetModel.

L2 5e-4 and the exponential-decay schedule (2e-5, x0.333 every 17 epochs, staircase, floor
8.18938e-8 = five decays), 100 epochs with a checkpoint every 10.
"""

from configs import coco


def get_config():
  config = coco.get_config()
  config.trainer.num_epoch = 100
  config.trainer.checkpoint_n_epoch = 10
  config.trainer.max_ckpt_to_keep = 50
  config.trainer.summary_every_n_steps = 20
  config.trainer.log_every_n_secs = 120
  config.model.architecture = "BpNetModel"
  config.model.regularization_type = "l2"
  aug = config.dataloader.augmentation_config.spatial_aug_params
  aug.translate_ratio_min = 0.2
  s = config.optimizer.learning_rate_schedule
  s.type = "exponential_decay"
  s.learning_rate = 2e-5
  s.decay_epochs = 17.0
  s.decay_rate = 0.333
  s.staircase = True
  s.min_learning_rate = 8.18938e-08
  return config
