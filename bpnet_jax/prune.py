"""Magnitude-based structured pruning of a BodyPoseNet parameter pytree (the original's
`min_weight` method), as a pure function.

  graph = model_graph(model)                 # which conv feeds which (concatenations, gates)
  pruned, widths, report = prune(variables, graph, threshold=0.1)

For every prunable conv, the statistic of an output filter is the L2 norm of its kernel slice
(biases ignored), normalised within the layer by its maximum (`max`) or by the L2 norm of the
vector of norms (`L2`; the original multiplied that by N, docs/decisions.md). A layer keeps the
filters whose statistic exceeds the threshold, at least `min_filters` (or all if it has fewer),
rounded up to a multiple of `granularity`, the largest statistics first. Convs whose outputs are
multiplied element-wise (an attention gate and the conv it gates) keep the same filters, chosen on
their statistics merged by the equalisation criterion. Consumers are sliced to match: the next
conv's input channels, the backbone's BatchNorm vectors, and the stage inputs concat(features,
previous heatmaps, previous PAFs), whose head channels are never pruned. Output heads (every
stage's heatmap and PAF convs) keep all their filters; `excluded` layers too.

The pruned architecture is data: `widths` ({conv path: filters}) goes into
`config.model.layer_widths`, and `prune_checkpoint` writes a model directory (OUT_DIR/config.json
with those widths, OUT_DIR/state, prune_report.json), so inference, export and
`trainer.pretrained_weights=OUT_DIR, load_graph=True` rebuild the pruned model from it.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bpnet_jax import checkpoint as checkpoint_lib
from bpnet_jax import fileio
from bpnet_jax import model as model_lib
from bpnet_jax.errors import PruneError

NORMALIZERS = ("max", "L2", "off")
CRITERIA = ("union", "intersection", "arithmetic_mean", "geometric_mean")


@dataclasses.dataclass(frozen=True)
class Node:
  """One conv of the model. `inputs`: producers concatenated along channels ('input' is the
  image); `bn`: BatchNorm applied to its output; `head`: an output (never pruned); `gates`: the
  conv whose output this conv's output multiplies (they keep the same filters)."""
  name: str
  inputs: tuple
  bn: str | None = None
  head: bool = False
  gates: str | None = None


def model_graph(model) -> list[Node]:
  """The channel graph of a BpNet, read off its layer spec (`bpnet_jax.model.layer_spec`)."""
  return [Node(layer.path, layer.inputs, bn=layer.bn, head=not layer.prunable,
               gates=layer.gates) for layer in model_lib.layer_spec(model).layers]


def filter_norms(kernel) -> np.ndarray:
  """(out,) L2 norm of each output filter of a (kh, kw, in, out) kernel."""
  k = np.asarray(kernel, np.float64)
  return np.sqrt(np.square(k).reshape(-1, k.shape[-1]).sum(0))


def normalize(stat: np.ndarray, normalizer: str) -> np.ndarray:
  if normalizer == "max":
    return stat / max(stat.max(), 1e-30)
  if normalizer == "L2":
    return stat / max(np.linalg.norm(stat), 1e-30)
  return stat


def merge(stats: list[np.ndarray], criterion: str) -> np.ndarray:
  """Equalisation of tied layers' statistics."""
  s = np.stack(stats)
  if criterion == "union":
    return s.max(0)
  if criterion == "intersection":
    return s.min(0)
  if criterion == "arithmetic_mean":
    return s.mean(0)
  return np.exp(np.log(np.maximum(s, 1e-30)).mean(0))


def select(stat: np.ndarray, threshold: float, granularity: int, min_filters: int):
  """(kept indices ascending, clamped): filters above the threshold, at least min(min_filters,
  D), rounded up to a multiple of granularity, at most D; `clamped` says min_filters decided."""
  d = len(stat)
  above = int((stat > threshold).sum())
  n = max(above, min(min_filters, d))
  n = min(int(math.ceil(n / granularity) * granularity), d)
  keep = np.sort(np.argsort(-stat, kind="stable")[:n])
  return keep, above < min(min_filters, d)


