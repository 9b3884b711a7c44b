"""`bpnet import_weights`: public VGG19 ImageNet weights -> the backbone's block_1a .. block_4b.

The weights files are written here with their real layouts, from independent little writers:
torchvision `vgg19` / `vgg19_bn` state dicts as .safetensors (every `features.*` entry, with
`num_batches_tracked`, and the `classifier.*` entries) and the Keras
`vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5` (both naming conventions). Random values go
into the ten convs the import uses; the later convs and the classifier (400 MB of float32) are
left as holes in the file (zeros, no disk), which the importer must skip without reading.

The check of the numbers: the imported model's block_4b activation, in inference mode, equals a
NumPy forward pass of VGG19's first ten convs (3x3 conv pad 1, [BatchNorm,] ReLU, 2x2 max pool
after blocks 1-3) on the source's own input normalisation, to 1e-4 of its magnitude.
"""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from conftest import write_config_file

from bpnet_jax import checkpoint as checkpoint_lib
from bpnet_jax import cli, import_weights
from bpnet_jax import config as config_lib
from bpnet_jax import model as model_lib
from bpnet_jax.errors import ConfigError, WeightsImportError
from bpnet_jax.skeleton import skeleton_from_config
from configs import demo

# VGG19's 16 convs: output channels, and their `features` index in torchvision's vgg19 and
# vgg19_bn (written out, not derived, so the importer's own numbering is checked).
CHANNELS = (64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512)
VGG19_INDEX = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)
VGG19_BN_INDEX = (0, 3, 7, 10, 14, 17, 20, 23, 27, 30, 33, 36, 40, 43, 46, 49)
KERAS_NAMES = ("block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2", "block3_conv1",
               "block3_conv2", "block3_conv3", "block3_conv4", "block4_conv1", "block4_conv2",
               "block4_conv3", "block4_conv4", "block5_conv1", "block5_conv2", "block5_conv3",
               "block5_conv4")
CLASSIFIER = {"classifier.0.weight": (4096, 25088), "classifier.0.bias": (4096,),
              "classifier.3.weight": (4096, 4096), "classifier.3.bias": (4096,),
              "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,)}
TARGETS = ("block_1a", "block_1b", "block_2a", "block_2b", "block_3a", "block_3b", "block_3c",
           "block_3d", "block_4a", "block_4b")
USED = 10
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
KERAS_BGR_MEAN = np.array([103.939, 116.779, 123.68])


# ----------------------------------------------------------------------------------------------
# Writers of the real file layouts.

def write_safetensors(path, tensors):
  """tensors: {name: array, or (shape, numpy dtype) for a hole of zeros}, written in order."""
  codes = {np.dtype("float32"): "F32", np.dtype("int64"): "I64"}
  header, offset = {}, 0
  for name, value in tensors.items():
    shape, dtype = (value.shape, value.dtype) if isinstance(value, np.ndarray) else value
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": codes[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = {"format": "pt"}
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)        # the data starts 8-byte aligned, as real files do
  with open(path, "wb") as f:
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    start = f.tell()
    for name, value in tensors.items():
      if isinstance(value, np.ndarray):
        f.seek(start + header[name]["data_offsets"][0])
        f.write(np.ascontiguousarray(value).astype("<" + value.dtype.str[1:]).tobytes())
    f.truncate(start + offset)


def random_convs(seed, batch_norm):
  """VGG19's first ten convs: [(OIHW kernel, bias, bn dict or None)], float32, scaled so that
  activations keep their size through ten layers; BatchNorm variances down to 1e-4, where the
  epsilon difference (1e-5 vs 1e-3) matters."""
  rng = np.random.default_rng(seed)
  convs, cin = [], 3
  for cout in CHANNELS[:USED]:
    kernel = rng.normal(0, np.sqrt(2.0 / (9 * cin)), (cout, cin, 3, 3)).astype(np.float32)
    bias = rng.normal(0, 0.1, cout).astype(np.float32)
    bn = None
    if batch_norm:
      var = (10.0 ** rng.uniform(-4, 0.5, cout)).astype(np.float32)
      bn = {"weight": (np.sqrt(var + 1e-5) * rng.uniform(0.5, 1.5, cout)).astype(np.float32),
            "bias": rng.normal(0.1, 0.1, cout).astype(np.float32),
            "running_mean": rng.normal(0, 0.1, cout).astype(np.float32),
            "running_var": var}
    convs.append((kernel, bias, bn))
    cin = cout
  return convs


