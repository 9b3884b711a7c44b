"""DetectNet_v2 cost function: weighted coverage BCE + cov_norm-weighted box L1, auto-weighted.

Shapes (B images, H x W output cells, C target classes in cost-function class order)
  cov_pred (B, H, W, C): sigmoid OUTPUT of the coverage head (probabilities, not logits).
  bbox_pred (B, H, W, 4C): box head, channel 4c + k = class c, coordinate k (L, T, R, B), in
    the target encoding (input px / scale).
  targets: batched `targets.make_targets` output {"cov", "bbox", "cov_norm", "loss_mask"} with
    the same shapes, plus optional "source_weight" (B,) (the data source's loss multiplier).

Per class c (w_fg = coverage_foreground_weight; m = loss_mask x source_weight):
  cov_cost_c  = mean over (B, H, W) of m w BCE(t, p), BCE = -(t log(p + 1e-5) +
                (1 - t) log(1 - p + 1e-5)), w = w_fg where t > 0.5 else 1 - w_fg (so with the
                shipped 0.05 foreground cells weigh 0.05 and background cells 0.95);
  bbox_cost_c = mean over (B, 4, H, W) of m cov_norm |pred - target|.
Task cost = sum_c W_c sum_o w_{c,o} cost_{c,o}, W_c = class_weight_c / sum class weights
(constant), w_{c,o} the objective weights (o = 0 cov, 1 bbox), initially initial_weight normalised
per class, then updated once per epoch by `update_auto_weights`. The means divide by the full
element count, masked cells included. Weight regularisation is added by the caller
(`regularization_from_config`); the validation cost is the task cost alone.

Auto-weighting state (`AutoWeightState`, a pytree of two (C, 2) float32 arrays, configuration
static): each training step adds the un-weighted per-batch costs (`terms["objective_costs"]`) to
the accumulator; at the end of every epoch, per class, u_o = weight_target_o / acc_o (0 where
acc_o = 0), w_o = clip(u_o / sum_o u_o, min_objective_weight, max_objective_weight), no
renormalisation after the clip; if sum_o u_o = 0 the old weights stay; the accumulator resets.
Disabled: the weights stay at their normalised initial values.

Differences from the original
  - Kept: BCE on the sigmoid output with +1e-5 inside the logs, always computed in float32
    (predictions are cast up, so bf16 compute does not change the cost).
  - Fixed: the epoch boundary is decided from the global step (`auto_weight_step`), so a resumed
    run updates at the same steps as an uninterrupted one (the original counted steps since
    process start); the clip-without-renormalisation rule is kept. The accumulator is in the
    state, so a mid-epoch checkpoint resumes exactly.
  - The accumulator sums costs of the global batch (one device program), which equals the
    original's all-reduced sum up to a constant factor that cancels in the normalisation.
  - A class may omit an objective (its weight and target are then 0); unknown objective names
    are rejected.
  - The GIoU bbox variant (unreachable from the original's spec) is not ported.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from bpnet_jax.losses import regularization

OBJECTIVES = ("cov", "bbox")   # objective axis order of every (C, 2) array here
BCE_EPSILON = 1e-5
REGULARIZER_TYPES = {"NO_REG": "none", "L1": "l1", "L2": "l2"}


def default_cost_function_config(class_names: Sequence[str] = ("car", "pedestrian")) -> dict:
  """The shipped KITTI `cost_function_config` (class order = output channel order)."""
  return {
      "target_classes": [
          {"name": name,
           "class_weight": 1.0,                 # > 0; normalised over the classes
           "coverage_foreground_weight": 0.05,  # in (0, 1); background cells get 1 - it
           "objectives": [
               {"name": "cov", "initial_weight": 1.0, "weight_target": 1.0},
               {"name": "bbox", "initial_weight": 10.0, "weight_target": 10.0},
           ]}
          for name in class_names],
      "enable_autoweighting": True,
      "min_objective_weight": 0.0001,
      "max_objective_weight": 0.9999,
  }


def default_regularizer_config() -> dict:
  """The shipped `training_config.regularizer`: type NO_REG | L1 | L2, weight."""
  return {"type": "L1", "weight": 3e-9}


def _class_entries(cost_function_config: Mapping, class_names):
  entries = list(cost_function_config["target_classes"])
  if not entries:
    raise ValueError("cost_function_config.target_classes is empty")
  by_name = {str(e["name"]): e for e in entries}
  if len(by_name) != len(entries):
    raise ValueError("cost_function_config.target_classes has duplicate names")
  if class_names is None:
    return entries
  missing = [n for n in class_names if n not in by_name]
  if missing:
    raise ValueError(f"cost_function_config has no target class {missing}")
  return [by_name[n] for n in class_names]


def _objective_table(entries, key: str):
  """(C, 2) float32 of objectives[key] (0 for an objective a class omits)."""
  rows = []
  for e in entries:
    row = [0.0, 0.0]
    for o in e.get("objectives", ()):
      if o["name"] not in OBJECTIVES:
        raise ValueError(f"class {e['name']!r}: unknown objective {o['name']!r} "
                         f"(expected one of {OBJECTIVES})")
      v = float(o[key])
      if v < 0:
        raise ValueError(f"class {e['name']!r}, objective {o['name']!r}: {key} must be >= 0")
      row[OBJECTIVES.index(o["name"])] = v
    rows.append(row)
  return jnp.asarray(rows, jnp.float32)


def initial_objective_weights(cost_function_config: Mapping,
                              class_names: Sequence[str] | None = None) -> jax.Array:
  """(C, 2) initial_weight normalised per class over its objectives."""
  w = _objective_table(_class_entries(cost_function_config, class_names), "initial_weight")
  s = w.sum(axis=1, keepdims=True)
  if bool(jnp.any(s <= 0)):
    raise ValueError("every target class needs an objective with initial_weight > 0")
  return w / s


def make_loss_weights(cost_function_config: Mapping, class_names: Sequence[str] | None = None,
                      objective_weights=None) -> dict:
  """The `weights` pytree of `detection_loss`.

  Returns {"class_weights": (C,) normalised to sum 1, "foreground_weights": (C,) w_fg,
  "objective_weights": (C, 2)} (the given objective_weights, e.g. an AutoWeightState's, or the
  normalised initial ones). class_names: reorder/subset the config's classes; default its order.
  """
  entries = _class_entries(cost_function_config, class_names)
  cw, fg = [], []
  for e in entries:
    c, f = float(e["class_weight"]), float(e["coverage_foreground_weight"])
    if c <= 0:
      raise ValueError(f"class {e['name']!r}: class_weight must be > 0, got {c}")
    if not 0.0 < f < 1.0:
      raise ValueError(f"class {e['name']!r}: coverage_foreground_weight must be in (0, 1), "
                       f"got {f}")
    cw.append(c)
    fg.append(f)
  cw = jnp.asarray(cw, jnp.float32)
  if objective_weights is None:
    objective_weights = initial_objective_weights(cost_function_config, class_names)
  return {"class_weights": cw / cw.sum(), "foreground_weights": jnp.asarray(fg, jnp.float32),
          "objective_weights": jnp.asarray(objective_weights, jnp.float32)}


# ------------------------------------------------------------------------------------------
# Costs


def coverage_bce(cov_pred, cov_target) -> jax.Array:
  """Elementwise BCE on probabilities with the original's +1e-5 inside the logs; float32."""
  p = jnp.asarray(cov_pred).astype(jnp.float32)
  t = jnp.asarray(cov_target).astype(jnp.float32)
  return -(t * jnp.log(p + BCE_EPSILON) + (1.0 - t) * jnp.log(1.0 - p + BCE_EPSILON))


