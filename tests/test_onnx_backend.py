"""The Predictor runs ONNX models with ONNX Runtime: a small real ONNX graph with the export
contract (input NHWC normalised image, outputs heatmap_out and paf_out at stride 8), its uint8
variant, and `bpnet inference --workers`."""

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bpnet_jax.errors import InferenceError  # noqa: E402
from bpnet_jax.inference import predictor  # noqa: E402
from configs import demo  # noqa: E402


def make_model(path, hw=None, heat_channels=19, paf_channels=38, seed=0):
  """input_1 (N, H, W, 3) -> 8x8 average pool -> 1x1 convs -> heatmap_out, paf_out (NHWC)."""
  rng = np.random.default_rng(seed)
  wh = rng.normal(size=(heat_channels, 3, 1, 1)).astype(np.float32)
  wp = rng.normal(size=(paf_channels, 3, 1, 1)).astype(np.float32)
  h, w = hw if hw else ("H", "W")
  nodes = [
      helper.make_node("Transpose", ["input_1"], ["nchw"], perm=[0, 3, 1, 2]),
      helper.make_node("AveragePool", ["nchw"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
      helper.make_node("Conv", ["pooled", "wh"], ["h"]),
      helper.make_node("Conv", ["pooled", "wp"], ["p"]),
      helper.make_node("Transpose", ["h"], ["heatmap_out"], perm=[0, 2, 3, 1]),
      helper.make_node("Transpose", ["p"], ["paf_out"], perm=[0, 2, 3, 1]),
  ]
  graph = helper.make_graph(
      nodes, "tiny", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["N", h, w, 3])],
      [helper.make_tensor_value_info("heatmap_out", TensorProto.FLOAT,
                                     ["N", "h", "w", heat_channels]),
       helper.make_tensor_value_info("paf_out", TensorProto.FLOAT, ["N", "h", "w", paf_channels])],
      [numpy_helper.from_array(wh, "wh"), numpy_helper.from_array(wp, "wp")])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  model.ir_version = 8
  onnx.save(model, str(path))
  return wh[:, :, 0, 0], wp[:, :, 0, 0]


def expected_maps(image, wh, wp):
  x = image.astype(np.float32) / 256 - 0.5
  h, w = x.shape[0] // 8, x.shape[1] // 8
  pooled = x[:h * 8, :w * 8].reshape(h, 8, w, 8, 3).mean((1, 3))
  return pooled @ wh.T, pooled @ wp.T


def test_onnx_model_runs_with_onnxruntime(tmp_path):
  path = tmp_path / "m.onnx"
  wh, wp = make_model(path)
  c = demo.get_config()
  c.inference.input_shape = (64, 96)
  p = predictor.Predictor.from_path(str(path), c)
  image = np.random.default_rng(1).integers(0, 255, (101, 157, 3), np.uint8)
  heat, paf, g = p.maps(image)
  net_input, _ = p.prepare(image)[0]
  eh, ep = expected_maps(net_input, wh, wp)
  h, w = heat.shape[:2]
  np.testing.assert_allclose(heat, eh[:h, :w], atol=1e-4)
  np.testing.assert_allclose(paf, ep[:h, :w], atol=1e-4)
  assert isinstance(p.predict(image), list)
  assert len(p.predict_batch([image, image[:50]])) == 2


def test_fixed_size_model_forces_padding_to_its_input(tmp_path, caplog):
  path = tmp_path / "fixed.onnx"
  make_model(path, hw=(64, 64))
  c = demo.get_config()
  c.inference.input_shape = (128, 128)
  c.inference.multi_scale_inference = True
  with caplog.at_level("WARNING"):
    p = predictor.Predictor.from_path(str(path), c)
  assert "fixed 64x64 input" in caplog.text
  assert p.input_shape == (64, 64) and p.mode == "pad_image_input" and p.scales == [1.0]
  heat, paf, g = p.maps(np.zeros((90, 160, 3), np.uint8))
  assert heat.shape == (8, 8, 19) and g.padded == (64, 64)


def test_onnx_model_for_another_skeleton_is_refused(tmp_path):
  path = tmp_path / "other.onnx"
  make_model(path, heat_channels=15, paf_channels=28)
  with pytest.raises(InferenceError, match="15 heatmap and 28 PAF channels"):
    predictor.Predictor.from_path(str(path), demo.get_config())
  (tmp_path / "junk.onnx").write_bytes(b"not onnx")
  with pytest.raises(InferenceError, match="ONNX Runtime cannot load"):
    predictor.Predictor.from_path(str(tmp_path / "junk.onnx"), demo.get_config())


def test_engine_without_tensorrt_is_a_clear_error(tmp_path):
  try:
    import tensorrt  # noqa: F401
    pytest.skip("tensorrt is installed")
  except ImportError:
    pass
  (tmp_path / "m.engine").write_bytes(b"\0" * 16)
  with pytest.raises(InferenceError, match="needs the 'tensorrt' package"):
    predictor.Predictor.from_path(str(tmp_path / "m.engine"), demo.get_config())