def torchvision_state_dict(convs, batch_norm):
  """{name: array or hole} in torchvision's order: every features.* entry, then classifier.*."""
  tensors, cin = {}, 3
  for i, (index, cout) in enumerate(zip(VGG19_BN_INDEX if batch_norm else VGG19_INDEX,
                                        CHANNELS)):
    used = i < USED
    tensors[f"features.{index}.weight"] = convs[i][0] if used else ((cout, cin, 3, 3), np.float32)
    tensors[f"features.{index}.bias"] = convs[i][1] if used else ((cout,), np.float32)
    if batch_norm:
      for leaf in ("weight", "bias", "running_mean", "running_var"):
        tensors[f"features.{index + 1}.{leaf}"] = convs[i][2][leaf] if used else \
            ((cout,), np.float32)
      tensors[f"features.{index + 1}.num_batches_tracked"] = np.array(123456, np.int64)
    cin = cout
  tensors.update({name: (shape, np.float32) for name, shape in CLASSIFIER.items()})
  return tensors


def write_keras_h5(path, convs, naming):
  """The notop file: a group per layer with a `weight_names` attribute; kernels HWIO.
  naming 'keras1': block1_conv1/block1_conv1_W_1:0 (the release file); 'keras2':
  block1_conv1/block1_conv1/kernel:0 (a later Keras save_weights)."""
  import h5py
  layers = ["input_1"]
  for block, count in ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4)):
    layers += [f"block{block}_conv{i}" for i in range(1, count + 1)] + [f"block{block}_pool"]
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [n.encode() for n in layers]
    f.attrs["backend"] = b"tensorflow"
    cin, conv_index = 3, 0
    for layer in layers:
      group = f.create_group(layer)
      if "_conv" not in layer:
        group.attrs["weight_names"] = np.array([], dtype="S1")
        continue
      cout = CHANNELS[conv_index]
      names = ([f"{layer}_W_1:0", f"{layer}_b_1:0"] if naming == "keras1" else
               [f"{layer}/kernel:0", f"{layer}/bias:0"])
      group.attrs["weight_names"] = [n.encode() for n in names]
      if conv_index < USED:
        kernel, bias, _ = convs[conv_index]
        group.create_dataset(names[0], data=kernel.transpose(2, 3, 1, 0))   # OIHW -> HWIO
        group.create_dataset(names[1], data=bias)
      else:    # never written: no storage allocated, reads as zeros
        group.create_dataset(names[0], shape=(3, 3, cin, cout), dtype=np.float32)
        group.create_dataset(names[1], shape=(cout,), dtype=np.float32)
      cin, conv_index = cout, conv_index + 1


# ----------------------------------------------------------------------------------------------
# The reference: VGG19's first ten convs in NumPy (float64).

def conv3x3(x, kernel_oihw, bias):
  """x (H, W, C); 3x3, stride 1, zero padding 1."""
  h, w, _ = x.shape
  padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
  out = np.zeros((h, w, kernel_oihw.shape[0]))
  for dy in range(3):
    for dx in range(3):
      out += padded[dy:dy + h, dx:dx + w, :] @ kernel_oihw[:, :, dy, dx].T.astype(np.float64)
  return out + bias


