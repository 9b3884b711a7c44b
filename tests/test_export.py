"""ONNX export: parity with JAX (fp32, fp16), plain ops only, pruned models, the Predictor and the
CLI running exported models."""

import json

import jax
import numpy as np
import pytest

pytest.importorskip("jax2onnx")
pytest.importorskip("onnxruntime")

from bpnet_jax import model as model_lib  # noqa: E402
from bpnet_jax import prune as P  # noqa: E402
from bpnet_jax.export import int8, runtimes  # noqa: E402
from bpnet_jax.export import onnx_model as E  # noqa: E402
from bpnet_jax.inference import predictor  # noqa: E402
from bpnet_jax.inference.backends import ort_session  # noqa: E402
from bpnet_jax.skeleton import load_skeleton  # noqa: E402
from configs import demo  # noqa: E402

SK = load_skeleton()
PLAIN_OPS = {"Conv", "Relu", "Concat", "Mul", "Add", "Sigmoid", "Tanh", "Transpose",
             "BatchNormalization", "Cast", "Resize", "ConvTranspose", "Reshape", "Expand",
             "Gather", "Shape", "Squeeze", "Unsqueeze"}


def tiny(attention=False, downsampling="strided_conv"):
  c = demo.get_config()
  c.model.use_self_attention = attention
  c.model.backbone_downsampling = downsampling
  m = model_lib.build_model(c.model, SK)
  v = model_lib.init_variables(m, jax.random.key(1), 64, 64)
  # Non-trivial BatchNorm statistics (small, both signs), so folding mistakes would show.
  rng = np.random.default_rng(0)
  v = {"params": v["params"], "batch_stats": jax.tree_util.tree_map(
      lambda a: a + (0.02 * rng.normal(size=a.shape)).astype(a.dtype), v["batch_stats"])}
  # Final heads scaled so the maps have std 0.3 (like real maps): the 1e-4 tolerance then means
  # what it says instead of comparing near-zero outputs.
  x = rng.uniform(-0.5, 0.5, (1, 64, 64, 3)).astype(np.float32)
  heat, paf = E.inference_fn(m, v)(x)
  gain = {"heatmap_out": 0.3 / float(np.std(heat)), "paf_out": 0.3 / float(np.std(paf))}
  params = dict(v["params"])
  for name, g in gain.items():
    params[name] = jax.tree_util.tree_map(lambda a: a * g, params[name])
  v = {"params": params, "batch_stats": v["batch_stats"]}
  heat, paf = E.inference_fn(m, v)(x)
  assert abs(np.std(heat) - 0.3) < 0.01 and abs(np.std(paf) - 0.3) < 0.01
  return c, m, v


@pytest.mark.parametrize("attention", [False, True])
def test_fp32_parity_dynamic_size_and_batch(tmp_path, attention):
  c, m, v = tiny(attention)
  out = tmp_path / "m.onnx"
  r = E.export(c, v, str(out))
  assert r["parity"]["max_abs_diff"] < 1e-4
  assert r["input"]["dtype"] == "float32" and not r["input"]["normalization"]["in_graph"]
  assert [1, 128, 160, 3] in r["parity"]["inputs"] and [3, 128, 160, 3] in r["parity"]["inputs"]
  assert [2, 160, 96, 3] in r["parity"]["inputs"]            # a second input size
  assert set(r["ops"]) <= PLAIN_OPS, r["ops"]
  assert json.load(open(tmp_path / "m.report.json"))["ops"] == r["ops"]
  import onnx
  proto = onnx.load(str(out))
  assert [i.name for i in proto.graph.input] == ["input_1"]
  assert [o.name for o in proto.graph.output] == ["heatmap_out", "paf_out"]
  assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
  # Our own check on another input, batch 3 at 64x96.
  x = np.random.default_rng(5).uniform(-0.5, 0.5, (3, 64, 96, 3)).astype(np.float32)
  diff = E.check_parity(str(out), E.inference_fn(m, v), [x])
  assert diff < 1e-4