def test_uint8_input_model_is_fed_pixels_without_host_normalisation(tmp_path):
  """A model exported with --input_uint8 (the graph normalises): OnnxBackend sees the uint8
  input type and feeds the pixels as they are; the maps are the float model's."""
  from bpnet_jax.export import onnx_model
  path = tmp_path / "m.onnx"
  wh, wp = make_model(path)
  proto = onnx_model.add_uint8_input(onnx.load(str(path)), (256.0,) * 3, (0.5,) * 3)
  onnx.save(proto, str(tmp_path / "u8.onnx"))
  c = demo.get_config()
  c.inference.input_shape = (64, 96)
  p = predictor.Predictor.from_path(str(tmp_path / "u8.onnx"), c)
  assert p.backend.uint8_input and not predictor.Predictor.from_path(str(path), c).backend.uint8_input
  fed = []
  run = p.backend.session.run
  p.backend.session.run = lambda names, feeds: (fed.append(feeds["input_1"].dtype),
                                                run(names, feeds))[1]
  image = np.random.default_rng(1).integers(0, 255, (101, 157, 3), np.uint8)
  heat, paf, _ = p.maps(image)
  assert fed == [np.uint8]
  eh, ep = expected_maps(p.prepare(image)[0][0], wh, wp)
  np.testing.assert_allclose(heat, eh[:heat.shape[0], :heat.shape[1]], atol=1e-4)
  np.testing.assert_allclose(paf, ep[:paf.shape[0], :paf.shape[1]], atol=1e-4)


def test_inference_cli_takes_workers(tmp_path, capsys):
  """`bpnet inference --workers N --batch_size B` on an exported model; --workers 0 is a
  one-line error."""
  import json

  import cv2

  from bpnet_jax import checkpoint, cli
  from bpnet_jax import config as config_lib
  make_model(tmp_path / "m.onnx")
  c = demo.get_config()
  (tmp_path / "m.config.json").write_text(config_lib.to_json(checkpoint.with_skeleton(c)))
  rng = np.random.default_rng(0)
  images = tmp_path / "images"
  images.mkdir()
  for i, shape in enumerate([(90, 120), (120, 90), (90, 120), (64, 64), (90, 120)]):
    cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 255, shape + (3,), np.uint8))
  args = ["inference", f"--model={tmp_path / 'm.onnx'}", "--input_type=dir",
          f"--input={images}", "--no_progress"]
  assert cli.main(args + [f"--results_dir={tmp_path / 'r'}", "--workers=3",
                          "--batch_size=2"]) == 0
  det = json.load(open(tmp_path / "r" / "detection.json"))
  assert [os.path.basename(e["file"]) for e in det["images"]] == [f"{i}.png" for i in range(5)]
  assert cli.main(args + [f"--results_dir={tmp_path / 'r0'}", "--workers=0"]) == 2
  assert "--workers 0: expected an integer >= 1" in capsys.readouterr().err


class _FakeTensor:
  """Just enough of a torch tensor over a NumPy array for TensorRTBackend's control flow."""

  registry: dict = {}       # data_ptr -> array (the fake engine reads and writes through it)

  def __init__(self, a):
    self.a = a
    self.shape, self.dtype = a.shape, a.dtype

  def __getitem__(self, index):
    return _FakeTensor(self.a[index])

  def copy_(self, other, non_blocking=False):
    self.a[...] = other.a
    return self

  def div_(self, other):
    self.a /= other.a
    return self

  def sub_(self, other):
    self.a -= other.a
    return self

  def to(self, dtype):
    return _FakeTensor(self.a.astype(dtype))

  def pin_memory(self):
    return _FakeTensor(self.a.copy())

  def numpy(self):
    return self.a

  def data_ptr(self):
    ptr = self.a.__array_interface__["data"][0]
    _FakeTensor.registry[ptr] = self.a
    return ptr


