"""BodyPoseNet in Flax, built from one description of the network: the layer spec.

`layer_spec(net)` lists every conv of the network in execution order (`Layer`: parameter path,
inputs, kernel, stride, default width, activation, BatchNorm, prunable or not, attention gate).
The Flax module `BpNet` runs that list; the pruner's channel graph (`bpnet_jax.prune`) and any
width override (`model.layer_widths`, from pruning or a config) are read off the same list, so
the network's shape is written once.

Layout is NHWC. Output stride is 8, so an (B, H, W, 3) input with H and W multiples of 8 gives
per-stage maps of (B, H/8, W/8, C). `BpNet.__call__` returns `(heatmaps, pafs)`: two tuples with
one array per stage, heatmaps with `skeleton.heat_channels` channels (joints + background), PAFs
with `skeleton.paf_channels`; the last entry of each is the final stage. All outputs are linear.

Parameter paths follow the original layer names, so LR multipliers, pruning and by-name weight
loading key on them:
  backbone/block_1a_conv_1 ... backbone/block_6a_conv_1 (+ block_*_bn_1)
  channel_reduction_conv
  stage1/conv1..3, stage1/paf/conv4, stage1/cmap/conv4, stage1/{paf,heat}_branch/out
  stage{t}/conv1..5, stage{t}/paf/conv6, stage{t}/cmap/conv6, [.../attention_conv]     (lite)
  stage{t}/paf_branch/conv1..6, stage{t}/heat_branch/conv1..6, [.../attention_conv]   (full)
  paf_out, heatmap_out                                                                (last stage)

Padding: 'symmetric' pads every conv by k//2 on each side, as the original (whose patched
Keras padded stride-2 convs symmetrically); 'same_lax' is lax 'SAME' (bottom/right only for the
three stride-2 backbone convs). Backbone downsampling: 'strided_conv' (the original: blocks 2a,
3a, 4a are stride-2 convs) or 'max_pool' (VGG19 / OpenPose: a 2x2 max pool before those blocks,
all convs stride 1), which lets ImageNet VGG19 weights apply exactly. Parameter counts are the
same in every mode.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Sequence

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
PADDINGS = ("symmetric", "same_lax")
DOWNSAMPLINGS = ("strided_conv", "max_pool")
ACTIVATIONS = ("relu", "tanh", "sigmoid", None)
BN_EPSILON = 1e-3          # Keras' BatchNorm default, as the original (torch's is 1e-5)


def _activate(x, activation: str | None):
  # Looked up at call time, not stored in a dict: exporters (jax2onnx) swap `nn.relu` and
  # friends for their own versions while tracing, which turns them into single ONNX ops.
  if activation == "relu":
    return nn.relu(x)
  if activation == "tanh":
    return jnp.tanh(x)
  if activation == "sigmoid":
    return nn.sigmoid(x)
  return x


@dataclasses.dataclass(frozen=True)
class Layer:
  """One conv of the network.

  path: parameter path ('stage2/paf/conv6'); inputs: producer paths concatenated along channels
  ('input' is the image); width: output channels before overrides; bn: BatchNorm path applied to
  its output; prunable: False for the outputs (heatmaps, PAFs); gates: for an attention conv, the
  layer whose output it multiplies element-wise (both keep the same filters); pool_before: a 2x2
  max pool on the input (max-pool downsampling).
  """
  path: str
  inputs: tuple
  kernel: int
  width: int
  stride: int = 1
  activation: str | None = "relu"
  bn: str | None = None
  prunable: bool = True
  gates: str | None = None
  pool_before: bool = False


@dataclasses.dataclass(frozen=True)
class Spec:
  """The network: its layers in execution order and, per stage, the (heatmap, PAF) layers."""
  layers: tuple
  outputs: tuple


def layer_spec(net: "BpNet") -> Spec:
  """The layer list of a network described by BpNet's fields (widths not yet overridden)."""
  layers = []
  max_pool = net.backbone_downsampling == "max_pool"
  prev = "input"
  for name, kernel, stride, filters in VGG_BACKBONE:
    layers.append(Layer(f"backbone/{name}_conv_1", (prev,), kernel, filters,
                        stride=1 if max_pool else stride, bn=f"backbone/{name}_bn_1",
                        pool_before=max_pool and stride == 2))
    prev = layers[-1].path
  layers.append(Layer("channel_reduction_conv", (prev,), 3, 128))
  feat, outputs = "channel_reduction_conv", []
  lite = net.architecture == "BpNetLiteModel"
  for t in range(1, net.stages + 1):
    last = t == net.stages
    x = (feat,) if t == 1 else (feat,) + outputs[-1]
    out_paths = (("heatmap_out", "paf_out") if last else
                 (f"stage{t}/heat_branch/out", f"stage{t}/paf_branch/out"))
    if lite:
      sizes = net.stage1_kernel_sizes if t == 1 else net.stageT_kernel_sizes
      for i, kernel in enumerate(sizes):
        layers.append(Layer(f"stage{t}/conv{i + 1}", x, kernel, 128))
        x = (layers[-1].path,)
      branches = ((f"stage{t}/cmap", [(f"conv{len(sizes) + 1}", 1, 512 if t == 1 else 128)]),
                  (f"stage{t}/paf", [(f"conv{len(sizes) + 1}", 1, 512 if t == 1 else 128)]))
    else:
      convs = ([(f"conv{i}", 3, 128) for i in (1, 2, 3)] + [("conv4", 1, 512)] if t == 1 else
               [(f"conv{i}", 7, 128) for i in range(1, 6)] + [("conv6", 1, 128)])
      branches = ((f"stage{t}/heat_branch", convs), (f"stage{t}/paf_branch", convs))
    deferred = []     # outputs outside their branch's scope run after both branches
    for (scope, convs), out, channels, gate in zip(
        branches, out_paths, (net.skeleton.heat_channels, net.skeleton.paf_channels),
        ("sigmoid", "tanh")):
      y = x
      for name, kernel, width in convs:
        layers.append(Layer(f"{scope}/{name}", y, kernel, width))
        y = (layers[-1].path,)
      if t > 1 and net.use_self_attention:
        layers.append(Layer(f"{scope}/attention_conv", y, 3, width, activation=gate,
                            gates=y[0]))
        y = (layers[-1].path,)
      head = Layer(out, y, 1, channels, activation=None, prunable=False)
      (layers if out.startswith(scope + "/") else deferred).append(head)
    layers.extend(deferred)     # (a scope's layers must be contiguous: Flax names are unique)
    outputs.append(out_paths)
  return Spec(tuple(layers), tuple(outputs))


