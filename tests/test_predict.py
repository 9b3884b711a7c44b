"""Predictor: preprocessing geometry of the three aspect modes, multi-scale merging, the
network call (jitted once per shape), checkpoint/config mismatches."""

import os

import jax
import numpy as np
import pytest

from bpnet_jax import checkpoint, targets
from bpnet_jax import model as model_lib
from bpnet_jax.errors import CheckpointError, InferenceError
from bpnet_jax.inference import predictor, preprocess
from bpnet_jax.skeleton import load_skeleton
from configs import demo

SK = load_skeleton()
MODES = ("adjust_network_input", "pad_image_input", "None")
# (height, width) of odd-sized originals: wider, taller and square relative to a 64x96 input.
SIZES = ((101, 157), (157, 101), (99, 99))


def blob_image(h, w, x0, y0, sigma=4.0):
  ys, xs = np.mgrid[0:h, 0:w]
  g = np.exp(-((xs - x0) ** 2 + (ys - y0) ** 2) / (2 * sigma ** 2))
  return np.repeat((40 + 200 * g)[..., None], 3, -1).round().astype(np.uint8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES)
def test_preprocess_geometry_maps_pixels_back(mode, size):
  h, w = size
  x0, y0 = 0.37 * w, 0.61 * h
  image, g = preprocess.preprocess(blob_image(h, w, x0, y0), (64, 96), mode)
  assert image.shape[0] % 8 == 0 and image.shape[1] % 8 == 0 and image.dtype == np.uint8
  assert image.shape[:2] == g.padded
  if mode == "adjust_network_input":      # covers the target box, keeps the aspect ratio
    assert (g.size[0] == 64 and g.size[1] >= 96) or (g.size[1] == 96 and g.size[0] >= 64)
    assert g.scale[0] == pytest.approx(g.scale[1], rel=0.02)
  else:
    assert g.size == (64, 96)
  if mode == "pad_image_input":           # padding is grey, the value that normalises to 0
    assert g.offset[0] == 0 or g.offset[1] == 0
    if max(g.offset) >= 4:
      assert (image[0, 0] == 128).all()
  # The blob's centroid in the network input maps back to where it was drawn.
  v = image[:g.size[0], :g.size[1], 0].astype(np.float64) - 40
  v[v < 0.5 * v.max()] = 0
  ys, xs = np.mgrid[0:g.size[0], 0:g.size[1]]
  c = np.array([(v * xs).sum(), (v * ys).sum()]) / v.sum()
  np.testing.assert_allclose(g.to_original(c), (x0, y0), atol=0.6 / min(g.scale))
  np.testing.assert_allclose(g.to_original(g.to_input([[3.2, 7.9]])), [[3.2, 7.9]])


def render(joints_in, grid, sigma=7.0):
  """Ideal (heat, paf) (1, h, w, C) maps for people given in network-input pixels."""
  joints = np.asarray(joints_in, np.float32)
  valid = np.ones(joints.shape[:2], bool)
  hm = np.asarray(targets.heatmaps(joints, valid, grid, 8, sigma))
  paf = np.asarray(targets.pafs(joints, valid, SK, grid, 8, 1.0))
  return np.concatenate([hm, 1 - hm.max(-1, keepdims=True)], -1)[None], paf[None]


def person(cx, cy, s):
  from tests.test_postprocess import POSE
  return np.array([(cx + s * POSE[j][0], cy + s * POSE[j][1]) for j in range(18)])


def config_for(mode, shape=(128, 192), scales=(1.0,)):
  c = demo.get_config()
  c.inference.input_shape = shape
  c.inference.keep_aspect_ratio_mode = mode
  c.inference.multi_scale_inference = len(scales) > 1
  c.inference.scales = scales
  return c


