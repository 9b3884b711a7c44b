"""Structured pruning: the reference behaviours on small models, exactness when only zero
filters go, the pruned architecture as data, retraining, and the CLI."""

import json

import jax
import numpy as np
import pytest

from bpnet_jax import model as model_lib
from bpnet_jax import prune as P
from bpnet_jax.skeleton import load_skeleton
from configs import demo

SK = load_skeleton()


def tiny(arch="BpNetLiteModel", attention=False, stages=2, downsampling="strided_conv"):
  c = demo.get_config()
  c.model.architecture, c.model.use_self_attention, c.model.stages = arch, attention, stages
  c.model.backbone_downsampling = downsampling
  m = model_lib.build_model(c.model, SK)
  return c, m, model_lib.init_variables(m, jax.random.key(0), 64, 64)


def test_selection_rule_matches_the_reference_examples():
  stat = np.linspace(0.01, 1.0, 128)[::-1].copy()
  stat[37:] = 0.05                                      # 37 above 0.1
  keep, clamped = P.select(stat, 0.1, 8, 16)
  assert len(keep) == 40 and not clamped                # 37 rounded up to a multiple of 8
  assert (np.diff(keep) > 0).all() and set(range(37)) <= set(keep.tolist())
  keep, clamped = P.select(np.r_[np.full(18, 0.5), 0.01], 0.1, 8, 16)
  assert len(keep) == 19 and not clamped                # 18 -> 24 -> clamped to D = 19
  keep, _ = P.select(np.array([0.1, 0.2, 0.1]), 0.1, 1, 0)
  assert keep.tolist() == [1]                           # strictly above the threshold
  keep, clamped = P.select(np.zeros(64), 0.1, 8, 16)    # everything below: min filters
  assert len(keep) == 16 and clamped


def test_normalizers_and_criteria():
  s = np.array([1.0, 2.0, 4.0])
  np.testing.assert_allclose(P.normalize(s, "max"), [0.25, 0.5, 1.0])
  np.testing.assert_allclose(P.normalize(s, "L2"), s / np.sqrt(21))   # not x N (docs/decisions.md)
  a, b = np.array([0.2, 0.9]), np.array([0.8, 0.1])
  assert P.merge([a, b], "union").tolist() == [0.8, 0.9]
  assert P.merge([a, b], "intersection").tolist() == [0.2, 0.1]
  np.testing.assert_allclose(P.merge([a, b], "arithmetic_mean"), [0.5, 0.5])
  np.testing.assert_allclose(P.merge([a, b], "geometric_mean"), [0.4, 0.3])


@pytest.mark.parametrize("arch,attention", [("BpNetLiteModel", False), ("BpNetLiteModel", True),
                                            ("BpNetModel", False)])
def test_graph_covers_the_model_and_pruned_shapes_rebuild(arch, attention):
  c, m, v = tiny(arch, attention, stages=3)
  graph = P.model_graph(m)
  names = {n.name for n in graph}
  kernels = {model_lib.path_str(p)[:-len("/kernel")] for p, _ in
             jax.tree_util.tree_flatten_with_path(v["params"])[0]
             if model_lib.path_str(p).endswith("kernel")}
  assert names == kernels
  heads = {n.name for n in graph if n.head}
  assert heads == {"stage1/heat_branch/out", "stage1/paf_branch/out", "stage2/heat_branch/out",
                   "stage2/paf_branch/out", "heatmap_out", "paf_out"}
  # Shrink the first half of every prunable conv's filters: those go at threshold 0.5.
  scaled = jax.tree_util.tree_map_with_path(
      lambda p, x: x.at[..., :x.shape[-1] // 2].multiply(0.1)
      if model_lib.path_str(p).endswith("kernel") and "out/" not in model_lib.path_str(p) + "/"
      and "_out/" not in model_lib.path_str(p) + "/" else x, v["params"])
  v = {"params": scaled, "batch_stats": v["batch_stats"]}
  pruned, widths, layers = P.prune(v, graph, threshold=0.5, granularity=2, min_filters=2)
  for n in graph:
    if not n.head:
      assert layers[n.name]["kept"] == layers[n.name]["total"] - layers[n.name]["total"] // 2
  c.model.layer_widths = widths
  rebuilt = model_lib.abstract_variables(model_lib.build_model(c.model, SK))
  shapes = lambda t: jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), t)
  assert shapes(rebuilt) == shapes(pruned)
  for h in heads:                                       # heads keep all their filters
    assert layers[h]["kept"] == layers[h]["total"]
  # Stage 2 reads concat(features, stage-1 heatmaps, stage-1 PAFs): features are sliced, the
  # 19 + 38 head channels are not.
  first = "stage2/conv1" if arch == "BpNetLiteModel" else "stage2/heat_branch/conv1"
  kernel = pruned["params"]
  for part in first.split("/"):
    kernel = kernel[part]
  assert kernel["kernel"].shape[2] == widths["channel_reduction_conv"] + 19 + 38
  assert widths["channel_reduction_conv"] < 128 * c.model.width_multiplier
  if attention:
    gated = [n.gates for n in graph if n.gates]
    assert gated and all(layers[g]["kept"] == layers[g.rsplit("/", 1)[0] + "/attention_conv"]
                         ["kept"] for g in gated)


