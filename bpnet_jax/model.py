"""BodyPoseNet models in Flax: VGG backbone, channel reduction, refinement stages.

Layout is NHWC. Output stride is 8 (three stride-2 convs), so an (B, H, W, 3) input with H and W
multiples of 8 gives per-stage maps of (B, H/8, W/8, C). `__call__` returns
`(heatmaps, pafs)`: two tuples with one array per stage, heatmaps with `skeleton.heat_channels`
channels (joints + background), PAFs with `skeleton.paf_channels` channels; the last entry of each
is the final stage. All outputs are linear.

Parameter paths follow the original layer names so LR multipliers, pruning and by-name weight
loading can key on them:
  backbone/block_1a_conv_1 ... backbone/block_6a_conv_1 (+ block_*_bn_1)
  channel_reduction_conv
  stage1/conv1..3, stage1/paf/conv4, stage1/cmap/conv4, stage1/paf_branch/out, stage1/heat_branch/out
  stage{t}/conv1..5, stage{t}/paf/conv6, stage{t}/cmap/conv6, [.../attention_conv]     (lite)
  stage{t}/paf_branch/conv1..6, stage{t}/heat_branch/conv1..6, [.../attention_conv]   (full)
  paf_out, heatmap_out                                                                (last stage)

Channel widths of every prunable conv can be overridden by name (`layer_widths`), which is how a
pruned model is rebuilt from data; `width_multiplier` narrows all of them (tiny test models).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bpnet_jax.skeleton import Skeleton

# (name, kernel, stride, filters) of the modified VGG19 backbone: BN after every conv, stride-2
# convs instead of pooling, two convs in block 4, and the extra 256-wide `block_6a`.
VGG_BACKBONE = (
    ("block_1a", 3, 1, 64), ("block_1b", 3, 1, 64),
    ("block_2a", 3, 2, 128), ("block_2b", 3, 1, 128),
    ("block_3a", 3, 2, 256), ("block_3b", 3, 1, 256), ("block_3c", 3, 1, 256),
    ("block_3d", 3, 1, 256),
    ("block_4a", 3, 2, 512), ("block_4b", 3, 1, 512),
    ("block_6a", 3, 1, 256),
)
OUTPUT_STRIDE = 8
ARCHITECTURES = ("BpNetLiteModel", "BpNetModel")
KERNEL_INITIALIZERS = ("random_normal", "xavier")


def _head_init(kind: str):
  # Keras `random_normal` is an untruncated N(0, 0.01); `xavier` is Glorot-uniform.
  if kind == "xavier":
    return nn.initializers.glorot_uniform()
  return nn.initializers.normal(stddev=0.01)


@dataclasses.dataclass(frozen=True)
class _Widths:
  """Resolves the output width of a prunable conv from its path (overrides, then multiplier)."""
  overrides: tuple = ()
  multiplier: float = 1.0

  def __call__(self, path: str, default: int) -> int:
    for name, width in self.overrides:
      if name == path:
        return int(width)
    return max(1, int(round(default * self.multiplier)))


def _activate(x, activation):
  if activation is None:
    return x
  return {"relu": nn.relu, "tanh": jnp.tanh, "sigmoid": nn.sigmoid}[activation](x)


class VggBackbone(nn.Module):
  """Modified VGG19: (B, H, W, 3) -> (B, ceil(H/8), ceil(W/8), 256). Conv -> BN -> ReLU."""
  widths: Any
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for name, k, stride, filters in VGG_BACKBONE:
      # TF/Keras 'same' padding for stride 2 pads bottom/right only; lax 'SAME' does the same.
      x = nn.Conv(self.widths(f"backbone/{name}_conv_1", filters), (k, k), (stride, stride),
                  padding="SAME", use_bias=self.use_bias,
                  kernel_init=nn.initializers.glorot_uniform(), dtype=self.dtype,
                  name=f"{name}_conv_1")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3,
                       dtype=self.dtype, name=f"{name}_bn_1")(x)
      x = nn.relu(x)
    return x


class Branch(nn.Module):
  """A named group of head convs, applied in order; attention gating multiplies its result in.

  `convs` is a tuple of (name, features, kernel, activation). A name 'attention_conv' gates: the
  running tensor is multiplied element-wise by that conv's output (tanh or sigmoid).
  """
  convs: tuple
  use_bias: bool = True
  kernel_init: Any = nn.initializers.normal(0.01)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _conv_stack(x, self.convs, use_bias=self.use_bias, kernel_init=self.kernel_init,
                       dtype=self.dtype)


def _conv_stack(x, convs, **conv_kwargs):
  """Applies (name, features, kernel, activation) convs in the calling module's scope."""
  for name, features, kernel, act in convs:
    y = _activate(nn.Conv(features, (kernel, kernel), padding="SAME",
                          bias_init=nn.initializers.zeros, name=name, **conv_kwargs)(x), act)
    x = x * y if name == "attention_conv" else y
  return x


