"""DetectNet_v2 ("GridBox") in Flax: a stride-16 ResNet or VGG backbone and two 1x1 conv heads.

Layout is NHWC. An input of (B, H, W, 3) with H and W multiples of 16 (input pixels; the
original requires multiples of 16) gives two maps on the output grid of (H/16, W/16) cells:

  cov  (B, H/16, W/16, C)   coverage per class, sigmoid applied: the export's `output_cov/Sigmoid`
  bbox (B, H/16, W/16, 4C)  box regression, linear: `output_bbox/BiasAdd`; channel 4c + k is
                            class c, edge k (0 left, 1 top, 2 right, 3 bottom)

`DetectNetV2.__call__` returns `(cov, bbox)` in that order (the original's Keras output list is
[output_bbox, output_cov]); both are float32 whatever the compute dtype, so the losses and the
sigmoid run in float32. C is the number of target classes, in the order of the class list.

The network is written once, as data: `layer_spec(net)` lists every conv in execution order
(`Layer`: name, input, kernel, stride, width, BatchNorm, activation, residual add, freeze
block). The module runs that list; the pruner's channel graph (`layer_graph`), the freeze mask
(`trainable_mask`) and width overrides (`model.layer_widths`, from pruning) are read off it.

Parameter paths are the original's Keras layer names, flat at the top level:
  ResNet: conv1 (7x7/2) + bn_conv1; block_<b><r>_conv_<i> + block_<b><r>_bn_<i>;
          block_<b><r>_conv_shortcut + block_<b><r>_bn_shortcut      (b = 1..4, r = a, b, ...)
  VGG:    block_<k><r>_conv_1 + block_<k><r>_bn_1                   (k = 1..5)
  heads:  output_cov (C filters), output_bbox (4C filters), 1x1 on the last backbone layer
ResNet blocks 1-3 downsample by 2 on the first conv of their first repeat (and its shortcut),
block 4 keeps the stride (ResNet v1: on the first 1x1 of a bottleneck); conv1 downsamples too,
so the total stride is 16. A shortcut is a 1x1 conv + BN on the first repeat of every block and,
with `all_projections`, on every repeat; otherwise the identity. VGG: widths 64-128-256-512-512,
stride 2 on the first conv of blocks 2-5, or (use_pooling) a 2x2/2 max pool before them.

Every conv has a bias (also before a BatchNorm, as the original), glorot-uniform kernels and
zero biases; BatchNorm has momentum 0.99, epsilon 1e-3. Flax feeds the running variance the
biased batch variance where Keras uses the unbiased one (x n/(n-1), n = B*H*W cells: a relative
difference below 1e-3 at any real size); this is not emulated.

Padding: every conv pads (k-1)//2 zeros on EACH side, stride 2 included, as the original (whose
patched Keras padded 'same' symmetrically). lax 'SAME' would pad stride-2 convs only at the
bottom/right and shift the sampling grid by a pixel, so pretrained weights would not carry over.

Freezing: `freeze_blocks` freezes the conv kernels and biases of those blocks (ResNet: 0 = conv1,
1-4 = every conv of that block, shortcuts included; VGG: 1-5), not their BatchNorm gamma/beta (as
the original): `trainable_mask` gives the mask for the optimizer. `freeze_bn` makes every
BatchNorm normalise with its running averages also when train=True, so the 'batch_stats'
collection is never updated; gamma and beta still train.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bpnet_jax.errors import ConfigError
from bpnet_jax.model import path_str

OUTPUT_STRIDE = 16
ARCHS = ("resnet", "vgg")
# Repeats per block. ResNet-152/200 exist in the original code but need more than 26 repeat
# letters in their layer names; they are not offered.
RESNET_REPEATS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3),
                  101: (3, 4, 23, 3)}
RESNET_WIDTHS = (64, 128, 256, 512)     # bottlenecks (50, 101) end at 4x these
RESNET_STRIDES = (2, 2, 2, 1)           # block 4 keeps the resolution: total stride 16
VGG_REPEATS = {16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
VGG_WIDTHS = (64, 128, 256, 512, 512)
HEADS = ("output_cov", "output_bbox")
# Model keys the original has but never reads for ResNet/VGG: rejected when set.
UNUSED_KEYS = ("dropout_rate", "activation", "freeze_pretrained_layers",
               "allow_loaded_model_modification")


def default_model_config() -> dict:
  """The `model` section with the original's defaults (its protobuf defaults, so the booleans
  are false; the shipped KITTI spec sets all_projections and use_batch_norm true)."""
  return {
      "arch": "resnet",             # resnet | vgg
      "num_layers": 18,             # resnet 10/18/34/50/101, vgg 16/19; 0 means 18 (original)
      "all_projections": False,     # ResNet: a 1x1 conv shortcut on every repeat, not only first
      "use_batch_norm": False,      # BatchNorm after every backbone conv
      "use_pooling": False,         # VGG: max pools instead of stride-2 convs; ResNet: rejected
      "freeze_blocks": [],          # block ids whose convs do not train (ResNet 0-4, VGG 1-5)
      "freeze_bn": False,           # BatchNorm uses its running averages while training
      "layer_widths": {},           # {conv name: filters} overrides, written by pruning
  }


@dataclasses.dataclass(frozen=True)
class Layer:
  """One conv of the network, in execution order.

  name: parameter path (the original layer name); input: the tensor it reads ('input' is the
  image, otherwise a conv name standing for that conv's output after its BN, add and
  activation); width: default filters; bn: BatchNorm on its output; activation: 'relu',
  'sigmoid' or None; add: a tensor added after the BN, before the activation (ResNet shortcut:
  a shortcut conv's name, or the repeat's input for the identity); tie: the first conv of its
  residual group (convs whose outputs are added keep the same filters); block: its
  `freeze_blocks` id (None for the heads); pool_before: a 2x2/2 max pool on its input.
  """
  name: str
  input: str
  kernel: int
  width: int
  stride: int = 1
  bn: str | None = None
  activation: str | None = "relu"
  add: str | None = None
  tie: str | None = None
  block: int | None = None
  pool_before: bool = False

  @property
  def head(self) -> bool:
    return self.name in HEADS


def _check_arch(arch: str, num_layers: int, use_pooling: bool) -> int:
  """num_layers after the 0 -> 18 default, or a ConfigError naming the bad key."""
  if arch not in ARCHS:
    raise ConfigError(f"model.arch: {arch!r} is not supported; expected one of {ARCHS}")
  if isinstance(num_layers, bool) or not isinstance(num_layers, int):
    raise ConfigError(f"model.num_layers: expected an integer, got {num_layers!r}")
  n = num_layers or 18
  valid = RESNET_REPEATS if arch == "resnet" else VGG_REPEATS
  if n not in valid:
    raise ConfigError(f"model.num_layers: {num_layers} is not a {arch} depth; expected one of "
                      f"{sorted(valid)}")
  if arch == "resnet" and use_pooling:
    raise ConfigError("model.use_pooling: true makes ResNet stride 32 with a 7x7 average pool, "
                      "unusable for detection; expected false (VGG may pool)")
  return n


def _resnet_layers(num_layers: int, all_projections: bool, bn: bool) -> tuple[list, str]:
  layers = [Layer("conv1", "input", 7, 64, stride=2, bn="bn_conv1" if bn else None, block=0)]
  x, root = "conv1", {}     # x: the current tensor; root: residual group of each added tensor
  bottleneck = num_layers >= 50
  for b, (repeats, width, stride) in enumerate(
      zip(RESNET_REPEATS[num_layers], RESNET_WIDTHS, RESNET_STRIDES), start=1):
    for r in range(repeats):
      s = stride if r == 0 else 1
      prefix = f"block_{b}{chr(ord('a') + r)}"
      convs = ([(1, width, s), (3, width, 1), (1, 4 * width, 1)] if bottleneck else
               [(3, width, s), (3, width, 1)])
      main, y = [], x
      for i, (k, w, st) in enumerate(convs, start=1):
        main.append(Layer(f"{prefix}_conv_{i}", y, k, w, stride=st,
                          bn=f"{prefix}_bn_{i}" if bn else None, block=b))
        y = main[-1].name
      if r == 0 or all_projections:
        group = f"{prefix}_conv_shortcut"         # a projection starts a new group
        short = Layer(group, x, 1, convs[-1][1], stride=s, activation=None, tie=group,
                      bn=f"{prefix}_bn_shortcut" if bn else None, block=b)
        layers.extend(main[:-1] + [short])
        added = short.name
      else:
        group, added = root[x], x                 # identity: joins the input's group
        layers.extend(main[:-1])
      last = dataclasses.replace(main[-1], add=added, tie=group)
      layers.append(last)
      root[last.name] = group
      x = last.name
  return layers, x


def _vgg_layers(num_layers: int, use_pooling: bool, bn: bool) -> tuple[list, str]:
  layers, x = [], "input"
  for k, (repeats, width) in enumerate(zip(VGG_REPEATS[num_layers], VGG_WIDTHS), start=1):
    for r in range(repeats):
      first = r == 0 and k > 1      # blocks 2-5 halve the resolution on entry
      name = f"block_{k}{chr(ord('a') + r)}"
      layers.append(Layer(f"{name}_conv_1", x, 3, width,
                          stride=2 if first and not use_pooling else 1,
                          bn=f"{name}_bn_1" if bn else None, block=k,
                          pool_before=first and use_pooling))   # the original's block<k-1>_pool
      x = layers[-1].name
  return layers, x


def layer_spec(net: "DetectNetV2") -> tuple:
  """The network's convs in execution order (default widths), heads last."""
  n = _check_arch(net.arch, net.num_layers, net.use_pooling)
  if net.arch == "resnet":
    layers, last = _resnet_layers(n, net.all_projections, net.use_batch_norm)
  else:
    layers, last = _vgg_layers(n, net.use_pooling, net.use_batch_norm)
  c = net.num_classes
  layers.append(Layer("output_cov", last, 1, c, activation="sigmoid"))
  layers.append(Layer("output_bbox", last, 1, 4 * c, activation=None))
  return tuple(layers)


