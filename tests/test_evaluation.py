"""COCO AP during training (trainer.evaluation): the in-memory evaluator equals `bpnet evaluate`
on the same state, compiles once, logs its metrics and keeps the best state by AP."""

import json
import os

import pytest
from conftest import tiny_train_config

from bpnet_jax import checkpoint as checkpoint_lib
from bpnet_jax import cli, train
from bpnet_jax.data import dataset_spec
from bpnet_jax.inference.coco_eval import CocoEvaluator
from bpnet_jax.skeleton import skeleton_from_config


@pytest.fixture(scope="module")
def evaluated_run(synth_records, tmp_path_factory):
  spec = synth_records[1]
  config = tiny_train_config(synth_records, num_epoch=2, checkpoint_n_epoch=1)
  config.trainer.evaluation.every_n_epochs = 1
  config.trainer.evaluation.dataset_spec = spec
  # Low thresholds so a two-step model still finds (mostly wrong) people: the AP comparison
  # then covers real detections, not an empty list.
  inference = config.inference
  inference.heatmap_threshold, inference.paf_threshold, inference.paf_sample_ratio = 1e-3, -1.0, 0
  inference.min_parts, inference.min_mean_score = 2, 0.0
  workdir = str(tmp_path_factory.mktemp("evaluated"))
  return config, workdir, train.train(config, workdir, progress=False)


def test_evaluation_logs_metrics_and_compiles_once(evaluated_run):
  _, workdir, result = evaluated_run
  history = result["evaluation"]
  assert [h["step"] for h in history] == [result["steps_per_epoch"], result["last_step"]]
  assert result["evaluation_compilations"] == 1
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  logged = [line for line in lines if "eval_AP" in line]
  assert [line["eval_AP"] for line in logged] == [h["AP"] for h in history]
  assert {"eval_AP50", "eval_AR"} <= set(logged[0])


def test_best_checkpoint_is_a_model_dir_with_the_best_ap(evaluated_run, tmp_path, capsys):
  _, workdir, result = evaluated_run
  history = result["evaluation"]
  best_dir = os.path.join(workdir, "checkpoints", "best")
  best = json.load(open(os.path.join(best_dir, "best.json")))
  first_best = max(history, key=lambda h: (h["AP"], -h["step"]))   # ties keep the earlier one
  assert best["step"] == first_best["step"] and best["metrics"]["AP"] == first_best["AP"]
  # Orbax ignores it: the newest numbered checkpoint is still what a resume reads.
  assert checkpoint_lib.find_step_dir(workdir).endswith(str(result["last_step"]))
  # Picked by name: `bpnet evaluate` on checkpoints/best gives the AP recorded for it.
  assert cli.main(["evaluate", f"--model={best_dir}", f"--dataset_spec={_spec(evaluated_run)}",
                   f"--results_dir={tmp_path / 'eval'}", "--no_progress"]) == 0
  metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
  assert metrics == pytest.approx(best["metrics"], abs=1e-9)


def _spec(run):
  return run[0].trainer.evaluation.dataset_spec


def test_evaluator_equals_bpnet_evaluate_on_the_final_state(evaluated_run, tmp_path):
  config, workdir, result = evaluated_run
  split = dataset_spec.load_spec(_spec(evaluated_run)).split("test")
  state = result["state"]
  evaluator = CocoEvaluator(config, skeleton_from_config(checkpoint_lib.with_skeleton(config)),
                            split.annotations, split.images_dir)
  metrics = evaluator({"params": state.params, "batch_stats": state.batch_stats})
  during_training = {k: result["evaluation"][-1][k] for k in metrics}
  assert metrics == pytest.approx(during_training, abs=1e-9)
  assert cli.main(["evaluate", f"--model={workdir}", f"--dataset_spec={_spec(evaluated_run)}",
                   f"--results_dir={tmp_path / 'eval'}", "--no_progress"]) == 0
  from_cli = json.load(open(tmp_path / "eval" / "metrics.json"))
  assert from_cli == pytest.approx(metrics, abs=1e-9)
  people = json.load(open(tmp_path / "eval" / "detections_coco.json"))
  assert people, "the comparison should cover real detections"
