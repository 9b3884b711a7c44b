"""Real-image learning check: memorise a small COCO subset, then measure COCO keypoint AP on it.

  python experiments/real_overfit.py --coco_dir DIR [--workdir W] [--epochs 100] [--size 256]
  python experiments/real_overfit.py --spec SPEC.json [...]

DIR holds a COCO person-keypoints subset laid out as COCO ships it:
DIR/annotations/person_keypoints_train2017.json and DIR/train2017/*.jpg (e.g. the 80 images of
a coco_mini folder). With --coco_dir a dataset spec is written into the workdir whose train and
test splits are both DIR (one record per image); --spec takes any spec instead (its train split
is trained on, its test split evaluated).

What runs is what a user runs: `dataset_convert` with generated masks of crowds and unlabelled
people, `train.train` on a small configs/coco.py variant without augmentation (every image
letterboxed whole into a SIZE x SIZE input, the view inference sees), COCO AP on the test split
during training (`trainer.evaluation`, the real post-processing + pycocotools), and a final
`bpnet evaluate`-equivalent on the last state. Memorising a few dozen images must reach a high AP
when targets, masks, crowd handling and coordinate mapping agree end to end on real data.
Prints the AP after each evaluation and the final per-area metrics; results in docs/training.md.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# COCO's 17 keypoints and limbs: the spec's category, as COCO's own annotation file has it.
COCO_SPEC = {
    "dataset": "coco",
    "duplicate_data_with_each_person_as_center": False,
    "visibility_flags": {"value": {"visible": 2, "occluded": 1, "not_labeled": 0},
                         "mapping": {"visible": "visible", "occluded": "occluded",
                                     "not_labeled": "not_labeled"}},
    # Every image with a labelled person becomes a record (the default filters keep only images
    # with a large, well-labelled "main person": 25 of coco_mini's 80), since AP is measured on
    # every image of the annotation file.
    "data_filtering_params": {"min_acceptable_height": 1, "min_acceptable_width": 1,
                              "min_acceptable_kpts": 1,
                              "min_acceptable_interperson_dist_ratio": 0.0},
}


def write_spec(coco_dir: str, work: str) -> str:
  """A dataset spec whose train and test splits are both `coco_dir`; masks go to the workdir."""
  coco_dir = os.path.abspath(coco_dir)
  annotations = os.path.join(coco_dir, "annotations", "person_keypoints_train2017.json")
  with open(annotations) as f:
    categories = json.load(f)["categories"]
  split = {"images_root_dir_path": os.path.join(coco_dir, "train2017"),
           "mask_root_dir_path": os.path.join(os.path.abspath(work), "masks"),
           "annotation_root_dir_path": annotations}
  spec = dict(COCO_SPEC, root_directory_path=coco_dir, train_data=split, test_data=split,
              categories=categories)
  path = os.path.join(work, "dataset_spec.json")
  with open(path, "w") as f:
    json.dump(spec, f, indent=1)
  return path


def overfit_config(spec: str, records: str, root: str, size: int, epochs: int, lr: float,
                   batch_size: int = 4):
  """configs/coco.py, narrowed (backbone 1/4 wide, two 3x3 refinement stages 96 wide), Adam,
  no augmentation, whole images letterboxed into size x size, AP on the spec's test split every
  epochs/5 epochs."""
  from bpnet_jax import model as model_lib
  from bpnet_jax.skeleton import skeleton_from_config
  from configs import coco
  c = coco.get_config()
  c.model.width_multiplier = 0.25
  c.model.stages = 2
  c.model.stageT_kernel_sizes = [3, 3, 3]
  c.model.kernel_initializer = "xavier"
  c.model.regularization_type = "none"
  net = model_lib.build_model(c.model, skeleton_from_config(c))
  c.model.layer_widths = {layer.path: 96 for layer in model_lib.layer_spec(net).layers
                          if layer.prunable and not layer.gates
                          and not layer.path.startswith("backbone/")}
  d = c.dataloader
  d.batch_size = batch_size
  d.image_config.height = d.image_config.width = size
  d.pose_config.target_shape = (size // 8, size // 8)
  d.shuffle_buffer_size = 1000
  d.dataset_config.root_data_path = root
  d.dataset_config.train_records_folder_path = records
  d.dataset_config.train_records_path = ("train-fold-000-of-001",)
  d.dataset_config.val_records_path = ()
  d.dataset_config.dataset_specs = {"coco": spec}
  aug = d.augmentation_config
  aug.spatial_augmentation_mode = "standard"      # the whole image, letterboxed, as inference
  sp = aug.spatial_aug_params
  sp.flip_lr_prob = sp.rotate_deg_min = sp.rotate_deg_max = 0.0
  sp.translate_min_x = sp.translate_max_x = sp.translate_min_y = sp.translate_max_y = 0.0
  t = c.trainer
  t.num_epoch = epochs
  t.checkpoint_n_epoch = epochs
  t.validation_every_n_epoch = 0
  t.summary_every_n_steps = 10
  t.log_every_n_secs = 10
  t.use_stagewise_lr_multipliers = False          # Adam normalises each parameter's step
  t.evaluation.every_n_epochs = max(1, epochs // 5)
  t.evaluation.batch_size = 4
  c.optimizer.name = "adam"
  s = c.optimizer.learning_rate_schedule
  s.base_learning_rate, s.min_learning_rate = lr, lr / 100
  s.soft_start, s.annealing = 0.05, 0.7
  inf = c.inference
  inf.input_shape = (size, size)
  inf.keep_aspect_ratio_mode = "pad_image_input"   # the training view: letterboxed to size
  return c


def oracle_ap(config, spec_path: str, skeleton) -> dict:
  """COCO AP of perfect network outputs: each test image's labels (the training targets, made
  from its ground truth in the inference geometry) decoded and evaluated like a prediction.
  The ceiling that the input size, the output stride and the decoder put on any model."""
  import numpy as np

  from bpnet_jax import targets
  from bpnet_jax.data import convert, dataset_spec
  from bpnet_jax.data.records import LABELED_BELOW
  from bpnet_jax.inference import coco_eval, postprocess
  from bpnet_jax.inference.predictor import Predictor
  from bpnet_jax.inference.preprocess import read_image
  spec = dataset_spec.load_spec(spec_path)
  split = spec.split("test")
  gt = coco_eval.load_coco(split.annotations)
  # Geometry and decoding settings of a Predictor with this config (its network is not run).
  predictor = Predictor(config, backend=None, skeleton=skeleton)
  label = config.dataloader.label_processor_config
  people_by_image = {}
  for image_id in sorted(gt.getImgIds()):
    image = read_image(os.path.join(split.images_dir, gt.imgs[image_id]["file_name"]))
    _, geom = predictor.prepare(image)[0]
    anns = [a for a in gt.imgToAnns[image_id] if not a.get("iscrowd") and a["num_keypoints"]]
    if not anns:
      people_by_image[image_id] = []
      continue
    joints, vis = convert.convert_keypoints(np.array([a["keypoints"] for a in anns]), spec,
                                            skeleton)
    valid = vis < LABELED_BELOW
    grid = (geom.padded[0] // 8, geom.padded[1] // 8)
    labels = np.asarray(targets.make_labels(
        geom.to_input(joints).astype(np.float32), valid, skeleton, grid, 8,
        label.heatmap_gaussian_sigma, label.paf_ortho_dist_thresh))
    n_paf = 2 * skeleton.num_limbs
    people = postprocess.decode(labels[..., n_paf:], labels[..., :n_paf],
                                **predictor.decode_kwargs)
    for person in people:
      kp = person["keypoints"]
      found = kp[:, 2] > 0
      kp[found, :2] = geom.to_original(kp[found, :2])
    people_by_image[image_id] = people
  return coco_eval.coco_eval(gt, coco_eval.coco_results(people_by_image, skeleton),
                             verbose=False)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--coco_dir", help="COCO subset: annotations/person_keypoints_train2017.json "
                   "and train2017/")
  src.add_argument("--spec", help="dataset spec JSON (train split trained, test split evaluated)")
  p.add_argument("--workdir", default=None)
  p.add_argument("--epochs", type=int, default=100)
  p.add_argument("--size", type=int, default=256, help="network input (pixels, multiple of 8)")
  p.add_argument("--batch_size", type=int, default=4)
  p.add_argument("--oracle_only", action="store_true",
                 help="only measure the AP of perfect outputs (the labels), no training")
  p.add_argument("--lr", type=float, default=2e-3)
  a = p.parse_args()

  from bpnet_jax import train
  from bpnet_jax.data import convert, dataset_spec

  work = a.workdir or tempfile.mkdtemp(prefix="bpnet_real_overfit_")
  os.makedirs(work, exist_ok=True)
  spec = a.spec or write_spec(a.coco_dir, work)
  records = os.path.join(work, "records")
  if not os.path.exists(os.path.join(records, "train.summary.json")):
    summary = convert.convert(spec, os.path.join(records, "train"), "train", generate_masks=True)
    print(f"converted: {json.dumps({k: summary[k] for k in ('images', 'records')})}")
  root = dataset_spec.load_spec(spec).root
  cfg = overfit_config(spec, records, root, a.size, a.epochs, a.lr, a.batch_size)
  from bpnet_jax import checkpoint as checkpoint_lib
  from bpnet_jax.skeleton import skeleton_from_config
  oracle = oracle_ap(cfg, spec, skeleton_from_config(checkpoint_lib.with_skeleton(cfg)))
  print("oracle (the labels decoded as a prediction, input "
        f"{a.size}x{a.size}): " + "  ".join(f"{k} {oracle[k]:.3f}" for k in
                                            ("AP", "AP50", "APm", "APl", "AR")))
  if a.oracle_only:
    return 0
  start = time.perf_counter()
  out = train.train(cfg, os.path.join(work, "train"))
  minutes = (time.perf_counter() - start) / 60
  for h in out["evaluation"]:
    print(f"epoch {h['epoch']:.0f} (step {h['step']}): AP {h['AP']:.3f}  AP50 {h['AP50']:.3f}  "
          f"AR {h['AR']:.3f}")
  final = out["evaluation"][-1]
  print(f"{out['step']} steps in {minutes:.1f} min (training + evaluations), final loss "
        f"{out['metrics']['loss']:.4g}")
  print("final: " + "  ".join(f"{k} {final[k]:.3f}" for k in
                              ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "ARm", "ARl")))
  return 0


if __name__ == "__main__":
  sys.exit(main())
