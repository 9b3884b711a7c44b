import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_skeleton import five_joint_json

import bpnet_jax
from bpnet_jax import model as M
from bpnet_jax.skeleton import load_skeleton
from configs import demo

SK = load_skeleton()


@pytest.mark.parametrize("downsampling", ["strided_conv", "max_pool"])
@pytest.mark.parametrize("arch, stages, attention, total, trainable, convs", [
    ("BpNetLiteModel", 3, False, 16_777_835, 16_772_459, 37),
    ("BpNetLiteModel", 6, False, 30_015_638, 30_010_262, 64),
    ("BpNetModel", 3, False, 25_965_035, 25_959_659, 50),
    ("BpNetModel", 6, False, 52_319_510, 52_314_134, 92),
    # With attention gates: +147,584 per gate (the original's counts).
    ("BpNetLiteModel", 3, True, 17_368_171, 17_362_795, 41),
    ("BpNetModel", 3, True, 26_555_371, 26_549_995, 54),
])
def test_reference_parameter_counts(arch, stages, attention, total, trainable, convs,
                                    downsampling):
  v = M.abstract_variables(M.BpNet(skeleton=SK, architecture=arch, stages=stages,
                                   use_self_attention=attention,
                                   backbone_downsampling=downsampling))
  c = M.count_params(v)
  assert (c["total"], c["trainable"], c["convs"]) == (total, trainable, convs)
  assert c["non_trainable"] == 5_376         # BN moving mean + variance


