"""`bpnet demo --workdir=DIR`: the whole pipeline on embedded synthetic data, in one folder.

  DIR/data    synthetic train/test JPEGs, COCO JSON, dataset_spec.json, masks
  DIR/records the converted records ({train,test}-fold-000-of-001 and summaries)
  DIR/train   a training run of configs/demo.py:demo (a normal, self-describing workdir:
              checkpoints, metrics.jsonl, tensorboard/, config.json)
  DIR/eval    COCO keypoint evaluation on the held-out synthetic split (metrics.json,
              results.csv, detections_coco.json)
  DIR/infer   inference on a few held-out synthetic images (detection.json, images_annotated/)
  DIR/pruned  the trained model pruned (`bpnet prune`: a model directory with config.json,
              state/, prune_report.json)
  DIR/retrain the pruned model retrained briefly (load_graph), evaluated in DIR/retrain/eval
  DIR/export  the trained model as ONNX at the inference size: model.onnx (+ .report.json,
              .config.json), model_fp16.onnx, model_int8.onnx with its calibration tensor and
              TensorRT calibration cache; the ONNX models are evaluated like the checkpoint
              (DIR/export/eval_*)

The settings live in configs/demo.py (variant "demo"; measured in docs/training.md). The demo
model learns synthetic stick figures only; it is not shown real photos (see docs/training.md for
a model that learns real people).

Re-running it reuses what is already there (data) and resumes training, so nothing is redone;
DIR/eval, DIR/infer, DIR/pruned and DIR/export are recomputed from the latest checkpoint;
DIR/retrain resumes. Export needs the optional ONNX packages (skipped with a note otherwise).
"""

from __future__ import annotations

import json
import os
import time

from bpnet_jax import checkpoint, prune, train
from bpnet_jax import config as config_lib
from bpnet_jax.data import dataset_spec, synthetic_dataset
from bpnet_jax.errors import ConfigError, ExportError
from bpnet_jax.export import int8, onnx_model
from bpnet_jax.inference import coco_eval, detections
from bpnet_jax.inference.predictor import Predictor

DEMO_IMAGES = 150
DEMO_STYLE = "demo"            # bpnet_jax.data.synthetic.STYLES
DEMO_CONFIG = "configs/demo.py:demo"
# The demo model is 1/8 wide (8..64 filters per conv): prune in steps of 4, keep at least 4.
# Threshold 0.6 removes 10% of the parameters at no measurable AP cost before retraining
# (docs/pruning.md); 0.8 removes 65% and every detection.
DEMO_PRUNE = dict(threshold=0.6, min_filters=4, granularity=4)
DEMO_RETRAIN_EPOCHS = 5


def demo_config(workdir: str, config=None):
  """The demo's config (configs/demo.py:demo unless `config` is given) pointed at DIR/data,
  making the synthetic dataset first if needed."""
  if config is None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, DEMO_CONFIG)
    if not os.path.isfile(path.split(":")[0]):
      raise ConfigError(f"{path.split(':')[0]}: the demo needs the repository's configs/ "
                        "folder (run it from a clone, or pass --config=FILE)")
    config = config_lib.load_config_file(path)
  paths = synthetic_dataset.make_dataset(workdir, DEMO_IMAGES, seed=0, width=320, height=240,
                                         test_fraction=0.2, style=DEMO_STYLE)
  for mode, s in paths["summaries"].items():
    print(f"[data] {mode}: {s['records']} records from {s['images_with_records']} synthetic "
          f"images -> {os.path.join(paths['records'], mode)}-fold-000-of-001")
  return synthetic_dataset.point_config(config, paths), paths


def loss_curve(metrics_path: str, rows: int = 10, width: int = 40) -> str:
  """The training loss as a text chart (one row per slice of the run)."""
  lines = [json.loads(l) for l in open(metrics_path) if l.strip()]
  train_lines = [l for l in lines if "loss" in l]
  val = {l["step"]: l["val_loss"] for l in lines if "val_loss" in l}
  if not train_lines:
    return "(no metrics yet)"
  idx = sorted({round(i * (len(train_lines) - 1) / max(rows - 1, 1)) for i in range(rows)})
  pick = [train_lines[i] for i in idx]
  hi = max(l["loss"] for l in pick)
  out = [f"{'step':>6} {'epoch':>6} {'loss':>10}"]
  for l in pick:
    bar = "#" * max(1, int(round(width * l["loss"] / hi)))
    out.append(f"{l['step']:>6} {l['epoch']:>6.2f} {l['loss']:>10.4g} {bar}")
  if val:
    out.append("validation loss (per image): " + ", ".join(
        f"step {s}: {v:.4g}" for s, v in sorted(val.items())))
  return "\n".join(out)


