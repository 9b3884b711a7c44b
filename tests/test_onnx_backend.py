"""The Predictor runs ONNX models with ONNX Runtime: a small real ONNX graph with the export
contract (input NHWC normalised image, outputs heatmap_out and paf_out at stride 8)."""

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
      [helper.make_tensor_value_info("heatmap_out", TensorProto.FLOAT, None),
       helper.make_tensor_value_info("paf_out", TensorProto.FLOAT, None)],
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
