"""DetectNet_v2 config: schema defaults from the owning modules, the shipped KITTI spec's values,
one-line errors naming the key, overrides of free-form mappings, JSON round trip."""

import json
import os

import ml_collections
import pytest

from bpnet_jax import config as config_lib
from bpnet_jax.detectnet_v2 import config as C
from bpnet_jax.detectnet_v2 import evaluate, losses, model, postprocess, targets
from bpnet_jax.errors import ConfigError
from configs.detectnet_v2 import demo, kitti_resnet18

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KITTI = os.path.join(ROOT, "configs", "detectnet_v2", "kitti_resnet18.py")


def test_defaults_validate_and_come_from_the_owning_modules():
  c = C.validate(C.default_config())
  names = list(C.CLASS_NAMES)
  assert C.class_names(c) == names
  assert c.cost_function_config.to_dict() == losses.default_cost_function_config(names)
  assert c.bbox_rasterizer_config.to_dict() == targets.default_rasterizer_config(names)
  assert c.postprocessing_config.to_dict() == postprocess.default_postprocessing_config(names)
  ev = c.evaluation_config.to_dict()
  assert {k: ev[k] for k in evaluate.default_evaluation_config(names)} == \
      evaluate.default_evaluation_config(names)
  assert (ev["validation_period_during_training"], c.dataset_config.validation_fold) == (0, None)
  m = c.model_config.to_dict()
  assert {k: m[k] for k in model.default_model_config()} == model.default_model_config()
  assert c.training_config.regularizer.to_dict() == losses.default_regularizer_config()


def test_kitti_config_is_the_shipped_spec():
  c = C.validate(kitti_resnet18.get_config())
  assert C.class_names(c) == ["car", "pedestrian"] and c.random_seed == 42
  assert dict(c.dataset_config.target_class_mapping) == \
      {"car": "car", "van": "car", "pedestrian": "pedestrian"}
  assert c.dataset_config.validation_fold == 0
  assert C.input_shape(c) == (384, 1248) and C.output_shape(c) == (24, 78)
  m = c.model_config
  assert (m.arch, m.num_layers, m.all_projections, m.use_batch_norm, m.use_pooling) == \
      ("resnet", 18, True, True, False)
  t = c.training_config
  assert (t.batch_size_per_gpu, t.num_epochs, t.checkpoint_interval) == (8, 120, 10)
  s = t.learning_rate.soft_start_annealing_schedule
  assert (s.min_learning_rate, s.max_learning_rate, s.soft_start, s.annealing) == \
      (5e-6, 5e-4, 0.1, 0.7)
  assert (t.regularizer.type, t.regularizer.weight) == ("L1", 3e-9)
  assert t.optimizer.adam.to_dict() == {"epsilon": 1e-8, "beta1": 0.9, "beta2": 0.999}
  a = c.augmentation_config
  assert (a.spatial_augmentation.hflip_probability, a.spatial_augmentation.translate_max_x,
          a.color_augmentation.hue_rotation_max, a.color_augmentation.saturation_shift_max,
          a.color_augmentation.contrast_scale_max, a.color_augmentation.contrast_center) == \
      (0.5, 8, 25.0, 0.2, 0.1, 0.5)
  cc = c.postprocessing_config.target_class_config.car.clustering_config
  assert (cc.coverage_threshold, cc.dbscan_eps, cc.dbscan_min_samples,
          cc.minimum_bounding_box_height) == (0.005, 0.13, 1, 20)
  ev = c.evaluation_config
  assert (ev.average_precision_mode, ev.validation_period_during_training,
          ev.first_validation_epoch) == ("INTEGRATE", 10, 110)
  assert dict(ev.minimum_detection_ground_truth_overlap) == {"car": 0.7, "pedestrian": 0.5}
  assert (ev.evaluation_box_config.car.minimum_height,
          ev.evaluation_box_config.car.minimum_width,
          ev.evaluation_box_config.pedestrian.minimum_height,
          ev.evaluation_box_config.pedestrian.minimum_width) == (40, 20, 25, 10)