def evaluate_and_infer(workdir: str, train_dir: str, test_split, num_images: int = 6) -> dict:
  """DIR/eval (COCO AP on the held-out synthetic split) and DIR/infer (drawings of a few of its
  images). The demo model has only seen synthetic people, so it is not shown real photos."""
  predictor = Predictor.from_path(train_dir)
  ev = coco_eval.evaluate_dataset(predictor, test_split.annotations, test_split.images_dir,
                                  os.path.join(workdir, "eval"), progress=False, verbose=False)
  m = ev["metrics"]
  print(f"[eval] {ev['images']} held-out images, {ev['people']} people found: AP {m['AP']:.3f}, "
        f"AP50 {m['AP50']:.3f}, AR {m['AR']:.3f} -> {os.path.join(workdir, 'eval')}")
  paths = sorted(os.path.join(test_split.images_dir, f)
                 for f in os.listdir(test_split.images_dir))[:num_images]
  det = detections.run(predictor, paths, os.path.join(workdir, "infer"),
                       dump_visualizations=True, overwrite=True, progress=False)
  c = det["counts"]
  print(f"[infer] {c['people']} people in {c['images']} held-out synthetic images -> "
        f"{os.path.join(workdir, 'infer', 'images_annotated')} (the demo model has learned "
        "synthetic people only; see docs/training.md for real photos)")
  return {"eval": m, "infer": c}


def prune_and_retrain(cfg, workdir: str, train_dir: str, test_split, eval_metrics: dict) -> dict:
  """DIR/pruned (prune the trained model) and DIR/retrain (retrain it briefly, evaluate)."""
  pruned_dir = os.path.join(workdir, "pruned")
  rep = prune.prune_checkpoint(train_dir, pruned_dir, overwrite=True, **DEMO_PRUNE)
  p, f = rep["params"], rep["flops"]
  print(f"[prune] threshold {DEMO_PRUNE['threshold']}: params {p['before']:,} -> {p['after']:,} "
        f"({p['after'] / p['before']:.0%}), FLOPs {f['before'] / 1e6:.0f}M -> "
        f"{f['after'] / 1e6:.0f}M ({f['after'] / f['before']:.0%}) -> {pruned_dir}")
  rc = cfg.copy_and_resolve_references()
  rc.trainer.pretrained_weights, rc.trainer.load_graph = pruned_dir, True
  rc.trainer.num_epoch = DEMO_RETRAIN_EPOCHS
  rc.trainer.checkpoint_n_epoch = rc.trainer.validation_every_n_epoch = DEMO_RETRAIN_EPOCHS
  retrain_dir = os.path.join(workdir, "retrain")
  out = train.train(rc, retrain_dir, progress=False)
  ev = coco_eval.evaluate_dataset(Predictor.from_path(retrain_dir), test_split.annotations,
                                  test_split.images_dir, os.path.join(retrain_dir, "eval"),
                                  progress=False, verbose=False)
  m = ev["metrics"]
  print(f"[retrain] {DEMO_RETRAIN_EPOCHS} epochs (step {out['step']}), AP {m['AP']:.3f} "
        f"(unpruned {eval_metrics['AP']:.3f}), AP50 {m['AP50']:.3f} "
        f"(unpruned {eval_metrics['AP50']:.3f}) -> {retrain_dir}")
  return {"prune": rep, "retrain": m}


