"""ImageNet VGG19 weights -> a bpnet_jax model directory to start training from.

`import_vgg19(weights_path, out_dir, config=None)` reads public VGG19 ImageNet weights and
writes OUT_DIR (`config.json` with the skeleton, `state/` an Orbax checkpoint, and
`import_report.json`) holding VGG19's first ten convs as the backbone's `block_1a` .. `block_4b`
(conv kernels, BatchNorm parameters and statistics), for `trainer.pretrained_weights=OUT_DIR`.
Training copies parameters by name and shape (`checkpoint.load_by_name`), so everything else
(`block_6a`, `channel_reduction_conv`, the stages) keeps training's own initialisation. OUT_DIR
is a starting point, not a model to run: it holds those ten layers only.

Sources (told apart by the file name's extension):
  .safetensors    torchvision / timm `vgg19` or `vgg19_bn` state dict (read here: no torch needed)
  .pth, .pt       the same state dicts as torch files (needs torch; loaded with weights_only=True)
  .h5, .hdf5      Keras `vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5` (needs h5py)

Names and layouts: torchvision's `features.N.weight` (conv kernels, OIHW) and `.bias`; vgg19_bn
adds `features.N+1.{weight, bias, running_mean, running_var}` (BatchNorm, epsilon 1e-5) after
each conv. Keras files hold one group per layer (`block1_conv1`, ...) whose `weight_names`
attribute lists its kernel (HWIO) and bias: `block1_conv1_W_1:0` / `block1_conv1_b_1:0` in the
Keras 1 release file, `block1_conv1/kernel:0` / `bias:0` in later Keras saves (under
`model_weights/` when a whole model was saved). The whole VGG19 `features` layout (16 convs,
their BatchNorms for vgg19_bn) must be there with VGG19's shapes; the first entry that is
missing or has another shape is a one-line WeightsImportError naming it. Other entries
(`classifier.*`, timm's `pre_logits.*` / `head.*`) are ignored.

The import reproduces the source network: in inference mode the backbone's block_4b output
equals VGG19's block4_conv2 output after ReLU, given the same image (the tests check it against
a NumPy forward pass). That needs:
  - max-pool downsampling (`model.backbone_downsampling='max_pool'`: 2x2 max pools before blocks
    2a, 3a and 4a, every conv stride 1), which the import requires;
  - the input normalisation folded into block_1a (`fold_input_normalization`);
  - BatchNorm's epsilon and the conv bias folded into the model's BatchNorm (`backbone_layer`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable

import jax
import numpy as np

from bpnet_jax import checkpoint as checkpoint_lib
from bpnet_jax import config as config_lib
from bpnet_jax import fileio
from bpnet_jax import model as model_lib
from bpnet_jax.errors import ConfigError, WeightsImportError
from bpnet_jax.skeleton import skeleton_from_config

# VGG19's `features`: the output channels of each 3x3 conv (stride 1, pad 1, then ReLU) and
# 'M' for each 2x2 max pool.
VGG19_FEATURES = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                  512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
# VGG19's first ten convs (block1_conv1 .. block4_conv2) become model.VGG_BACKBONE's first ten
# layers (block_1a .. block_4b); VGG19 has no counterpart of block_6a.
IMPORTED = 10
TORCH_BN_EPSILON = 1e-5            # torch.nn.BatchNorm2d's default, which vgg19_bn uses
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REPORT_FILE = "import_report.json"
# |offset| (in the source's input units) below which the border of block_1a counts as exact.
_EXACT_OFFSET = 1e-6


@dataclasses.dataclass(frozen=True)
class VggConv:
  """One conv of VGG19's `features`: its Keras name, its torchvision module index, channels."""
  keras_name: str      # 'block3_conv2'
  index: int           # `features.<index>` in torchvision's vgg19 or vgg19_bn
  cin: int
  cout: int


