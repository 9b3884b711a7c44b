import numpy as np
import pytest

from bpnet_jax import schedules


def test_soft_start_annealing_reference_vector():
  f = schedules.soft_start_annealing(1.0, 0.1, 0.05, 0.5, 1000)
  got = [float(f(s)) for s in [1, 200, 400, 600, 800, 999]]
  np.testing.assert_allclose(got, [0.10471285, 1.0, 1.0, 0.63095725, 0.25118864, 0.100461565],
                             rtol=1e-6)


def test_soft_start_annealing_worked_example():
  # The original's schedule: s=0.05, a=0.5, 8e-8 -> 2e-5, progress p at last_step 1000.
  f = schedules.soft_start_annealing(2e-5, 8e-8, 0.05, 0.5, 1000)
  table = {0: 8.0e-08, 10: 2.41367e-07, 25: 1.264911e-06, 40: 6.62891e-06, 50: 2.0e-05,
           300: 2.0e-05, 500: 2.0e-05, 600: 6.62891e-06, 750: 1.264911e-06, 900: 2.41367e-07,
           1000: 8.0e-08}
  for step, lr in table.items():
    np.testing.assert_allclose(float(f(step)), lr, rtol=1e-5, err_msg=f"step {step}")
  assert float(f(0)) == pytest.approx(8e-8, rel=1e-6)      # the first update uses min_lr


@pytest.mark.parametrize("staircase, min_lr, expected", [
    (False, 0.0, [0.1, 0.01, 0.0015848934, 0.0001]),
    (False, 5e-4, [0.1, 0.01, 0.0015848934, 0.0005]),
    (True, 0.0, [0.1, 0.01, 0.01, 0.0001]),
    (True, 5e-4, [0.1, 0.01, 0.01, 0.0005]),
])
def test_exponential_decay_reference_vectors(staircase, min_lr, expected):
  # steps_per_epoch 25, decay_epochs 1 -> decay_steps 25; evaluated at 25, 50, 70, 100.
  f = schedules.exponential_decay(1.0, 25, 0.1, staircase, min_lr)
  np.testing.assert_allclose([float(f(s)) for s in [25, 50, 70, 100]], expected, rtol=1e-6)


def test_from_config_uses_steps_per_epoch():
  from bpnet_jax.config import default_config
  c = default_config().optimizer.learning_rate_schedule
  c.type = "exponential_decay"
  c.learning_rate, c.decay_epochs, c.decay_rate, c.staircase, c.min_learning_rate = \
      1.0, 1.0, 0.1, True, 0.0
  f = schedules.from_config(c, steps_per_epoch=25, last_step=100)
  assert float(f(24)) == pytest.approx(1.0) and float(f(25)) == pytest.approx(0.1)


@pytest.mark.parametrize("args", [(1.0, 0.1, 0.6, 0.5, 10), (1.0, 0.0, 0.1, 0.5, 10),
                                  (1.0, 0.1, 0.1, 0.5, 0)])
def test_soft_start_rejects_impossible_values(args):
  with pytest.raises(ValueError):
    schedules.soft_start_annealing(*args)
