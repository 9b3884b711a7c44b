"""DetectNet_v2 model: reference parameter/conv counts, shapes, names, padding, config checks,
freezing and the pruner's channel graph. Big models are only traced (jax.eval_shape)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from bpnet_jax import model as M
from bpnet_jax import prune as prune_lib
from bpnet_jax.detectnet_v2 import model as D
from bpnet_jax.errors import ConfigError


def cfg(arch="resnet", num_layers=18, **kw):
  c = D.default_model_config()
  c.update(arch=arch, num_layers=num_layers, use_batch_norm=kw.pop("use_batch_norm", True), **kw)
  return c


def abstract(config, num_classes=3, size=64):
  return M.abstract_variables(D.build_model(config, num_classes), size, size)


def head_params(v):
  return sum(int(np.prod(x.shape)) for h in D.HEADS
             for x in jax.tree_util.tree_leaves(v["params"][h]))


# Model reference section "parameter counts" (computed with Keras count_params; BN moving stats
# counted as non-trainable): backbone total, BN stats, backbone convs, model total and
# trainable for 3 classes. Conv counts: ResNet (n - 1) + 4 shortcuts (8 with all_projections).
@pytest.mark.parametrize("arch, n, proj, backbone, bn_stats, convs, total, trainable", [
    ("resnet", 10, False, 4_918_848, 5_888, 13, 4_926_543, 4_920_655),
    ("resnet", 10, True, 4_918_848, 5_888, 13, 4_926_543, 4_920_655),
    ("resnet", 18, False, 11_195_328, 9_728, 21, 11_203_023, 11_193_295),
    ("resnet", 18, True, 11_548_288, 11_648, 25, 11_555_983, 11_544_335),
    ("resnet", 34, False, 21_314_624, 17_152, 37, 21_322_319, 21_305_167),
    ("resnet", 34, True, 22_238_016, 22_784, 49, 22_245_711, 22_222_927),
    ("resnet", 50, False, 23_587_712, 53_120, 53, 23_618_447, 23_565_327),
    ("resnet", 50, True, 38_193_024, 75_648, 65, 38_223_759, 38_148_111),
    ("vgg", 16, False, 14_731_584, 8_448, 13, 14_739_279, 14_730_831),
    ("vgg", 19, False, 20_046_400, 11_008, 16, 20_054_095, 20_043_087),
])
def test_reference_parameter_counts(arch, n, proj, backbone, bn_stats, convs, total, trainable):
  v = abstract(cfg(arch, n, all_projections=proj))
  c = M.count_params(v)
  assert (c["total"], c["trainable"], c["non_trainable"]) == (total, trainable, bn_stats)
  assert c["total"] - head_params(v) == backbone
  assert c["convs"] - 2 == convs                 # the two heads are not backbone convs


@pytest.mark.parametrize("arch, n, heads", [
    ("resnet", 18, (2_565, 5_130, 7_695)),       # (512 + 1) x 5C
    ("resnet", 50, (10_245, 20_490, 30_735)),    # (2048 + 1) x 5C
    ("vgg", 19, (2_565, 5_130, 7_695)),
])
def test_head_parameter_counts(arch, n, heads):
  for c, expected in zip((1, 2, 3), heads):
    assert head_params(abstract(cfg(arch, n), num_classes=c)) == expected


def test_kitti_spec_and_no_batch_norm_counts():
  # The shipped KITTI spec: ResNet-18, all_projections, BN, classes car + pedestrian.
  c = M.count_params(abstract(cfg(all_projections=True), num_classes=2))
  assert (c["total"], c["trainable"]) == (11_553_418, 11_541_770)
  # ResNet-18, all_projections, no BN: 11,524,992 + 7,695.
  v = abstract(cfg(all_projections=True, use_batch_norm=False))
  assert M.count_params(v)["total"] == 11_532_687
  assert M.count_params(v)["total"] - head_params(v) == 11_524_992
  assert not v.get("batch_stats")


def test_use_pooling_leaves_vgg_counts_unchanged():
  a, b = abstract(cfg("vgg", 16)), abstract(cfg("vgg", 16, use_pooling=True))
  assert M.count_params(a) == M.count_params(b)


@pytest.mark.parametrize("config", [
    cfg(all_projections=True), cfg(num_layers=50), cfg(num_layers=10, use_batch_norm=False),
    cfg("vgg", 16), cfg("vgg", 19, use_pooling=True)])
def test_output_shapes_at_kitti_size(config):
  model = D.build_model(config, 2)
  v = M.abstract_variables(model)
  images = jax.ShapeDtypeStruct((2, 384, 1248, 3), jnp.float32)
  cov, bbox = jax.eval_shape(lambda v, x: model.apply(v, x), v, images)
  assert cov.shape == (2, 24, 78, 2) and bbox.shape == (2, 24, 78, 8)     # stride 16
  assert cov.dtype == bbox.dtype == jnp.float32


def _names(tree):
  return {M.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_parameter_names_follow_the_original():
  names = _names(abstract(cfg())["params"])
  for expected in ["conv1/kernel", "conv1/bias", "bn_conv1/scale", "block_1a_conv_1/kernel",
                   "block_1a_bn_1/bias", "block_1a_conv_2/bias", "block_1a_conv_shortcut/kernel",
                   "block_1a_bn_shortcut/scale", "block_4b_conv_2/kernel",
                   "block_4a_conv_shortcut/kernel", "output_cov/kernel", "output_bbox/bias"]:
    assert expected in names, expected
  assert "block_1b_conv_shortcut/kernel" not in names          # identity without all_projections
  assert "block_1b_conv_shortcut/kernel" in _names(abstract(cfg(all_projections=True))["params"])
  assert "block_2d_conv_3/kernel" in _names(abstract(cfg(num_layers=50))["params"])
  vgg = abstract(cfg("vgg", 16))
  assert {n.split("/")[0] for n in _names(vgg["batch_stats"])} == {
      f"block_{k}{r}_bn_1" for k, reps in enumerate((2, 2, 3, 3, 3), 1) for r in "abc"[:reps]}


def init(model, seed, size=32):
  """Random variables shaped like the model's (no init compilation: XLA:CPU compile time is
  most of these tests): kernels N(0, 1/fan_in), biases small, BN at its initial state."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = M.path_str(path).split("/")[-1]
    if name == "kernel":
      return jnp.asarray(rng.normal(size=x.shape) / np.sqrt(np.prod(x.shape[:-1])), jnp.float32)
    if name in ("scale", "var"):
      return jnp.ones(x.shape, jnp.float32)
    if name == "mean":
      return jnp.zeros(x.shape, jnp.float32)
    return jnp.asarray(rng.normal(size=x.shape) * 0.01, jnp.float32)   # biases

  return jax.tree_util.tree_map_with_path(leaf, M.abstract_variables(model, size, size))


