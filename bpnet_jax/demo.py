"""`bpnet demo --workdir=DIR`: the whole pipeline on embedded synthetic data, in one folder.

  DIR/data    make_synthetic output (train/test JPEGs, COCO JSON, dataset_spec.json), the
              converted records (DIR/data/records/{train,test}-fold-000-of-001) and masks
  DIR/train   a short training run of configs/demo.py (a normal workdir: checkpoints,
              metrics.jsonl, tensorboard/, config.json)
  DIR/eval    COCO keypoint evaluation on the held-out synthetic split (metrics.json,
              results.csv, detections_coco.json)
  DIR/infer   inference on a few synthetic test images and real COCO photos (detection.json,
              images_annotated/)
  DIR/pruned  the trained model pruned (`bpnet prune`; prune_report.json, model.json, state/)
  DIR/retrain the pruned model retrained briefly (load_graph), evaluated in DIR/retrain/eval
  DIR/export  the trained model as ONNX at the inference size: model.onnx (+ model.report.json),
              model_fp16.onnx, model_int8.onnx with its calibration tensor and TensorRT
              calibration cache; the ONNX models are evaluated like the checkpoint
              (DIR/export/eval_*)

The demo trains configs/demo.py with the settings of `demo_config` (measured in
docs/training.md): the synthetic "demo" style (1-3 large part-coloured people on plain
backgrounds), no left-right flips (the part colours fix left and right), rotations +-20 deg,
64-wide refinement stages, Adam 2e-3 for 50 epochs, inference at 192.

Re-running it reuses what is already there (data) and resumes training, so nothing is redone;
DIR/eval, DIR/infer, DIR/pruned and DIR/export are recomputed from the latest checkpoint;
DIR/retrain resumes. Export needs the optional ONNX packages (skipped with a note otherwise).
"""

from __future__ import annotations

import json
import os
import sys
import time

DEMO_IMAGES = 150
DEMO_EPOCHS = 50
DEMO_STYLE = "demo"            # bpnet_jax.synthetic.STYLES
# Refinement-stage widths of the demo model (configs/demo.py has 16): they run at 1/8 of the
# input resolution, so 64 costs little, and 16 channels cannot hold 19 heatmaps + 38 PAFs.
DEMO_STAGE_WIDTH = 64
# Held-out people are 40-85% of 240 px tall; at 192 they appear at about the size that
# person-centric training scales them to (0.6 x 128 px).
DEMO_INFERENCE_SHAPE = (192, 192)