def test_variants_validate():
  three = C.validate(kitti_resnet18.get_config("3class"))
  assert C.class_names(three) == ["car", "pedestrian", "cyclist"]
  small = C.validate(demo.get_config())
  assert small.model_config.num_layers == 10 and C.input_shape(small) == (128, 256)
  with pytest.raises(ValueError, match="unknown variant"):
    kitti_resnet18.get_config("4class")


def _set(path, value):
  def mutate(c):
    node = c
    parts = path.split(".")
    for p in parts[:-1]:
      node = node[p]
    with node.ignore_type():
      node[parts[-1]] = value
  return mutate


def _bad_class_weight(c):
  c.cost_function_config.target_classes[1]["class_weight"] = 0.0


def _bad_objective(c):
  c.cost_function_config.target_classes[0]["objectives"][1]["name"] = "iou"


@pytest.mark.parametrize("mutate, key", [
    (_set("training_config.num_epoch", 3), "config.training_config.num_epoch: unknown key"),
    (_set("training_config.num_epochs", 0), "config.training_config.num_epochs"),
    (_set("training_config.batch_size_per_gpu", "8"),
     "config.training_config.batch_size_per_gpu: expected an integer"),
    (_set("training_config.learning_rate.soft_start_annealing_schedule.annealing", 0.05),
     "config.training_config.learning_rate.soft_start_annealing_schedule.annealing"),
    (_set("training_config.regularizer.type", "L3"), "config.training_config.regularizer.type"),
    (_set("training_config.optimizer.adam.beta2", 1.0),
     "config.training_config.optimizer.adam.beta2"),
    (_set("training_config.compute_dtype", "float16"), "config.training_config.compute_dtype"),
    (_set("training_config.visualizer.enabled", True),
     "config.training_config.visualizer.enabled"),
    (_set("training_config.enable_qat", False), "config.training_config.enable_qat: unknown key"),
    (_set("augmentation_config.preprocessing.output_image_width", 1250),
     "config.augmentation_config.preprocessing.output_image_width"),
    (_set("augmentation_config.spatial_augmentation.zoom_max", 0.5),
     "config.augmentation_config.spatial_augmentation.zoom_max"),
    (_set("augmentation_config.color_augmentation.saturation_shift_max", 2.0),
     "config.augmentation_config.color_augmentation.saturation_shift_max"),
    (_set("model_config.use_pooling", True), "config.model_config.use_pooling"),
    (_set("model_config.num_layers", 20), "config.model_config.num_layers"),
    (_set("model_config.load_graph", True), "config.model_config.load_graph"),
    (_set("dataset_config.data_sources", [{"records_path": "r-fold-*"}]),
     "config.dataset_config.data_sources[0].image_directory_path: missing"),
    (_set("dataset_config.data_sources", [{"records_path": "r", "image_directory_path": "d",
                                           "tfrecords_path": "x"}]),
     "config.dataset_config.data_sources[0].tfrecords_path: unknown key"),
    (_set("dataset_config.target_class_mapping", {"car": "car"}),
     "config.dataset_config.target_class_mapping: no record class maps to target class "
     "'pedestrian'"),
    (_set("dataset_config.target_class_mapping", {"Car": "car", "pedestrian": "pedestrian"}),
     "config.dataset_config.target_class_mapping.Car"),
    (_set("dataset_config.target_class_mapping", {"car": "truck", "pedestrian": "pedestrian"}),
     "config.dataset_config.target_class_mapping.car"),
    (_set("dataset_config.validation_fold", -1), "config.dataset_config.validation_fold"),
    (_set("evaluation_config.validation_period_during_training", 5),
     "config.evaluation_config.validation_period_during_training"),
    (_bad_class_weight, "config.cost_function_config.target_classes[1].class_weight"),
    (_bad_objective, "config.cost_function_config.target_classes[0].objectives[1].name"),
    (_set("bbox_rasterizer_config.deadzone_radius", 1.5), "config.bbox_rasterizer_config"),
    (_set("bbox_rasterizer_config.target_class_config.car.cov_radius", 0.4),
     "config.bbox_rasterizer_config.target_class_config.car.cov_radius: unknown key"),
    (_set("postprocessing_config.target_class_config.car.clustering_config.dbscan_eps", 2.0),
     "config.postprocessing_config.target_class_config.car.clustering_config.dbscan_eps"),
    (_set("postprocessing_config.stride", 8), "config.postprocessing_config.stride"),
    (_set("evaluation_config.average_precision_mode", "AREA"),
     "config.evaluation_config.average_precision_mode"),
    (_set("evaluation_config.minimum_detection_ground_truth_overlap", {"car": 0.5}),
     "config.evaluation_config.minimum_detection_ground_truth_overlap.pedestrian: missing"),
])
def test_bad_values_are_one_line_errors_naming_the_key(mutate, key):
  c = C.default_config()
  mutate(c)
  with pytest.raises(ConfigError) as e:
    C.validate(c)
  assert key in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_overrides_reach_free_form_mappings_only():
  c = config_lib.load_config_file(KITTI, [
      "dataset_config.target_class_mapping.lorry=car",
      "postprocessing_config.target_class_config.car.clustering_config.dbscan_eps=0.2",
      "training_config.num_epochs=3"], free_form=C.FREE_FORM)
  C.validate(c)
  assert c.dataset_config.target_class_mapping.lorry == "car"
  assert c.postprocessing_config.target_class_config.car.clustering_config.dbscan_eps == 0.2
  assert c.training_config.num_epochs == 3
  with pytest.raises(ConfigError, match="unknown key 'num_epoch'"):
    config_lib.load_config_file(KITTI, ["training_config.num_epoch=3"], free_form=C.FREE_FORM)
  # The pose schema's free-form list does not open DetectNet_v2 mappings.
  with pytest.raises(ConfigError, match="unknown key 'lorry'"):
    config_lib.load_config_file(KITTI, ["dataset_config.target_class_mapping.lorry=car"])