def tiny_config(arch="resnet", num_layers=10, width=4, **kw):
  """A model of `arch` with every prunable conv `width` wide (residual groups follow)."""
  c = cfg(arch, num_layers, **kw)
  c["layer_widths"] = {n.name: width for n in D.layer_graph(c, 1) if not n.head and not n.gates}
  return c


def test_padding_is_symmetric_on_stride_2_convs():
  """Single-tap kernels make convs read one shifted pixel: a stride-2 k x k conv's output (i, j)
  reads padded pixel (2i + t, 2j + t) for tap t, with (k - 1) // 2 zeros on every side."""
  model = D.build_model(tiny_config(use_batch_norm=False), 1)
  v = init(model, 0)
  p = traverse_util.flatten_dict(jax.device_get(v["params"]), sep="/")
  k1 = np.zeros((7, 7, 3, 4), np.float32)
  k1[0, 0, 0, 0] = k1[6, 6, 0, 1] = k1[3, 3, 1, 2] = 1.0    # first, last and centre taps
  k2 = np.zeros((3, 3, 4, 4), np.float32)
  k2[0, 0, 0, 0] = k2[0, 0, 1, 1] = k2[2, 2, 2, 2] = k2[2, 2, 3, 3] = 1.0
  p.update({"conv1/kernel": k1, "block_2a_conv_1/kernel": k2})
  p.update({k: np.zeros_like(a) for k, a in p.items() if k.endswith("bias")})
  params = traverse_util.unflatten_dict(p, sep="/")
  x = np.random.default_rng(0).uniform(size=(1, 32, 32, 3)).astype(np.float32)
  _, state = jax.jit(lambda p, x: model.apply({"params": p}, x, capture_intermediates=True))(
      params, x)
  out = {k: np.asarray(val["__call__"][0][0]) for k, val in state["intermediates"].items()
         if k != "__call__"}                   # (that one is the model's own output)

  def read(img, pad, tap, n):                  # img[2i + tap - pad, 2j + tap - pad], zero outside
    padded = np.pad(img, ((pad, pad), (pad, pad)))
    return padded[tap:tap + 2 * n:2, tap:tap + 2 * n:2]

  c1 = out["conv1"]
  assert c1.shape == (16, 16, 4)
  np.testing.assert_array_equal(c1[..., 0], read(x[0, ..., 0], 3, 0, 16))
  np.testing.assert_array_equal(c1[..., 1], read(x[0, ..., 0], 3, 6, 16))
  np.testing.assert_array_equal(c1[..., 2], x[0, ::2, ::2, 1])
  assert np.all(c1[0, :, 0] == 0) and np.all(c1[-1, :, 1] == 0)   # pad at top and bottom
  # Block 2's first conv (3x3 / 2) reads block 1's output relu(main + shortcut).
  b1 = np.maximum(out["block_1a_conv_2"] + out["block_1a_conv_shortcut"], 0)
  b2 = out["block_2a_conv_1"]
  assert b1.shape == (8, 8, 4) and b2.shape == (4, 4, 4)
  for ch, tap in ((0, 0), (1, 0), (2, 2), (3, 2)):
    np.testing.assert_allclose(b2[..., ch], read(b1[..., ch], 1, tap, 4), rtol=1e-6)
  # lax 'SAME' would pad 0 on top, 1 at the bottom: tap 0 would read b1[2i, 2j] instead.
  assert not np.allclose(b2[..., 0], b1[::2, ::2, 0])