def test_fixed_size_fp16_and_sdk_models(tmp_path):
  c, m, v = tiny()
  r16 = E.export(c, v, str(tmp_path / "h.onnx"), input_dims=(64, 96), data_type="fp16")
  assert 0 < r16["parity"]["max_abs_diff"] < 5e-2 and r16["input"]["dims"] == [64, 96]
  import onnx
  kinds = {t.data_type for t in onnx.load(str(tmp_path / "h.onnx")).graph.initializer}
  assert onnx.TensorProto.FLOAT16 in kinds
  sdk = E.export(c, v, str(tmp_path / "s.onnx"), input_dims=(64, 64), sdk_compatible=True)
  assert sdk["parity"]["max_abs_diff"] < 1e-4
  import onnxruntime as ort
  s = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
  heat, paf = s.run(None, {"input_1": np.zeros((2, 64, 64, 3), np.float32)})
  assert heat.shape == (2, 8, 8, 19) and paf.shape == (2, 32, 32, 38)
  with pytest.raises(FileExistsError):
    E.export(c, v, str(tmp_path / "s.onnx"), input_dims=(64, 64))
  with pytest.raises(E.ExportError, match="multiples of 8"):
    E.export(c, v, str(tmp_path / "x.onnx"), input_dims=(60, 64))


def test_uint8_input_normalised_in_the_graph(tmp_path):
  """--input_uint8: input_1 is (B, H, W, 3) uint8 and the graph normalises it (fp32, dynamic
  size; fp16, fixed size); parity is checked on uint8 images; the report records it; the
  Predictor feeds it pixels and gets the checkpoint's maps."""
  import onnx
  c, m, v = tiny()
  c.dataloader.normalization_params.image_scale = [255.0, 200.0, 256.0]   # per channel
  c.dataloader.normalization_params.image_offset = [0.5, 0.4, 0.6]
  out = tmp_path / "u8.onnx"
  r = E.export(c, v, str(out), input_uint8=True)
  assert r["input"]["dtype"] == "uint8" and r["input"]["normalization"]["in_graph"]
  assert r["input"]["normalization"]["scale"] == [255.0, 200.0, 256.0]
  assert r["parity"]["max_abs_diff"] < 1e-4 and [2, 160, 96, 3] in r["parity"]["inputs"]
  assert json.load(open(tmp_path / "u8.report.json"))["input"]["dtype"] == "uint8"
  proto = onnx.load(str(out))
  assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
  assert [n.op_type for n in proto.graph.node[:3]] == ["Cast", "Div", "Sub"]
  image = np.random.default_rng(2).integers(0, 255, (90, 130, 3), np.uint8)
  c.inference.input_shape = (64, 96)
  p = predictor.Predictor.from_path(str(out), c)
  assert p.backend.uint8_input
  want = predictor.Predictor.from_variables(c, v).maps(image)
  got = p.maps(image)
  np.testing.assert_allclose(got[0], want[0], atol=1e-4)
  np.testing.assert_allclose(got[1], want[1], atol=1e-4)
  r16 = E.export(c, v, str(tmp_path / "u8h.onnx"), input_dims=(64, 96), data_type="fp16",
                 input_uint8=True)
  assert r16["input"]["dtype"] == "uint8" and 0 < r16["parity"]["max_abs_diff"] < 5e-2


def test_pruned_model_trains_a_step_and_exports(tmp_path):
  import optax

  from bpnet_jax import losses
  c, m, v = tiny()
  pruned, widths, _ = P.prune(v, P.model_graph(m), threshold=0.9, granularity=2, min_filters=2)
  c.model.layer_widths = widths
  small = model_lib.build_model(c.model, SK)
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  labels = np.random.default_rng(1).uniform(size=(2, 8, 8, SK.num_channels)).astype(np.float32)
  masks = np.ones((2, 8, 8, 1), np.float32)

  def loss_fn(params):
    (heats, pafs), _ = small.apply({"params": params, "batch_stats": pruned["batch_stats"]}, x,
                                   train=True, mutable=["batch_stats"])
    return losses.pose_loss(heats, pafs, labels, masks, SK, params, "l1", 5e-4)[0]
  params = jax.tree_util.tree_map(np.asarray, pruned["params"])
  loss_fn = jax.jit(loss_fn)
  l0, g = jax.jit(jax.value_and_grad(loss_fn))(params)
  tx = optax.sgd(1e-3 / float(optax.global_norm(g)))       # a small step down the gradient
  updates, _ = tx.update(g, tx.init(params), params)
  params = optax.apply_updates(params, updates)
  assert np.isfinite(float(l0)) and float(loss_fn(params)) < float(l0)
  r = E.export(c, {"params": params, "batch_stats": pruned["batch_stats"]},
               str(tmp_path / "pruned.onnx"))
  assert r["parity"]["max_abs_diff"] < 1e-4
  assert r["params"] < model_lib.count_params(v)["total"]