def _fake_gpu_modules(wh, wp, max_batch):
  """(torch, tensorrt) stand-ins: a CUDA-less torch over NumPy, and an engine computing the
  tiny model's maps (8x8 mean pool, 1x1 convs) at 64x96, batch 1..max_batch."""
  import contextlib
  import types
  allocations = []

  def empty(shape, dtype=None, device=None, pin_memory=False):
    allocations.append(tuple(shape))
    return _FakeTensor(np.zeros(shape, dtype))

  torch = types.SimpleNamespace(
      float32=np.float32, float16=np.float16, uint8=np.uint8, int8=np.int8, int32=np.int32,
      empty=empty, tensor=lambda a, device=None: _FakeTensor(np.array(a)),
      from_numpy=_FakeTensor, allocations=allocations,
      cuda=types.SimpleNamespace(
          is_available=lambda: True, stream=lambda s: contextlib.nullcontext(),
          Stream=lambda: types.SimpleNamespace(cuda_stream=0, synchronize=lambda: None)))
  mode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
  dt = types.SimpleNamespace(FLOAT="f32", HALF="f16", UINT8="u8", INT8="i8", INT32="i32")
  shapes = {"input_1": (-1, 64, 96, 3), "heatmap_out": (-1, -1, -1, 19),
            "paf_out": (-1, -1, -1, 38)}

  class Context:
    def __init__(self):
      self.addr, self.runs = {}, []

    def set_input_shape(self, name, shape):
      self.shape = shape

    def get_tensor_shape(self, name):
      b, h, w, _ = self.shape
      return (b, h // 8, w // 8, shapes[name][-1])

    def set_tensor_address(self, name, ptr):
      self.addr[name] = ptr

    def execute_async_v3(self, stream):
      x = _FakeTensor.registry[self.addr["input_1"]]
      assert x.shape == self.shape and x.dtype == np.float32 and x.shape[0] <= max_batch
      self.runs.append(x.shape[0])
      b, h, w, _ = x.shape
      pooled = x.reshape(b, h // 8, 8, w // 8, 8, 3).mean((2, 4))
      _FakeTensor.registry[self.addr["heatmap_out"]][...] = pooled @ wh.T
      _FakeTensor.registry[self.addr["paf_out"]][...] = pooled @ wp.T

  engine = types.SimpleNamespace(
      num_io_tensors=3, get_tensor_name=lambda i: list(shapes)[i],
      get_tensor_mode=lambda n: mode.INPUT if n == "input_1" else mode.OUTPUT,
      get_tensor_shape=lambda n: shapes[n], get_tensor_dtype=lambda n: dt.FLOAT,
      get_tensor_profile_shape=lambda n, k: [(1, 64, 96, 3), (1, 64, 96, 3),
                                             (max_batch, 64, 96, 3)],
      create_execution_context=Context)
  logger = lambda level: None
  logger.WARNING = 0
  trt = types.SimpleNamespace(
      Logger=logger, TensorIOMode=mode, DataType=dt,
      Runtime=lambda log: types.SimpleNamespace(deserialize_cuda_engine=lambda b: engine))
  return torch, trt, shapes


def test_tensorrt_backend_logic_with_stand_ins(tmp_path, monkeypatch):
  """TensorRTBackend's buffer handling, without a GPU (stand-ins for torch and tensorrt): the
  maps equal the model's, buffers are allocated once per shape and reused, batches above the
  profile's maximum run in chunks (a fixed-batch engine's short chunk padded), and the outputs
  returned are the caller's own. (The real thing has not run on a GPU in this project yet.)"""
  import sys

  from bpnet_jax.inference import backends
  from bpnet_jax.skeleton import load_skeleton
  rng = np.random.default_rng(0)
  wh = rng.normal(size=(19, 3)).astype(np.float32)
  wp = rng.normal(size=(38, 3)).astype(np.float32)
  torch, trt, shapes = _fake_gpu_modules(wh, wp, max_batch=2)
  monkeypatch.setitem(sys.modules, "torch", torch)
  monkeypatch.setitem(sys.modules, "tensorrt", trt)
  (tmp_path / "m.engine").write_bytes(b"\0")
  b = backends.TensorRTBackend(str(tmp_path / "m.engine"), load_skeleton(), (256.0,) * 3,
                               (0.5,) * 3)
  assert b.fixed_hw == (64, 96) and b.max_batch == 2 and not b.uint8_input
  images = rng.integers(0, 255, (5, 64, 96, 3), np.uint8)
  heat, paf = b(images)
  assert b.context.runs == [2, 2, 1] and heat.shape == (5, 8, 12, 19)
  for k in range(5):
    eh, ep = expected_maps(images[k], wh, wp)
    np.testing.assert_allclose(heat[k], eh, atol=1e-4)
    np.testing.assert_allclose(paf[k], ep, atol=1e-4)
  allocated = len(torch.allocations)
  heat[...] = 0                                      # the caller's own copy
  heat2, _ = b(images)
  assert len(torch.allocations) == allocated          # buffers reused
  np.testing.assert_allclose(heat2[4], expected_maps(images[4], wh, wp)[0], atol=1e-4)
  # A fixed batch of 2: 3 images run as 2 + (1 padded to 2).
  shapes["input_1"] = (2, 64, 96, 3)
  b = backends.TensorRTBackend(str(tmp_path / "m.engine"), load_skeleton(), (256.0,) * 3,
                               (0.5,) * 3)
  heat, _ = b(images[:3])
  assert b.fixed_batch == 2 and b.context.runs == [2, 2] and heat.shape[0] == 3
  np.testing.assert_allclose(heat[2], expected_maps(images[2], wh, wp)[0], atol=1e-4)