@pytest.mark.parametrize("config, key", [
    (cfg(use_pooling=True), "model.use_pooling"),
    (cfg(num_layers=20), "model.num_layers"),
    (cfg("vgg", 18), "model.num_layers"),
    (cfg("vgg", 0), "model.num_layers"),              # 0 means 18, not a VGG depth
    (cfg("googlenet"), "model.arch"),
    (cfg(num_layers="18"), "model.num_layers"),
    (cfg(freeze_blocks=[5]), "model.freeze_blocks"),
    (cfg("vgg", 16, freeze_blocks=[0]), "model.freeze_blocks"),
    (cfg(freeze_bn="yes"), "model.freeze_bn"),
    (cfg(dropout_rate=0.1), "model.dropout_rate"),
    (cfg(layer_widths={"output_cov": 8}), "model.layer_widths"),
    (cfg(layer_widths={"block_9a_conv_1": 8}), "model.layer_widths"),
    (cfg(layer_widths={"block_1a_conv_1": 0}), "model.layer_widths"),
    (cfg(layer_widths={"block_1a_conv_2": 8}), "model.layer_widths.block_1a_conv_2"),  # tied
])
def test_impossible_values_are_rejected_in_one_line(config, key):
  with pytest.raises(ValueError) as e:
    D.build_model(config, 3)
  assert isinstance(e.value, ConfigError)
  assert key in str(e.value) and "\n" not in str(e.value)


def test_use_pooling_message_says_why():
  with pytest.raises(ConfigError, match=r"model\.use_pooling: .*detection; expected false"):
    D.build_model(cfg(use_pooling=True), 3)
  with pytest.raises(ConfigError, match="num_classes"):
    D.build_model(cfg(), 0)


def test_defaults():
  d = D.default_model_config()
  assert d["arch"] == "resnet" and d["num_layers"] == 18 and d["freeze_blocks"] == []
  assert not (d["all_projections"] or d["use_batch_norm"] or d["use_pooling"] or d["freeze_bn"])
  model = D.build_model(d, 3)
  assert (model.arch, model.num_layers, model.use_batch_norm) == ("resnet", 18, False)
  assert D.build_model({}, 3) == model          # missing keys take the defaults
  assert D.build_model({"num_layers": 0}, 3).num_layers == 0      # 0 builds ResNet-18
  assert M.count_params(abstract({"num_layers": 0}))["convs"] == 23