def test_predictor_on_exported_model_matches_the_checkpoint(trained_workdir, tmp_path, capsys):
  from bpnet_jax import cli
  config, workdir = trained_workdir
  from conftest import write_config_file
  write_config_file(config, tmp_path / "cfg.py")
  out = tmp_path / "m.onnx"
  assert cli.main(["export", f"--workdir={workdir}", f"-o={out}"]) == 0
  assert "max |diff|" in capsys.readouterr().out
  assert cli.main(["export", f"--workdir={workdir}", f"-o={out}"]) == 2
  assert "already exists" in capsys.readouterr().err
  image = np.random.default_rng(2).integers(0, 255, (90, 130, 3), np.uint8)
  a = predictor.Predictor.from_path(workdir).maps(image)
  b = predictor.Predictor.from_path(str(out)).maps(image)     # OUT.config.json describes it
  np.testing.assert_allclose(a[0], b[0], atol=1e-4)
  np.testing.assert_allclose(a[1], b[1], atol=1e-4)
  # --input_uint8: the model takes pixels; same maps.
  assert cli.main(["export", f"--workdir={workdir}", f"-o={tmp_path / 'u8.onnx'}",
                   "--input_uint8"]) == 0
  assert "input uint8" in capsys.readouterr().out
  u8 = predictor.Predictor.from_path(str(tmp_path / "u8.onnx"))
  assert u8.backend.uint8_input
  np.testing.assert_allclose(u8.maps(image)[0], a[0], atol=1e-4)


def test_int8_qdq_model_cache_and_calibration_data(tmp_path):
  import cv2
  import onnx
  c, m, v = tiny()
  images = tmp_path / "cal"
  images.mkdir()
  rng = np.random.default_rng(3)
  for i in range(5):
    cv2.imwrite(str(images / f"{i}.jpg"), rng.integers(0, 255, (50 + 7 * i, 80, 3), np.uint8))
  (images / "notes.txt").write_text("not an image")
  data = int8.calibration_data(str(images), (64, 96), batches=2, batch_size=2)
  assert data.shape == (4, 64, 96, 3) and data.dtype == np.float32
  assert -0.5 <= data.min() and data.max() < 0.5
  with pytest.raises(E.ExportError, match="5 images, but --batches 3 x --batch_size 2 = 6"):
    int8.calibration_data(str(images), (64, 96), batches=3, batch_size=2)
  npy = str(tmp_path / "cal.npy")
  same = int8.load_or_make_calibration_data(npy, lambda: data)
  again = int8.load_or_make_calibration_data(npy, lambda: pytest.fail("the file is reused"))
  np.testing.assert_array_equal(same, again)

  cache = str(tmp_path / "cal.bin")
  cal = {"data": lambda: data, "batch_size": 2, "method": "percentile", "cache_file": cache}
  r = E.export(c, v, str(tmp_path / "m8.onnx"), input_dims=(64, 96), data_type="int8",
               calibration=cal)
  ops = r["ops"]
  assert ops["QuantizeLinear"] > 20 and ops["DequantizeLinear"] > 20
  assert "BatchNormalization" not in ops and set(ops) <= PLAIN_OPS | {"QuantizeLinear",
                                                                     "DequantizeLinear"}
  # Cache format: header, then 'tensor: 8 hex digits' (big-endian float32 scale = amax / 127).
  lines = open(cache).read().splitlines()
  assert lines[0].startswith("TRT-") and lines[0].endswith("-EntropyCalibration2")
  import re
  assert all(re.fullmatch(r"\S+: [0-9a-f]{8}", l) for l in lines[1:]) and len(lines) > 20
  ranges = int8.read_trt_cache(cache)
  assert all(lo == -hi and hi > 0 for lo, hi in ranges.values())
  # The int8 model runs in ONNX Runtime and stays close to fp32 (maps with std 0.3).
  x = data[:1]
  s8 = ort_session(str(tmp_path / "m8.onnx"))
  ref = [np.asarray(a) for a in E.inference_fn(m, v)(x)]
  got = s8.run(None, {"input_1": x})
  for a, b in zip(got, ref):
    assert np.abs(a - b).max() < 0.1 and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
  # A second export reuses the cache (no calibration data needed) and gives the same model.
  r2 = E.export(c, v, str(tmp_path / "m8b.onnx"), input_dims=(64, 96), data_type="int8",
                calibration=dict(cal, data=None))
  assert r2["int8"]["calibration"] == "cache"
  s8b = ort_session(str(tmp_path / "m8b.onnx"))
  for a, b in zip(s8b.run(None, {"input_1": x}), got):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # uint8 input on the int8 model: the same Q/DQ graph behind an in-graph normalisation.
  r3 = E.export(c, v, str(tmp_path / "m8u.onnx"), input_dims=(64, 96), data_type="int8",
                calibration=dict(cal, data=None), input_uint8=True, overwrite=True)
  assert r3["input"]["dtype"] == "uint8"
  pixels = np.random.default_rng(4).integers(0, 255, (2, 64, 96, 3), np.uint8)
  s8u = ort_session(str(tmp_path / "m8u.onnx"))
  for a, b in zip(s8u.run(None, {"input_1": pixels}),
                  s8b.run(None, {"input_1": E.normalize(pixels, (256.0,) * 3, (0.5,) * 3)})):
    np.testing.assert_allclose(a, b, atol=1e-6)
  (tmp_path / "bad.bin").write_text("not a cache\n")
  with pytest.raises(E.ExportError, match="not a TensorRT calibration cache"):
    int8.read_trt_cache(str(tmp_path / "bad.bin"))
  assert onnx.load(str(tmp_path / "m8.fp32.onnx")).graph.node


