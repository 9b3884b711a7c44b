import os
import subprocess
import sys

import pytest

from bpnet_jax.config import ConfigError, default_config, validate
from configs import coco, coco_bpnet_full, demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_coco_config_carries_the_tao_tutorial_values():
  c = validate(coco.get_config())
  assert (c.model.architecture, c.model.stages, c.model.regularization_type) == \
      ("BpNetLiteModel", 3, "l1")
  assert c.model.kernel_regularization_factor == 5e-4 and c.model.bias_regularization_factor == 0
  assert c.model.backbone_attributes.use_bias is False and c.model.use_bias is True
  assert c.model.kernel_initializer == "random_normal"
  s = c.optimizer.learning_rate_schedule
  assert (s.type, s.soft_start, s.annealing, s.base_learning_rate, s.min_learning_rate) == \
      ("softstart_annealing", 0.05, 0.5, 2e-5, 8e-8)
  assert c.optimizer.momentum == 0.9 and not c.optimizer.use_nesterov
  assert c.optimizer.name == "sgd"
  d = c.dataloader
  assert d.batch_size == 10 and (d.image_config.height, d.image_config.width) == (256, 256)
  assert list(d.pose_config.target_shape) == [32, 32]
  assert d.label_processor_config.heatmap_gaussian_sigma == 7.0
  assert d.label_processor_config.paf_ortho_dist_thresh == 1.0
  a = d.augmentation_config.spatial_aug_params
  assert (a.flip_lr_prob, a.rotate_deg_max, a.translate_max_x, a.translate_ratio_min,
          a.target_person_scale) == (0.5, 40, 40, -0.2, 0.6)
  assert d.shuffle_buffer_size == 20000
  t = c.trainer
  assert (t.num_epoch, t.checkpoint_n_epoch, t.max_ckpt_to_keep, t.random_seed) == (20, 5, 100, 42)
  assert t.use_stagewise_lr_multipliers
  assert list(c.inference.input_shape) == [368, 368]
  assert c.inference.heatmap_threshold == 0.1 and c.inference.paf_threshold == 0.05


def test_variants_override_a_few_fields():
  full = validate(coco_bpnet_full.get_config())
  assert full.model.architecture == "BpNetModel" and full.model.regularization_type == "l2"
  assert full.optimizer.learning_rate_schedule.type == "exponential_decay"
  tiny = validate(demo.get_config())
  assert tiny.dataloader.image_config.height == 128 and tiny.model.width_multiplier == 0.125


def _set(path, value):
  def mutate(c):
    node = c
    parts = path.split(".")
    for p in parts[:-1]:
      node = node[p]
    with node.ignore_type():
      node[parts[-1]] = value
  return mutate


@pytest.mark.parametrize("mutate, key", [
    (_set("model.stagez", 3), "config.model.stagez: unknown key"),
    (_set("model.stages", "3"), "config.model.stages: expected an integer"),
    (_set("model.stages", 1), "config.model.stages"),
    (_set("dataloader.image_config.height", 250), "config.dataloader.image_config.height"),
    (_set("inference.input_shape", [368, 370]), "config.inference.input_shape"),
    (_set("optimizer.learning_rate_schedule.annealing", 0.01),
     "config.optimizer.learning_rate_schedule.annealing"),
    (_set("model.architecture", "ResNet"), "config.model.architecture"),
    (_set("dataloader.pose_config.target_shape", [16, 16]),
     "config.dataloader.pose_config.target_shape"),
    (_set("dataloader.pose_config.pose_config_path", "nope"),
     "config.dataloader.pose_config.pose_config_path"),
    (_set("model.kernel_initializer", "he"), "config.model.kernel_initializer"),
    (_set("trainer.checkpoint_n_epoch", 50), "config.trainer.checkpoint_n_epoch"),
    (_set("trainer.load_graph", True), "config.trainer.load_graph"),
    (_set("trainer.compute_dtype", "float16"), "config.trainer.compute_dtype"),
    (_set("optimizer.grad_weights_dict", {"stage1/*": -1.0}), "grad_weights_dict"),
    (_set("loss.focal_loss_params.use_focal_loss", "yes"), "use_focal_loss: expected a bool"),
    (_set("optimizer.name", "rmsprop"), "config.optimizer.name"),
])
def test_validation_names_the_key(mutate, key):
  c = default_config()
  mutate(c)
  with pytest.raises(ConfigError) as e:
    validate(c)
  assert key in str(e.value) and "\n" not in str(e.value)


def test_optional_keys_accept_none_and_their_type():
  c = default_config()
  c.trainer.pretrained_weights = "/some/ckpt"
  c.inference.output_stage_to_use = 2
  validate(c)


def _run(args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True,
                        env=env, timeout=120)


@pytest.mark.parametrize("args, needle", [
    (["--config=configs/demo.py", "--config.model.stages=1"], "config.model.stages"),
    (["--config=configs/demo.py", "--config.model.stages=abc"], "config.model.stages"),
    (["--config=configs/demo.py", "--config.model.nope=1"], "config.model.nope"),
    (["--config=configs/nope.py"], "configs/nope.py"),
])
def test_main_rejects_bad_config_in_one_line(tmp_path, args, needle):
  r = _run(["main.py"] + args + [f"--workdir={tmp_path}"])
  assert r.returncode == 2
  err = r.stderr.strip().splitlines()
  assert len(err) == 1 and needle in err[0], r.stderr


def test_cli_summary_prints_reference_count():
  r = _run(["-m", "bpnet_jax.cli", "summary", "--config=configs/coco.py"])
  assert r.returncode == 0, r.stderr
  assert "16,777,835 total" in r.stdout and "16,772,459 trainable" in r.stdout
  r = _run(["-m", "bpnet_jax.cli", "summary", "--config=configs/coco.py",
            "--config.model.architecture=BpNetModel", "--config.model.stages=6"])
  assert "52,319,510 total" in r.stdout, r.stderr


def test_cli_user_errors_are_one_line(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from configs import demo\n\ndef get_config():\n  c = demo.get_config()\n"
                 "  c.model.unknown_knob = 1\n  return c\n")
  for args, needle in [(["summary", f"--config={bad}"], "config.model.unknown_knob"),
                       (["summary", "--config=configs/nope.py"], "does not exist"),
                       (["summary", "--config=configs/demo.py", "--config.model.nope=1"],
                        "unknown key 'nope'")]:
    r = _run(["-m", "bpnet_jax.cli"] + args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