def test_json_round_trip(tmp_path):
  c = kitti_resnet18.get_config("3class")
  c.dataset_config.validation_fold = None
  c.evaluation_config.validation_period_during_training = 0
  path = tmp_path / "config.json"
  path.write_text(config_lib.to_json(c))
  back = C.validate(config_lib.read_json(str(path), schema=C.default_config,
                                         free_form=C.FREE_FORM))
  assert config_lib.to_json(back) == config_lib.to_json(c)
  assert C.class_names(back) == ["car", "pedestrian", "cyclist"]
  assert isinstance(back.dataset_config.data_sources, tuple)
  bad = json.loads(path.read_text())
  bad["training_config"]["epochs"] = 1
  with pytest.raises(ConfigError, match="unknown key config.training_config.epochs"):
    config_lib.from_dict(bad, schema=C.default_config, free_form=C.FREE_FORM)


def test_config_files_import_their_package_root(tmp_path):
  # configs/detectnet_v2/demo.py does `from configs.detectnet_v2 import kitti_resnet18`: the
  # loader puts the folder above the outermost package on sys.path, as for configs/demo.py.
  assert config_lib._import_root(os.path.join(ROOT, "configs", "detectnet_v2", "demo.py")) \
      == ROOT
  assert config_lib._import_root(os.path.join(ROOT, "configs", "demo.py")) == ROOT
  plain = tmp_path / "a" / "b.py"
  assert config_lib._import_root(str(plain)) == str(tmp_path)
  c = config_lib.load_config_file(os.path.join(ROOT, "configs", "detectnet_v2", "demo.py"),
                                  free_form=C.FREE_FORM)
  assert isinstance(c, ml_collections.ConfigDict) and C.validate(c)