def test_max_pool_backbone_exports_and_quantizes(tmp_path):
  # The VGG19 layout (2x2 max pools, stride-1 convs): fp32 parity and an int8 Q/DQ model close
  # to it in ONNX Runtime (pruning: tests/test_prune.py).
  c, m, v = tiny(downsampling="max_pool")
  x = np.random.default_rng(2).uniform(-0.5, 0.5, (4, 64, 96, 3)).astype(np.float32)
  r = E.export(c, v, str(tmp_path / "m.onnx"), input_dims=(64, 96))
  assert r["parity"]["max_abs_diff"] < 1e-4 and r["ops"]["MaxPool"] == 3
  assert set(r["ops"]) <= PLAIN_OPS | {"MaxPool"}, r["ops"]
  cal = {"data": lambda: x, "batch_size": 2, "method": "percentile",
         "cache_file": str(tmp_path / "cal.bin")}
  E.export(c, v, str(tmp_path / "m8.onnx"), input_dims=(64, 96), data_type="int8",
           calibration=cal)
  ref = [np.asarray(a) for a in E.inference_fn(m, v)(x[:1])]
  got = ort_session(str(tmp_path / "m8.onnx")).run(None, {"input_1": x[:1]})
  for a, b in zip(got, ref):
    assert np.abs(a - b).max() < 0.1 and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_engine_without_tensorrt_fails_clearly_after_the_onnx(tmp_path):
  try:
    import tensorrt  # noqa: F401
    pytest.skip("tensorrt is installed: the engine build is exercised on GPU machines")
  except ImportError:
    pass
  c, m, v = tiny()
  E.export(c, v, str(tmp_path / "m.onnx"), input_dims=(64, 64))
  with pytest.raises(E.ExportError, match="needs TensorRT .* the ONNX export itself succeeded"):
    runtimes.build_engine(str(tmp_path / "m.onnx"), str(tmp_path / "m.engine"), "fp16", (64, 64))
  assert (tmp_path / "m.onnx").exists() and not (tmp_path / "m.engine").exists()


def test_saved_model_round_trip(tmp_path):
  pytest.importorskip("tensorflow", reason="TensorFlow is not installed (optional extra 'tf'); "
                      "the SavedModel export is untested here")
  c, m, v = tiny()
  x = E.check_inputs((64, 96))
  r = runtimes.export_saved_model(m, v, str(tmp_path / "sm"), (64, 96), check=x)
  assert r["max_abs_diff"] < 1e-4 and (tmp_path / "sm" / "saved_model.pb").exists()
  r = runtimes.export_saved_model(m, v, str(tmp_path / "sm_dyn"), None, check=E.check_inputs(None),
                           overwrite=True)
  assert r["max_abs_diff"] < 1e-4
