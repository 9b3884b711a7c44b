import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpnet_jax import losses
from bpnet_jax.skeleton import Skeleton, load_skeleton

SK = load_skeleton()


def _random_case(sk, stages=3, b=2, h=16, w=16, seed=0):
  rng = np.random.default_rng(seed)
  heats = [rng.normal(size=(b, h, w, sk.heat_channels)).astype(np.float32) for _ in range(stages)]
  pafs = [rng.normal(size=(b, h, w, sk.paf_channels)).astype(np.float32) for _ in range(stages)]
  labels = rng.normal(size=(b, h, w, sk.num_channels)).astype(np.float32)
  masks = (rng.uniform(size=(b, h, w, sk.num_channels)) > 0.3).astype(np.float32)
  return heats, pafs, labels, masks


def _np_term(p, y, m):
  return 0.5 * np.sum(((p.astype(np.float64) - y) * m) ** 2)


@pytest.mark.parametrize("joints, limbs", [(18, 19), (10, 10), (3, 2)])
def test_stage_losses_match_numpy(joints, limbs):
  sk = Skeleton("t", tuple(f"j{i}" for i in range(joints)),
                tuple((i % joints, (i + 1) % joints) for i in range(limbs)), ())
  heats, pafs, labels, masks = _random_case(sk)
  terms = losses.stage_losses(heats, pafs, labels, masks, sk)
  npaf = 2 * limbs
  for s in range(3):
    np.testing.assert_allclose(
        terms[f"cmap_loss_stage{s + 1}"], _np_term(heats[s], labels[..., npaf:], masks[..., npaf:]),
        rtol=1e-5)
    np.testing.assert_allclose(
        terms[f"paf_loss_stage{s + 1}"], _np_term(pafs[s], labels[..., :npaf], masks[..., :npaf]),
        rtol=1e-5)


def test_single_channel_mask_broadcasts():
  heats, pafs, labels, masks = _random_case(SK)
  one = masks[..., :1]
  tiled = np.repeat(one, SK.num_channels, axis=-1)
  a = losses.stage_losses(heats, pafs, labels, one, SK)
  b = losses.stage_losses(heats, pafs, labels, tiled, SK)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6)


def test_total_divides_data_by_batch_and_adds_regularization():
  heats, pafs, labels, masks = _random_case(SK, b=4)
  params = {"conv": {"kernel": jnp.full((3, 3, 2, 2), -0.5), "bias": jnp.ones((2,))},
            "bn": {"scale": jnp.full((2,), 7.0), "bias": jnp.full((2,), 7.0)}}
  total, terms = losses.pose_loss(heats, pafs, labels, masks, SK, params, "l1", 1e-2, 0.0)
  data = sum(v for k, v in terms.items() if "stage" in k) / 4
  np.testing.assert_allclose(terms["data_loss"], data, rtol=1e-6)
  np.testing.assert_allclose(terms["regularization_loss"], 1e-2 * 36 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(total, data + 0.18, rtol=1e-6)


@pytest.mark.parametrize("kind, expected", [
    ("l1", 0.1 * (36 * 0.5) + 0.2 * 2),
    ("l2", 0.1 * (36 * 0.25) + 0.2 * 2),
    ("l1_l2", 0.1 * (36 * 0.75) + 0.2 * 4),    # the configured factor on both terms
    ("none", 0.0),
])
def test_regularization_on_conv_kernels_and_biases_only(kind, expected):
  params = {"stage1": {"conv1": {"kernel": jnp.full((3, 3, 2, 2), -0.5),
                                 "bias": jnp.ones((2,))}},
            "backbone": {"block_1a_bn_1": {"scale": jnp.full((4,), 9.0),
                                           "bias": jnp.full((4,), 9.0)}}}
  got = losses.regularization(params, kind, 0.1, 0.2)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_focal_variant_matches_formula():
  heats, pafs, labels, masks = _random_case(SK, stages=1)
  labels = np.abs(labels) * (np.abs(labels) > 0.5)
  focal = dict(alpha=0.1, beta=0.02, bkg_thresh=0.01, gamma=2.0)
  terms = losses.stage_losses(heats, pafs, labels, masks, SK, focal)
  p, y, m = heats[0], labels[..., 38:], masks[..., 38:]
  scale = np.where(y > 0.01, np.abs(1 + 0.1 - p), np.abs(p + 0.02)) ** 2
  np.testing.assert_allclose(terms["cmap_loss_stage1"],
                             0.5 * np.sum(((p - y) * m * scale).astype(np.float64) ** 2),
                             rtol=1e-4)


def test_loss_gradient_is_finite_and_masked():
  heats, pafs, labels, masks = _random_case(SK, stages=2)
  masks[0] = 0.0
  g = jax.grad(lambda h: losses.pose_loss([h, heats[1]], pafs, labels, masks, SK)[0])(
      jnp.asarray(heats[0]))
  assert np.isfinite(g).all()
  assert float(jnp.abs(g[0]).max()) == 0.0 and float(jnp.abs(g[1]).max()) > 0
