"""Sample INT8 calibration images from a COCO keypoint annotation file.

  python experiments/sample_calibration_images.py -a person_keypoints_train2017.json \
      -i train2017/ -o calibration_samples/ -n 2000 -pth 1 -kth 5 --randomize --seed 0

Keeps images with at least `-pth` people that each have at least `-kth` labelled keypoints
(crowd annotations do not count), in file order or shuffled (seeded), and copies exactly `-n` of
them (the original helper copied n + 1) into the output folder, which must be new or empty.
Then: `bpnet export ... --data_type int8 --cal_image_dir calibration_samples/`.
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np


def select(annotations: dict, num: int, min_people: int, min_keypoints: int,
           randomize: bool, seed: int) -> list[dict]:
  """The image entries to copy (at most `num`)."""
  good: dict[int, int] = {}
  for a in annotations.get("annotations", []):
    if not a.get("iscrowd", 0) and a.get("num_keypoints", 0) >= min_keypoints:
      good[a["image_id"]] = good.get(a["image_id"], 0) + 1
  images = [im for im in annotations["images"] if good.get(im["id"], 0) >= min_people]
  if randomize:
    order = np.random.default_rng(seed).permutation(len(images))
    images = [images[i] for i in order]
  return images[:num]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("-a", "--annotations", required=True)
  p.add_argument("-i", "--image_root", required=True)
  p.add_argument("-o", "--output_dir", required=True)
  p.add_argument("-n", "--num_images", type=int, default=500)
  p.add_argument("-pth", "--min_people", type=int, default=1)
  p.add_argument("-kth", "--min_keypoints", type=int, default=5)
  p.add_argument("-r", "--randomize", action="store_true")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  try:
    with open(a.annotations) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    sys.exit(f"sample_calibration_images: error: {a.annotations}: {e}")
  if os.path.isdir(a.output_dir) and os.listdir(a.output_dir):
    sys.exit(f"sample_calibration_images: error: {a.output_dir} is not empty")
  chosen = select(data, a.num_images, a.min_people, a.min_keypoints, a.randomize, a.seed)
  missing = [im["file_name"] for im in chosen
             if not os.path.isfile(os.path.join(a.image_root, im["file_name"]))]
  if missing:
    sys.exit(f"sample_calibration_images: error: {len(missing)} selected images are missing "
             f"under {a.image_root} (e.g. {missing[0]})")
  os.makedirs(a.output_dir, exist_ok=True)
  for im in chosen:
    dst = os.path.join(a.output_dir, im["file_name"])
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(os.path.join(a.image_root, im["file_name"]), dst)
  if len(chosen) < a.num_images:
    print(f"warning: only {len(chosen)} images qualify (asked for {a.num_images})",
          file=sys.stderr)
  print(f"{len(chosen)} images -> {a.output_dir}")


if __name__ == "__main__":
  main()