def vgg_reference(u, convs):
  """block4_conv2's output after ReLU for the source-normalised input u (H, W, 3)."""
  x = u.astype(np.float64)
  for i, (kernel, bias, bn) in enumerate(convs):
    x = conv3x3(x, kernel, bias)
    if bn is not None:
      x = (x - bn["running_mean"]) / np.sqrt(bn["running_var"].astype(np.float64) + 1e-5) \
          * bn["weight"] + bn["bias"]
    x = np.maximum(x, 0)
    if i in (1, 3, 7):
      h, w, c = x.shape
      x = x.reshape(h // 2, 2, w // 2, 2, c).max(axis=(1, 3))
  return x


# ----------------------------------------------------------------------------------------------
# The model side.

def vgg_config(image_scale, image_offset):
  """The tests' tiny model with max-pool downsampling and VGG19's widths in block_1a..4b."""
  config = demo.get_config()
  config.model.backbone_downsampling = "max_pool"
  config.model.layer_widths = {f"backbone/{t}_conv_1": c for t, c in zip(TARGETS, CHANNELS)}
  config.dataloader.normalization_params.image_scale = tuple(float(v) for v in image_scale)
  config.dataloader.normalization_params.image_offset = tuple(float(v) for v in image_offset)
  return config


def block_4b(config, model_dir, x):
  """The model's block_4b activation (after BatchNorm and ReLU) for input x (1, H, W, 3), with
  the model dir's weights loaded as training loads `trainer.pretrained_weights`."""
  model = model_lib.build_model(config.model, skeleton_from_config(config))
  variables = model_lib.init_variables(model, jax.random.key(0), x.shape[1], x.shape[2])
  saved = checkpoint_lib.read_state(model_dir)
  params, rp = checkpoint_lib.load_by_name(variables["params"], saved["params"])
  stats, rs = checkpoint_lib.load_by_name(variables["batch_stats"], saved["batch_stats"])
  assert not rp["shape_mismatch"] and not rs["shape_mismatch"]
  assert sorted(rp["loaded"]) == sorted(
      f"backbone/{t}_{leaf}" for t in TARGETS
      for leaf in ("conv_1/kernel", "bn_1/scale", "bn_1/bias"))
  assert sorted(rs["loaded"]) == sorted(
      f"backbone/{t}_bn_1/{leaf}" for t in TARGETS for leaf in ("mean", "var"))
  _, captured = model.apply(
      {"params": params, "batch_stats": stats}, x, train=False,
      capture_intermediates=lambda module, _: module.name == "block_4b_bn_1",
      mutable=["intermediates"])
  out = captured["intermediates"]["backbone"]["block_4b_bn_1"]["__call__"][0]
  return np.maximum(np.asarray(out[0], np.float64), 0)


def pixels(seed=3, size=32):
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3)).astype(np.float64)


def assert_matches(got, want):
  assert got.shape == want.shape
  assert (want > 0).mean() > 0.1, "the reference is mostly zero: not a meaningful check"
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """{name: (path, convs)} of the synthetic weights files."""
  root = tmp_path_factory.mktemp("vgg_weights")
  out = {}
  for name, batch_norm, seed in (("vgg19", False, 0), ("vgg19_bn", True, 1)):
    convs = random_convs(seed, batch_norm)
    path = str(root / f"{name}.safetensors")
    write_safetensors(path, torchvision_state_dict(convs, batch_norm))
    out[name] = (path, convs)
  convs = random_convs(2, False)
  for naming in ("keras1", "keras2") if importlib.util.find_spec("h5py") else ():
    path = str(root / f"vgg19_{naming}_notop.h5")
    write_keras_h5(path, convs, naming)
    out[naming] = (path, convs)
  return out


# ----------------------------------------------------------------------------------------------
# Tests.

def test_vgg19_bn_safetensors_reproduces_the_source_network(files, tmp_path):
  # torchvision's own normalisation as the config's: exact everywhere, borders included.
  path, convs = files["vgg19_bn"]
  config = vgg_config(255 * STD, MEAN / STD)
  report = import_weights.import_vgg19(path, str(tmp_path / "m"), config)
  assert report["format"] == "torchvision/timm vgg19_bn (.safetensors)"
  assert report["input"]["exact"]
  assert [r["layer"] for r in report["loaded"]] == [f"backbone/{t}" for t in TARGETS]
  assert report["loaded"][9]["from"] == "features.30 + features.31"
  assert "backbone/block_6a_conv_1" in report["left_initialised"]
  assert "stage1" in report["left_initialised"]
  p = pixels()
  got = block_4b(config, str(tmp_path / "m"), (p / (255 * STD) - MEAN / STD)[None])
  assert_matches(got, vgg_reference((p / 255 - MEAN) / STD, convs))


def test_vgg19_safetensors_with_scale_256_folds_the_normalisation(files, tmp_path):
  # The original's pixel / 256 scale, offsets at torchvision's zero: the 1/std and 255/256
  # factors go into block_1a's kernel; no BatchNorm in vgg19, so identity BatchNorms.
  path, convs = files["vgg19"]
  config = vgg_config((256.0,) * 3, 255 * MEAN / 256)
  report = import_weights.import_vgg19(path, str(tmp_path / "m"), config)
  assert report["format"] == "torchvision/timm vgg19 (.safetensors)" and report["input"]["exact"]
  p = pixels(4)
  got = block_4b(config, str(tmp_path / "m"), (p / 256 - 255 * MEAN / 256)[None])
  assert_matches(got, vgg_reference((p / 255 - MEAN) / STD, convs))