def vgg19_convs(batch_norm: bool) -> tuple:
  """VGG19's 16 convs in order. torchvision numbers the `features` modules one by one: conv,
  [BatchNorm,] ReLU for each conv and one for each max pool."""
  convs, index, block, in_block, cin = [], 0, 1, 0, 3
  for item in VGG19_FEATURES:
    if item == "M":
      index, block, in_block = index + 1, block + 1, 0
      continue
    in_block += 1
    convs.append(VggConv(f"block{block}_conv{in_block}", index, cin, item))
    index += 3 if batch_norm else 2
    cin = item
  return tuple(convs)


@dataclasses.dataclass(frozen=True)
class InputConvention:
  """What a source network's first conv reads: its input channel j is
  (pixel[..., rgb_index[j]] - zero[j]) / scale[j], for RGB pixels in 0..255."""
  description: str
  rgb_index: tuple
  zero: tuple
  scale: tuple


TORCHVISION_INPUT = InputConvention(
    "RGB, (pixel / 255 - ImageNet mean) / ImageNet std (torchvision)", (0, 1, 2),
    tuple(255.0 * m for m in IMAGENET_MEAN), tuple(255.0 * s for s in IMAGENET_STD))
# Keras applications' 'caffe' preprocessing for VGG: BGR, minus the ImageNet means, unscaled.
KERAS_INPUT = InputConvention("BGR, pixel - ImageNet mean (Keras 'caffe' mode)", (2, 1, 0),
                              (103.939, 116.779, 123.68), (1.0, 1.0, 1.0))


@dataclasses.dataclass
class SourceConv:
  """One conv of the source network, converted to this package's layout (float64).

  kernel: (3, 3, in, out) HWIO, input channels in the source's order; bias: (out,);
  batch_norm: None, or the BatchNorm after it: {'gamma', 'beta', 'mean', 'var'}, (out,) each.
  """
  name: str            # where it came from: 'features.0 + features.1' or 'block1_conv1'
  kernel: np.ndarray
  bias: np.ndarray
  batch_norm: dict | None = None


@dataclasses.dataclass
class SourceWeights:
  """VGG19's first ten convs read from a weights file."""
  kind: str                      # 'torchvision/timm vgg19_bn (.safetensors)'
  convs: list                    # IMPORTED SourceConvs, block1_conv1 first
  input: InputConvention


# ----------------------------------------------------------------------------------------------
# Reading weights files.

@dataclasses.dataclass
class NamedTensors:
  """The tensors of a weights file: {name: shape} and a reader of one tensor (float64)."""
  shapes: dict
  read: Callable[[str], np.ndarray]


# safetensors dtype names -> NumPy (little-endian). BF16 is read as uint16 and widened.
_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8",
                       "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
_MAX_HEADER_BYTES = 100 << 20


