"""bpnet_jax: bottom-up multi-person 2D pose estimation (BodyPoseNet) in JAX/Flax.

Library entry points:
  load_skeleton, Skeleton            the pose skeleton as data (joints, limbs, flip pairs, layout)
  default_config, validate_config    the experiment config schema and its checks
  build_model, BpNet, layer_spec     the network and its one description (the layer spec)
  count_params, param_table
  pose_loss, stage_losses, regularization
  build_optimizer, lr_multipliers, soft_start_annealing, exponential_decay
  make_labels                        training targets (heatmaps, PAFs, background)
  decode                             network maps -> people (post-processing)
  load_model                         a saved model (workdir, checkpoint, pruned dir) -> SavedModel
  Predictor                          images -> people with a checkpoint, ONNX model or engine
  Error                              the base of every user-facing error

Nothing here imports TensorFlow or GPU-only packages.
"""

from bpnet_jax.checkpoint import SavedModel, load_model
from bpnet_jax.config import default_config
from bpnet_jax.config import validate as validate_config
from bpnet_jax.errors import ConfigError, Error
from bpnet_jax.inference.postprocess import decode
from bpnet_jax.inference.predictor import Predictor
from bpnet_jax.losses import pose_loss, regularization, stage_losses
from bpnet_jax.model import (
                             BpNet,
                             build_model,
                             count_params,
                             init_variables,
                             layer_spec,
                             param_table,
)
from bpnet_jax.optimizer import build_optimizer, lr_multipliers, optimizer_from_config
from bpnet_jax.schedules import exponential_decay, soft_start_annealing
from bpnet_jax.skeleton import Skeleton, load_skeleton, skeleton_from_config
from bpnet_jax.targets import make_labels

__version__ = "0.3.0"