def demo_config(workdir: str):
  """configs/demo.py pointed at DIR/data, with the demo's training settings.

  On top of configs/demo.py (see docs/training.md for the measurements): no left-right flips
  (the demo data's part colours fix left and right), rotations +-20 deg, 64-wide refinement
  stages, Adam from 1e-5 up to 2e-3 and back (soft start / annealing), DEMO_EPOCHS epochs, and
  inference at 192x192 (the held-out people then appear at about the size training scales them
  to).
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)
  from configs import demo
  data = os.path.join(workdir, "data")
  c = demo.get_config()
  dc = c.dataloader.dataset_config
  dc.train_records_folder_path = dc.val_records_folder_path = os.path.join(data, "records")
  dc.train_records_path = ("train-fold-000-of-001",)
  dc.val_records_path = ("test-fold-000-of-001",)
  dc.dataset_specs = {"coco": os.path.join(data, "dataset_spec.json")}
  dc.root_data_path = data
  c.dataloader.max_image_size = (240, 320)
  c.trainer.num_epoch = DEMO_EPOCHS
  c.trainer.checkpoint_n_epoch = DEMO_EPOCHS // 4 or 1
  c.trainer.validation_every_n_epoch = DEMO_EPOCHS // 4 or 1
  c.trainer.summary_every_n_steps = 5
  aug = c.dataloader.augmentation_config.spatial_aug_params
  aug.flip_lr_prob = 0.0
  aug.rotate_deg_min, aug.rotate_deg_max = -20.0, 20.0
  widths = {"channel_reduction_conv": DEMO_STAGE_WIDTH}
  for t in range(1, c.model.stages + 1):
    for i in range(1, len(c.model.stage1_kernel_sizes if t == 1 else c.model.stageT_kernel_sizes)
                   + 1):
      widths[f"stage{t}/conv{i}"] = DEMO_STAGE_WIDTH
    if t > 1:
      n = len(c.model.stageT_kernel_sizes) + 1
      widths[f"stage{t}/cmap/conv{n}"] = widths[f"stage{t}/paf/conv{n}"] = DEMO_STAGE_WIDTH
  c.model.layer_widths = widths
  c.optimizer.name = "adam"
  c.trainer.use_stagewise_lr_multipliers = False   # Adam normalises each parameter's step
  s = c.optimizer.learning_rate_schedule
  s.base_learning_rate, s.min_learning_rate = 2e-3, 1e-5
  c.inference.input_shape = DEMO_INFERENCE_SHAPE
  return c


def prepare_data(workdir: str, num_images: int = DEMO_IMAGES, seed: int = 0) -> dict:
  """Synthetic images + records under DIR/data (skipped where already present)."""
  from bpnet_jax.data import convert
  from bpnet_jax.data import synthetic
  data = os.path.join(workdir, "data")
  spec = os.path.join(data, "dataset_spec.json")
  if not os.path.exists(spec):
    counts = synthetic.make_synthetic(data, num_images, seed=seed, width=320, height=240,
                                      test_fraction=0.2, style=DEMO_STYLE)
    print(f"[data] {counts['train']['images']} train + {counts['test']['images']} test synthetic "
          f"images -> {data}")
  out = {}
  for mode in ("train", "test"):
    base = os.path.join(data, "records", mode)
    if not os.path.exists(base + ".summary.json"):
      convert.convert(spec, base, mode, generate_masks=True)
    out[mode] = json.load(open(base + ".summary.json"))
    print(f"[data] {mode}: {out[mode]['records']} records from "
          f"{out[mode]['images_with_records']} images -> {base}-fold-000-of-001")
  return out


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


COCO_PHOTOS = os.path.join("tests", "data", "coco_mini", "train2017")
# The demo model is 1/8 wide (8..64 filters per conv): prune in steps of 4, keep at least 4.
# Threshold 0.6 removes 10% of the parameters at no measurable AP cost before retraining
# (docs/pruning.md); 0.8 removes 65% and every detection.
DEMO_PRUNE = dict(threshold=0.6, min_filters=4, granularity=4)
DEMO_RETRAIN_EPOCHS = 5


def evaluate_and_infer(cfg, workdir: str, train_dir: str, num_synthetic: int = 6) -> dict:
  """DIR/eval (held-out synthetic split) and DIR/infer (synthetic + real photos)."""
  from bpnet_jax.data import dataset_spec
  from bpnet_jax.inference import coco_eval
  from bpnet_jax.inference import detections
  from bpnet_jax.inference import predictor
  predictor = predictor.Predictor.from_path(cfg, train_dir)
  split = dataset_spec.load_spec(os.path.join(workdir, "data", "dataset_spec.json")).split("test")
  ev = coco_eval.evaluate_dataset(predictor, split.annotations, split.images_dir,
                                 os.path.join(workdir, "eval"), progress=False, verbose=False)
  m = ev["metrics"]
  print(f"[eval] {ev['images']} held-out images, {ev['people']} people found: AP {m['AP']:.3f}, "
        f"AP50 {m['AP50']:.3f}, AR {m['AR']:.3f} -> {os.path.join(workdir, 'eval')}")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  photos = os.path.join(root, COCO_PHOTOS)
  paths = sorted(os.path.join(split.images_dir, f) for f in os.listdir(split.images_dir))
  paths = paths[:num_synthetic]
  if os.path.isdir(photos):
    paths += sorted(os.path.join(photos, f) for f in os.listdir(photos))
  det = detections.run(predictor, paths, os.path.join(workdir, "infer"), dump_visualizations=True,
                      overwrite=True, progress=False)
  c = det["counts"]
  print(f"[infer] {c['people']} people in {c['images']} images -> "
        f"{os.path.join(workdir, 'infer', 'detection.json')} and images_annotated/")
  return {"eval": m, "infer": c}


def prune_and_retrain(cfg, workdir: str, train_dir: str, eval_metrics: dict) -> dict:
  """DIR/pruned (prune the trained model) and DIR/retrain (retrain it briefly, evaluate)."""
  from bpnet_jax import prune, train
  from bpnet_jax.data import dataset_spec
  from bpnet_jax.inference import coco_eval
  from bpnet_jax.inference import predictor
  pruned_dir = os.path.join(workdir, "pruned")
  rep = prune.prune_checkpoint(cfg, train_dir, pruned_dir, overwrite=True, **DEMO_PRUNE)
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
  split = dataset_spec.load_spec(os.path.join(workdir, "data", "dataset_spec.json")).split("test")
  ev = coco_eval.evaluate_dataset(predictor.Predictor.from_path(rc, retrain_dir), split.annotations,
                                 split.images_dir, os.path.join(retrain_dir, "eval"),
                                 progress=False, verbose=False)
  m = ev["metrics"]
  print(f"[retrain] {DEMO_RETRAIN_EPOCHS} epochs (step {out['step']}), AP {m['AP']:.3f} "
        f"(unpruned {eval_metrics['AP']:.3f}), AP50 {m['AP50']:.3f} "
        f"(unpruned {eval_metrics['AP50']:.3f}) -> {retrain_dir}")
  return {"prune": rep, "retrain": m}


def export_and_evaluate(cfg, workdir: str, train_dir: str, eval_metrics: dict) -> dict | None:
  """DIR/export: fp32, fp16 and int8 ONNX models, each evaluated on the held-out split."""
  from bpnet_jax.data import dataset_spec
  from bpnet_jax.inference import coco_eval
  from bpnet_jax.export import onnx_model
  from bpnet_jax.inference import predictor
  try:
    onnx_model._require_onnx()
  except onnx_model.ExportError as e:
    print(f"[export] skipped: {e}")
    return None
  out = os.path.join(workdir, "export")
  os.makedirs(out, exist_ok=True)
  _, variables = predictor.load_model(cfg, train_dir)
  split = dataset_spec.load_spec(os.path.join(workdir, "data", "dataset_spec.json")).split("test")
  dims = list(cfg.inference.input_shape)
  calibration = onnx_model.int8_calibration(
      cfg, os.path.join(workdir, "data", "train"), dims, batches=16, batch_size=2,
      data_file=os.path.join(out, "calibration.npy"),
      cache_file=os.path.join(out, "calibration.bin"))
  # All three at the inference size, so their evaluations preprocess alike (a fixed-size model
  # pads images into its input) and the int8-vs-fp32 AP compares like with like.
  models = {"fp32": ("model.onnx", dims), "fp16": ("model_fp16.onnx", dims),
            "int8": ("model_int8.onnx", dims)}
  results = {}
  for dtype, (name, fixed) in models.items():
    path = os.path.join(out, name)
    r = onnx_model.export(cfg, variables, path, input_dims=fixed, data_type=dtype,
                      overwrite=True, calibration=calibration if dtype == "int8" else None)
    ev = coco_eval.evaluate_dataset(predictor.Predictor.from_path(cfg, path), split.annotations,
                                   split.images_dir, os.path.join(out, f"eval_{dtype}"),
                                   progress=False, verbose=False)
    results[dtype] = {"max_abs_diff": r["parity"]["max_abs_diff"], "AP": ev["metrics"]["AP"],
                      "AP50": ev["metrics"]["AP50"]}
  print("[export] " + "; ".join(
      f"{k}: max |diff| vs JAX {v['max_abs_diff']:.1e}, AP {v['AP']:.3f}" for k, v in
      results.items()) + f" (checkpoint AP {eval_metrics['AP']:.3f}) -> {out}")
  return results


def run(workdir: str) -> int:
  from bpnet_jax import train
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  prepare_data(workdir)
  cfg = demo_config(workdir)
  train_dir = os.path.join(workdir, "train")
  print(f"[train] configs/demo.py ({cfg.model.architecture}, {cfg.model.stages} stages, width x"
        f"{cfg.model.width_multiplier}, stages {DEMO_STAGE_WIDTH} wide, "
        f"{cfg.dataloader.image_config.height}x{cfg.dataloader.image_config.width}, "
        f"{cfg.optimizer.name}) for {cfg.trainer.num_epoch} epochs -> {train_dir}")
  out = train.train(cfg, train_dir)
  print(f"[train] step {out['step']}/{out['last_step']}, final loss "
        f"{out['metrics'].get('loss', float('nan')):.4g}")
  print(loss_curve(os.path.join(train_dir, "metrics.jsonl")))
  results = evaluate_and_infer(cfg, workdir, train_dir)
  prune_and_retrain(cfg, workdir, train_dir, results["eval"])
  export_and_evaluate(cfg, workdir, train_dir, results["eval"])
  print(f"\ndone in {time.time() - t0:.0f} s. Outputs:\n"
        f"  {os.path.join(workdir, 'data')}            synthetic images, COCO JSON, dataset spec, "
        f"records, masks\n"
        f"  {os.path.join(train_dir, 'checkpoints')}  Orbax checkpoints\n"
        f"  {os.path.join(train_dir, 'metrics.jsonl')} metrics; TensorBoard: tensorboard "
        f"--logdir {os.path.join(train_dir, 'tensorboard')}\n"
        f"  {os.path.join(workdir, 'eval')}            COCO keypoint AP/AR on the held-out split\n"
        f"  {os.path.join(workdir, 'infer')}           detection.json, images_annotated/\n"
        f"  {os.path.join(workdir, 'pruned')}          pruned model (prune_report.json)\n"
        f"  {os.path.join(workdir, 'retrain')}         retrained pruned model and its evaluation\n"
        f"  {os.path.join(workdir, 'export')}          ONNX fp32 / fp16 / int8 models, calibration "
        f"cache, evaluations")
  return 0
