r"""BodyPoseNet on COCO 2017 keypoints: the public TAO tutorial's training spec.

BpNetLite with 3 stages, 256x256 input (32x32 labels, sigma 7 px), batch 10, 20 epochs,
L1 5e-4 on conv kernels, momentum 0.9 with the soft-start annealing schedule (0.05 / 0.5,
8e-8 -> 2e-5 -> 8e-8) and stage-wise LR multipliers; person-centric augmentation (flip 0.5,
rotation +-40 deg, translation +-40 px). Every value is in `bpnet_jax.config.default_config()`;
this file names the data. Usage:

  python main.py --config=configs/coco.py --workdir=/tmp/bpnet_coco \
      --config.dataloader.dataset_config.root_data_path=/data/coco/
"""

from bpnet_jax.config import default_config


def get_config():
  config = default_config()
  ds = config.dataloader.dataset_config
  ds.root_data_path = "data/coco/"
  ds.train_records_folder_path = "data/coco/records"
  ds.train_records_path = ["train-fold-000-of-001"]
  ds.val_records_folder_path = "data/coco/records"
  ds.val_records_path = ["val-fold-000-of-001"]
  ds.dataset_specs = {"coco": "data/coco/coco_spec.json"}
  return config