@pytest.mark.parametrize("mode", MODES)
def test_ideal_maps_decode_to_original_pixels(mode):
  """Maps rendered where the preprocessing puts the people decode to the original pixels."""
  h, w = 301, 413
  truth = np.stack([person(120.3, 150.7, 1.3), person(290.6, 160.2, 1.2)])
  p = predictor.Predictor(config_for(mode), backend=None)
  (_, g), = p.prepare(np.zeros((h, w, 3), np.uint8))
  grid = (g.padded[0] // 8, g.padded[1] // 8)
  people = p.finish((render(g.to_input(truth), grid), [g]))
  assert len(people) == 2
  got = np.stack(sorted((q["keypoints"] for q in people), key=lambda k: k[1, 0]))
  # Peaks sit on whole network-input pixels of interpolated maps: within one input pixel.
  tol = 1.0 / min(g.scale)
  assert np.abs(got[..., :2] - truth).max() <= tol


@pytest.mark.parametrize("mode", ("adjust_network_input", "pad_image_input"))
def test_multi_scale_maps_are_resampled_onto_the_largest_scale(mode):
  h, w = 240, 330
  truth = np.stack([person(110.2, 120.5, 1.0), person(230.8, 118.1, 1.1)])
  scales = (0.5, 1.0, 1.5)
  p = predictor.Predictor(config_for(mode, (96, 128), scales), backend=None)
  prepared = p.prepare(np.zeros((h, w, 3), np.uint8))
  geoms = [g for _, g in prepared]
  grids = [(g.padded[0] // 8, g.padded[1] // 8) for g in geoms]
  maps = [render(g.to_input(truth) , grid) for g, grid in zip(geoms, grids)]
  params = preprocess.merge_params(geoms, grids[-1], len(geoms) - 1)
  merge = preprocess.merge_maps_jit()
  heat = np.asarray(merge(tuple(m[0] for m in maps), params, grids[-1]))
  paf = np.asarray(merge(tuple(m[1] for m in maps), params, grids[-1]))
  # The largest scale's own maps and the merged ones agree where people are.
  ref = maps[-1][0]
  peak = ref[0, ..., :18].max(-1) > 0.5
  assert np.abs(heat[0, ..., :18].max(-1) - ref[0, ..., :18].max(-1))[peak].mean() < 0.2
  people = p.finish(((heat, paf), [geoms[-1]]))
  assert len(people) == 2
  got = np.stack(sorted((q["keypoints"] for q in people), key=lambda k: k[1, 0]))
  assert np.abs(got[..., :2] - truth).max() <= 2.0


def test_real_model_all_modes_and_one_compile_per_shape():
  import jax

  from bpnet_jax import model as model_lib
  c = config_for("adjust_network_input", (64, 96))
  net = model_lib.build_model(c.model, SK)
  variables = model_lib.init_variables(net, jax.random.key(0), 64, 64)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 255, (101, 157, 3), np.uint8) for _ in range(3)]
  p = predictor.Predictor.from_variables(c, variables)
  for im in images:
    assert isinstance(p.predict(im), list)
  assert p.backend._forward._cache_size() == 1          # one input shape -> one compilation
  # 100x152 resizes to 64x97, 101x157 to 64x99: both pad to 64x128 (input_size_multiple 32).
  p.predict(rng.integers(0, 255, (100, 152, 3), np.uint8))
  assert p.backend._forward._cache_size() == 1
  batch = p.predict_batch(images + [rng.integers(0, 255, (80, 60, 3), np.uint8)])
  assert len(batch) == 4
  heat, paf, g = p.maps(images[0])
  assert heat.shape == (8, 13, 19) and paf.shape == (8, 13, 38) and g.size == (64, 99)
  # Multi-scale with one repeated scale is the single-scale result.
  c2 = config_for("pad_image_input", (64, 96), (1.0, 1.0))
  p2 = predictor.Predictor.from_variables(c2, variables)
  heat2, paf2, _ = p2.maps(images[0])
  ref = predictor.Predictor.from_variables(config_for("pad_image_input", (64, 96)), variables)
  heat1, paf1, _ = ref.maps(images[0])
  np.testing.assert_allclose(heat2, heat1, atol=1e-5)
  np.testing.assert_allclose(paf2, paf1, atol=1e-5)
  # inference.compute_dtype='bfloat16' runs the network in bf16: close to, not equal to, fp32.
  c3 = config_for("pad_image_input", (64, 96))
  c3.inference.compute_dtype = "bfloat16"
  heat3, paf3, _ = predictor.Predictor.from_variables(c3, variables).maps(images[0])
  assert heat3.dtype == np.float32 and not np.array_equal(heat3, heat1)
  scale = max(np.abs(heat1).max(), np.abs(paf1).max())
  assert max(np.abs(heat3 - heat1).max(), np.abs(paf3 - paf1).max()) < 0.05 * scale


def test_predict_iter_reports_unreadable_images(tmp_path):
  import jax

  from bpnet_jax import model as model_lib
  c = config_for("adjust_network_input", (64, 64))
  net = model_lib.build_model(c.model, SK)
  p = predictor.Predictor.from_variables(c, model_lib.init_variables(net, jax.random.key(0), 64, 64))
  good = tmp_path / "good.png"
  import cv2
  cv2.imwrite(str(good), np.full((50, 70, 3), 90, np.uint8))
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not a jpeg")
  out = list(p.predict_iter([str(good), str(bad), str(tmp_path / "missing.png"), str(good)]))
  assert [o[0] for o in out] == [str(good), str(bad), str(tmp_path / "missing.png"), str(good)]
  assert [o[2] is None for o in out] == [True, False, False, True]
  assert "not a readable image" in str(out[1][2]) and "no such file" in str(out[2][2])


def test_predict_iter_batches_keep_order_and_results(tmp_path):
  """batch_size > 1 (same-shape images share a network call, decoding in threads) yields what
  one-at-a-time prediction yields, in order, errors included."""
  import cv2
  import jax

  from bpnet_jax import model as model_lib
  c = config_for("adjust_network_input", (64, 64))
  # Loose thresholds: a random network's maps decode to many "people", so results are non-trivial.
  c.inference.heatmap_threshold, c.inference.paf_threshold = 0.0, -1.0
  c.inference.min_parts, c.inference.min_mean_score = 1, 0.0
  net = model_lib.build_model(c.model, SK)
  p = predictor.Predictor.from_variables(c, model_lib.init_variables(net, jax.random.key(1), 64, 64))
  rng = np.random.default_rng(0)
  paths = []
  for i, shape in enumerate([(50, 70), (50, 70), (70, 50), (50, 70), (50, 70), (50, 70)]):
    path = tmp_path / f"{i}.png"
    cv2.imwrite(str(path), rng.integers(0, 255, shape + (3,), np.uint8))
    paths.append(str(path))
  (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
  paths.insert(4, str(tmp_path / "bad.jpg"))
  one = list(p.predict_iter(paths, batch_size=1))
  many = list(p.predict_iter(paths, batch_size=3, workers=3))
  assert [o[0] for o in many] == paths
  assert [o[2] is None for o in many] == [True] * 4 + [False] + [True] * 2
  assert sum(len(o[1]) for o in one if o[1]) > 0
  for a, b in zip(one, many):
    if a[1] is None:
      continue
    assert len(a[1]) == len(b[1])
    for x, y in zip(a[1], b[1]):
      np.testing.assert_allclose(x["keypoints"], y["keypoints"], atol=1e-3)


def test_saved_models_describe_themselves_and_configs_may_only_change_inference(
    trained_workdir):
  config, workdir = trained_workdir
  image = np.zeros((70, 90, 3), np.uint8)
  # No config: the workdir, its checkpoints/ dir and a step dir all carry theirs.
  step_dir = os.path.join(workdir, "checkpoints", sorted(os.listdir(
      os.path.join(workdir, "checkpoints")))[-1])
  for path in (workdir, os.path.join(workdir, "checkpoints"), step_dir):
    p = predictor.Predictor.from_path(path)
    assert isinstance(p.predict(image), list)
    assert p.config.model.to_dict() == config.model.to_dict()
  # A given config may change inference settings ...
  changed = config.copy_and_resolve_references()
  changed.inference.input_shape = (96, 96)
  changed.trainer.num_epoch = 99             # (training keys are irrelevant here)
  assert predictor.Predictor.from_path(workdir, changed).input_shape == (96, 96)
  # ... but not the network: one line naming the key.
  wrong = config.copy_and_resolve_references()
  wrong.model.stages = 3
  with pytest.raises(CheckpointError, match=r"config.model.stages=3 but the model in .* has 2"):
    predictor.Predictor.from_path(workdir, wrong)
  wrong = config.copy_and_resolve_references()
  wrong.model.width_multiplier = 0.25
  with pytest.raises(CheckpointError, match="config.model.width_multiplier=0.25"):
    predictor.Predictor.from_path(workdir, wrong)
  with pytest.raises(InferenceError, match="no such model"):
    predictor.Predictor.from_path(workdir + "/nope")


def test_checkpoint_that_does_not_fit_its_model_is_one_clear_error(trained_workdir):
  config, workdir = trained_workdir
  saved = checkpoint.load_model(workdir)
  wrong = config.copy_and_resolve_references()
  wrong.model.stages = 3
  expected = model_lib.abstract_variables(model_lib.build_model(wrong.model, saved.skeleton))
  with pytest.raises(CheckpointError, match="has 2 stages but the config's model has 3"):
    checkpoint.check_variables(workdir, expected, saved.variables)
  wrong.model.stages = 2
  wrong.model.width_multiplier = 0.25
  expected = model_lib.abstract_variables(model_lib.build_model(wrong.model, saved.skeleton))
  with pytest.raises(CheckpointError, match="does not fit the config's model"):
    checkpoint.check_variables(workdir, expected, saved.variables)


def numpy_variables(net, seed=0):
  """Random {'params', 'batch_stats'} drawn with NumPy (LeCun-normal kernels, zero biases,
  unit BatchNorm statistics): `model.init_variables` compiles ~60 samplers op by op, seconds on
  a loaded 2-core machine, for values no test here depends on."""
  rng = np.random.default_rng(seed)

  def fill(path, a):
    name = path[-1].key
    if name == "kernel":
      return (rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1]))).astype(a.dtype)
    return (np.ones if name in ("var", "scale") else np.zeros)(a.shape, a.dtype)
  return jax.tree_util.tree_map_with_path(fill, model_lib.abstract_variables(net))