@pytest.mark.parametrize("naming", ["keras1", "keras2"])
def test_keras_h5_reproduces_the_source_network(files, tmp_path, naming):
  pytest.importorskip("h5py")
  # Keras reads BGR minus the ImageNet means: the channel order is reversed in the kernel.
  path, convs = files[naming]
  config = vgg_config((256.0,) * 3, KERAS_BGR_MEAN[::-1] / 256)
  report = import_weights.import_vgg19(path, str(tmp_path / "m"), config)
  assert report["input"]["exact"] and report["format"].startswith("Keras")
  p = pixels(5)
  got = block_4b(config, str(tmp_path / "m"), (p / 256 - KERAS_BGR_MEAN[::-1] / 256)[None])
  assert_matches(got, vgg_reference(p[..., ::-1] - KERAS_BGR_MEAN, convs))


def test_model_dir_carries_config_skeleton_and_report(files, tmp_path):
  path, _ = files["vgg19"]
  out = str(tmp_path / "m")
  import_weights.import_vgg19(path, out, vgg_config(255 * STD, MEAN / STD))
  saved = checkpoint_lib.saved_config(out)
  assert saved.model.backbone_downsampling == "max_pool"
  assert saved.dataloader.pose_config.definition     # the skeleton travels with the weights
  with open(os.path.join(out, "import_report.json")) as f:
    assert json.load(f)["format"] == "torchvision/timm vgg19 (.safetensors)"


def test_default_config_is_max_pool_and_reports_an_inexact_border(files, tmp_path):
  # The default normalisation (pixel / 256 - 0.5) puts the zero input at pixel 128, not at
  # ImageNet's mean: exact except on the border, and the report says which offset fixes it.
  path, _ = files["vgg19"]
  report = import_weights.import_vgg19(path, str(tmp_path / "m"))
  assert not report["input"]["exact"]
  np.testing.assert_allclose(report["input"]["exact_image_offset"], 255 * MEAN / 256)
  assert "max_pool" in report["config"]
  lines = import_weights.summary_lines(report)
  assert any("image_offset=[" in line for line in lines)


def test_inexact_offset_folds_into_the_bias_exactly_inside_the_image():
  # With the default pixel / 256 - 0.5 input, block_1a's folded kernel and bias give the
  # source's first conv exactly away from the border; only the 1-pixel border differs.
  (kernel, bias, _), = random_convs(7, False)[:1]
  hwio = kernel.transpose(2, 3, 1, 0).astype(np.float64)
  folded, folded_bias, offsets = import_weights.fold_input_normalization(
      hwio, bias.astype(np.float64), import_weights.KERAS_INPUT, (256.0,) * 3, (0.5,) * 3)
  assert np.abs(offsets).max() > 1           # pixel 128 is far from the means: a real test
  p = pixels(8, 12)
  got = conv3x3(p / 256 - 0.5, folded.transpose(3, 2, 0, 1), folded_bias)
  want = conv3x3(p[..., ::-1] - KERAS_BGR_MEAN, kernel, bias)
  np.testing.assert_allclose(got[1:-1, 1:-1], want[1:-1, 1:-1], rtol=1e-9, atol=1e-9)
  assert np.abs(got[0] - want[0]).max() > 1e-3


def test_coco_imagenet_recipe_imports_exactly_with_the_original_parameter_count(files, tmp_path):
  from configs import coco, coco_imagenet
  config = config_lib.validate(coco_imagenet.get_config())
  report = import_weights.import_vgg19(files["vgg19_bn"][0], str(tmp_path / "m"), config)
  assert report["input"]["exact"]
  assert report["left_initialised"][:3] == ["backbone/block_6a_conv_1", "backbone/block_6a_bn_1",
                                            "channel_reduction_conv"]
  count = lambda c: model_lib.count_params(model_lib.abstract_variables(
      model_lib.build_model(c.model, skeleton_from_config(c))))["total"]
  assert count(config) == count(coco.get_config()) == 16_777_835


def test_strided_conv_config_is_refused(files, tmp_path):
  config = vgg_config(255 * STD, MEAN / STD)
  config.model.backbone_downsampling = "strided_conv"
  with pytest.raises(ConfigError, match="backbone_downsampling"):
    import_weights.import_vgg19(files["vgg19"][0], str(tmp_path / "m"), config)
  assert not os.path.exists(tmp_path / "m")