def resolved_widths(net: "BpNet", spec: Spec) -> dict:
  """{layer path: output channels} after `layer_widths` overrides and `width_multiplier`.
  Attention convs take the width of the layer they gate; outputs keep theirs."""
  overrides = dict(net.layer_widths)
  widths = {}
  for layer in spec.layers:
    if layer.gates:
      widths[layer.path] = widths[layer.gates]
    elif not layer.prunable:
      widths[layer.path] = layer.width
    elif layer.path in overrides:
      widths[layer.path] = int(overrides[layer.path])
    else:
      widths[layer.path] = max(1, int(round(layer.width * net.width_multiplier)))
  return widths


def _head_init(kind: str):
  # Keras `random_normal` is an untruncated N(0, 0.01); `xavier` is Glorot-uniform.
  if kind == "xavier":
    return nn.initializers.glorot_uniform()
  return nn.initializers.normal(stddev=0.01)


def conv_padding(mode: str, kernel: int, stride: int) -> tuple:
  """Explicit ((top, bottom), (left, right)) pads of a conv.

  'symmetric': k//2 on each side (the original). 'same_lax': what lax 'SAME' pads for an input
  whose size is a multiple of the stride (always true here: inputs are multiples of 8), i.e.
  k - s in total with the extra pixel at the bottom/right. Explicit pads keep the graph free of
  shape-dependent padding arithmetic, so exports with symbolic height and width trace cleanly.
  """
  if mode == "symmetric":
    lo = hi = kernel // 2
  else:
    total = max(kernel - stride, 0)
    lo, hi = total // 2, total - total // 2
  return ((lo, hi), (lo, hi))