def zero_filters(v, graph, rng, fraction=0.5):
  """Zeroes a random subset of every prunable conv's filters (and their bias / BN shift) so they
  output exactly 0 after ReLU; returns the variables and the zeroed indices."""
  from flax import traverse_util
  p = traverse_util.flatten_dict(jax.device_get(v["params"]), sep="/")
  s = traverse_util.flatten_dict(jax.device_get(v["batch_stats"]), sep="/")
  p = {k: np.array(x) for k, x in p.items()}
  s = {k: np.array(x) for k, x in s.items()}
  zeroed = {}
  {n.name: n for n in graph}
  for n in graph:
    if n.head or n.gates:
      continue
    d = p[f"{n.name}/kernel"].shape[-1]
    idx = rng.choice(d, d // 2 if d > 2 else 0, replace=False)
    zeroed[n.name] = idx
    for name in [n.name] + [g.name for g in graph if g.gates == n.name]:
      p[f"{name}/kernel"][..., idx] = 0
      if f"{name}/bias" in p:
        p[f"{name}/bias"][idx] = 0
    if n.bn:
      p[f"{n.bn}/bias"][idx] = 0
      s[f"{n.bn}/mean"][idx] = 0
  return {"params": traverse_util.unflatten_dict(p, sep="/"),
          "batch_stats": traverse_util.unflatten_dict(s, sep="/")}, zeroed


@pytest.mark.parametrize("arch,attention,downsampling", [
    ("BpNetLiteModel", False, "strided_conv"), ("BpNetLiteModel", True, "strided_conv"),
    ("BpNetModel", False, "strided_conv"), ("BpNetLiteModel", False, "max_pool")])
def test_removing_zero_filters_keeps_the_outputs(arch, attention, downsampling):
  c, m, v = tiny(arch, attention, downsampling=downsampling)
  graph = P.model_graph(m)
  v, zeroed = zero_filters(v, graph, np.random.default_rng(0))
  pruned, widths, layers = P.prune(v, graph, threshold=0.01, granularity=1, min_filters=1)
  for name, idx in zeroed.items():
    assert layers[name]["kept"] == layers[name]["total"] - len(idx)
  c.model.layer_widths = widths
  small = model_lib.build_model(c.model, SK)
  x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
  ref = m.apply(v, x)
  out = small.apply(pruned, x)
  for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(out)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
  assert model_lib.count_params(pruned)["total"] < model_lib.count_params(v)["total"]


def test_excluded_layers_and_bad_options():
  c, m, v = tiny()
  graph = P.model_graph(m)
  _, _, layers = P.prune(v, graph, threshold=0.99, granularity=1, min_filters=1,
                         excluded=("stage1/conv2",))
  assert layers["stage1/conv2"]["kept"] == layers["stage1/conv2"]["total"]
  assert layers["stage1/conv1"]["kept"] < layers["stage1/conv1"]["total"]
  with pytest.raises(P.PruneError, match=r"not in the model; valid names: backbone/block_1a"):
    P.prune(v, graph, excluded=("stage7/conv1",))
  with pytest.raises(P.PruneError, match="normalizer"):
    P.prune(v, graph, normalizer="L1")


def test_prune_cli_report_and_retrain(trained_workdir, tmp_path, capsys):
  from bpnet_jax import cli, train
  from bpnet_jax.inference import predictor
  config, workdir = trained_workdir
  from conftest import write_config_file
  cfg_path = write_config_file(config, tmp_path / "cfg.py")
  out = tmp_path / "pruned"
  args = ["prune", f"--model={workdir}", f"-o={out}", "-pth=0.8",
          "-nf=4", "-pg=2", "-el", "backbone/block_1a_conv_1"]
  assert cli.main(args) == 0
  report = json.load(open(out / "prune_report.json"))
  model = json.load(open(out / "config.json"))["model"]      # the pruned dir describes itself
  assert report["options"]["excluded"] == ["backbone/block_1a_conv_1"]
  assert report["params"]["after"] < report["params"]["before"]
  assert report["flops"]["after"] < report["flops"]["before"]
  assert report["layers"]["backbone/block_1a_conv_1"]["kept"] == 8
  assert all(model["layer_widths"][k] == l["kept"] for k, l in report["layers"].items()
             if k in model["layer_widths"])
  assert "params" in capsys.readouterr().out
  # The pruned model is rebuilt from its directory: inference and parameter count.
  p = predictor.Predictor.from_path(str(out))
  assert model_lib.count_params(p.backend.variables)["total"] == report["params"]["after"]
  assert isinstance(p.predict(np.zeros((64, 80, 3), np.uint8)), list)
  # Existing output is not replaced without --overwrite.
  assert cli.main(args) == 2
  assert "already exists" in capsys.readouterr().err
  # Retrain one epoch from it (load_graph): every weight loads, the model trains.
  rc = config.copy_and_resolve_references()
  rc.trainer.pretrained_weights, rc.trainer.load_graph = str(out), True
  r = train.train(rc, str(tmp_path / "retrain"), progress=False)
  assert r["step"] == r["last_step"] and np.isfinite(r["metrics"]["loss"])
  saved = json.load(open(tmp_path / "retrain" / "config.json"))
  assert saved["model"]["layer_widths"] == model["layer_widths"]
  q = predictor.Predictor.from_path(str(tmp_path / "retrain"))
  assert model_lib.count_params(q.backend.variables)["total"] == report["params"]["after"]
  # A config that describes another network fails in one line naming the key.
  assert cli.main(["prune", f"--config={cfg_path}", "--config.model.stages=3",
                   f"--workdir={workdir}", f"-o={tmp_path / 'p2'}"]) == 2
  assert "config.model.stages=3 but the model in" in capsys.readouterr().err
  # Out-of-range thresholds are refused before anything is read or written.
  for bad in ("2", "-1", "nan"):
    assert cli.main(["prune", f"--model={workdir}", f"-o={tmp_path / 'p3'}", f"-pth={bad}"]) == 2
    assert "expected a number in [0, 1]" in capsys.readouterr().err
  assert not (tmp_path / "p3").exists()


def test_load_graph_needs_a_saved_model_of_the_same_architecture(trained_workdir, tmp_path):
  from bpnet_jax import train
  from bpnet_jax.errors import CheckpointError
  config, workdir = trained_workdir
  rc = config.copy_and_resolve_references()
  rc.trainer.pretrained_weights, rc.trainer.load_graph = str(tmp_path), True
  with pytest.raises(CheckpointError, match="no checkpoint found"):
    train.train(rc, str(tmp_path / "x"), progress=False)
  rc.trainer.pretrained_weights = workdir
  rc.model.stages = 3
  with pytest.raises(CheckpointError, match="the saved model has config.model.stages=2"):
    train.train(rc, str(tmp_path / "x"), progress=False)