def test_predict_iter_compiles_once_per_network_shape_whatever_the_order():
  """Contract (issue 18 e): mixed aspect ratios through predict_iter(batch_size=4) are bucketed
  by network-input shape and partial buckets padded, so the jitted forward compiles at most once
  per distinct shape and each shape takes ceil(n / 4) calls; results are batch_size=1's, in
  input order, unreadable items included; a small reorder buffer flushes early, same results."""
  import collections
  import math

  c = config_for("adjust_network_input", (64, 96))
  c.inference.paf_threshold, c.inference.min_parts, c.inference.min_mean_score = -1.0, 1, 0.0
  variables = numpy_variables(model_lib.build_model(c.model, SK))
  rng = np.random.default_rng(4)
  # Wide, tall and square photos (network inputs 64x128, 160x96 and 96x96), shuffled.
  sizes = [(101, 157)] * 6 + [(157, 101)] * 3 + [(99, 99)] * 2
  images = [rng.integers(0, 255, sizes[i] + (3,), np.uint8) for i in rng.permutation(11)]
  items = list(range(len(images)))
  items.insert(5, "unreadable")

  def load(i):
    if i == "unreadable":
      raise InferenceError("unreadable: not a readable image")
    return images[i]

  # A random network's heatmaps are tiny: a threshold at their 90th percentile finds some
  # "people" (non-trivial results) and keeps decoding fast.
  ref = predictor.Predictor.from_variables(c, variables)
  c.inference.heatmap_threshold = float(np.quantile(ref.maps(images[0])[0][..., :-1], 0.9))
  ref.decode_kwargs["heatmap_threshold"] = c.inference.heatmap_threshold
  one = list(ref.predict_iter(items, load=load))
  assert sum(len(o[1]) for o in one if o[1]) > 20
  shapes = collections.Counter(
      predictor.Predictor(c, None).prepare(im)[0][0].shape[:2] for im in images)
  assert len(shapes) == 3
  p = predictor.Predictor.from_variables(c, variables)
  fwd, calls = p.backend._forward, []
  p.backend._forward = lambda v, x: (calls.append(x.shape[:3]), fwd(v, x))[1]
  for max_buffered in (None, 4):
    calls.clear()
    many = list(p.predict_iter(items, load=load, batch_size=4, workers=2,
                               max_buffered=max_buffered))
    assert fwd._cache_size() <= len(shapes)            # 3, not one per (batch size, shape)
    assert {s[0] for s in calls} == {4}                # partial buckets padded
    if max_buffered is None:
      assert collections.Counter(tuple(s[1:]) for s in calls) == {
          hw: math.ceil(n / 4) for hw, n in shapes.items()}
    assert [o[0] for o in many] == items
    assert [o[2] is None for o in many] == [i != "unreadable" for i in items]
    for a, b in zip(one, many):
      if a[1] is None:
        continue
      assert len(a[1]) == len(b[1])
      for x, y in zip(a[1], b[1]):
        np.testing.assert_allclose(x["keypoints"], y["keypoints"], atol=1e-3)
