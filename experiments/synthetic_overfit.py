"""Learning check: the tiny config overfits a small synthetic set until its heatmap peaks sit on
the true joints.

  python experiments/synthetic_overfit.py [--workdir DIR] [--num_images 12] [--epochs 400]

Makes a synthetic dataset, converts it, trains `configs/demo.py` on it without augmentation,
then runs the trained model on the training images (identity transform) and, for every labelled
joint inside the input, measures the distance from the true joint to the nearest peak (3x3 local
maximum above 0.1) of its heatmap channel, in output cells. Prints the numbers; exits 0 when the
mean distance is under 1 cell (a perfect peak on the nearest cell centre is up to 0.71 away) and
at least 90% of the joints have a peak in their channel.
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def peak_distances(heat, joints, valid, stride, threshold=0.1):
  """Distances (output cells) from each valid joint to the nearest peak of its channel.

  heat (h, w, J); joints (P, J, 2) input px; valid (P, J). Returns an array (NaN: no peak).
  """
  import numpy as np
  from scipy.ndimage import maximum_filter
  h, w, j = heat.shape
  peaks = (heat == maximum_filter(heat, size=(3, 3, 1), mode="constant")) & (heat > threshold)
  out = []
  for jj in range(j):
    ys, xs = np.nonzero(peaks[..., jj])
    cells = np.stack([xs, ys], -1).astype(np.float64)
    for p in np.nonzero(valid[:, jj])[0]:
      true = (joints[p, jj] - (stride - 1) / 2) / stride          # in cell units
      if not (-0.5 <= true[0] <= w - 0.5 and -0.5 <= true[1] <= h - 0.5):
        continue
      out.append(np.min(np.linalg.norm(cells - true, axis=1)) if len(cells) else np.nan)
  return np.array(out)


def overfit_config(work: str, epochs: int = 400, lr: float = 5e-4, num_images: int = 12):
  """configs/demo.py on WORK's synthetic dataset (made if missing) without augmentation or
  regularisation."""
  from bpnet_jax.data import synthetic_dataset
  from configs import demo
  paths = synthetic_dataset.make_dataset(work, num_images, seed=1, test_fraction=0)
  cfg = synthetic_dataset.point_config(demo.get_config(), paths, validation=False)
  d = cfg.dataloader
  d.max_image_size = (240, 320)
  sp = d.augmentation_config.spatial_aug_params
  sp.flip_lr_prob, sp.rotate_deg_min, sp.rotate_deg_max = 0.0, 0.0, 0.0
  sp.translate_min_x = sp.translate_max_x = sp.translate_min_y = sp.translate_max_y = 0.0
  cfg.trainer.num_epoch = epochs
  cfg.trainer.checkpoint_n_epoch = epochs
  cfg.trainer.summary_every_n_steps = 10
  cfg.trainer.validation_every_n_epoch = 0
  cfg.model.regularization_type = "none"
  cfg.optimizer.learning_rate_schedule.base_learning_rate = lr
  cfg.optimizer.learning_rate_schedule.min_learning_rate = lr / 100
  return cfg


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default=None)
  p.add_argument("--num_images", type=int, default=12)
  p.add_argument("--epochs", type=int, default=400)
  p.add_argument("--lr", type=float, default=5e-4)
  a = p.parse_args()

  import jax
  import numpy as np

  from bpnet_jax import augment, train
  from bpnet_jax.data import input_pipeline as ip
  from bpnet_jax.skeleton import load_skeleton

  work = a.workdir or tempfile.mkdtemp(prefix="bpnet_overfit_")
  rec = os.path.join(work, "records", "train")
  cfg = overfit_config(work, a.epochs, a.lr, a.num_images)
  d = cfg.dataloader
  out = train.train(cfg, os.path.join(work, "train"))
  state = out["state"]

  sk = load_skeleton()
  model = train.setup(cfg).model
  aug = augment.AugParams.from_config(d.augmentation_config, enabled=False)
  lab = augment.LabelParams.from_config(cfg)
  ds = ip.build_dataset([rec + "-fold-000-of-001"], ip.decoder_from_config(cfg, sk), 0, 0,
                        shuffle=False, repeat=False)

  @jax.jit
  def predict(batch):
    res = jax.vmap(lambda s: augment.preprocess_sample(None, s, aug, lab, sk,
                                                       draws=augment.identity_draw()))(
        {k: batch[k] for k in augment.sample_fields(batch)})
    heats, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                           res["image"])
    return heats[-1], res["joints"], res["valid"]

  dists = []
  for i in range(len(ds)):
    batch = jax.tree_util.tree_map(lambda x: x[None], ds[i])
    heat, joints, valid = jax.device_get(predict(batch))
    dists.append(peak_distances(heat[0][..., :sk.num_joints], joints[0], valid[0], lab.stride))
  dists = np.concatenate(dists)
  found = dists[~np.isnan(dists)]
  mean = float(found.mean()) if len(found) else float("inf")
  within = float(np.mean(np.nan_to_num(dists, nan=np.inf) <= 1.5))
  with open(os.path.join(work, "train", "metrics.jsonl")) as f:
    first = json.loads(f.readline())["loss"]
  last = out["metrics"]["loss"]
  print(f"records {len(ds)}, steps {out['step']}, loss {first:.4g} -> {last:.4g}")
  print(f"labelled joints in view: {len(dists)}; with a peak: {len(found)}; "
        f"within 1.5 cells: {within:.1%}")
  print(f"mean distance to the nearest peak: {mean:.3f} output cells "
        f"({mean * lab.stride:.2f} input px at stride {lab.stride})")
  ok = mean < 1.0 and len(found) >= 0.9 * len(dists)
  print("PASS" if ok else "FAIL")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