def export_and_evaluate(workdir: str, train_dir: str, test_split, eval_metrics: dict):
  """DIR/export: fp32, fp16 and int8 ONNX models, each evaluated on the held-out split."""
  try:
    onnx_model.require_onnx()
  except ExportError as e:
    print(f"[export] skipped: {e}")
    return None
  out = os.path.join(workdir, "export")
  saved = checkpoint.load_model(train_dir)
  cfg, variables = saved.config, saved.variables
  dims = list(cfg.inference.input_shape)
  train_images = os.path.join(workdir, "data", "train")
  # 32 calibration images (fewer when the demo is run small).
  batches = max(1, min(16, len(os.listdir(train_images)) // 2))
  calibration = int8.int8_calibration(
      cfg, train_images, dims, batches=batches, batch_size=2,
      data_file=os.path.join(out, "calibration.npy"),
      cache_file=os.path.join(out, "calibration.bin"))
  # All three at the inference size, so their evaluations preprocess alike (a fixed-size model
  # pads images into its input) and the int8-vs-fp32 AP compares like with like.
  results = {}
  for dtype, name in (("fp32", "model.onnx"), ("fp16", "model_fp16.onnx"),
                      ("int8", "model_int8.onnx")):
    path = os.path.join(out, name)
    os.makedirs(out, exist_ok=True)
    r = onnx_model.export(cfg, variables, path, input_dims=dims, data_type=dtype,
                          overwrite=True, calibration=calibration if dtype == "int8" else None)
    ev = coco_eval.evaluate_dataset(Predictor.from_path(path), test_split.annotations,
                                    test_split.images_dir, os.path.join(out, f"eval_{dtype}"),
                                    progress=False, verbose=False)
    results[dtype] = {"max_abs_diff": r["parity"]["max_abs_diff"], "AP": ev["metrics"]["AP"],
                      "AP50": ev["metrics"]["AP50"]}
  print("[export] " + "; ".join(
      f"{k}: max |diff| vs JAX {v['max_abs_diff']:.1e}, AP {v['AP']:.3f}" for k, v in
      results.items()) + f" (checkpoint AP {eval_metrics['AP']:.3f}) -> {out}")
  return results


def run(workdir: str, config=None) -> int:
  """The whole demo into `workdir` (config: configs/demo.py:demo unless given)."""
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  cfg, paths = demo_config(workdir, config)
  test_split = dataset_spec.load_spec(paths["spec"]).split("test")
  train_dir = os.path.join(workdir, "train")
  print(f"[train] {DEMO_CONFIG} ({cfg.model.architecture}, {cfg.model.stages} stages, width x"
        f"{cfg.model.width_multiplier}, "
        f"{cfg.dataloader.image_config.height}x{cfg.dataloader.image_config.width}, "
        f"{cfg.optimizer.name}) for {cfg.trainer.num_epoch} epochs -> {train_dir}")
  out = train.train(cfg, train_dir)
  print(f"[train] step {out['step']}/{out['last_step']}, final loss "
        f"{out['metrics'].get('loss', float('nan')):.4g}")
  print(loss_curve(os.path.join(train_dir, "metrics.jsonl")))
  results = evaluate_and_infer(workdir, train_dir, test_split)
  prune_and_retrain(cfg, workdir, train_dir, test_split, results["eval"])
  export_and_evaluate(workdir, train_dir, test_split, results["eval"])
  print(f"\ndone in {time.time() - t0:.0f} s. Outputs:\n"
        f"  {os.path.join(workdir, 'data')}            synthetic images, COCO JSON, dataset spec, "
        f"masks\n"
        f"  {os.path.join(workdir, 'records')}         training and test records\n"
        f"  {os.path.join(train_dir, 'checkpoints')}  Orbax checkpoints (each with its config)\n"
        f"  {os.path.join(train_dir, 'metrics.jsonl')} metrics; TensorBoard: tensorboard "
        f"--logdir {os.path.join(train_dir, 'tensorboard')}\n"
        f"  {os.path.join(workdir, 'eval')}            COCO keypoint AP/AR on the held-out split\n"
        f"  {os.path.join(workdir, 'infer')}           detection.json, images_annotated/\n"
        f"  {os.path.join(workdir, 'pruned')}          pruned model (prune_report.json)\n"
        f"  {os.path.join(workdir, 'retrain')}         retrained pruned model and its evaluation\n"
        f"  {os.path.join(workdir, 'export')}          ONNX fp32 / fp16 / int8 models, calibration "
        f"cache, evaluations")
  return 0