def test_trainable_mask_freezes_convs_not_batch_norm():
  c = cfg(all_projections=True, freeze_blocks=[0, 1])
  params = abstract(c)["params"]
  mask = D.trainable_mask(params, c)
  assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
  flat = {M.path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  for frozen in ["conv1/kernel", "conv1/bias", "block_1a_conv_1/kernel",
                 "block_1b_conv_shortcut/bias"]:
    assert flat[frozen] is False, frozen
  for trainable in ["bn_conv1/scale", "block_1a_bn_1/bias", "block_2a_conv_1/kernel",
                    "output_cov/kernel", "output_bbox/bias"]:
    assert flat[trainable] is True, trainable
  # 11,544,335 trainable (reference, 3 classes) minus conv1 (7*7*3*64 + 64) and block 1's
  # convs: 2 repeats x (two 3x3 64->64 convs + a 1x1 shortcut), with biases.
  n = sum(int(np.prod(x.shape)) for x, m in zip(jax.tree_util.tree_leaves(params),
                                                jax.tree_util.tree_leaves(mask)) if m)
  assert n == 11_544_335 - 9_472 - 2 * (2 * 36_928 + 4_160)
  vgg = cfg("vgg", 16, freeze_blocks=[5])
  flat = {M.path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(
      D.trainable_mask(abstract(vgg)["params"], vgg))[0]}
  assert not flat["block_5c_conv_1/kernel"] and flat["block_4c_conv_1/kernel"]
  assert flat["block_5c_bn_1/scale"]


def test_frozen_parameters_do_not_move_and_freeze_bn_keeps_statistics():
  c = tiny_config(freeze_blocks=[0, 4], freeze_bn=True)
  model, model2 = D.build_model(c, 2), D.build_model(dict(c, freeze_bn=False), 2)
  v = init(model, 1)
  x = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3))
  mask = D.trainable_mask(v["params"], c)
  tx = optax.chain(optax.sgd(0.1), optax.masked(optax.set_to_zero(),
                                                jax.tree.map(lambda t: not t, mask)))

  @jax.jit       # one compilation for everything (op-by-op dispatch is slow on CPU)
  def run(v, x):
    def loss(params):           # a training step without freeze_bn
      (cov, bbox), new = model2.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                                      train=True, mutable=["batch_stats"])
      return jnp.mean(cov) + jnp.mean(bbox ** 2), new
    (_, new2), grads = jax.value_and_grad(loss, has_aux=True)(v["params"])
    updates, _ = tx.update(grads, tx.init(v["params"]), v["params"])
    _, new = model.apply(v, x, train=True, mutable=["batch_stats"])
    return new, new2, optax.apply_updates(v["params"], updates)

  new, new2, new_params = run(v, x)
  # freeze_bn: training mode normalises with the running averages and does not update them
  # (Flax updates them exactly when use_running_average is False); without it, it does.
  assert jax.tree_util.tree_all(jax.tree.map(jnp.array_equal, new["batch_stats"],
                                             v["batch_stats"]))
  assert not jnp.array_equal(new2["batch_stats"]["bn_conv1"]["mean"],
                             v["batch_stats"]["bn_conv1"]["mean"])
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), v["params"], new_params)
  assert not moved["conv1"]["kernel"] and not moved["block_4a_conv_2"]["bias"]
  assert moved["bn_conv1"]["scale"] and moved["output_cov"]["kernel"]
  assert moved["block_1a_conv_1"]["kernel"] and moved["block_4a_bn_2"]["bias"]


