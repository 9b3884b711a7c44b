"""Momentum SGD with per-parameter learning-rate multipliers, as an optax chain.

The original scaled each variable's gradient by a fixed "grad weight" before a TF1 momentum
update; because momentum SGD is linear in the gradient, that is exactly a per-parameter LR
multiplier. Here: `scale_by_multipliers(tree)` then `optax.sgd(schedule, momentum, nesterov)`.
`optimizer.name = "adam"` (not in the original; the demo uses it) puts `optax.adam` in its place.

Multiplier rules, by parameter path ('stage2/conv1/kernel'):
  1. `grad_weights_dict`: {glob pattern: multiplier}; the first matching pattern wins.
  2. stage-wise rule (`use_stagewise_lr_multipliers`), for conv kernels and biases:
       stage1/...                     kernel x1, bias x2
       stage{t>=2}/... , *out         kernel x4, bias x8   (refinement stages, final outputs)
       everything else                kernel x1, bias x2   (backbone, channel reduction)
     ('stage1' matches only stage 1; the original's regex also caught stage10..19.)
  3. `weight_default_value` (BatchNorm scale/bias with the stage-wise rule, everything otherwise).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from bpnet_jax.model import path_str


def stagewise_multiplier(path: str) -> Optional[float]:
  """Stage-wise LR multiplier of a conv 'kernel' or 'bias' path, None for other parameters."""
  module, _, leaf = path.rpartition("/")
  if leaf not in ("kernel", "bias"):
    return None
  bias = leaf == "bias"
  if re.match(r"stage1(/|$)", module):
    return 2.0 if bias else 1.0
  if re.match(r"stage\d+(/|$)", module) or module.split("/")[-1].endswith("out"):
    return 8.0 if bias else 4.0
  return 2.0 if bias else 1.0


def lr_multipliers(params, use_stagewise: bool = False,
                   grad_weights: Optional[Mapping[str, float]] = None,
                   default: float = 1.0):
  """A pytree like `params` of float multipliers (see module docstring for the rules)."""
  grad_weights = dict(grad_weights or {})

  def mult(path, _):
    p = path_str(path)
    for pattern, value in grad_weights.items():
      if fnmatch.fnmatchcase(p, pattern):
        return float(value)
    if use_stagewise and _is_conv_param(params, p):
      m = stagewise_multiplier(p)
      if m is not None:
        return m
    return float(default)
  return jax.tree_util.tree_map_with_path(mult, params)


def _is_conv_param(params, path: str) -> bool:
  # A conv module holds a 'kernel'; BatchNorm holds scale/bias only.
  node = params
  for part in path.split("/")[:-1]:
    node = node[part]
  return "kernel" in node


def scale_by_multipliers(multipliers) -> optax.GradientTransformation:
  """Multiplies each gradient leaf by its fixed multiplier (a pytree matching the params)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    updates = jax.tree_util.tree_map(lambda g, m: g * jnp.asarray(m, g.dtype), updates,
                                     multipliers)
    return updates, state
  return optax.GradientTransformation(init_fn, update_fn)


OPTIMIZERS = ("sgd", "adam")


def build_optimizer(params, schedule, momentum: float = 0.9, use_nesterov: bool = False,
                    use_stagewise_lr_multipliers: bool = False, grad_weights_dict=None,
                    weight_default_value: float = 1.0,
                    name: str = "sgd") -> optax.GradientTransformation:
  """optax chain: per-parameter multipliers, then the update rule.

  name 'sgd' (the original): TF1 momentum (accum = m*accum + g; w -= lr*accum) is optax.sgd's
  trace form, so a run with all multipliers 1 is plain momentum SGD; a multiplier 0 freezes that
  parameter. name 'adam' (an opt-in addition): Adam on `schedule` with b1 = momentum, applied
  after the multipliers, which then only matter as 0 (frozen) or not, since Adam normalises
  each parameter's step.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer name must be one of {OPTIMIZERS}, got {name!r}")
  mults = lr_multipliers(params, use_stagewise_lr_multipliers, grad_weights_dict,
                         weight_default_value)
  if name == "adam":
    rule = optax.adam(schedule, b1=momentum)
  else:
    rule = optax.sgd(schedule, momentum=momentum or None, nesterov=use_nesterov)
  return optax.chain(scale_by_multipliers(mults), rule)


def optimizer_from_config(config, params, schedule) -> optax.GradientTransformation:
  """The optimizer of `config.optimizer` (+ trainer.use_stagewise_lr_multipliers)."""
  o = config.optimizer
  return build_optimizer(params, schedule, float(o.momentum), bool(o.use_nesterov),
                         bool(config.trainer.use_stagewise_lr_multipliers),
                         dict(o.grad_weights_dict or {}), float(o.weight_default_value),
                         str(o.name))
