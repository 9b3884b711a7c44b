"""DetectNet_v2 cost function: hand-computed BCE/L1, weights, masking, auto-weighting."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpnet_jax.detectnet_v2 import losses as L


def _cat_dog_config(enable=True):
  return {
      "target_classes": [
          {"name": "cat", "class_weight": 1.0, "coverage_foreground_weight": 0.9,
           "objectives": [{"name": "cov", "initial_weight": 4.0, "weight_target": 2.0},
                          {"name": "bbox", "initial_weight": 1.0, "weight_target": 1.0}]},
          {"name": "dog", "class_weight": 3.0, "coverage_foreground_weight": 0.5,
           "objectives": [{"name": "cov", "initial_weight": 1.0, "weight_target": 1.0},
                          {"name": "bbox", "initial_weight": 3.0, "weight_target": 3.0}]},
      ],
      "enable_autoweighting": enable,
      "min_objective_weight": 0.0001,
      "max_objective_weight": 0.9999,
  }


def _targets(cov, bbox, cov_norm, mask=None):
  cov = np.asarray(cov, np.float32)
  return {"cov": cov, "bbox": np.asarray(bbox, np.float32),
          "cov_norm": np.asarray(cov_norm, np.float32),
          "loss_mask": np.ones_like(cov) if mask is None else np.asarray(mask, np.float32)}


_loss = jax.jit(L.detection_loss)


def _one_class_weights(w_fg=0.05):
  return {"class_weights": np.ones(1, np.float32), "foreground_weights": np.full(1, w_fg),
          "objective_weights": np.ones((1, 2), np.float32)}


def test_coverage_bce_by_hand():
  # One image, 1 x 4 cells, one class: targets 1, 0, 0.5 (background: not > 0.5), 0.75.
  t = np.array([1.0, 0.0, 0.5, 0.75], np.float32).reshape(1, 1, 4, 1)
  p = np.array([0.8, 0.3, 0.6, 0.9], np.float32).reshape(1, 1, 4, 1)
  z = np.zeros((1, 1, 4, 4), np.float32)
  _, terms = _loss(p, z, _targets(t, z, np.zeros_like(t)), _one_class_weights())
  e = 1e-5
  bce = [-math.log(0.8 + e),
         -math.log(1 - 0.3 + e),
         -(0.5 * math.log(0.6 + e) + 0.5 * math.log(0.4 + e)),
         -(0.75 * math.log(0.9 + e) + 0.25 * math.log(0.1 + e))]
  w = [0.05, 0.95, 0.95, 0.05]   # foreground cells get the small weight
  want = sum(a * b for a, b in zip(w, bce)) / 4
  np.testing.assert_allclose(terms["cov_cost"], [want], rtol=1e-6)
  assert float(terms["bbox_cost"][0]) == 0.0


def test_foreground_weight_applies_to_foreground():
  t = np.array([1.0, 0.0], np.float32).reshape(1, 1, 2, 1)
  p = np.array([0.5, 0.5], np.float32).reshape(1, 1, 2, 1)
  z = np.zeros((1, 1, 2, 4), np.float32)
  costs = []
  for w_fg in (0.05, 0.5):
    _, terms = _loss(p, z, _targets(t, z, np.zeros_like(t)), _one_class_weights(w_fg))
    costs.append(float(terms["cov_cost"][0]))
  b = -math.log(0.5 + 1e-5)
  np.testing.assert_allclose(costs, [(0.05 * b + 0.95 * b) / 2, b / 2], rtol=1e-6)


def test_bbox_l1_by_hand():
  # 1 x 2 cells, one class; cov_norm weights the L1; mean over B * 4 * H * W = 8 elements.
  t = np.zeros((1, 1, 2, 1), np.float32)
  bbox_t = np.array([[1, 2, 3, 4], [0, 0, 0, 0]], np.float32).reshape(1, 1, 2, 4)
  bbox_p = np.array([[1.5, 2, 2, 4], [9, 9, 9, 9]], np.float32).reshape(1, 1, 2, 4)
  norm = np.array([0.2, 0.0], np.float32).reshape(1, 1, 2, 1)
  _, terms = _loss(np.zeros_like(t), bbox_p, _targets(t, bbox_t, norm),
                              _one_class_weights())
  np.testing.assert_allclose(terms["bbox_cost"], [0.2 * 1.5 / 8], rtol=1e-6)


def test_class_and_objective_weights():
  cfg = _cat_dog_config()
  w = L.make_loss_weights(cfg)
  np.testing.assert_allclose(w["class_weights"], [0.25, 0.75])
  np.testing.assert_allclose(w["objective_weights"], [[0.8, 0.2], [0.25, 0.75]])
  np.testing.assert_allclose(w["foreground_weights"], [0.9, 0.5])
  # Reordering by name.
  w2 = L.make_loss_weights(cfg, ["dog", "cat"])
  np.testing.assert_allclose(w2["class_weights"], [0.75, 0.25])
  # Shipped defaults: cov 1/11, bbox 10/11.
  w3 = L.make_loss_weights(L.default_cost_function_config())
  np.testing.assert_allclose(w3["objective_weights"], [[1 / 11, 10 / 11]] * 2, rtol=1e-6)
  np.testing.assert_allclose(w3["foreground_weights"], [0.05, 0.05])


def test_total_is_weighted_sum():
  rng = np.random.default_rng(0)
  b, h, w, c = 2, 3, 4, 2
  t = (rng.uniform(size=(b, h, w, c)) > 0.6).astype(np.float32)
  p = rng.uniform(0.01, 0.99, (b, h, w, c)).astype(np.float32)
  bt = rng.normal(size=(b, h, w, 4 * c)).astype(np.float32)
  bp = rng.normal(size=(b, h, w, 4 * c)).astype(np.float32)
  norm = t * 0.1
  mask = (rng.uniform(size=(b, h, w, c)) > 0.2).astype(np.float32)
  weights = L.make_loss_weights(_cat_dog_config())
  total, terms = _loss(p, bp, _targets(t, bt, norm, mask), weights)
  # Independent numpy reference.
  fg = np.array([0.9, 0.5])
  wt = np.where(t > 0.5, fg, 1 - fg)
  bce = -(t * np.log(p + 1e-5) + (1 - t) * np.log(1 - p + 1e-5))
  cov = (mask * wt * bce).sum((0, 1, 2)) / (b * h * w)
  l1 = np.abs(bp - bt).reshape(b, h, w, c, 4) * (mask * norm)[..., None]
  box = l1.sum((0, 1, 2, 4)) / (b * h * w * 4)
  want = 0.25 * (0.8 * cov[0] + 0.2 * box[0]) + 0.75 * (0.25 * cov[1] + 0.75 * box[1])
  np.testing.assert_allclose(terms["objective_costs"], np.stack([cov, box], -1), rtol=1e-5)
  np.testing.assert_allclose(total, want, rtol=1e-5)
  np.testing.assert_allclose(terms["task_cost"], total)
  # Source weights scale whole frames.
  tg = dict(_targets(t, bt, norm, mask), source_weight=np.array([0.0, 2.0], np.float32))
  _, terms2 = _loss(p, bp, tg, weights)
  only1 = _targets(t, bt, norm, mask * np.array([0.0, 2.0]).reshape(2, 1, 1, 1))
  _, terms3 = _loss(p, bp, only1, weights)
  np.testing.assert_allclose(terms2["objective_costs"], terms3["objective_costs"], rtol=1e-6)


def test_masked_cell_contributes_exactly_zero():
  rng = np.random.default_rng(1)
  t = (rng.uniform(size=(1, 3, 3, 2)) > 0.5).astype(np.float32)
  p = rng.uniform(0.1, 0.9, t.shape).astype(np.float32)
  bt = rng.normal(size=(1, 3, 3, 8)).astype(np.float32)
  bp = rng.normal(size=(1, 3, 3, 8)).astype(np.float32)
  mask = np.ones_like(t)
  mask[0, 1, 1, :] = 0.0
  targets = _targets(t, bt, np.full_like(t, 0.3), mask)
  weights = L.make_loss_weights(_cat_dog_config())
  base, _ = _loss(p, bp, targets, weights)
  p2, bp2 = p.copy(), bp.copy()
  p2[0, 1, 1, :] = [0.0, 1.0]      # extreme values: 1e-5 keeps the logs finite
  bp2[0, 1, 1, :] = 1e6
  other, _ = _loss(p2, bp2, targets, weights)
  assert float(other) == float(base)
  g_cov, g_box = jax.jit(jax.grad(lambda a, b: L.detection_loss(a, b, targets, weights)[0],
                                  argnums=(0, 1)))(p, bp)
  assert not np.asarray(g_cov)[0, 1, 1].any() and not np.asarray(g_box)[0, 1, 1].any()
  assert np.asarray(g_cov).any() and np.asarray(g_box).any()


def test_bf16_predictions_cost_in_float32():
  t = np.ones((1, 1, 1, 1), np.float32)
  z = np.zeros((1, 1, 1, 4), np.float32)
  _, terms = _loss(jnp.full((1, 1, 1, 1), 0.25, jnp.bfloat16), z.astype(jnp.bfloat16),
                   _targets(t, z, np.zeros_like(t)), _one_class_weights())
  assert terms["cov_cost"].dtype == jnp.float32
  np.testing.assert_allclose(terms["cov_cost"], [-0.05 * math.log(0.25 + 1e-5)], rtol=1e-6)


# --- auto-weighting ------------------------------------------------------------------------


def test_update_auto_weights_hand_example():
  s = L.init_auto_weight_state(L.default_cost_function_config(["car"]))
  np.testing.assert_allclose(s.objective_weights, [[1 / 11, 10 / 11]], rtol=1e-6)
  assert len(jax.tree.leaves(s)) == 2
  # targets (1, 10), accumulated costs (2, 0.5): u = (0.5, 20), w = u / 20.5.
  s1 = jax.jit(L.update_auto_weights)(s, np.array([[2.0, 0.5]], np.float32))
  np.testing.assert_allclose(s1.objective_weights, [[0.5 / 20.5, 20 / 20.5]], rtol=1e-6)
  assert not np.asarray(s1.accumulator).any()
  # Clipped, not renormalised.
  s2 = L.update_auto_weights(s, np.array([[1e3, 1e-3]], np.float32))
  np.testing.assert_allclose(s2.objective_weights, [[0.0001, 0.9999]], rtol=1e-6)
  # A zero accumulator gives u = 0 for that objective.
  s3 = L.update_auto_weights(s, np.array([[0.0, 2.0]], np.float32))
  np.testing.assert_allclose(s3.objective_weights, [[0.0001, 0.9999]], rtol=1e-6)
  # All zero: the old weights stay.
  s4 = L.update_auto_weights(s1, np.zeros((1, 2), np.float32))
  np.testing.assert_array_equal(s4.objective_weights, s1.objective_weights)


def test_autoweighting_disabled_keeps_initial_weights():
  s = L.init_auto_weight_state(_cat_dog_config(enable=False))
  s = L.accumulate_costs(s, np.ones((2, 2), np.float32))
  s1 = L.update_auto_weights(s, s.accumulator)
  np.testing.assert_allclose(s1.objective_weights, [[0.8, 0.2], [0.25, 0.75]])
  assert not np.asarray(s1.accumulator).any()


def _numpy_costs(p, bp, t, bt, norm, fg):
  b, h, w, c = t.shape
  wt = np.where(t > 0.5, fg, 1 - fg)
  bce = -(t * np.log(p + 1e-5) + (1 - t) * np.log(1 - p + 1e-5))
  cov = (wt * bce).sum((0, 1, 2)) / (b * h * w)
  l1 = np.abs(bp - bt).reshape(b, h, w, c, 4) * norm[..., None]
  return np.stack([cov, l1.sum((0, 1, 2, 4)) / (b * h * w * 4)], -1)


def test_autoweighting_over_epochs():
  # 5 epochs x 2 steps, 4 x 4 grid, targets 1 on the central 2 x 2, predictions moving
  # linearly towards them; cat/dog config. Reference: the formulas in numpy.
  cfg = _cat_dog_config()
  state = L.init_auto_weight_state(cfg)
  weights = L.make_loss_weights(cfg)
  t = np.zeros((1, 4, 4, 2), np.float32)
  t[:, 1:3, 1:3, :] = 1.0
  bt = np.repeat(t, 4, axis=-1) * 2.0
  norm = t * 0.25
  targets = _targets(t, bt, norm)
  fg = np.array([0.9, 0.5])
  tw = np.array([[2.0, 1.0], [1.0, 3.0]])

  @jax.jit
  def step(state, p, bp, k):
    w = dict(weights, objective_weights=state.objective_weights)
    total, terms = L.detection_loss(p, bp, targets, w)
    return L.auto_weight_step(state, terms["objective_costs"], k, 2), total

  ref_w = np.array([[0.8, 0.2], [0.25, 0.75]])
  acc = np.zeros((2, 2))
  steps = 10
  for k in range(steps):
    a = (k + 1) / (steps + 1)
    p = (0.5 + a * (t - 0.5)).astype(np.float32)
    bp = (a * bt).astype(np.float32)
    state, total = step(state, p, bp, k)
    costs = _numpy_costs(p, bp, t, bt, norm, fg)
    want_total = (np.array([0.25, 0.75])[:, None] * ref_w * costs).sum()
    np.testing.assert_allclose(total, want_total, rtol=1e-5)
    acc += costs
    if (k + 1) % 2 == 0:
      u = tw / acc
      ref_w = np.clip(u / u.sum(1, keepdims=True), 0.0001, 0.9999)
      acc[:] = 0
    np.testing.assert_allclose(state.objective_weights, ref_w, rtol=1e-5)
    np.testing.assert_allclose(state.accumulator, acc, rtol=1e-5)


def test_state_restores_from_leaves():
  # A checkpoint holds only the two arrays; restoring into a state built from the config
  # resumes exactly (including a mid-epoch accumulator).
  cfg = _cat_dog_config()
  s = L.auto_weight_step(L.init_auto_weight_state(cfg), np.full((2, 2), 0.5, np.float32), 0, 3)
  leaves = [np.asarray(x) for x in jax.tree.leaves(s)]
  fresh = L.init_auto_weight_state(cfg)
  restored = jax.tree.unflatten(jax.tree.structure(fresh), leaves)
  a = L.update_auto_weights(restored, restored.accumulator)
  b = L.update_auto_weights(s, s.accumulator)
  np.testing.assert_array_equal(a.objective_weights, b.objective_weights)
  np.testing.assert_allclose(s.accumulator, np.full((2, 2), 0.5))


# --- config and regularisation -------------------------------------------------------------


def test_config_validation():
  cfg = _cat_dog_config()
  with pytest.raises(ValueError, match="bird"):
    L.make_loss_weights(cfg, ["bird"])
  bad = _cat_dog_config()
  bad["target_classes"][0]["coverage_foreground_weight"] = 1.0
  with pytest.raises(ValueError, match="coverage_foreground_weight"):
    L.make_loss_weights(bad)
  bad = _cat_dog_config()
  bad["target_classes"][1]["objectives"][0]["name"] = "depth"
  with pytest.raises(ValueError, match="depth"):
    L.init_auto_weight_state(bad)
  d = L.default_cost_function_config()
  assert [c["name"] for c in d["target_classes"]] == ["car", "pedestrian"]
  assert d["enable_autoweighting"] and d["min_objective_weight"] == 0.0001


def test_regularization_from_config():
  params = {"conv": {"kernel": np.array([[1.0, -2.0]], np.float32),
                     "bias": np.array([0.5], np.float32)},
            "bn": {"scale": np.array([3.0], np.float32), "bias": np.array([4.0], np.float32)}}
  np.testing.assert_allclose(L.regularization_from_config(params, {"type": "L1", "weight": 0.1}),
                             0.1 * 3.5, rtol=1e-6)
  np.testing.assert_allclose(L.regularization_from_config(params, {"type": "L2", "weight": 0.1}),
                             0.1 * 5.25, rtol=1e-6)
  assert float(L.regularization_from_config(params, {"type": "NO_REG", "weight": 0.1})) == 0.0
  assert L.default_regularizer_config() == {"type": "L1", "weight": 3e-9}
  with pytest.raises(ValueError):
    L.regularization_from_config(params, {"type": "L3", "weight": 0.1})