def test_compute_dtype_and_outputs():
  c = tiny_config("vgg", 16, width=8, use_pooling=True)
  v = init(D.build_model(c, 3), 3)
  x = jax.random.uniform(jax.random.key(4), (1, 32, 32, 3))

  @jax.jit
  def run(v, x):
    (cov32, bbox32), state = D.build_model(c, 3).apply(v, x, capture_intermediates=True)
    return cov32, bbox32, state, D.build_model(c, 3, compute_dtype="bfloat16").apply(v, x)

  cov32, bbox32, state, (cov16, bbox16) = run(v, x)
  assert cov32.shape == (1, 2, 2, 3) and bbox32.shape == (1, 2, 2, 12)
  assert cov16.dtype == bbox16.dtype == jnp.float32
  assert jax.tree_util.tree_all(jax.tree.map(lambda a: a.dtype == jnp.float32, v))
  assert bool(jnp.all((cov32 > 0) & (cov32 < 1)))
  np.testing.assert_allclose(cov16, cov32, atol=0.05)
  logits = state["intermediates"]["output_cov"]["__call__"][0]
  np.testing.assert_allclose(cov32, jax.nn.sigmoid(logits), rtol=1e-6)   # sigmoid applied
  np.testing.assert_allclose(bbox32, state["intermediates"]["output_bbox"]["__call__"][0])


def _check_graph(config, num_classes=3):
  graph = D.layer_graph(config, num_classes)
  v = abstract(config, num_classes, size=32)
  params = traverse_util.flatten_dict(v["params"], sep="/")
  kernels = sorted(k[:-len("/kernel")] for k in params if k.endswith("/kernel"))
  assert sorted(n.name for n in graph) == kernels          # every conv exactly once
  width = {n.name: n.width for n in graph}
  width["input"] = 3
  for n in graph:
    k = params[f"{n.name}/kernel"].shape
    assert k[-1] == n.width, n.name
    assert k[-2] == sum(width[i] for i in n.inputs), n.name
    if n.bn:
      assert params[f"{n.bn}/scale"].shape == (n.width,)
    assert n.head == (n.name in D.HEADS)
  for group in D.residual_groups(graph):
    assert len({width[m] for m in group}) == 1
  return graph


def test_layer_graph_resnet_groups():
  graph = _check_graph(cfg())
  groups = D.residual_groups(graph)
  assert len(groups) == 4 and {len(g) for g in groups} == {3}
  assert {"block_1a_conv_shortcut", "block_1a_conv_2", "block_1b_conv_2"} in groups
  by = {n.name: n for n in graph}
  assert by["block_1b_conv_1"].inputs == ("block_1a_conv_2",)   # a sum: its main-path conv
  assert by["block_1b_conv_2"].gates == "block_1a_conv_shortcut"
  assert by["block_1a_conv_shortcut"].gates is None and by["conv1"].residual == ()
  assert by["output_cov"].inputs == by["output_bbox"].inputs == ("block_4b_conv_2",)
  groups = D.residual_groups(_check_graph(cfg(all_projections=True)))
  assert len(groups) == 8 and {len(g) for g in groups} == {2}
  assert len(D.residual_groups(_check_graph(cfg(num_layers=50)))) == 4
  assert D.residual_groups(_check_graph(cfg("vgg", 19, use_pooling=True))) == []
  _check_graph(tiny_config(num_layers=34, width=8), num_classes=2)


def test_pruner_accepts_the_graph_and_the_widths_rebuild_the_model():
  c = tiny_config(num_layers=18, width=16)
  model = D.build_model(c, 2)
  v = init(model, 5)
  graph = D.layer_graph(c, 2)
  # Shrink the second half of every conv's filters: those fall under the threshold.
  shrink = jnp.where(jnp.arange(16) < 8, 1.0, 0.01)
  v = {"batch_stats": v["batch_stats"], "params": {
      k: dict(p, kernel=p["kernel"] * shrink) if "kernel" in p and k not in D.HEADS else p
      for k, p in v["params"].items()}}
  pruned, widths, layers = prune_lib.prune(v, graph, threshold=0.1, granularity=4,
                                           min_filters=4)
  assert set(widths) == {n.name for n in graph if not n.head and not n.gates}
  assert set(widths.values()) == {8}
  assert all(layers[n.name]["kept"] == 8 for n in graph if not n.head)    # groups follow
  rebuilt = D.build_model(dict(c, layer_widths=widths), 2)
  shapes = M.abstract_variables(rebuilt, 32, 32)
  same = jax.tree.map(lambda a, b: a.shape == np.shape(b), shapes, pruned)
  assert jax.tree_util.tree_all(same)
  cov, bbox = jax.jit(rebuilt.apply)(pruned, jnp.zeros((1, 32, 32, 3)))
  assert cov.shape == (1, 2, 2, 2) and bbox.shape == (1, 2, 2, 8)