class Conv(nn.Module):
  """A 2-D NHWC convolution with float32 parameters `kernel` (k, k, in, out) and `bias` (out,).

  Like `nn.Conv`, it computes in `dtype`; unlike it, the bias is added in float32 before the
  result is cast back, so under bfloat16 the bias gradient (a sum over batch and pixels)
  accumulates in float32 instead of bfloat16. Parameter names and initialisation equal nn.Conv's.
  """
  features: int
  kernel: int
  stride: int = 1
  padding: Any = "SAME"
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init,
                        (self.kernel, self.kernel, x.shape[-1], self.features), jnp.float32)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride),
        self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = (y.astype(jnp.float32) + bias).astype(self.dtype)
    return y


@dataclasses.dataclass(frozen=True)
class _ConvOptions:
  """What every conv needs besides its Layer (hashable, so Flax modules can hold it)."""
  widths: tuple                # ((layer path, output channels), ...)
  padding: str
  use_bias: bool
  backbone_use_bias: bool
  kernel_initializer: str
  dtype: Any


def _apply_layer(layer: Layer, opts: _ConvOptions, env: dict, train: bool):
  """Conv (+ BatchNorm) + activation of one layer, created in the calling module's scope."""
  x = jnp.concatenate([env[p] for p in layer.inputs], axis=-1) if len(layer.inputs) > 1 \
      else env[layer.inputs[0]]
  if layer.pool_before:
    x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
  backbone = layer.path.startswith("backbone/")
  y = Conv(dict(opts.widths)[layer.path], layer.kernel, layer.stride,
           padding=conv_padding(opts.padding, layer.kernel, layer.stride),
           use_bias=opts.backbone_use_bias if backbone else opts.use_bias,
           kernel_init=(nn.initializers.glorot_uniform() if backbone
                        else _head_init(opts.kernel_initializer)),
           dtype=opts.dtype, name=layer.path.split("/")[-1])(x)
  if layer.bn:
    y = nn.BatchNorm(use_running_average=not train, momentum=0.99, epsilon=BN_EPSILON,
                     dtype=opts.dtype, name=layer.bn.split("/")[-1])(y)
  y = _activate(y, layer.activation)
  return env[layer.gates] * y if layer.gates else y


def _run_layers(layers: tuple, depth: int, opts: _ConvOptions, env: dict, train: bool) -> dict:
  """Applies layers in order; a run of layers sharing the next path component goes into a
  child `_Scope` of that name, so parameter paths equal layer paths."""
  env = dict(env)
  i = 0
  while i < len(layers):
    parts = layers[i].path.split("/")
    if len(parts) == depth + 1:
      env[layers[i].path] = _apply_layer(layers[i], opts, env, train)
      i += 1
      continue
    j = i
    while j < len(layers) and len(layers[j].path.split("/")) > depth + 1 \
        and layers[j].path.split("/")[depth] == parts[depth]:
      j += 1
    env = _Scope(layers[i:j], depth + 1, opts, name=parts[depth])(env, train)
    i = j
  return env


class _Scope(nn.Module):
  """The layers under one path prefix (e.g. 'backbone', 'stage2', 'stage2/paf')."""
  layers: tuple
  depth: int
  opts: _ConvOptions

  @nn.compact
  def __call__(self, env: dict, train: bool):
    return _run_layers(self.layers, self.depth, self.opts, env, train)


