r"""Retraining a pruned BodyPoseNet: the TAO tutorial's retrain spec.

The same as configs/coco.py except: 50 epochs, weights and architecture from a pruned model
directory (`bpnet prune ... -o runs/coco_pruned`) with `load_graph`, which also turns weight
regularisation off unless `trainer.regularize_pruned` is set. Stage-wise LR multipliers stay on
(the original silently lost them in this mode; docs/decisions.md). Usage:

  bpnet prune --model=runs/coco -o runs/coco_pruned -pth 0.05
  python main.py --config=configs/coco_retrain_pruned.py --workdir=runs/coco_retrain \
      --config.trainer.pretrained_weights=runs/coco_pruned
"""

from configs import coco


def get_config():
  config = coco.get_config()
  config.trainer.num_epoch = 50
  config.trainer.pretrained_weights = "runs/coco_pruned"
  config.trainer.load_graph = True
  return config