class BpNetLiteModel(nn.Module):
  """BodyPoseNet lite: each stage has a shared trunk, then a 1x1 split into PAF and heatmap.

  Stage 1: trunk convs of `stage1_kernel_sizes` (128 ch), then 1x1/512 per branch.
  Stage t>=2 reads concat(F, heat_{t-1}, paf_{t-1}); trunk convs of `stageT_kernel_sizes`,
  then 1x1/128 per branch, optional attention gates (tanh for PAF, sigmoid for heatmap).
  """
  skeleton: Skeleton
  stages: int = 3
  use_self_attention: bool = False
  use_bias: bool = True
  backbone_use_bias: bool = False
  kernel_initializer: str = "random_normal"
  stage1_kernel_sizes: Sequence[int] = (3, 3, 3)
  stageT_kernel_sizes: Sequence[int] = (7, 7, 7, 7, 7)
  width_multiplier: float = 1.0
  layer_widths: tuple = ()          # ((conv path, filters), ...) overrides, e.g. from pruning
  dtype: Any = jnp.float32          # compute dtype; parameters stay float32

  def _trunk(self, t, w):
    sizes = self.stage1_kernel_sizes if t == 1 else self.stageT_kernel_sizes
    return tuple((f"conv{i + 1}", w(f"stage{t}/conv{i + 1}", 128), k, "relu")
                 for i, k in enumerate(sizes))

  def _branch(self, t, kind, w):
    sizes = self.stage1_kernel_sizes if t == 1 else self.stageT_kernel_sizes
    name = f"conv{len(sizes) + 1}"
    width = w(f"stage{t}/{kind}/{name}", 512 if t == 1 else 128)
    convs = [(name, width, 1, "relu")]
    if t > 1 and self.use_self_attention:
      # The gate must match the gated tensor's width.
      convs.append(("attention_conv", width, 3, "tanh" if kind == "paf" else "sigmoid"))
    return tuple(convs)

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images: (B, H, W, 3) normalised. Returns (heatmaps, pafs), tuples of stages."""
    return _forward(self, images, train, lite=True)


class BpNetModel(BpNetLiteModel):
  """BodyPoseNet (full): every stage has two separate branches (PAF and heatmap).

  Stage 1 branch: three 3x3/128 convs, 1x1/512. Stage t>=2 branch: five 7x7/128 convs, 1x1/128,
  optional attention gate. The lite model's kernel-size lists do not apply.
  """

  def _full_branch(self, t, kind, w):
    scope = f"stage{t}/{kind}"
    if t == 1:
      convs = [(f"conv{i}", w(f"{scope}/conv{i}", 128), 3, "relu") for i in (1, 2, 3)]
      convs.append(("conv4", w(f"{scope}/conv4", 512), 1, "relu"))
    else:
      convs = [(f"conv{i}", w(f"{scope}/conv{i}", 128), 7, "relu") for i in range(1, 6)]
      convs.append(("conv6", w(f"{scope}/conv6", 128), 1, "relu"))
      if self.use_self_attention:
        convs.append(("attention_conv", convs[-1][1], 3,
                      "tanh" if kind == "paf_branch" else "sigmoid"))
    return tuple(convs)

  @nn.compact
  def __call__(self, images, train: bool = False):
    return _forward(self, images, train, lite=False)


def _forward(m: BpNetLiteModel, images, train, lite):
  if m.stages < 2:
    raise ValueError(f"stages must be >= 2, got {m.stages}")
  w = _Widths(m.layer_widths, m.width_multiplier)
  init = _head_init(m.kernel_initializer)
  sk = m.skeleton
  x = images.astype(m.dtype)
  x = VggBackbone(w, m.backbone_use_bias, m.dtype, name="backbone")(x, train)
  feat = nn.Conv(w("channel_reduction_conv", 128), (3, 3), padding="SAME", use_bias=m.use_bias,
                 kernel_init=init, bias_init=nn.initializers.zeros, dtype=m.dtype,
                 name="channel_reduction_conv")(x)
  feat = nn.relu(feat)

  heats, pafs = [], []
  x = feat
  for t in range(1, m.stages + 1):
    last = t == m.stages
    if t > 1:
      x = jnp.concatenate([feat, heats[-1], pafs[-1]], axis=-1)
    kw = dict(use_bias=m.use_bias, kernel_init=init, dtype=m.dtype)
    if lite:
      convs = dict(trunk_convs=m._trunk(t, w), paf_convs=m._branch(t, "paf", w),
                   cmap_convs=m._branch(t, "cmap", w))
    else:
      convs = dict(trunk_convs=(), paf_convs=m._full_branch(t, "paf_branch", w),
                   cmap_convs=m._full_branch(t, "heat_branch", w))
    heat, paf = _Stage(lite=lite, last=last, heat_channels=sk.heat_channels,
                       paf_channels=sk.paf_channels, name=f"stage{t}", **convs, **kw)(x)
    if last:
      # The final stage's outputs live at the top level, named as the exported tensors.
      heat = _conv_stack(heat, (("heatmap_out", sk.heat_channels, 1, None),), **kw)
      paf = _conv_stack(paf, (("paf_out", sk.paf_channels, 1, None),), **kw)
    heats.append(heat)
    pafs.append(paf)
  return tuple(heats), tuple(pafs)


class _Stage(nn.Module):
  """One stage: (B, h, w, Cin) -> (heat, paf) maps, or branch features for the final stage.

  Lite: shared trunk convs (stage{t}/conv*), then `paf`/`cmap` 1x1 branches and, unless final,
  the outputs `paf_branch/out`, `heat_branch/out`. Full: `paf_branch`/`heat_branch` hold all their
  convs including `out`. The final stage's outputs are applied by the caller (`paf_out`,
  `heatmap_out` at the top level, as the original names them).
  """
  trunk_convs: tuple
  paf_convs: tuple
  cmap_convs: tuple
  lite: bool
  last: bool
  heat_channels: int
  paf_channels: int
  use_bias: bool = True
  kernel_init: Any = nn.initializers.normal(0.01)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(use_bias=self.use_bias, kernel_init=self.kernel_init, dtype=self.dtype)
    heat_out = () if self.last else (("out", self.heat_channels, 1, None),)
    paf_out = () if self.last else (("out", self.paf_channels, 1, None),)
    if not self.lite:
      return (Branch(self.cmap_convs + heat_out, name="heat_branch", **kw)(x),
              Branch(self.paf_convs + paf_out, name="paf_branch", **kw)(x))
    x = _conv_stack(x, self.trunk_convs, **kw)    # stage{t}/conv*, directly in the stage scope
    heat = Branch(self.cmap_convs, name="cmap", **kw)(x)
    paf = Branch(self.paf_convs, name="paf", **kw)(x)
    if not self.last:
      heat = Branch(heat_out, name="heat_branch", **kw)(heat)
      paf = Branch(paf_out, name="paf_branch", **kw)(paf)
    return heat, paf


# ----------------------------------------------------------------------------------------------
# Building from a config, and inspecting parameters.

def build_model(model_config, skeleton: Skeleton, compute_dtype: str = "float32") -> nn.Module:
  """Builds the model described by `config.model` for `skeleton`."""
  cls = {"BpNetLiteModel": BpNetLiteModel, "BpNetModel": BpNetModel}[model_config.architecture]
  layer_widths = tuple(sorted((str(k), int(v)) for k, v in
                              dict(model_config.get("layer_widths") or {}).items()))
  return cls(
      skeleton=skeleton, stages=int(model_config.stages),
      use_self_attention=bool(model_config.use_self_attention),
      use_bias=bool(model_config.use_bias),
      backbone_use_bias=bool(model_config.backbone_attributes.use_bias),
      kernel_initializer=str(model_config.kernel_initializer),
      stage1_kernel_sizes=tuple(model_config.stage1_kernel_sizes),
      stageT_kernel_sizes=tuple(model_config.stageT_kernel_sizes),
      width_multiplier=float(model_config.width_multiplier),
      layer_widths=layer_widths, dtype=jnp.dtype(compute_dtype))


def init_variables(model: nn.Module, rng, height: int = 256, width: int = 256, batch: int = 1):
  """Initialises {'params', 'batch_stats'} for an input of (batch, height, width, 3).

  rng: a key; a threefry key is mapped (deterministically) to an RBG key first. XLA:CPU takes
  ~10 s to compile the ~60 threefry samplers of a model's initialisers and ~2 s for RBG
  (XLA's RngBitGenerator), which is most of the start-up of a small training run.
  """
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)                  # a raw uint32 (threefry) key
  if jax.random.key_impl(rng) != jax.random.key_impl(jax.random.key(0, impl="rbg")):
    data = jax.random.key_data(rng).reshape(-1).astype(jnp.uint32)
    rng = jax.random.wrap_key_data(jnp.concatenate([data, data ^ jnp.uint32(0x9E3779B9)]),
                                   impl="rbg")
  return model.init(rng, jnp.zeros((batch, height, width, 3), jnp.float32), train=False)


def abstract_variables(model: nn.Module, height: int = 64, width: int = 64):
  """Shapes and dtypes of the variables, without allocating them (cheap for big models)."""
  return jax.eval_shape(lambda: init_variables(model, jax.random.key(0), height, width))


def path_str(path) -> str:
  """'stage2/conv1/kernel' for a jax tree path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def count_params(variables) -> dict:
  """{'total', 'trainable', 'non_trainable', 'convs'} for {'params', 'batch_stats'} variables."""
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
  trainable = size(variables.get("params", {}))
  non_trainable = size(variables.get("batch_stats", {}))
  convs = sum(1 for p, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
              if path_str(p).endswith("kernel"))
  return {"total": trainable + non_trainable, "trainable": trainable,
          "non_trainable": non_trainable, "convs": convs}


def param_table(variables, depth: int = 1) -> str:
  """A per-module table of parameter counts; module paths are truncated to `depth` levels
  (depth 1: backbone, channel_reduction_conv, stage1, ...; depth 2: every conv)."""
  rows = collections.OrderedDict()
  for col in ("params", "batch_stats"):
    for p, x in jax.tree_util.tree_flatten_with_path(variables.get(col, {}))[0]:
      module = path_str(p).split("/")[:-1]   # drop the leaf name (kernel, bias, scale, ...)
      key = "/".join(module[:depth])
      r = rows.setdefault(key, [0, 0, 0])
      n = int(np.prod(x.shape))
      r[0 if col == "params" else 1] += n
      r[2] += n
  width = max([len(k) for k in rows] + [6])
  lines = [f"{'module':<{width}}  {'trainable':>12}  {'non-train':>10}  {'total':>12}"]
  for k, (t, nt, tot) in rows.items():
    lines.append(f"{k:<{width}}  {t:>12,}  {nt:>10,}  {tot:>12,}")
  c = count_params(variables)
  lines.append(f"{'TOTAL':<{width}}  {c['trainable']:>12,}  {c['non_trainable']:>10,}  "
               f"{c['total']:>12,}")
  return "\n".join(lines)