class BpNet(nn.Module):
  """BodyPoseNet: modified VGG19 backbone, channel reduction, refinement stages.

  architecture 'BpNetLiteModel': each stage has a shared trunk (stage1_kernel_sizes /
  stageT_kernel_sizes, 128 wide), then a 1x1 split into PAF and heatmap branches (512 wide in
  stage 1, 128 after). 'BpNetModel': every stage has two separate branches (stage 1: three
  3x3/128 convs and 1x1/512; later stages: five 7x7/128 and 1x1/128). Stage t >= 2 reads
  concat(features, heatmaps_{t-1}, pafs_{t-1}); attention gates (tanh for PAF, sigmoid for
  heatmaps) multiply the branch features of stages >= 2.
  """
  skeleton: Skeleton
  architecture: str = "BpNetLiteModel"
  stages: int = 3
  use_self_attention: bool = False
  use_bias: bool = True
  backbone_use_bias: bool = False
  kernel_initializer: str = "random_normal"
  stage1_kernel_sizes: Sequence[int] = (3, 3, 3)
  stageT_kernel_sizes: Sequence[int] = (7, 7, 7, 7, 7)
  width_multiplier: float = 1.0
  layer_widths: tuple = ()          # ((layer path, filters), ...) overrides, e.g. from pruning
  padding: str = "symmetric"
  backbone_downsampling: str = "strided_conv"
  dtype: Any = jnp.float32          # compute dtype; parameters stay float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images: (B, H, W, 3) normalised. Returns (heatmaps, pafs), tuples over stages."""
    if self.stages < 2:
      raise ValueError(f"stages must be >= 2, got {self.stages}")
    spec = layer_spec(self)
    opts = _ConvOptions(tuple(resolved_widths(self, spec).items()), self.padding, self.use_bias,
                        self.backbone_use_bias, self.kernel_initializer, self.dtype)
    env = _run_layers(spec.layers, 0, opts, {"input": images.astype(self.dtype)}, train)
    return tuple(env[h] for h, _ in spec.outputs), tuple(env[p] for _, p in spec.outputs)


# ----------------------------------------------------------------------------------------------
# Building from a config, and inspecting parameters.

def build_model(model_config, skeleton: Skeleton, compute_dtype: str = "float32") -> BpNet:
  """The network described by `config.model` for `skeleton`."""
  layer_widths = tuple(sorted((str(k), int(v)) for k, v in
                              dict(model_config.get("layer_widths") or {}).items()))
  return BpNet(
      skeleton=skeleton, architecture=str(model_config.architecture),
      stages=int(model_config.stages),
      use_self_attention=bool(model_config.use_self_attention),
      use_bias=bool(model_config.use_bias),
      backbone_use_bias=bool(model_config.backbone_attributes.use_bias),
      kernel_initializer=str(model_config.kernel_initializer),
      stage1_kernel_sizes=tuple(model_config.stage1_kernel_sizes),
      stageT_kernel_sizes=tuple(model_config.stageT_kernel_sizes),
      width_multiplier=float(model_config.width_multiplier),
      layer_widths=layer_widths, padding=str(model_config.get("padding", "symmetric")),
      backbone_downsampling=str(model_config.get("backbone_downsampling", "strided_conv")),
      dtype=jnp.dtype(compute_dtype))


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
      row = rows.setdefault("/".join(module[:depth]), [0, 0, 0])
      n = int(np.prod(x.shape))
      row[0 if col == "params" else 1] += n
      row[2] += n
  width = max([len(k) for k in rows] + [6])
  lines = [f"{'module':<{width}}  {'trainable':>12}  {'non-train':>10}  {'total':>12}"]
  for key, (trainable, non_trainable, total) in rows.items():
    lines.append(f"{key:<{width}}  {trainable:>12,}  {non_trainable:>10,}  {total:>12,}")
  c = count_params(variables)
  lines.append(f"{'TOTAL':<{width}}  {c['trainable']:>12,}  {c['non_trainable']:>10,}  "
               f"{c['total']:>12,}")
  return "\n".join(lines)
