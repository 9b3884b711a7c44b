"""Pose loss and weight regularisation, as pure functions.

Per stage and per output kind, the loss is `0.5 * sum(((pred - label) * mask) ** 2)` over batch,
pixels and channels (TF `l2_loss`): heatmaps against the heatmap+background label channels, PAFs
against the PAF channels. Stage terms are summed and divided by the batch size (per-image sum,
averaged over images); regularisation is added once, undivided.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from bpnet_jax.skeleton import Skeleton

REGULARIZATION_TYPES = ("l1", "l2", "l1_l2", "none")


def _focal_scale(pred, label, alpha, beta, bkg_thresh, gamma):
  # Foreground pixels push the prediction towards 1 + alpha, background ones towards -beta; the
  # weight |...|^gamma grows with the error. Gradients flow through the scale, as the original.
  fg = label > bkg_thresh
  return jnp.where(fg, jnp.abs(1.0 + alpha - pred), jnp.abs(pred + beta)) ** gamma


def l2_term(pred, label, mask, focal=None):
  """0.5 * sum(((pred - label) * mask [* focal scale]) ** 2) over everything; float32.

  pred, label: (B, h, w, C). mask: (B, h, w, C) or (B, h, w, 1) (broadcast over channels).
  focal: None or a mapping with alpha, beta, bkg_thresh, gamma.
  """
  pred = pred.astype(jnp.float32)
  r = (pred - label) * mask
  if focal is not None:
    r = r * _focal_scale(pred, label, focal["alpha"], focal["beta"], focal["bkg_thresh"],
                         focal["gamma"])
  return 0.5 * jnp.sum(jnp.square(r))


def stage_losses(heatmaps: Sequence[jax.Array], pafs: Sequence[jax.Array], labels, masks,
                 skeleton: Skeleton, focal=None) -> dict:
  """Per-stage loss terms, not divided by the batch.

  heatmaps[s]: (B, h, w, J+1); pafs[s]: (B, h, w, 2L); labels: (B, h, w, 2L+J+1) in the
  skeleton's channel layout; masks: same shape as labels, or (B, h, w, 1).
  Returns {'cmap_loss_stage1': ..., 'paf_loss_stage1': ..., ...} (1-based stages).
  """
  hs, ps = skeleton.heatmap_with_background_slice, skeleton.paf_slice
  one = masks.shape[-1] == 1
  out = {}
  for s, (h, p) in enumerate(zip(heatmaps, pafs), start=1):
    heat_masks = masks if one else masks[..., hs]
    out[f"cmap_loss_stage{s}"] = l2_term(h, labels[..., hs], heat_masks, focal)
    out[f"paf_loss_stage{s}"] = l2_term(p, labels[..., ps], masks if one else masks[..., ps], focal)
  return out


def _conv_leaves(params):
  """Yields (kind, array) for conv kernels ('kernel') and conv biases ('bias').

  A conv is a module holding a 'kernel'; BatchNorm modules (scale/bias, no kernel) are skipped.
  """
  if not isinstance(params, Mapping):
    return
  if "kernel" in params:
    yield "kernel", params["kernel"]
    if "bias" in params:
      yield "bias", params["bias"]
    return
  for v in params.values():
    yield from _conv_leaves(v)


def regularization(params, regularization_type: str, kernel_factor: float,
                   bias_factor: float = 0.0) -> jax.Array:
  """Weight penalty on conv kernels and conv biases (never on BatchNorm).

  l1: f * sum|w|; l2: f * sum w^2 (no 1/2, as Keras); l1_l2: f * (sum|w| + sum w^2) -- the
  configured factor on both terms (the original silently used 0.01 for the L2 part); none: 0.
  """
  if regularization_type not in REGULARIZATION_TYPES:
    raise ValueError(f"regularization_type must be one of {REGULARIZATION_TYPES}, "
                     f"got {regularization_type!r}")
  total = jnp.zeros((), jnp.float32)
  if regularization_type == "none":
    return total
  for kind, w in _conv_leaves(params):
    f = kernel_factor if kind == "kernel" else bias_factor
    if not f:
      continue
    w = w.astype(jnp.float32)
    term = 0.0
    if regularization_type in ("l1", "l1_l2"):
      term = term + jnp.sum(jnp.abs(w))
    if regularization_type in ("l2", "l1_l2"):
      term = term + jnp.sum(jnp.square(w))
    total = total + f * term
  return total


def pose_loss(heatmaps, pafs, labels, masks, skeleton: Skeleton, params=None,
              regularization_type: str = "none", kernel_factor: float = 0.0,
              bias_factor: float = 0.0, focal=None):
  """Total training loss and its parts.

  Returns (total, terms): total = sum(stage terms) / batch + regularisation; terms holds the
  per-stage terms (summed over the batch, as the original logs them), 'data_loss' (already
  divided by the batch) and 'regularization_loss'.
  """
  terms = stage_losses(heatmaps, pafs, labels, masks, skeleton, focal)
  batch = labels.shape[0]
  data = sum(terms.values()) / batch
  reg = (regularization(params, regularization_type, kernel_factor, bias_factor)
         if params is not None else jnp.zeros((), jnp.float32))
  terms = dict(terms, data_loss=data, regularization_loss=reg)
  return data + reg, terms


def loss_from_config(config, skeleton: Skeleton):
  """`loss(params, heatmaps, pafs, labels, masks) -> (total, terms)` bound to `config`."""
  m = config.model
  fl = config.loss.focal_loss_params
  focal = (dict(alpha=float(fl.alpha), beta=float(fl.beta), bkg_thresh=float(fl.bkg_thresh),
                gamma=float(fl.gamma)) if fl.use_focal_loss else None)
  reg_type = m.regularization_type
  # A pruned model is retrained without regularisation unless asked (the original's behaviour).
  if config.trainer.load_graph and not config.trainer.regularize_pruned:
    reg_type = "none"

  def loss(params, heatmaps, pafs, labels, masks):
    return pose_loss(heatmaps, pafs, labels, masks, skeleton, params, reg_type,
                     float(m.kernel_regularization_factor), float(m.bias_regularization_factor),
                     focal)
  return loss