def _paths(tree):
  return {M.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_parameter_names_are_stable():
  v = M.abstract_variables(M.BpNet(architecture="BpNetLiteModel", skeleton=SK, stages=3, use_self_attention=True))
  names = _paths(v["params"])
  for expected in ["backbone/block_1a_conv_1/kernel", "backbone/block_4b_bn_1/scale",
                   "backbone/block_6a_conv_1/kernel", "channel_reduction_conv/kernel",
                   "stage1/conv3/kernel", "stage1/paf/conv4/kernel", "stage1/cmap/conv4/bias",
                   "stage1/paf_branch/out/kernel", "stage1/heat_branch/out/kernel",
                   "stage2/conv5/kernel", "stage2/paf/attention_conv/kernel",
                   "stage3/cmap/conv6/kernel", "paf_out/kernel", "heatmap_out/bias"]:
    assert expected in names, expected
  assert "backbone/block_1a_conv_1/bias" not in names        # backbone convs have no bias
  assert not any(n.startswith("stage3/paf_branch") for n in names)   # last stage: paf_out
  assert _paths(v["batch_stats"]) == {f"backbone/{b}_bn_1/{s}" for b, *_ in M.VGG_BACKBONE
                                      for s in ("mean", "var")}
  full = _paths(M.abstract_variables(M.BpNet(architecture="BpNetModel", skeleton=SK, stages=3))["params"])
  assert {"stage2/paf_branch/conv5/kernel", "stage2/heat_branch/conv6/kernel",
          "stage2/paf_branch/out/kernel", "stage1/heat_branch/conv4/kernel",
          "paf_out/kernel"} <= full


def tiny(**kw):
  cfg = demo.get_config()
  for k, v in kw.items():
    cfg.model[k] = v
  return bpnet_jax.build_model(cfg.model, SK)


@pytest.mark.parametrize("h, w", [(64, 64), (40, 72)])
def test_forward_shapes_any_multiple_of_8(h, w):
  net = tiny()
  v = M.init_variables(net, jax.random.key(0), h, w)
  heats, pafs = jax.jit(net.apply)(v, jnp.ones((2, h, w, 3)))
  assert len(heats) == len(pafs) == 2
  for hm, paf in zip(heats, pafs):
    assert hm.shape == (2, h // 8, w // 8, 19) and paf.shape == (2, h // 8, w // 8, 38)
    assert hm.dtype == jnp.float32
  # Stage 2 depends on stage 1 (its input concatenates the stage-1 maps).
  diff = float(jnp.abs(heats[0] - heats[1]).max())
  assert diff > 1e-3 * float(jnp.abs(heats[1]).max())


def test_full_model_forward():
  net = tiny(architecture="BpNetModel", use_self_attention=True)
  v = M.init_variables(net, jax.random.key(1), 32, 32)
  heats, pafs = net.apply(v, jax.random.normal(jax.random.key(2), (1, 32, 32, 3)))
  assert heats[-1].shape == (1, 4, 4, 19) and pafs[-1].shape == (1, 4, 4, 38)


def test_model_for_a_five_joint_skeleton(tmp_path):
  path = tmp_path / "stick5.json"
  path.write_text(json.dumps(five_joint_json()))
  sk = load_skeleton(str(path))
  net = bpnet_jax.build_model(demo.get_config().model, sk)
  v = M.init_variables(net, jax.random.key(0), 32, 32)
  heats, pafs = net.apply(v, jnp.zeros((1, 32, 32, 3)))
  assert heats[-1].shape[-1] == 6 and pafs[-1].shape[-1] == 8
  assert v["params"]["heatmap_out"]["kernel"].shape[-1] == 6


def test_batchnorm_train_mode_updates_stats():
  net = tiny()
  v = M.init_variables(net, jax.random.key(0), 32, 32)
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  _, new = net.apply(v, x, train=True, mutable=["batch_stats"])
  old_mean = v["batch_stats"]["backbone"]["block_1a_bn_1"]["mean"]
  new_mean = new["batch_stats"]["backbone"]["block_1a_bn_1"]["mean"]
  assert not np.allclose(old_mean, new_mean)
  # Keras momentum 0.99: new = 0.99 * old (0 at init) + 0.01 * batch mean of the conv output.
  k = v["params"]["backbone"]["block_1a_conv_1"]["kernel"]
  y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(new_mean, 0.01 * y.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-7)


def test_bfloat16_compute_keeps_float32_params():
  net = bpnet_jax.build_model(demo.get_config().model, SK, compute_dtype="bfloat16")
  v = M.init_variables(net, jax.random.key(0), 32, 32)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(v))
  heats, _ = net.apply(v, jnp.ones((1, 32, 32, 3)))
  assert heats[-1].dtype == jnp.bfloat16


def test_kernel_initializers():
  for kind, check in [("random_normal", lambda k: abs(float(k.std()) - 0.01) < 0.002),
                      ("xavier", lambda k: float(jnp.abs(k).max()) <= np.sqrt(6 / (9 * 16 + 9 * 16)))]:
    net = tiny(kernel_initializer=kind)
    v = M.init_variables(net, jax.random.key(0), 32, 32)
    k = v["params"]["stage2"]["conv1"]["kernel"]       # 3x3, 185*... in, 16 out
    fan_in = k.shape[0] * k.shape[1] * k.shape[2]
    if kind == "xavier":
      assert float(jnp.abs(k).max()) <= np.sqrt(6 / (fan_in + 9 * k.shape[3])) + 1e-6
      assert float(k.std()) > 0.02
    else:
      assert check(k)
    assert float(jnp.abs(v["params"]["stage2"]["conv1"]["bias"]).max()) == 0.0


def test_layer_width_overrides_rebuild_a_pruned_architecture():
  net = tiny(layer_widths={"stage1/conv1": 5, "backbone/block_2a_conv_1": 3,
                           "channel_reduction_conv": 7})
  v = M.init_variables(net, jax.random.key(0), 32, 32)
  p = v["params"]
  assert p["stage1"]["conv1"]["kernel"].shape[-1] == 5
  assert p["stage1"]["conv2"]["kernel"].shape[2] == 5
  assert p["backbone"]["block_2a_conv_1"]["kernel"].shape[-1] == 3
  assert p["backbone"]["block_2a_bn_1"]["scale"].shape == (3,)
  assert p["backbone"]["block_2b_conv_1"]["kernel"].shape[2] == 3
  assert p["stage2"]["conv1"]["kernel"].shape[2] == 7 + 19 + 38     # concat(F, heat, paf)


def test_param_table_lists_modules():
  v = M.abstract_variables(M.BpNet(architecture="BpNetLiteModel", skeleton=SK, stages=3))
  table = M.param_table(v)
  assert "backbone" in table and "16,777,835" in table.splitlines()[-1]
  assert "backbone/block_1a_conv_1" in M.param_table(v, depth=2)


@pytest.mark.parametrize("mode, pads", [("symmetric", ((1, 1), (1, 1))),
                                        ("same_lax", ((0, 1), (0, 1)))])
def test_stride_2_padding_modes(mode, pads):
  assert M.conv_padding(mode, 3, 2) == pads
  assert M.conv_padding(mode, 7, 1) == ((3, 3), (3, 3))            # stride 1: the same
  # A 3x3 stride-2 conv whose kernel picks the top-left tap: output (0, 0) reads input (-1, -1)
  # (zero padding) under symmetric padding, input (0, 0) under lax SAME.
  conv = M.Conv(1, 3, 2, padding=M.conv_padding(mode, 3, 2), use_bias=False)
  kernel = jnp.zeros((3, 3, 1, 1)).at[0, 0, 0, 0].set(1.0)
  x = jnp.arange(1.0, 65.0).reshape(1, 8, 8, 1)
  y = conv.apply({"params": {"kernel": kernel}}, x)
  assert y.shape == (1, 4, 4, 1)
  assert float(y[0, 0, 0, 0]) == (0.0 if mode == "symmetric" else 1.0)
  assert float(y[0, 1, 1, 0]) == (float(x[0, 1, 1, 0]) if mode == "symmetric"
                                  else float(x[0, 2, 2, 0]))
