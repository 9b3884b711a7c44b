import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bpnet_jax
from bpnet_jax import losses
from bpnet_jax import model as M
from bpnet_jax import optimizer as O
from bpnet_jax.skeleton import load_skeleton
from configs import demo

SK = load_skeleton()


def test_stagewise_multiplier_groups_of_the_default_model():
  # The original's Lite S=3 multiplier groups (sum = 16,772,459 trainable).
  params = M.abstract_variables(M.BpNet(architecture="BpNetLiteModel", skeleton=SK, stages=3))["params"]
  mults = O.lr_multipliers(params, use_stagewise=True)
  groups = collections.Counter()
  for m, p in zip(jax.tree_util.tree_leaves(mults), jax.tree_util.tree_leaves(params)):
    groups[m] += int(np.prod(p.shape))
  assert groups == {1.0: 7_042_752 + 294_912 + 602_624 + 5_376, 2.0: 128 + 1_465,
                    4.0: 2 * 4_411_648, 8.0: 2 * 953}


@pytest.mark.parametrize("path, expected", [
    ("backbone/block_1a_conv_1/kernel", 1.0), ("channel_reduction_conv/bias", 2.0),
    ("stage1/paf_branch/out/bias", 2.0), ("stage2/conv1/kernel", 4.0),
    ("stage3/cmap/attention_conv/bias", 8.0), ("paf_out/kernel", 4.0), ("heatmap_out/bias", 8.0),
    ("stage10/conv1/kernel", 4.0),     # the original's 'stage1.*' regex wrongly gave x1 here
])
def test_stagewise_rule(path, expected):
  assert O.stagewise_multiplier(path) == expected


def _setup(batch=2, hw=32):
  cfg = demo.get_config()
  net = bpnet_jax.build_model(cfg.model, SK)
  variables = M.init_variables(net, jax.random.key(0), hw, hw)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-0.5, 0.5, (batch, hw, hw, 3)), jnp.float32)
  labels = jnp.asarray(rng.uniform(0, 1, (batch, hw // 8, hw // 8, SK.num_channels)), jnp.float32)
  masks = jnp.ones((batch, hw // 8, hw // 8, 1), jnp.float32)

  def loss_fn(params):
    (heats, pafs), _ = net.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                 train=True, mutable=["batch_stats"])
    return losses.pose_loss(heats, pafs, labels, masks, SK, params, "l1", 5e-4)[0]
  return variables["params"], jax.jit(jax.value_and_grad(loss_fn))


def _run(params, grad_fn, tx, steps=3):
  state = tx.init(params)
  for _ in range(steps):
    _, g = grad_fn(params)
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


def _changed(a, b):
  return {M.path_str(p): bool(jnp.any(x != y)) for (p, x), y in
          zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b))}


def test_zero_multipliers_freeze_parameters():
  params, grad_fn = _setup()
  lr = optax.constant_schedule(1e-2)
  frozen = _run(params, grad_fn, O.build_optimizer(params, lr, weight_default_value=0.0))
  assert not any(_changed(params, frozen).values())
  partial = _run(params, grad_fn, O.build_optimizer(
      params, lr, grad_weights_dict={"stage1/*": 0.0, "backbone/*": 0.5}))
  changed = _changed(params, partial)
  assert not any(v for k, v in changed.items() if k.startswith("stage1/"))
  assert all(v for k, v in changed.items() if k.startswith("stage2/") and k.endswith("kernel"))
  assert any(v for k, v in changed.items() if k.startswith("backbone/"))


def test_unit_multipliers_equal_plain_momentum_sgd():
  params, grad_fn = _setup()
  lr = optax.constant_schedule(1e-2)
  ours = _run(params, grad_fn, O.build_optimizer(params, lr, momentum=0.9))
  plain = _run(params, grad_fn, optax.sgd(lr, momentum=0.9))
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(plain)):
    np.testing.assert_array_equal(a, b)


def test_multipliers_scale_the_first_update():
  params, grad_fn = _setup()
  lr = optax.constant_schedule(1e-3)
  _, g = grad_fn(params)
  tx = O.build_optimizer(params, lr, use_stagewise_lr_multipliers=True)
  updates, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(updates["stage2"]["conv1"]["kernel"],
                             -1e-3 * 4 * g["stage2"]["conv1"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(updates["stage1"]["conv1"]["bias"],
                             -1e-3 * 2 * g["stage1"]["conv1"]["bias"], rtol=1e-6)
  np.testing.assert_allclose(updates["backbone"]["block_1a_bn_1"]["bias"],
                             -1e-3 * g["backbone"]["block_1a_bn_1"]["bias"], rtol=1e-6)


def test_nesterov_differs_from_heavy_ball():
  params, grad_fn = _setup()
  lr = optax.constant_schedule(1e-2)
  a = _run(params, grad_fn, O.build_optimizer(params, lr, use_nesterov=False), steps=2)
  b = _run(params, grad_fn, O.build_optimizer(params, lr, use_nesterov=True), steps=2)
  assert not np.allclose(a["paf_out"]["kernel"], b["paf_out"]["kernel"])


def test_optimizer_from_config_uses_the_schedule():
  cfg = demo.get_config()
  params, grad_fn = _setup()
  from bpnet_jax import schedules
  sched = schedules.from_config(cfg.optimizer.learning_rate_schedule, 10, 100)
  tx = O.optimizer_from_config(cfg, params, sched)
  _, g = grad_fn(params)
  updates, _ = tx.update(g, tx.init(params), params)
  # Step 0 uses min_learning_rate; paf_out kernels get x4.
  np.testing.assert_allclose(updates["paf_out"]["kernel"],
                             -cfg.optimizer.learning_rate_schedule.min_learning_rate * 4
                             * g["paf_out"]["kernel"], rtol=1e-5)


def test_adam_is_opt_in_and_matches_optax():
  params, grad_fn = _setup()
  lr = optax.constant_schedule(1e-3)
  ours = _run(params, grad_fn, O.build_optimizer(params, lr, momentum=0.8, name="adam"), steps=2)
  ref = _run(params, grad_fn, optax.adam(1e-3, b1=0.8), steps=2)
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  # A multiplier 0 still freezes a parameter; other multipliers do not change Adam's step much.
  frozen = _run(params, grad_fn, O.build_optimizer(
      params, lr, grad_weights_dict={"stage1/*": 0.0}, name="adam"), steps=1)
  changed = _changed(params, frozen)
  assert not any(v for k, v in changed.items() if k.startswith("stage1/"))
  assert changed["paf_out/kernel"]
  cfg = demo.get_config()
  assert cfg.optimizer.name == "sgd"
  cfg.optimizer.name = "adam"
  tx = O.optimizer_from_config(cfg, params, lr)
  _, g = grad_fn(params)
  updates, _ = tx.update(g, tx.init(params), params)
  # Adam's first step is -lr * sign(g) (up to epsilon), whatever the stage-wise multiplier.
  u, gk = updates["paf_out"]["kernel"], g["paf_out"]["kernel"]
  big = jnp.abs(gk) > 1e-4
  np.testing.assert_allclose(u[big], -1e-3 * jnp.sign(gk[big]), rtol=1e-3)
  with pytest.raises(ValueError, match="rmsprop"):
    O.build_optimizer(params, lr, name="rmsprop")
