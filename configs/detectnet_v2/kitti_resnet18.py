r"""DetectNet_v2 on KITTI: the original's shipped KITTI training spec, ResNet-18.

ResNet-18 with projection shortcuts on every repeat and BatchNorm (11,553,418 parameters for the
two classes), input 1248x384, classes car (+ van) and pedestrian, batch 8 per device, 120 epochs,
Adam (eps 1e-8, betas 0.9 / 0.999) with the soft-start annealing schedule 5e-6 -> 5e-4 -> 5e-6
(soft start 0.1, annealing 0.7), L1 3e-9 on conv kernels and biases, a checkpoint every 10
epochs; augmentation: flip 0.5, translation +-8 px, hue +-25 deg, saturation 0.2, contrast 0.1
around 0.5; clustering: DBSCAN, coverage > 0.005, eps 0.13, min_samples 1, boxes taller than 20
px; evaluation: fold 0 every 10 epochs from epoch 110, AP mode INTEGRATE (the VOC2010 area; set
evaluation_config.ap_integrate_compat for the original's numbers), IoU car 0.7 / pedestrian
0.5, ground truth at least 40x20 px (car) / 25x10 px (pedestrian). The cost function (foreground
0.05, cov 1 / bbox 10 with auto-weighting) and rasterizer (radius 0.4, min radius 1 cell,
deadzone 0.67) are the schema's defaults. The original's visualizer (TensorBoard images) is off.

  get_config()          the shipped spec (car, pedestrian)
  get_config("3class")  + cyclist (ResNet-18 all_projections, 3 classes: 11,555,983 parameters),
                        cyclist evaluated like pedestrian (IoU 0.5, at least 25x10 px)

Data: records from `detectnet_v2 dataset_convert -d SPEC -o data/kitti/records/kitti_trainval`
(random mode, 2 folds: fold 0 = validation) of the KITTI training images, whose dataset root is
data/kitti/training (relative paths are relative to the working directory). Usage:

  detectnet_v2 summary --config=configs/detectnet_v2/kitti_resnet18.py[:3class]
"""

from bpnet_jax.detectnet_v2 import losses, targets
from bpnet_jax.detectnet_v2.config import default_config

# Target class -> (evaluation IoU threshold, (minimum height, minimum width) of evaluated boxes).
EVALUATION = {"car": (0.7, (40, 20)), "pedestrian": (0.5, (25, 10)), "cyclist": (0.5, (25, 10))}
# Record class (KITTI type, lower case) -> target class.
MAPPING = {"car": "car", "van": "car", "pedestrian": "pedestrian", "cyclist": "cyclist"}


def set_classes(config, names, min_box_height: int = 20) -> None:
  """Points every per-class section at `names` (output channel order): the shipped cost
  function and rasterizer per class, the shipped clustering with boxes taller than
  `min_box_height` px, the EVALUATION thresholds and the MAPPING entries of those classes."""
  names = list(names)
  config.dataset_config.target_class_mapping = {
      k: v for k, v in MAPPING.items() if v in names}
  config.cost_function_config.target_classes = \
      losses.default_cost_function_config(names)["target_classes"]
  config.bbox_rasterizer_config.target_class_config = \
      targets.default_rasterizer_config(names)["target_class_config"]
  config.postprocessing_config.target_class_config = {
      name: {"clustering_config": {
                 "coverage_threshold": 0.005, "clustering_algorithm": "DBSCAN",
                 "dbscan_eps": 0.13, "dbscan_min_samples": 1,
                 "dbscan_confidence_threshold": 0.0,
                 "minimum_bounding_box_height": min_box_height,
                 "nms_iou_threshold": 0.0, "nms_confidence_threshold": 0.0},
             "confidence_model": "aggregate_cov"}
      for name in names}
  ev = config.evaluation_config
  ev.minimum_detection_ground_truth_overlap = {name: EVALUATION[name][0] for name in names}
  ev.evaluation_box_config = {
      name: {"minimum_height": EVALUATION[name][1][0], "maximum_height": 9999,
             "minimum_width": EVALUATION[name][1][1], "maximum_width": 9999}
      for name in names}


def get_config(arg: str = ""):
  if arg not in ("", "3class"):
    raise ValueError(f"unknown variant {arg!r}: expected '' or '3class'")
  config = default_config()
  config.random_seed = 42

  ds = config.dataset_config
  ds.data_sources = [{"records_path": "data/kitti/records/kitti_trainval-fold-*",
                      "image_directory_path": "data/kitti/training"}]
  ds.validation_fold = 0
  set_classes(config, ["car", "pedestrian", "cyclist"] if arg else ["car", "pedestrian"])

  pre = config.augmentation_config.preprocessing
  pre.output_image_width, pre.output_image_height, pre.output_image_channel = 1248, 384, 3
  pre.min_bbox_width = pre.min_bbox_height = 1.0
  spatial = config.augmentation_config.spatial_augmentation
  spatial.hflip_probability, spatial.vflip_probability = 0.5, 0.0
  spatial.zoom_min = spatial.zoom_max = 1.0
  spatial.translate_max_x = spatial.translate_max_y = 8
  color = config.augmentation_config.color_augmentation
  color.color_shift_stddev, color.hue_rotation_max = 0.0, 25.0
  color.saturation_shift_max, color.contrast_scale_max, color.contrast_center = 0.2, 0.1, 0.5

  model = config.model_config
  model.arch, model.num_layers = "resnet", 18
  model.all_projections = model.use_batch_norm = True
  model.use_pooling = model.freeze_bn = False

  train = config.training_config
  train.batch_size_per_gpu, train.num_epochs = 8, 120
  s = train.learning_rate.soft_start_annealing_schedule
  s.min_learning_rate, s.max_learning_rate, s.soft_start, s.annealing = 5e-6, 5e-4, 0.1, 0.7
  train.regularizer.type, train.regularizer.weight = "L1", 3e-9
  adam = train.optimizer.adam
  adam.epsilon, adam.beta1, adam.beta2 = 1e-8, 0.9, 0.999
  train.checkpoint_interval = 10

  ev = config.evaluation_config
  ev.average_precision_mode = "INTEGRATE"
  ev.validation_period_during_training, ev.first_validation_epoch = 10, 110
  return config