def read_safetensors(path: str) -> NamedTensors:
  """A .safetensors file, read without the safetensors package.

  Layout: an 8-byte little-endian header length N; N bytes of JSON {name: {"dtype", "shape",
  "data_offsets": [begin, end]}} (plus an optional "__metadata__"); then the raw tensors, row
  major, little-endian, offsets counted from the end of the header. Only the tensors asked for
  are read.
  """
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
    if not 0 < length <= min(size - 8, _MAX_HEADER_BYTES):
      raise WeightsImportError(f"{path}: not a safetensors file (no valid header)")
    try:
      header = json.loads(f.read(length))
    except (UnicodeDecodeError, ValueError):
      raise WeightsImportError(f"{path}: not a safetensors file (its header is not JSON)") \
          from None
  if not isinstance(header, dict):
    raise WeightsImportError(f"{path}: not a safetensors file (its header is not a mapping)")
  header.pop("__metadata__", None)
  data_start = 8 + length
  entries = {}
  for name, entry in header.items():
    try:
      dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
      shape = tuple(int(d) for d in entry["shape"])
      begin, end = (int(v) for v in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise WeightsImportError(f"{path}: tensor {name!r} has an unreadable header entry "
                               f"{str(entry)[:100]}") from None
    if end - begin != math.prod(shape) * dtype.itemsize or data_start + end > size:
      raise WeightsImportError(f"{path}: tensor {name!r} ({entry['dtype']} {list(shape)}) does "
                               "not fit its byte range (a truncated file?)")
    entries[name] = (dtype, shape, data_start + begin, entry["dtype"] == "BF16")

  def read(name: str) -> np.ndarray:
    dtype, shape, offset, bf16 = entries[name]
    data = np.fromfile(path, dtype=dtype, count=math.prod(shape), offset=offset)
    if bf16:   # bfloat16 is the top half of a float32
      data = (data.astype(np.uint32) << 16).view(np.float32)
    return data.reshape(shape).astype(np.float64)
  return NamedTensors({name: e[1] for name, e in entries.items()}, read)


def read_torch(path: str) -> NamedTensors:
  """A torch state dict file (.pth), loaded with weights_only=True (no code runs)."""
  try:
    import torch
  except ImportError:
    raise WeightsImportError(f"{path}: reading .pth files needs PyTorch (pip install torch); "
                             "the same weights as .safetensors need nothing") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle, zip and torch errors alike: the file cannot be used
    raise WeightsImportError(f"{path}: not a loadable PyTorch state dict ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]          # a training checkpoint wrapping the state dict
  if not isinstance(obj, dict):
    raise WeightsImportError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
  return NamedTensors({k: tuple(v.shape) for k, v in tensors.items()},
                      lambda name: tensors[name].detach().to(torch.float64).numpy())


def _check_shapes(path: str, what: str, expected: dict, shapes: dict) -> None:
  """WeightsImportError naming the first expected entry (in order) that is missing or has
  another shape."""
  for name, shape in expected.items():
    if name not in shapes:
      raise WeightsImportError(f"{path}: not {what}: {name} is missing")
    if tuple(shapes[name]) != tuple(shape):
      raise WeightsImportError(f"{path}: not {what}: {name} has shape {list(shapes[name])}, "
                               f"expected {list(shape)}")


def torch_vgg19(path: str, tensors: NamedTensors, file_kind: str) -> SourceWeights:
  """VGG19's first ten convs from a torchvision/timm vgg19 or vgg19_bn state dict."""
  if "features.0.weight" not in tensors.shapes:
    raise WeightsImportError(f"{path}: not a torchvision/timm VGG19 state dict: no "
                             f"features.0.weight (its first names: {sorted(tensors.shapes)[:3]})")
  batch_norm = "features.1.running_var" in tensors.shapes
  what = f"a torchvision/timm {'vgg19_bn' if batch_norm else 'vgg19'} state dict"
  convs = vgg19_convs(batch_norm)
  expected = {}
  for c in convs:
    expected[f"features.{c.index}.weight"] = (c.cout, c.cin, 3, 3)
    expected[f"features.{c.index}.bias"] = (c.cout,)
    if batch_norm:
      for leaf in ("weight", "bias", "running_mean", "running_var"):
        expected[f"features.{c.index + 1}.{leaf}"] = (c.cout,)
  _check_shapes(path, what, expected, tensors.shapes)
  out = []
  for c in convs[:IMPORTED]:
    conv = f"features.{c.index}"
    kernel = tensors.read(conv + ".weight").transpose(2, 3, 1, 0)     # OIHW -> HWIO
    bn = None
    if batch_norm:
      bn_name = f"features.{c.index + 1}"
      bn = {mine: tensors.read(f"{bn_name}.{theirs}") for mine, theirs in
            (("gamma", "weight"), ("beta", "bias"), ("mean", "running_mean"),
             ("var", "running_var"))}
      conv = f"{conv} + {bn_name}"
    out.append(SourceConv(conv, kernel, tensors.read(f"features.{c.index}.bias"), bn))
  kind = f"torchvision/timm {'vgg19_bn' if batch_norm else 'vgg19'} ({file_kind})"
  return SourceWeights(kind, out, TORCHVISION_INPUT)


def _keras_layer(path: str, what: str, root, conv: VggConv):
  """(kernel name, kernel dataset, bias name, bias dataset) of one Keras conv layer group, with
  the shapes checked."""
  if conv.keras_name not in root:
    raise WeightsImportError(f"{path}: not {what}: layer {conv.keras_name} is missing")
  group = root[conv.keras_name]
  names = [n.decode() if isinstance(n, bytes) else str(n)
           for n in group.attrs.get("weight_names", [])]
  if not names:    # no attribute: take whatever datasets the group holds
    group.visit(lambda name: names.append(name) if hasattr(group[name], "shape") else None)
  for name in names:
    if name not in group:
      raise WeightsImportError(f"{path}: not {what}: {conv.keras_name}/{name} is missing")
  kernels = [n for n in names if group[n].ndim == 4]
  biases = [n for n in names if group[n].ndim == 1]
  for found, label, shape in ((kernels, "kernel", (3, 3, conv.cin, conv.cout)),
                              (biases, "bias", (conv.cout,))):
    if len(found) != 1:
      raise WeightsImportError(f"{path}: not {what}: layer {conv.keras_name} has "
                               f"{len(found)} {label} arrays ({names}), expected 1")
    if tuple(group[found[0]].shape) != shape:
      raise WeightsImportError(
          f"{path}: not {what}: {conv.keras_name}/{found[0]} has shape "
          f"{list(group[found[0]].shape)}, expected {list(shape)}"
          + (" (a Theano-ordered 'th' file? use the 'tf' one)" if label == "kernel" else ""))
  return kernels[0], group[kernels[0]], biases[0], group[biases[0]]


def keras_vgg19(path: str) -> SourceWeights:
  """VGG19's first ten convs from a Keras applications VGG19 weights file (.h5)."""
  try:
    import h5py
  except ImportError:
    raise WeightsImportError(f"{path}: reading Keras .h5 weights needs h5py (pip install h5py, "
                             "or the package's [h5py] extra)") from None
  what = "Keras VGG19 weights (vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5)"
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise WeightsImportError(f"{path}: not a readable HDF5 file ({e})") from None
  with f:
    root = f["model_weights"] if "model_weights" in f else f
    layers = [_keras_layer(path, what, root, c) for c in vgg19_convs(False)]
    convs = [SourceConv(c.keras_name, np.asarray(kernel[()], np.float64),
                        np.asarray(bias[()], np.float64))
             for c, (_, kernel, _, bias) in zip(vgg19_convs(False)[:IMPORTED], layers)]
  return SourceWeights("Keras applications VGG19 (.h5)", convs, KERAS_INPUT)


def read_vgg19(path: str) -> SourceWeights:
  """VGG19's first ten convs from a .safetensors, .pth/.pt or Keras .h5 file."""
  if not os.path.isfile(path):
    raise WeightsImportError(f"{path}: no such file")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    return torch_vgg19(path, read_safetensors(path), ".safetensors")
  if ext in (".pth", ".pt"):
    return torch_vgg19(path, read_torch(path), ".pth")
  if ext in (".h5", ".hdf5"):
    return keras_vgg19(path)
  raise WeightsImportError(f"{path}: unknown weights format {ext or '(no extension)'!r} "
                           "(expected .safetensors, .pth/.pt or .h5)")


# ----------------------------------------------------------------------------------------------
# Converting: input normalisation, BatchNorm, the model's parameter tree.

def fold_input_normalization(kernel: np.ndarray, bias: np.ndarray, source: InputConvention,
                             image_scale, image_offset):
  """block_1a's kernel and bias for this package's input x = pixel / image_scale - image_offset
  (RGB, per channel), from a first conv that reads `source`'s input.

  The source reads u_j = (pixel_r - zero_j) / scale_j with r = rgb_index[j]. With
  pixel_r = image_scale_r * (x_r + image_offset_r), u_j = a_j * x_r + d_j where
  a_j = image_scale_r / scale_j and d_j = (image_scale_r * image_offset_r - zero_j) / scale_j.
  The channel order and a_j go into the kernel's input axis, exactly. d_j goes into the bias
  (the sum over the 3x3 taps of kernel * d), exact wherever the window lies inside the image;
  on the 1-pixel border the source zero-pads u (pixel = zero_j) while the model zero-pads x
  (pixel = image_scale * image_offset), so the border is exact only when d = 0.

  kernel: (3, 3, 3, out) HWIO in the source's channel order; bias: (out,).
  Returns (kernel (3, 3, 3, out) in RGB order, bias (out,), d (3,) in the source's units).
  """
  folded = np.zeros_like(kernel)
  offsets = np.zeros(3)
  for j, r in enumerate(source.rgb_index):
    folded[:, :, r, :] = kernel[:, :, j, :] * (image_scale[r] / source.scale[j])
    offsets[j] = (image_scale[r] * image_offset[r] - source.zero[j]) / source.scale[j]
  return folded, bias + np.einsum("hwio,i->o", kernel, offsets), offsets


def exact_image_offset(source: InputConvention, image_scale) -> list:
  """The RGB image_offset for which `fold_input_normalization` is exact on the border too
  (the model's zero input is the source's zero input)."""
  offset = [0.0, 0.0, 0.0]
  for j, r in enumerate(source.rgb_index):
    offset[r] = source.zero[j] / image_scale[r]
  return offset


def backbone_layer(conv: SourceConv, conv_has_bias: bool):
  """(conv params, BatchNorm params, BatchNorm stats) of one backbone layer that computes what
  the source's conv [+ BatchNorm] computes, in inference mode.

  The model computes y = (conv(x) [+ b] - mean) / sqrt(var + 1e-3) * scale + bias.
  - A source with BatchNorm (vgg19_bn: (conv(x) + b - mean) / sqrt(var + 1e-5) * gamma + beta)
    keeps its statistics; the epsilon difference goes into the scale,
    scale = gamma * sqrt((var + 1e-3) / (var + 1e-5)), so small variances come out the same.
    A conv bias the model lacks (backbone convs have none by default) goes into the mean,
    mean - b; training-mode BatchNorm removes any per-channel constant, in both networks.
  - A source without BatchNorm (vgg19, Keras): an identity BatchNorm (mean 0, var 1 - 1e-3,
    scale 1) with the conv bias as its bias (beta), where it still acts once BatchNorm runs on
    batch statistics in training (as a running mean it would be lost at the first step).
  """
  eps = model_lib.BN_EPSILON
  conv_params = {"kernel": conv.kernel}
  bias = conv.bias
  if conv_has_bias:
    conv_params["bias"], bias = conv.bias, np.zeros_like(conv.bias)
  bn = conv.batch_norm
  if bn is None:
    params = {"scale": np.ones_like(bias), "bias": bias}
    stats = {"mean": np.zeros_like(bias), "var": np.full_like(bias, 1.0 - eps)}
  else:
    params = {"scale": bn["gamma"] * np.sqrt((bn["var"] + eps) / (bn["var"] + TORCH_BN_EPSILON)),
              "bias": bn["beta"]}
    stats = {"mean": bn["mean"] - bias, "var": bn["var"]}
  as32 = lambda tree: {k: np.asarray(v, np.float32) for k, v in tree.items()}
  return as32(conv_params), as32(params), as32(stats)


def import_config(config=None):
  """(config, note): the config the weights are imported for. None: the default config with
  max-pool downsampling. A given config must already use max-pool downsampling, since it
  describes the model that will be trained (ConfigError otherwise)."""
  if config is None:
    config = config_lib.default_config()
    config.model.backbone_downsampling = "max_pool"
    note = ("model.backbone_downsampling='max_pool' (set: the default config has "
            "'strided_conv'; train with max_pool too)")
  else:
    config = config.copy_and_resolve_references()
    if config.model.backbone_downsampling != "max_pool":
      raise ConfigError(f"config.model.backbone_downsampling={config.model.backbone_downsampling!r}"
                        ": VGG19's weights apply only with 'max_pool' (2x2 max pools before "
                        "blocks 2-4, as VGG19); configs/coco_imagenet.py sets it, or pass "
                        "--config.model.backbone_downsampling=max_pool")
    note = "model.backbone_downsampling='max_pool' (as the config)"
  config_lib.validate(config)
  return config, note


def backbone_variables(source: SourceWeights, config):
  """({'params', 'batch_stats'} holding block_1a .. block_4b, [(layer, source name, values)],
  {path: shape} of the model's variables, the model's layer spec). WeightsImportError if the
  config's model has other widths there than VGG19."""
  net = model_lib.build_model(config.model, skeleton_from_config(config))
  spec = model_lib.layer_spec(net)
  layers = spec.layers[:IMPORTED]
  want = [f"backbone/{name}_conv_1" for name, *_ in model_lib.VGG_BACKBONE[:IMPORTED]]
  assert [layer.path for layer in layers] == want, "the backbone's layer list changed"
  abstract = model_lib.abstract_variables(net, 64, 64)
  shapes = {model_lib.path_str(p): tuple(v.shape) for p, v in
            jax.tree_util.tree_flatten_with_path(abstract)[0]}
  params, stats, rows = {}, {}, []
  for index, (layer, conv) in enumerate(zip(layers, source.convs)):
    if index == 0:
      norm = config.dataloader.normalization_params
      kernel, bias, _ = fold_input_normalization(conv.kernel, conv.bias, source.input,
                                                 norm.image_scale, norm.image_offset)
      conv = dataclasses.replace(conv, kernel=kernel, bias=bias)
    conv_p, bn_p, bn_s = backbone_layer(conv, f"params/{layer.path}/bias" in shapes)
    for collection, module, tree in (("params", layer.path, conv_p), ("params", layer.bn, bn_p),
                                     ("batch_stats", layer.bn, bn_s)):
      for leaf, value in tree.items():
        name = f"{collection}/{module}/{leaf}"
        if shapes.get(name) != value.shape:
          raise WeightsImportError(
              f"the config's model has {name} {shapes.get(name)} but VGG19's {conv.name} gives "
              f"{value.shape}: block_1a..block_4b must keep VGG19's widths "
              "(model.width_multiplier / model.layer_widths)")
      target = params if collection == "params" else stats
      target.setdefault("backbone", {})[module.split("/")[-1]] = tree
    rows.append((layer.path.removesuffix("_conv_1"), conv.name,
                 sum(v.size for t in (conv_p, bn_p, bn_s) for v in t.values())))
  return {"params": params, "batch_stats": stats}, rows, shapes, spec


def _left_initialised(shapes: dict, variables, spec: model_lib.Spec) -> tuple:
  """([module], value count) of the model's variables the import does not provide, in the
  network's order: backbone layers by name, everything else by its top-level module."""
  have = {model_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]}
  group = lambda path: "/".join(path.split("/")[:2] if path.startswith("backbone/")
                                else path.split("/")[:1])
  order = {}
  for i, layer in enumerate(spec.layers):
    for module in filter(None, (layer.path, layer.bn)):
      order.setdefault(group(module), (i, module != layer.path))
  counts = {}
  for name, shape in shapes.items():
    if name not in have:       # name: 'params/stage1/conv1/kernel'
      module = group(name.split("/", 1)[1].rsplit("/", 1)[0])
      counts[module] = counts.get(module, 0) + math.prod(shape)
  modules = sorted(counts, key=lambda m: order.get(m, (len(spec.layers), False)))
  return modules, sum(counts.values())


def _input_report(source: SourceWeights, config) -> dict:
  norm = config.dataloader.normalization_params
  _, _, offsets = fold_input_normalization(source.convs[0].kernel, source.convs[0].bias,
                                           source.input, norm.image_scale, norm.image_offset)
  exact = float(np.abs(offsets).max()) <= _EXACT_OFFSET
  return {"source": source.input.description,
          "model": "RGB, pixel / image_scale - image_offset",
          "image_scale": [float(v) for v in norm.image_scale],
          "image_offset": [float(v) for v in norm.image_offset],
          "exact": exact, "border_offset": [float(v) for v in offsets],
          "exact_image_offset": exact_image_offset(source.input, norm.image_scale)}


def import_vgg19(weights_path: str, out_dir: str, config=None, overwrite: bool = False) -> dict:
  """Writes OUT_DIR: VGG19's first ten convs from `weights_path` as block_1a .. block_4b of the
  model `config` describes (default: the default config with max-pool downsampling), for
  `trainer.pretrained_weights=OUT_DIR`. Returns the report (also OUT_DIR/import_report.json):
  what was loaded from where, what training will initialise, how the input and BatchNorm were
  mapped. WeightsImportError / ConfigError (one line) for a file or config that does not fit;
  nothing is written then.
  """
  fileio.check_can_write([os.path.abspath(out_dir)], overwrite)   # before reading big files
  config, config_note = import_config(config)
  source = read_vgg19(weights_path)
  variables, rows, shapes, spec = backbone_variables(source, config)
  left, left_count = _left_initialised(shapes, variables, spec)
  with_bn = source.convs[0].batch_norm is not None
  report = {
      "source": os.path.abspath(weights_path), "format": source.kind,
      "output": os.path.abspath(out_dir),
      "loaded": [{"layer": layer, "from": name, "values": n} for layer, name, n in rows],
      "loaded_values": sum(n for *_, n in rows),
      "left_initialised": left, "left_initialised_values": left_count,
      "batch_norm": ("the source's statistics; epsilon 1e-5 -> 1e-3 folded into the scale, "
                     "the conv bias into the mean" if with_bn else
                     "VGG19 has none: identity BatchNorms (mean 0, var 1 - 1e-3, scale 1, bias "
                     "= the conv bias), exact in inference; training normalises with batch "
                     "statistics from the first step (vgg19_bn avoids that change)"),
      "input": _input_report(source, config),
      "config": config_note,
  }
  checkpoint_lib.save_model_dir(out_dir, variables, config, extra_json={REPORT_FILE: report},
                                overwrite=overwrite)
  return report


def summary_lines(report: dict) -> list:
  """What `bpnet import_weights` prints about an import."""
  loaded = report["loaded"]
  inp = report["input"]
  if inp["exact"]:
    input_line = (f"input: {inp['source']} folded into block_1a; exact for image_scale "
                  f"{inp['image_scale']}, image_offset {inp['image_offset']}")
  else:
    offset = ", ".join(f"{v:.6g}" for v in inp["exact_image_offset"])
    input_line = (f"input: {inp['source']} folded into block_1a; exact except on the image's "
                  f"1-pixel border (this config's zero input is not VGG19's); "
                  f"--config.dataloader.normalization_params.image_offset=[{offset}] "
                  "makes it exact (train with the same)")
  return [
      f"{report['format']}: {report['source']}",
      f"loaded: {loaded[0]['layer']} .. {loaded[-1]['layer']} (conv + BatchNorm) from "
      f"{loaded[0]['from']} .. {loaded[-1]['from']}, {report['loaded_values']:,} values",
      f"left to training's initialisation: {', '.join(report['left_initialised'])} "
      f"({report['left_initialised_values']:,} values)",
      f"BatchNorm: {report['batch_norm']}",
      input_line,
      f"config: {report['config']}",
      f"-> {report['output']} (use it as --config.trainer.pretrained_weights="
      f"{report['output']}; report: {REPORT_FILE})",
  ]
