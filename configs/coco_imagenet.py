r"""BodyPoseNet on COCO 2017 from an ImageNet VGG19-BN backbone (torchvision / timm `vgg19_bn`).

configs/coco.py (BpNetLite, 3 stages, 256x256, batch 10, L1 5e-4, stage-wise multipliers) with:
- `model.backbone_downsampling='max_pool'`: 2x2 max pools before blocks 2-4 and stride-1 convs,
  VGG19's own downsampling, so the imported block_1a .. block_4b compute what they computed on
  ImageNet (parameter counts are the same as with strided convs);
- the input normalised as torchvision's ImageNet models expect it, (pixel / 255 - mean) / std,
  so block_1a's kernels are VGG19's as they are and its 1-pixel border is exact too;
- `trainer.pretrained_weights`: the `bpnet import_weights` output (ten layers: conv kernels,
  BatchNorm scale/bias and statistics); everything after block_4b starts from random init;
- OpenPose's schedule for the same start (VGG19's first ten layers from ImageNet, random
  stages): base LR 4e-5 at batch 10, about 50 epochs of ~120k main-person samples; here on
  the soft-start / annealing shape of the original (5% warm-up, annealing from half-way). The
  stage-wise multipliers stay on: kernels x1 (bias x2) in the backbone and stage 1, x4 (x8)
  in the refinement stages are OpenPose's own `lr_mult`s for that network. Reasons in
  docs/training.md ("Starting from ImageNet VGG19").

Usage (the whole sequence is in docs/training.md):

  bpnet import_weights --weights=vgg19_bn.safetensors --output=runs/vgg19_bn_imagenet \
      --config=configs/coco_imagenet.py
  python main.py --config=configs/coco_imagenet.py --workdir=runs/coco_imagenet \
      --config.trainer.pretrained_weights=runs/vgg19_bn_imagenet
"""

from configs import coco

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_config():
  config = coco.get_config()
  config.model.backbone_downsampling = "max_pool"
  norm = config.dataloader.normalization_params
  # network input = pixel / scale - offset  ==  (pixel / 255 - mean) / std
  norm.image_scale = tuple(255.0 * s for s in IMAGENET_STD)
  norm.image_offset = tuple(m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
  # Where `bpnet import_weights --output=...` wrote the backbone (override on the command line).
  config.trainer.pretrained_weights = "runs/vgg19_bn_imagenet"
  config.trainer.num_epoch = 50
  config.trainer.checkpoint_n_epoch = 5
  config.trainer.use_stagewise_lr_multipliers = True
  schedule = config.optimizer.learning_rate_schedule
  schedule.type = "softstart_annealing"
  schedule.base_learning_rate = 4e-5
  schedule.min_learning_rate = 8e-8
  schedule.soft_start = 0.05
  schedule.annealing = 0.5
  return config
