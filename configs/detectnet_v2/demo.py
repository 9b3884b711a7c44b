"""A small DetectNet_v2 config for the demo and the tests: ResNet-10 on synthetic scenes.

The KITTI config's 3-class variant (car, pedestrian, cyclist: what `detectnet_v2 make_synthetic`
draws) made small: ResNet-10 (projection shortcuts, BatchNorm; 4,926,543 parameters), input
256x128 (an output grid of 16x8 cells; generate the data at that size, `make_synthetic --width
256 --height 128`), translation +-4 px, batch 8, 4 epochs with a checkpoint and a validation
(fold 0) every 2, Adam from 1e-5 up to 1e-3 and back; clustering keeps boxes taller than 4 px
and evaluation counts ground truth of at least 4x4 px at IoU 0.5, as small scenes need.

Data paths: records `data/detectnet_v2_demo/records/synthetic-fold-*` converted from the
synthetic dataset root `data/detectnet_v2_demo/synthetic` (its dataset_convert_spec.json).
Usage: --config=configs/detectnet_v2/demo.py
"""

from configs.detectnet_v2 import kitti_resnet18

WIDTH, HEIGHT = 256, 128            # network input = synthetic image size, pixels
DATA_ROOT = "data/detectnet_v2_demo/synthetic"
RECORDS = "data/detectnet_v2_demo/records/synthetic-fold-*"


def get_config(arg: str = ""):
  if arg:
    raise ValueError(f"unknown variant {arg!r}: expected ''")
  config = kitti_resnet18.get_config("3class")
  config.dataset_config.data_sources = [{"records_path": RECORDS,
                                         "image_directory_path": DATA_ROOT}]
  config.dataset_config.validation_fold = 0
  kitti_resnet18.set_classes(config, ["car", "pedestrian", "cyclist"], min_box_height=4)
  ev = config.evaluation_config
  for name in ev.minimum_detection_ground_truth_overlap:
    ev.minimum_detection_ground_truth_overlap[name] = 0.5
    ev.evaluation_box_config[name].minimum_height = 4
    ev.evaluation_box_config[name].minimum_width = 4
  ev.validation_period_during_training, ev.first_validation_epoch = 2, 0

  pre = config.augmentation_config.preprocessing
  pre.output_image_width, pre.output_image_height = WIDTH, HEIGHT
  spatial = config.augmentation_config.spatial_augmentation
  spatial.translate_max_x = spatial.translate_max_y = 4

  config.model_config.num_layers = 10

  train = config.training_config
  train.batch_size_per_gpu, train.num_epochs = 8, 4
  s = train.learning_rate.soft_start_annealing_schedule
  s.min_learning_rate, s.max_learning_rate = 1e-5, 1e-3
  train.checkpoint_interval, train.max_ckpt_to_keep = 2, 2
  train.summary_every_n_steps, train.log_every_n_secs = 2, 1
  return config