def test_narrow_backbone_is_refused(files, tmp_path):
  config = vgg_config(255 * STD, MEAN / STD)
  config.model.layer_widths = {}          # the tiny model's 1/8 widths
  with pytest.raises(WeightsImportError, match="block_1a_conv_1/kernel"):
    import_weights.import_vgg19(files["vgg19"][0], str(tmp_path / "m"), config)
  assert not os.path.exists(tmp_path / "m")


def _mismatched(files, tmp_path, kind):
  """A vgg19 file with one entry wrong: ('features.5.weight' with another shape) or missing
  ('features.16.weight', the layout of VGG16, whose module 16 is a pool)."""
  _, convs = files["vgg19"]
  tensors = torchvision_state_dict(convs, batch_norm=False)
  if kind == "shape":
    tensors["features.5.weight"] = np.zeros((128, 32, 3, 3), np.float32)
    expected = r"features\.5\.weight has shape \[128, 32, 3, 3\], expected \[128, 64, 3, 3\]"
  else:
    del tensors["features.16.weight"]
    expected = r"features\.16\.weight is missing"
  path = str(tmp_path / f"bad_{kind}.safetensors")
  write_safetensors(path, tensors)
  return path, expected


@pytest.mark.parametrize("kind", ["shape", "missing"])
def test_mismatched_file_fails_in_one_line(files, tmp_path, kind, capsys):
  path, expected = _mismatched(files, tmp_path, kind)
  with pytest.raises(WeightsImportError, match=expected) as e:
    import_weights.import_vgg19(path, str(tmp_path / "m"))
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "m")
  # The same through the command line: status 2, one line on stderr, no output directory.
  out = str(tmp_path / "cli_out")
  assert cli.main(["import_weights", f"--weights={path}", f"--output={out}"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("bpnet import_weights: error: ")
  assert expected.replace("\\", "").split(" has")[0].split(" is")[0] in err
  assert not os.path.exists(out)


def test_keras_missing_layer_and_wrong_format(files, tmp_path):
  h5py = pytest.importorskip("h5py")
  _, convs = files["keras1"]
  path = str(tmp_path / "bad.h5")
  write_keras_h5(path, convs, "keras1")
  with h5py.File(path, "a") as f:
    del f["block3_conv4"]
  with pytest.raises(WeightsImportError, match="layer block3_conv4 is missing"):
    import_weights.import_vgg19(path, str(tmp_path / "m"))
  bogus = tmp_path / "weights.safetensors"
  bogus.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
  with pytest.raises(WeightsImportError, match="not a safetensors file"):
    import_weights.import_vgg19(str(bogus), str(tmp_path / "m"))
  npz = tmp_path / "vgg19.npz"
  npz.write_bytes(b"x")
  with pytest.raises(WeightsImportError, match="unknown weights format '.npz'"):
    import_weights.import_vgg19(str(npz), str(tmp_path / "m"))


def test_pth_without_torch_is_one_line(tmp_path):
  try:
    import torch  # noqa: F401
    pytest.skip("torch is installed")
  except ImportError:
    pass
  path = tmp_path / "vgg19.pth"
  path.write_bytes(b"PK")
  with pytest.raises(WeightsImportError, match="needs PyTorch"):
    import_weights.import_vgg19(str(path), str(tmp_path / "m"))


def test_cli_import_then_load_as_training_does(files, tmp_path, capsys):
  # bpnet import_weights with the training config; then the model dir is read the way training
  # reads trainer.pretrained_weights (checkpoint.read_state + load_by_name, asserted in
  # block_4b: exactly the ten layers' 30 params and 20 batch stats) and computes VGG19's
  # numbers. (A full `train.train` run from it compiles a VGG-wide train step: ~1.5 min here.)
  path, convs = files["vgg19_bn"]
  config = vgg_config(255 * STD, MEAN / STD)
  out = str(tmp_path / "imported")
  assert cli.main(["import_weights", f"--weights={path}", f"--output={out}",
                   f"--config={write_config_file(config, tmp_path / 'c.py')}"]) == 0
  printed = capsys.readouterr().out
  assert "loaded: backbone/block_1a .. backbone/block_4b" in printed
  assert "left to training's initialisation: backbone/block_6a_conv_1, backbone/block_6a_bn_1, " \
      "channel_reduction_conv, stage1, stage2" in printed
  config.trainer.pretrained_weights = out
  config_lib.validate(config)
  p = pixels(6)
  got = block_4b(config, config.trainer.pretrained_weights, (p / (255 * STD) - MEAN / STD)[None])
  assert_matches(got, vgg_reference((p / 255 - MEAN) / STD, convs))