def objective_costs(cov_pred, bbox_pred, targets: Mapping, foreground_weights) -> jax.Array:
  """(C, 2) un-weighted per-class costs [cov, bbox] of a batch (formulas in the module doc)."""
  t_cov = targets["cov"].astype(jnp.float32)
  mask = targets["loss_mask"].astype(jnp.float32)
  if "source_weight" in targets:
    mask = mask * jnp.asarray(targets["source_weight"], jnp.float32)[:, None, None, None]
  b, h, w, c = t_cov.shape
  fg = jnp.asarray(foreground_weights, jnp.float32)
  wt = jnp.where(t_cov > 0.5, fg, 1.0 - fg)
  cov_cost = jnp.sum(mask * wt * coverage_bce(cov_pred, t_cov), axis=(0, 1, 2)) / (b * h * w)

  shape4 = (b, h, w, c, 4)
  diff = jnp.abs(bbox_pred.astype(jnp.float32).reshape(shape4)
                 - targets["bbox"].astype(jnp.float32).reshape(shape4))
  scale = mask * targets["cov_norm"].astype(jnp.float32)
  bbox_cost = jnp.sum(scale[..., None] * diff, axis=(0, 1, 2, 4)) / (b * h * w * 4)
  return jnp.stack([cov_cost, bbox_cost], axis=-1)


def detection_loss(cov_pred, bbox_pred, targets: Mapping, weights: Mapping):
  """Weighted task cost of a batch (no regularisation).

  cov_pred (B, H, W, C) probabilities; bbox_pred (B, H, W, 4C); targets as the module doc;
  weights from `make_loss_weights` (objective_weights usually an AutoWeightState's).
  Returns (total, terms): terms = {"cov_cost": (C,), "bbox_cost": (C,), "objective_costs":
  (C, 2) un-weighted (feed these to the auto-weighting), "weighted_costs": (C, 2)
  W_c w_{c,o} cost_{c,o}, "task_cost": () = total}.
  """
  costs = objective_costs(cov_pred, bbox_pred, targets, weights["foreground_weights"])
  weighted = (jnp.asarray(weights["class_weights"], jnp.float32)[:, None]
              * jnp.asarray(weights["objective_weights"], jnp.float32) * costs)
  total = jnp.sum(weighted)
  terms = {"cov_cost": costs[:, 0], "bbox_cost": costs[:, 1], "objective_costs": costs,
           "weighted_costs": weighted, "task_cost": total}
  return total, terms