def resolved_widths(net: "DetectNetV2", spec: tuple) -> dict:
  """{conv name: filters} after `layer_widths` overrides. A conv tied by a residual add takes
  the width of its group's first conv; heads keep theirs. Bad overrides raise ConfigError."""
  overrides = dict(net.layer_widths)
  by_name = {layer.name: layer for layer in spec}
  for name, value in overrides.items():
    if name not in by_name or by_name[name].head:
      raise ConfigError(f"model.layer_widths: {name!r} is not a prunable conv of this model")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"model.layer_widths.{name}: expected a positive integer, got {value!r}")
  widths = {}
  for layer in spec:
    if layer.tie and layer.tie != layer.name:
      widths[layer.name] = widths[layer.tie]
      if overrides.get(layer.name, widths[layer.name]) != widths[layer.name]:
        raise ConfigError(f"model.layer_widths.{layer.name}: its output is added to "
                          f"{layer.tie}'s; set the width of {layer.tie} (now "
                          f"{widths[layer.tie]}), which its residual group follows")
    else:
      widths[layer.name] = overrides.get(layer.name, layer.width)
  return widths


def _activate(y, activation: str | None):
  # Looked up at call time (exporters swap nn.relu / nn.sigmoid while tracing); the sigmoid runs
  # in float32 because the coverage feeds the loss.
  if activation == "relu":
    return nn.relu(y)
  if activation == "sigmoid":
    return nn.sigmoid(y.astype(jnp.float32))
  return y


