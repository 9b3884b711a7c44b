"""DetectNet_v2 targets: rasterizer geometry, worked examples, compositing, encoding, don't-care."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bpnet_jax.detectnet_v2 import targets as T


def _config(classes, radius=0.4, r_min=1.0, d=0.67, center=0.5, **extra):
  """Rasterizer config with per-class radius/r_min (scalars or one per class)."""
  radius = radius if isinstance(radius, (list, tuple)) else [radius] * len(classes)
  r_min = r_min if isinstance(r_min, (list, tuple)) else [r_min] * len(classes)
  cfg = {"deadzone_radius": d, "target_class_config": {
      n: {"cov_center_x": center, "cov_center_y": center, "cov_radius_x": r,
          "cov_radius_y": r, "bbox_min_radius": m} for n, r, m in zip(classes, radius, r_min)}}
  cfg.update(extra)
  return cfg


def _pad(boxes, class_ids, n=6, dontcare=None):
  """Pads to n boxes: (boxes, class_ids, valid, dontcare) numpy arrays."""
  k = len(boxes)
  b = np.zeros((n, 4), np.float32)
  b[:k] = boxes
  c = np.zeros(n, np.int32)
  c[:k] = class_ids
  v = np.zeros(n, bool)
  v[:k] = True
  dc = np.zeros(n, bool)
  if dontcare is not None:
    dc[:k] = dontcare
  return b, c, v, dc


_jit_targets = jax.jit(T.make_targets)
_jit_geometry = jax.jit(T.box_geometry)


def _targets(boxes, class_ids, params, n=6, dontcare=None):
  out = _jit_targets(*_pad(boxes, class_ids, n, dontcare), params)
  return {k: np.asarray(v) for k, v in out.items()}


# --- geometry ------------------------------------------------------------------------------


def test_geometry_unit_case():
  # Box (1, 2, 3, 4) at stride 1, centre 0.5, radius 0.6, r_min 0.5, deadzone 1.0.
  p = T.TargetParams.from_config(_config(["a"], radius=0.6, r_min=0.5, d=1.0), ["a"], (6, 6),
                                 input_shape=(6, 6))
  g = _jit_geometry(np.array([[1, 2, 3, 4]], np.float32), np.zeros(1, np.int32), p)
  np.testing.assert_allclose(g["cov_radius"][0] / g["deadzone_radius"][0], [0.6, 0.6], rtol=1e-6)
  np.testing.assert_allclose(g["inv_area"][0], 0.694444, rtol=1e-5)
  # Mapping to deadzone space: unit scale, translation (-2, -3).
  np.testing.assert_allclose(g["deadzone_radius"][0], [1.0, 1.0])
  np.testing.assert_allclose(-g["center"][0], [-2.0, -3.0])


def test_geometry_small_input_case():
  # Input 15x6 -> output 5x3 (strides 3, 2), classes [car, person] with radius 1.0 / 0.5.
  p = T.TargetParams.from_config(_config(["car", "person"], radius=[1.0, 0.5], r_min=1.0),
                                 ["car", "person"], (3, 5), input_shape=(6, 15))
  boxes = np.array([[7, 6, 8, 9], [2, 3, 4, 5], [0, 0, 3, 4]], np.float32)
  g = jax.tree.map(np.asarray, _jit_geometry(boxes, np.array([1, 0, 0], np.int32), p))
  np.testing.assert_allclose(g["box"][:, 0], [2.3333335, 0.6666667, 0.0], rtol=1e-6)
  np.testing.assert_allclose(g["box"][:, 1], [3.0, 1.5, 0.0], rtol=1e-6)
  np.testing.assert_allclose(g["box"][:, 2], [2.6666667, 1.3333334, 1.0], rtol=1e-6)
  np.testing.assert_allclose(g["box"][:, 3], [4.5, 2.5, 2.0], rtol=1e-6)
  np.testing.assert_allclose(g["cov_radius"] / g["deadzone_radius"], np.ones((3, 2)), rtol=1e-6)
  np.testing.assert_allclose(g["inv_area"], [0.06666667, 0.16666669, 0.125], rtol=1e-6)
  np.testing.assert_allclose(1.0 / g["deadzone_radius"][:, 1], [0.26666668, 0.66666675, 0.5],
                             rtol=1e-6)
  np.testing.assert_allclose(1.0 / g["deadzone_radius"][:, 0], [1.0, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(g["center"], [[2.5, 3.75], [1.0, 2.0], [0.5, 1.0]], rtol=1e-6)


def test_off_centre_uses_nearer_edge_and_min_radius_keeps_aspect():
  p = T.TargetParams.from_config(_config(["a"], radius=0.5, r_min=1.0, center=0.25), ["a"],
                                 (10, 10), input_shape=(10, 10))
  g = jax.tree.map(np.asarray, _jit_geometry(np.array([[0, 0, 8, 2]], np.float32),
                                              np.zeros(1, np.int32), p))
  np.testing.assert_allclose(g["center"][0], [2.0, 0.5])
  # Half extents to the nearer (left/top) edge: 2, 0.5 -> radii 1.0, 0.25 -> y grown to 1.0
  # with x scaled by the same factor 4.
  np.testing.assert_allclose(g["cov_radius"][0], [4.0, 1.0])


# --- worked examples -----------------------------------------------------------------------


KITTI_TABLE = np.array([[0.125, 0.9375, 1.0, 0.5625],
                        [0.1875, 1.0, 1.0, 0.6875],
                        [0.0, 0.1875, 0.25, 0.0625]], np.float32)


def test_kitti_worked_example():
  cfg = T.default_rasterizer_config(["car", "pedestrian"])
  p = T.TargetParams.from_config(cfg, ["car", "pedestrian"], (24, 78))
  assert (p.stride_x, p.stride_y) == (16.0, 16.0)
  box = np.array([[100, 50, 228, 146]], np.float32)
  g = jax.tree.map(np.asarray, _jit_geometry(box, np.zeros(1, np.int32), p))
  np.testing.assert_allclose(g["box"][0], [6.25, 3.125, 14.25, 9.125])
  np.testing.assert_allclose(g["center"][0], [10.25, 6.125])
  np.testing.assert_allclose(g["cov_radius"][0], [1.6, 1.2], rtol=1e-6)
  np.testing.assert_allclose(g["deadzone_radius"][0], [3.208, 2.406], rtol=1e-6)
  np.testing.assert_allclose(g["cov_radius"][0] / g["deadzone_radius"][0], [0.4988, 0.4988],
                             atol=1e-4)
  np.testing.assert_allclose(g["inv_area"][0], 1 / 7.68, rtol=1e-6)

  t = _targets(box, [0], p)
  assert t["cov"].shape == (24, 78, 2) and t["bbox"].shape == (24, 78, 8)
  cov = t["cov"][..., 0]
  np.testing.assert_array_equal(cov[5:8, 8:12], KITTI_TABLE)
  rest = cov.copy()
  rest[5:8, 8:12] = 0
  assert not rest.any() and not t["cov"][..., 1].any()
  assert cov.sum() == 6.0
  np.testing.assert_allclose(t["cov_norm"].sum(), 0.78125, rtol=1e-6)
  np.testing.assert_allclose(t["cov_norm"][6, 10, 0], 0.130208, rtol=1e-5)
  np.testing.assert_allclose(t["bbox"][6, 10, :4], [1.728571, 1.328571, 1.928571, 1.414286],
                             rtol=1e-6)
  # Cells outside the ellipse: zero in every channel; the mask is all ones.
  off = cov == 0
  assert not t["bbox"][off].any() and not t["cov_norm"][off].any()
  assert (t["loss_mask"] == 1).all()
  dec = np.asarray(T.decode_bbox_map(t["bbox"], p))[6, 10, 0]
  np.testing.assert_allclose(dec, box[0], atol=1e-4)


def test_supersampled_quarter_ellipse_raster():
  # 2 images x 2 classes, 3x5 grid, ellipse radii 0.5 with deadzone radius 1 (unit scale),
  # centred (2, 3) for class 1 in image 0 and (3, 2) for class 0 in image 1.
  p = T.TargetParams.from_config(_config(["c0", "c1"], radius=0.5, r_min=0.0, d=1.0),
                                 ["c0", "c1"], (3, 5), input_shape=(3, 5))
  boxes = np.zeros((2, 2, 4), np.float32)
  boxes[0, 0] = [1, 2, 3, 4]
  boxes[1, 0] = [2, 1, 4, 3]
  ids = np.array([[1, 0], [0, 0]], np.int32)
  valid = np.array([[True, False], [True, False]])
  t = jax.jit(T.make_batch_targets)(boxes, ids, valid, np.zeros((2, 2), bool), p)
  want = np.zeros((2, 3, 5, 2), np.float32)
  want[0, 2, 1:3, 1] = 0.1875
  want[1, 1:3, 2:4, 0] = 0.1875
  np.testing.assert_array_equal(np.asarray(t["cov"]), want)


# --- encoding ------------------------------------------------------------------------------


def _roundtrip_params():
  # Output 6 x 5 cells, input 96 x 80 (H x W), scale 35, offset 0.5, radius 1, r_min 1, d 1.
  return T.TargetParams.from_config(_config(["a"], radius=1.0, r_min=1.0, d=1.0), ["a"], (6, 5),
                                    input_shape=(96, 80))


def test_objective_round_trip():
  p = _roundtrip_params()
  label = np.array([[1.1, 21.1, 42.1, 66.666]], np.float32)
  t = _targets(label, [0], p)
  on = t["cov"][..., 0] > 0
  assert on.sum() > 1
  dec = np.asarray(T.decode_bbox_map(t["bbox"], p))[..., 0, :]
  np.testing.assert_allclose(dec[on], np.broadcast_to(label, (on.sum(), 4)), atol=1e-5)


@pytest.mark.parametrize("box,want", [
    ((-10.1, -30, 150, 140), (0, 0, 80, 96)),
    ((-10.1, 30.2, 50, 20.2), (0, 30.2, 50, 30.2)),
    ((30.2, 50, 20.2, 60), (30.2, 50, 30.2, 60)),
])
def test_clipped_decoding(box, want):
  p = _roundtrip_params()
  pts = T.reference_points(p)
  enc = T.encode_boxes(np.array(box, np.float32), pts, p.scale)
  dec = np.asarray(T.decode_boxes(enc, pts, p.scale, clip_size=(80, 96)))
  np.testing.assert_allclose(dec, np.broadcast_to(np.array(want, np.float32), dec.shape),
                             atol=1e-5)


def test_decode_all_ones():
  p = _roundtrip_params()
  dec = np.asarray(T.decode_bbox_map(np.ones((6, 5, 4), np.float32), p))[..., 0, :]
  c = np.arange(5) * 16 + 0.5
  r = np.arange(6) * 16 + 0.5
  x1 = np.clip(c - 35, 0, 80)
  y1 = np.clip(r - 35, 0, 96)
  np.testing.assert_allclose(dec[..., 0], np.broadcast_to(x1, (6, 5)), atol=1e-5)
  np.testing.assert_allclose(dec[..., 1], np.broadcast_to(y1[:, None], (6, 5)), atol=1e-5)
  np.testing.assert_allclose(dec[..., 2], np.broadcast_to(np.clip(c + 35, x1, 80), (6, 5)),
                             atol=1e-5)
  np.testing.assert_allclose(dec[..., 3], np.broadcast_to(np.clip(r + 35, y1, 96)[:, None],
                                                          (6, 5)), atol=1e-5)


def test_encode_decode_exact_inverse():
  rng = np.random.default_rng(0)
  boxes = rng.uniform(-50, 300, (20, 4)).astype(np.float32)
  pts = rng.uniform(0, 250, (20, 2)).astype(np.float32)
  enc = T.encode_boxes(boxes, pts, 35.0)
  np.testing.assert_allclose(np.asarray(T.decode_boxes(enc, pts, 35.0)), boxes, atol=1e-4)


# --- compositing ---------------------------------------------------------------------------


def _reference(boxes, class_ids, params_cfg, classes, out_shape, in_shape):
  """Literal per-cell loop of the original kernel (numpy; boxes all valid, none don't-care)."""
  p = T.TargetParams.from_config(params_cfg, classes, out_shape, input_shape=in_shape)
  g = jax.tree.map(np.asarray, _jit_geometry(boxes, class_ids, p))
  h, w = out_shape
  nc = len(classes)
  cov = np.zeros((h, w, nc), np.float32)
  norm = np.zeros((h, w, nc), np.float32)
  bbox = np.zeros((h, w, nc, 4), np.float32)
  pts = np.asarray(T.reference_points(p))
  s = (np.arange(4, dtype=np.float32) + 0.5) / 4
  for k in np.argsort(g["box"][:, 3], kind="stable"):
    c = class_ids[k]
    cx, cy = g["center"][k]
    for r in range(h):
      for col in range(w):
        ys, xs = np.meshgrid(r + s, col + s, indexing="ij")

        def frac(rad):
          return np.mean(((xs - cx) / rad[0]) ** 2 + ((ys - cy) / rad[1]) ** 2 < 1)

        a, f = frac(g["deadzone_radius"][k]), frac(g["cov_radius"][k])
        if a > 0 and a >= cov[r, col, c]:
          cov[r, col, c] = norm[r, col, c] = 0
          bbox[r, col, c] = 0
        if f > 0 and f >= cov[r, col, c]:
          cov[r, col, c] = f
          norm[r, col, c] = f * g["inv_area"][k]
          px, py = pts[r, col]
          bx = boxes[k]
          bbox[r, col, c] = [px - bx[0], py - bx[1], bx[2] - px, bx[3] - py]
          bbox[r, col, c] /= 35.0
  return cov, norm, bbox.reshape(h, w, 4 * nc)


def test_compositing_matches_literal_kernel():
  rng = np.random.default_rng(3)
  classes = ["a", "b"]
  cfg = _config(classes, radius=[0.6, 0.9], r_min=[0.5, 1.0], d=0.67)
  xy = rng.uniform(0, 90, (7, 2))
  wh = rng.uniform(8, 60, (7, 2))
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  ids = rng.integers(0, 2, 7).astype(np.int32)
  p = T.TargetParams.from_config(cfg, classes, (6, 8), input_shape=(96, 128))
  t = _targets(boxes, ids, p, n=9)
  cov, norm, bbox = _reference(boxes, ids, cfg, classes, (6, 8), (96, 128))
  np.testing.assert_array_equal(t["cov"], cov)
  np.testing.assert_allclose(t["cov_norm"], norm, rtol=1e-6)
  np.testing.assert_allclose(t["bbox"], bbox, rtol=1e-5, atol=1e-6)
  # Input order does not matter: drawing follows y2.
  perm = rng.permutation(7)
  t2 = _targets(boxes[perm], ids[perm], p, n=9)
  np.testing.assert_array_equal(t2["cov"], t["cov"])


def test_nearer_box_deadzone_erases_farther_box():
  # Both class 0; the lower box (larger y2) is drawn last; its deadzone clears the upper box's
  # cells around it (they become background, not ignored).
  p = T.TargetParams.from_config(_config(["a"], radius=0.4, r_min=0.0, d=1.0), ["a"], (10, 10),
                                 input_shape=(10, 10))
  far = [2, 1, 8, 5]      # centre (5, 3)
  near = [2, 2, 8, 8]     # centre (5, 5), deadzone radius 3 reaches row 2
  t_far = _targets([far], [0], p)
  t = _targets([near, far], [0, 0], p)
  t_near = _targets([near], [0], p)
  np.testing.assert_array_equal(t["cov"], t_near["cov"])
  assert t_far["cov"][2, 5, 0] > 0 and t["cov"][2, 5, 0] == 0.0
  assert (t["loss_mask"] == 1).all()
  # Another class is independent.
  t_two = _targets([near, far], [0, 1], T.TargetParams.from_config(
      _config(["a", "b"], radius=0.4, r_min=0.0, d=1.0), ["a", "b"], (10, 10),
      input_shape=(10, 10)))
  np.testing.assert_array_equal(t_two["cov"][..., 1], t_far["cov"][..., 0])


def test_padding_invalid_and_empty_boxes_draw_nothing():
  p = T.TargetParams.from_config(_config(["a"]), ["a"], (4, 4))
  b, c, v, dc = _pad([[10, 10, 40, 40], [5, 5, 5, 20], [0, 0, 30, 30]], [0, 0, 3])
  v[0] = False
  t = _jit_targets(b, c, v, dc, p)
  assert not np.asarray(t["cov"]).any() and not np.asarray(t["bbox"]).any()


# --- don't-care ----------------------------------------------------------------------------


def test_dontcare_off_by_default_is_background():
  p = T.TargetParams.from_config(T.default_rasterizer_config(["a"]), ["a"], (4, 4))
  t = _targets([[0, 0, 32, 32]], [-1], p, dontcare=[True])
  assert not t["cov"].any() and (t["loss_mask"] == 1).all()


def test_dontcare_mask():
  cfg = _config(["a", "b"], dontcare_mask=True)
  p = T.TargetParams.from_config(cfg, ["a", "b"], (4, 6), input_shape=(4, 6))
  # Class-agnostic don't-care (id -1) over x [0.5, 2.0), y [1, 2): cells (1, 0) and (1, 1);
  # class-1 don't-care over cell (3, 5) only; a class-0 object overlapping the first region.
  boxes = [[0.5, 1.0, 2.0, 2.0], [5.0, 3.0, 6.0, 4.0], [1.0, 0.0, 3.0, 3.0]]
  t = _targets(boxes, [-1, 1, 0], p, dontcare=[True, True, False])
  want = np.ones((4, 6, 2), np.float32)
  want[1, 0:2, 1] = 0
  want[1, 0, 0] = 0           # cell (1, 1) keeps mask 1 for class 0: it has coverage there
  want[3, 5, 1] = 0
  assert t["cov"][1, 1, 0] > 0 and t["cov"][1, 0, 0] == 0
  np.testing.assert_array_equal(t["loss_mask"], want)
  # Don't-care boxes are never drawn: coverage equals the object's alone.
  alone = _targets([boxes[2]], [0], p)
  np.testing.assert_array_equal(t["cov"], alone["cov"])
  # Without preserving ground truth the object's cell is masked too.
  p2 = T.TargetParams.from_config(dict(cfg, dontcare_preserve_ground_truth=False), ["a", "b"],
                                  (4, 6), input_shape=(4, 6))
  assert _targets(boxes, [-1, 1, 0], p2, dontcare=[True, True, False])["loss_mask"][1, 1, 0] == 0


# --- config and batching -------------------------------------------------------------------


def test_default_config_and_validation():
  cfg = T.default_rasterizer_config(["car", "pedestrian"])
  assert cfg["deadzone_radius"] == 0.67
  assert cfg["target_class_config"]["car"] == {
      "cov_center_x": 0.5, "cov_center_y": 0.5, "cov_radius_x": 0.4, "cov_radius_y": 0.4,
      "bbox_min_radius": 1.0}
  p = T.TargetParams.from_config(cfg, ["pedestrian", "car"], (24, 78))
  assert p.class_names == ("pedestrian", "car") and p.num_classes == 2
  assert p.input_shape == (384, 1248) and (p.scale, p.offset) == (35.0, 0.5)
  with pytest.raises(ValueError, match="cyclist"):
    T.TargetParams.from_config(cfg, ["cyclist"], (24, 78))
  bad = T.default_rasterizer_config(["car"])
  bad["target_class_config"]["car"]["cov_radius_x"] = 1.5
  with pytest.raises(ValueError, match="cov_radius_x"):
    T.TargetParams.from_config(bad, ["car"], (24, 78))
  with pytest.raises(ValueError, match="deadzone"):
    T.TargetParams.from_config(dict(cfg, deadzone_radius=-0.1), ["car"], (24, 78))


def test_jit_vmap_shapes():
  p = T.TargetParams.from_config(T.default_rasterizer_config(["a", "b", "c"]), ["a", "b", "c"],
                                 (4, 5))
  b = np.random.default_rng(0).uniform(0, 60, (3, 8, 4)).astype(np.float32)
  b[..., 2:] += b[..., :2]
  t = jax.jit(T.make_batch_targets)(b, np.zeros((3, 8), np.int32), np.ones((3, 8), bool),
                                    np.zeros((3, 8), bool), p)
  assert t["cov"].shape == (3, 4, 5, 3) and t["bbox"].shape == (3, 4, 5, 12)
  assert t["cov_norm"].shape == t["loss_mask"].shape == (3, 4, 5, 3)
  single = _jit_targets(b[1], np.zeros(8, np.int32), np.ones(8, bool), np.zeros(8, bool), p)
  np.testing.assert_array_equal(np.asarray(t["cov"][1]), np.asarray(single["cov"]))