def prune(variables, graph: list[Node], threshold: float = 0.1, normalizer: str = "max",
          criterion: str = "union", granularity: int = 8, min_filters: int = 16,
          excluded=()):
  """Prunes {'params', 'batch_stats'}; returns (pruned variables, widths, layers).

  widths: {conv path: kept filters} for every prunable conv (attention gates follow the conv
  they gate); layers: {conv path: {"kept", "total", "clamped_by_min_filters"}}.
  """
  if normalizer not in NORMALIZERS:
    raise PruneError(f"normalizer {normalizer!r}: expected one of {NORMALIZERS}")
  if criterion not in CRITERIA:
    raise PruneError(f"equalization criterion {criterion!r}: expected one of {CRITERIA}")
  if granularity < 1 or min_filters < 0:
    raise PruneError("granularity must be >= 1 and min_filters >= 0")
  names = [n.name for n in graph]
  unknown = sorted(set(excluded) - set(names))
  if unknown:
    raise PruneError(f"excluded layer(s) {unknown} not in the model; valid names: "
                     f"{', '.join(names)}")
  params = traverse_util.flatten_dict(variables["params"], sep="/")
  stats = traverse_util.flatten_dict(variables.get("batch_stats", {}), sep="/")
  out_width = {n.name: int(params[f"{n.name}/kernel"].shape[-1]) for n in graph}
  out_width["input"] = int(params[f"{graph[0].name}/kernel"].shape[-2])

  # Groups of convs that must keep the same filters (gate and gated conv).
  group = {n.name: n.name for n in graph}
  for n in graph:
    if n.gates:
      group[n.name] = group[n.gates]
  members: dict[str, list[str]] = {}
  for n in graph:
    members.setdefault(group[n.name], []).append(n.name)
  by_name = {n.name: n for n in graph}
  kept, layers = {"input": np.arange(out_width["input"])}, {}
  for root, names_ in members.items():
    total = out_width[root]
    fixed = any(by_name[m].head or m in excluded for m in names_)
    if fixed:
      keep, clamped = np.arange(total), False
    else:
      s = [normalize(filter_norms(params[f"{m}/kernel"]), normalizer) for m in names_]
      keep, clamped = select(merge(s, criterion), threshold, granularity, min_filters)
    for m in names_:
      kept[m] = keep
      layers[m] = {"kept": int(len(keep)), "total": total, "clamped_by_min_filters": clamped}

  new_params, new_stats = {}, {}
  for n in graph:
    offsets = np.cumsum([0] + [out_width[s] for s in n.inputs])
    in_idx = np.concatenate([kept[s] + o for s, o in zip(n.inputs, offsets)])
    k = np.asarray(params[f"{n.name}/kernel"])
    if k.shape[-2] != offsets[-1]:
      raise PruneError(f"{n.name}: kernel has {k.shape[-2]} input channels but its inputs "
                       f"{n.inputs} give {offsets[-1]}; the graph does not fit the model")
    new_params[f"{n.name}/kernel"] = k[..., in_idx, :][..., kept[n.name]]
    if f"{n.name}/bias" in params:
      new_params[f"{n.name}/bias"] = np.asarray(params[f"{n.name}/bias"])[kept[n.name]]
    if n.bn:
      for coll, src in ((new_params, params), (new_stats, stats)):
        for key in [k_ for k_ in src if k_.startswith(n.bn + "/")]:
          coll[key] = np.asarray(src[key])[kept[n.name]]
  missing = set(params) - set(new_params)
  if missing:
    raise PruneError(f"parameters outside the pruning graph: {sorted(missing)[:5]}")
  pruned = {"params": traverse_util.unflatten_dict(new_params, sep="/"),
            "batch_stats": traverse_util.unflatten_dict(new_stats, sep="/")}
  widths = {n.name: layers[n.name]["kept"] for n in graph if not n.head and not n.gates}
  return pruned, widths, layers


# ----------------------------------------------------------------------------------------------
# The pruned model on disk, and rebuilding it.

def flops(model, variables, height: int, width: int) -> float:
  """Forward-pass FLOPs of one (height, width) image, as XLA counts them."""
  x = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.float32),
                                    variables)
  cost = jax.jit(lambda v, im: model.apply(v, im, train=False)).lower(abstract, x).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def prune_checkpoint(checkpoint: str, out_dir: str, threshold: float = 0.1,
                     normalizer: str = "max", criterion: str = "union", granularity: int = 8,
                     min_filters: int = 16, excluded=(), overwrite: bool = False,
                     config=None) -> dict:
  """Prunes a saved model (workdir, checkpoint or pruned model dir) into out_dir, a model
  directory of its own (state/, config.json with the pruned widths, prune_report.json);
  returns the report. `config` (optional) may only change inference settings.
  """
  if not (0.0 <= threshold <= 1.0):     # also rejects NaN
    raise PruneError(f"pruning threshold {threshold}: expected a number in [0, 1]")
  fileio.check_can_write([out_dir], overwrite)
  saved = checkpoint_lib.load_model(checkpoint, config)
  config, variables, sk = saved.config, saved.variables, saved.skeleton
  model = model_lib.build_model(config.model, sk)
  graph = model_graph(model)
  pruned, widths, layers = prune(variables, graph, threshold, normalizer, criterion,
                                 granularity, min_filters, excluded)
  pruned_config = config.copy_and_resolve_references()
  pruned_config.model.layer_widths = widths
  pruned_model = model_lib.build_model(pruned_config.model, sk)
  h, w = config.dataloader.image_config.height, config.dataloader.image_config.width
  before, after = model_lib.count_params(variables), model_lib.count_params(pruned)
  report = {
      "source": os.path.abspath(checkpoint),
      "options": {"threshold": threshold, "normalizer": normalizer, "criterion": criterion,
                  "granularity": granularity, "min_filters": min_filters,
                  "excluded": list(excluded)},
      "input_size": [h, w],
      "params": {"before": before["total"], "after": after["total"]},
      "flops": {"before": flops(model, variables, h, w),
                "after": flops(pruned_model, pruned, h, w)},
      "clamped_by_min_filters": [n for n, l in layers.items() if l["clamped_by_min_filters"]],
      "layers": layers,
  }
  checkpoint_lib.save_model_dir(out_dir, pruned, pruned_config,
                                {"prune_report.json": report}, overwrite)
  return report