class DetectNetV2(nn.Module):
  """DetectNet_v2: backbone (arch, num_layers, ...) + `output_cov` / `output_bbox` heads.

  Fields mirror the `model` config section (see `build_model`); `layer_widths` is a tuple of
  (conv name, filters) overrides; `dtype` is the compute dtype, parameters stay float32.
  """
  num_classes: int
  arch: str = "resnet"
  num_layers: int = 18
  all_projections: bool = False
  use_batch_norm: bool = False
  use_pooling: bool = False
  freeze_bn: bool = False
  layer_widths: tuple = ()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images: (B, H, W, 3) preprocessed. Returns (cov, bbox): (B, H/16, W/16, C) sigmoid and
    (B, H/16, W/16, 4C) linear, float32."""
    spec = layer_spec(self)
    widths = resolved_widths(self, spec)
    env = {"input": images.astype(self.dtype)}
    for layer in spec:
      x = env[layer.input]
      if layer.pool_before:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      pad = (layer.kernel - 1) // 2
      y = nn.Conv(widths[layer.name], (layer.kernel, layer.kernel), (layer.stride, layer.stride),
                  padding=((pad, pad), (pad, pad)), use_bias=True,
                  kernel_init=nn.initializers.glorot_uniform(), bias_init=nn.initializers.zeros,
                  dtype=self.dtype, name=layer.name)(x)
      if layer.bn:
        y = nn.BatchNorm(use_running_average=not train or self.freeze_bn, momentum=0.99,
                         epsilon=1e-3, dtype=self.dtype, name=layer.bn)(y)
      if layer.add:
        y = y + env[layer.add]
      env[layer.name] = _activate(y, layer.activation)
    return env["output_cov"], env["output_bbox"].astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Building from the config.

def _get(model_config, key: str):
  default = default_model_config()[key]
  value = model_config.get(key, default) if model_config is not None else default
  return default if value is None else value


def _freeze_blocks(model_config, arch: str) -> tuple:
  blocks = _get(model_config, "freeze_blocks")
  valid = range(0, 5) if arch == "resnet" else range(1, 6)
  if not isinstance(blocks, (list, tuple)) or any(
      isinstance(b, bool) or not isinstance(b, int) or b not in valid for b in blocks):
    raise ConfigError(f"model.freeze_blocks: {blocks!r} invalid for {arch}; expected a list "
                      f"of block ids in {valid.start}..{valid.stop - 1}")
  return tuple(sorted(set(blocks)))


def build_model(model_config, num_classes: int,
                compute_dtype: str = "float32") -> DetectNetV2:
  """The network of the `model` config section (dict or ConfigDict; missing keys take
  `default_model_config()`) for `num_classes` target classes. Impossible values raise
  ConfigError (a ValueError) naming `model.<key>`."""
  for key in UNUSED_KEYS:
    if model_config is not None and model_config.get(key):
      raise ConfigError(f"model.{key}: not used by ResNet/VGG in the original; expected it unset")
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ConfigError(f"num_classes: expected a positive integer (the target classes), got "
                      f"{num_classes!r}")
  flags = {}
  for key in ("all_projections", "use_batch_norm", "use_pooling", "freeze_bn"):
    flags[key] = _get(model_config, key)
    if not isinstance(flags[key], bool):
      raise ConfigError(f"model.{key}: expected true or false, got {flags[key]!r}")
  arch = str(_get(model_config, "arch")).lower()
  _check_arch(arch, _get(model_config, "num_layers"), flags["use_pooling"])
  _freeze_blocks(model_config, arch)
  widths = _get(model_config, "layer_widths")
  model = DetectNetV2(
      num_classes=num_classes, arch=arch, num_layers=_get(model_config, "num_layers"),
      layer_widths=tuple(sorted((str(k), v) for k, v in dict(widths).items())),
      dtype=jnp.dtype(compute_dtype), **flags)
  resolved_widths(model, layer_spec(model))    # validates the overrides now, not at init
  return model


# ----------------------------------------------------------------------------------------------
# Freezing and the pruner's channel graph, both read off the layer spec.

def trainable_mask(params, model_config):
  """A pytree of bools shaped like `params`: False for the kernels and biases of the convs in
  `model.freeze_blocks` (their BatchNorm gamma/beta stay True, as the original). Freeze with
  e.g. `optax.chain(tx, optax.masked(optax.set_to_zero(), jax.tree.map(lambda t: not t,
  mask)))`: a plain `optax.masked(tx, mask)` would pass the raw gradients of frozen leaves."""
  model = build_model(model_config, 1)
  frozen = set(_freeze_blocks(model_config, model.arch))
  block = {layer.name: layer.block for layer in layer_spec(model)}

  def trainable(path, _):
    module = path_str(path).split("/")[0]
    return not (module in block and block[module] in frozen)

  return jax.tree_util.tree_map_with_path(trainable, params)


@dataclasses.dataclass(frozen=True)
class Node:
  """One conv in the pruner's channel graph.

  name: the conv's parameter path; inputs: the producers it reads ('input' is the image; a
  residual sum is named by the main-path conv of the add, whose filters the whole group shares);
  width: its filters; bn: the BatchNorm on its output or None; head: an output (never pruned);
  residual: the convs whose outputs are summed with this one's, directly or along identity
  shortcuts (itself included, execution order), so they keep the same filters; () if none;
  block: its freeze_blocks id.
  """
  name: str
  inputs: tuple
  width: int
  bn: str | None = None
  head: bool = False
  residual: tuple = ()
  block: int | None = None

  @property
  def gates(self) -> str | None:
    """The first conv of its residual group when that is another conv: the field through which
    `bpnet_jax.prune.prune` ties a conv's filters to an earlier one's."""
    return self.residual[0] if self.residual and self.residual[0] != self.name else None


def layer_graph(model_config, num_classes: int) -> list[Node]:
  """The channel graph of the model that `build_model(model_config, num_classes)` builds."""
  model = build_model(model_config, num_classes)
  spec = layer_spec(model)
  widths = resolved_widths(model, spec)
  groups: dict[str, list] = {}
  for layer in spec:              # execution order, so each group starts with its first conv
    if layer.tie:
      groups.setdefault(layer.tie, []).append(layer.name)
  return [Node(layer.name, (layer.input,), widths[layer.name], bn=layer.bn, head=layer.head,
               residual=tuple(groups[layer.tie]) if layer.tie else (), block=layer.block)
          for layer in spec]


def residual_groups(graph: list[Node]) -> list[set]:
  """The sets of convs whose outputs are added together (each must keep the same filters)."""
  seen, groups = set(), []
  for node in graph:
    if node.residual and node.residual not in seen:
      seen.add(node.residual)
      groups.append(set(node.residual))
  return groups
