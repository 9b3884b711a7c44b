"""Learning-rate schedules as optax-style `step -> lr` functions (jit-friendly, float32).

The step passed in is the number of updates already applied (optax's count), so the first
update uses `schedule(0)`, exactly as the original used the pre-increment global step.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

SCHEDULES = ("softstart_annealing", "exponential_decay")


def soft_start_annealing(base_lr: float, min_lr: float, soft_start: float, annealing: float,
                         last_step: int):
  """Log-linear ramp from min_lr to base_lr, plateau, log-linear ramp back down.

  With progress p = step / last_step (clipped to [0, 1]):
    t = p / soft_start          if p < soft_start      (t = 1 when soft_start == 0)
    t = 1                       if soft_start <= p <= annealing
    t = (1 - p) / (1 - annealing) if p > annealing      (t = 1 when annealing >= 1; wins ties)
    lr = min_lr * (base_lr / min_lr) ** t
  """
  if not 0 < min_lr <= base_lr:
    raise ValueError(f"need 0 < min_lr <= base_lr, got min_lr={min_lr}, base_lr={base_lr}")
  if not 0 <= soft_start <= annealing <= 1:
    raise ValueError(f"need 0 <= soft_start <= annealing <= 1, got soft_start={soft_start}, "
                     f"annealing={annealing}")
  if last_step <= 0:
    raise ValueError(f"last_step must be positive, got {last_step}")
  log_min = np.float32(np.log(min_lr))
  log_span = np.float32(np.log(base_lr) - np.log(min_lr))

  def schedule(step):
    p = jnp.clip(jnp.asarray(step, jnp.float32) / jnp.float32(last_step), 0.0, 1.0)
    t = jnp.ones_like(p)
    if soft_start > 0:
      t = jnp.where(p < soft_start, p / jnp.float32(soft_start), t)
    if annealing < 1:
      t = jnp.where(p > annealing, (1.0 - p) / jnp.float32(1.0 - annealing), t)
    return jnp.exp(log_min + t * log_span)
  return schedule


def exponential_decay(learning_rate: float, decay_steps: int, decay_rate: float,
                      staircase: bool = False, min_learning_rate: float = 0.0):
  """lr = max(min_lr, lr0 * decay_rate ** (step / decay_steps)); exponent floored if staircase."""
  if decay_steps <= 0:
    raise ValueError(f"decay_steps must be positive, got {decay_steps}")

  def schedule(step):
    e = jnp.asarray(step, jnp.float32) / jnp.float32(decay_steps)
    if staircase:
      e = jnp.floor(e)
    lr = jnp.float32(learning_rate) * jnp.power(jnp.float32(decay_rate), e)
    return jnp.maximum(lr, jnp.float32(min_learning_rate))
  return schedule


def from_config(schedule_config, steps_per_epoch: int, last_step: int):
  """Builds the schedule of `config.optimizer.learning_rate_schedule`.

  last_step (= num_epoch * steps_per_epoch) feeds the soft-start schedule, as the original
  trainer overwrote the spec's value; decay_epochs are converted with steps_per_epoch.
  """
  c = schedule_config
  if c.type == "softstart_annealing":
    return soft_start_annealing(float(c.base_learning_rate), float(c.min_learning_rate),
                                float(c.soft_start), float(c.annealing), int(last_step))
  if c.type == "exponential_decay":
    return exponential_decay(float(c.learning_rate), int(c.decay_epochs * steps_per_epoch),
                             float(c.decay_rate), bool(c.staircase), float(c.min_learning_rate))
  raise ValueError(f"learning_rate_schedule.type must be one of {SCHEDULES}, got {c.type!r}")
