"""Prune-retrain sweep: size, FLOPs and AP of a trained model pruned at several thresholds.

  python experiments/prune_sweep.py --demo_dir=demo_out [--thresholds 0.1 0.3 0.5 0.7]
      [--retrain_epochs 5] [--min_filters 4] [--granularity 4]
  python experiments/prune_sweep.py --overfit_dir=DIR --eval_size 224 ...

The model: `bpnet demo --workdir=demo_out` (demo_out/train, configs/demo.py on the synthetic
data, evaluated on the held-out split), or `experiments/synthetic_overfit.py --workdir=DIR`
(trained without augmentation on 12 images and evaluated on those same images: a measure of what
pruning removes from what the model learned, not of generalisation). For each threshold: prune
(`bpnet_jax.prune.prune_checkpoint`, max normaliser, union), evaluate as is, retrain with
`load_graph` for --retrain_epochs epochs (regularisation off, stage-wise LR multipliers on) and
evaluate again (pycocotools keypoint AP). The unpruned model is the first row. Outputs go to
<dir>/prune_sweep/; the table is printed (markdown) for docs/pruning.md.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


SPLIT = "test"


def evaluate(cfg, model_dir, data_dir, out_dir):
  from bpnet_jax.data import dataset_spec
  from bpnet_jax.inference import coco_eval as ev
  from bpnet_jax.inference import predictor
  split = dataset_spec.load_spec(os.path.join(data_dir, "dataset_spec.json")).split(SPLIT)
  p = predictor.Predictor.from_path(model_dir, cfg)
  return ev.evaluate_dataset(p, split.annotations, split.images_dir, out_dir, progress=False,
                             verbose=False)["metrics"]


def main():
  ap = argparse.ArgumentParser()
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--demo_dir", help="a `bpnet demo` workdir")
  src.add_argument("--overfit_dir", help="an experiments/synthetic_overfit.py --workdir")
  ap.add_argument("--eval_size", type=int, default=0,
                  help="inference input height/width (default: the config's)")
  ap.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7])
  ap.add_argument("--retrain_epochs", type=int, default=5)
  ap.add_argument("--min_filters", type=int, default=4, help="-nf (the demo model is 1/8 wide)")
  ap.add_argument("--granularity", type=int, default=4, help="-pg")
  a = ap.parse_args()

  from bpnet_jax import checkpoint, prune, train
  from bpnet_jax import model as model_lib
  from bpnet_jax.skeleton import skeleton_from_config
  global SPLIT
  if a.demo_dir:
    root = a.demo_dir
    cfg = checkpoint.saved_config(os.path.join(root, "train"))
  else:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from synthetic_overfit import overfit_config
    root, cfg, SPLIT = a.overfit_dir, overfit_config(a.overfit_dir), "train"
  if a.eval_size:
    cfg.inference.input_shape = (a.eval_size, a.eval_size)
  data, trained = os.path.join(root, "data"), os.path.join(root, "train")
  out = os.path.join(root, "prune_sweep")
  os.makedirs(out, exist_ok=True)
  sk = skeleton_from_config(cfg)
  h, w = cfg.dataloader.image_config.height, cfg.dataloader.image_config.width
  base = evaluate(cfg, trained, data, os.path.join(out, "eval_unpruned"))
  variables = checkpoint.load_model(trained).variables
  net = model_lib.build_model(cfg.model, sk)
  rows = [("unpruned", model_lib.count_params(variables)["total"],
           prune.flops(net, variables, h, w), base, base, 0.0)]
  for th in a.thresholds:
    t0 = time.time()
    pdir = os.path.join(out, f"pruned_{th:g}")
    rep = prune.prune_checkpoint(trained, pdir, threshold=th, granularity=a.granularity,
                                 min_filters=a.min_filters, overwrite=True, config=cfg)
    before = evaluate(cfg, pdir, data, os.path.join(out, f"eval_pruned_{th:g}"))
    rc = cfg.copy_and_resolve_references()
    rc.trainer.pretrained_weights, rc.trainer.load_graph = pdir, True
    rc.trainer.num_epoch = a.retrain_epochs
    rc.trainer.checkpoint_n_epoch = a.retrain_epochs
    rc.trainer.validation_every_n_epoch = 0
    rc.trainer.summary_every_n_steps = 1
    rdir = os.path.join(out, f"retrain_{th:g}")
    train.train(rc, rdir, progress=False)
    after = evaluate(rc, rdir, data, os.path.join(out, f"eval_retrain_{th:g}"))
    rows.append((f"{th:g}", rep["params"]["after"], rep["flops"]["after"], before, after,
                 time.time() - t0))
    print(f"threshold {th:g}: params {rep['params']['after']:,}, AP pruned {before['AP']:.3f}, "
          f"retrained {after['AP']:.3f} ({time.time() - t0:.0f} s)", flush=True)

  p0, f0 = rows[0][1], rows[0][2]
  print(f"\n{len(rows) - 1} thresholds, retrain {a.retrain_epochs} epochs, -nf {a.min_filters} "
        f"-pg {a.granularity}, FLOPs at {h}x{w}\n")
  print("| threshold | params | params % | GFLOPs | FLOPs % | AP pruned | AP50 pruned | "
        "AP retrained | AP50 retrained |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, params, fl, before, after, _ in rows:
    print(f"| {name} | {params:,} | {100 * params / p0:.1f} | {fl / 1e9:.3f} | "
          f"{100 * fl / f0:.1f} | {before['AP']:.3f} | {before['AP50']:.3f} | "
          f"{after['AP']:.3f} | {after['AP50']:.3f} |")


if __name__ == "__main__":
  main()