def regularization_from_config(params, regularizer_config: Mapping) -> jax.Array:
  """`regularizer {type, weight}` on conv kernels AND biases (never BatchNorm), heads included.

  L1 = weight sum|w|, L2 = weight sum w^2 (Keras, no 1/2), NO_REG = 0. Delegates to
  `bpnet_jax.losses.regularization`, whose conv-only walk and factors fit: the same weight is
  passed for kernels and biases.
  """
  kind = str(regularizer_config.get("type", "NO_REG")).upper()
  if kind not in REGULARIZER_TYPES:
    raise ValueError(f"regularizer.type must be one of {sorted(REGULARIZER_TYPES)}, got {kind!r}")
  w = float(regularizer_config.get("weight", 0.0))
  if w < 0:
    raise ValueError(f"regularizer.weight must be >= 0, got {w}")
  return regularization(params, REGULARIZER_TYPES[kind], w, w)


# ------------------------------------------------------------------------------------------
# Auto-weighting


@flax.struct.dataclass
class AutoWeightState:
  """Objective weights and the epoch's cost accumulator; checkpoint it with the train state.

  objective_weights (C, 2) and accumulator (C, 2) float32 are the pytree leaves; the
  configuration (weight_target, bounds, enabled) is static, taken from the config on restore.
  """
  objective_weights: jax.Array
  accumulator: jax.Array
  weight_target: tuple = flax.struct.field(pytree_node=False, default=())
  min_objective_weight: float = flax.struct.field(pytree_node=False, default=0.0001)
  max_objective_weight: float = flax.struct.field(pytree_node=False, default=0.9999)
  enabled: bool = flax.struct.field(pytree_node=False, default=True)


def init_auto_weight_state(cost_function_config: Mapping,
                           class_names: Sequence[str] | None = None) -> AutoWeightState:
  """State at step 0: normalised initial weights, zero accumulator."""
  w = initial_objective_weights(cost_function_config, class_names)
  target = _objective_table(_class_entries(cost_function_config, class_names), "weight_target")
  lo = float(cost_function_config.get("min_objective_weight", 0.0001))
  hi = float(cost_function_config.get("max_objective_weight", 0.9999))
  if not 0.0 <= lo <= hi:
    raise ValueError(f"need 0 <= min_objective_weight <= max_objective_weight, got {lo}, {hi}")
  return AutoWeightState(
      objective_weights=w, accumulator=jnp.zeros_like(w),
      weight_target=tuple(tuple(float(v) for v in row) for row in target.tolist()),
      min_objective_weight=lo, max_objective_weight=hi,
      enabled=bool(cost_function_config.get("enable_autoweighting", True)))


def accumulate_costs(state: AutoWeightState, objective_costs) -> AutoWeightState:
  """Adds one step's un-weighted (C, 2) costs (`terms["objective_costs"]`) to the accumulator."""
  acc = state.accumulator + jax.lax.stop_gradient(jnp.asarray(objective_costs, jnp.float32))
  return state.replace(accumulator=acc)


def update_auto_weights(state: AutoWeightState, epoch_stats) -> AutoWeightState:
  """Epoch-end update from epoch_stats = (C, 2) summed per-step costs (usually
  `state.accumulator`); returns new weights and a zeroed accumulator. Pure and jit-able."""
  acc = jnp.asarray(epoch_stats, jnp.float32)
  w = state.objective_weights
  if state.enabled:
    target = jnp.asarray(state.weight_target, jnp.float32).reshape(acc.shape)
    u = jnp.where(acc != 0.0, target / jnp.where(acc != 0.0, acc, 1.0), 0.0)
    s = u.sum(axis=1, keepdims=True)
    new = jnp.clip(u / jnp.where(s != 0.0, s, 1.0), state.min_objective_weight,
                   state.max_objective_weight)
    w = jnp.where(s != 0.0, new, w)
  return state.replace(objective_weights=w, accumulator=jnp.zeros_like(state.accumulator))


def auto_weight_step(state: AutoWeightState, objective_costs, global_step,
                     steps_per_epoch: int) -> AutoWeightState:
  """Per-step bookkeeping inside a jitted train step.

  global_step: index of the step just taken (0-based, counted over the whole run, resumes
  included); when it is the last step of an epoch ((global_step + 1) % steps_per_epoch == 0) the
  weights are updated and the accumulator reset. The costs of this step are accumulated first.
  """
  state = accumulate_costs(state, objective_costs)
  updated = update_auto_weights(state, state.accumulator)
  end = (jnp.asarray(global_step) + 1) % steps_per_epoch == 0
  return jax.tree.map(lambda a, b: jnp.where(end, a, b), updated, state)
