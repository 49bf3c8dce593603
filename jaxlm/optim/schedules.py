"""Learning-rate schedules: linear warmup followed by cosine, WSD or constant.

:func:`make_schedule` turns a :class:`~jaxlm.config.TrainConfig` into an ``optax.Schedule`` (a
jittable ``count -> lr``). The schedule always spans ``train.steps``; ``train.stop_at`` only ends a
run early, so a run that is stopped and resumed sees exactly the same learning rates.

Step convention. optax calls the schedule with its 0-based update counter ``i`` (0 for the first
update). We write ``k = i + 1`` for the 1-based update number, so the first update uses ``lr/W``
(not 0, which would waste a step), update ``W`` uses the peak ``lr`` and the last update
(``k = steps``) uses the floor ``lr_min = lr * min_lr_ratio``. ``W = min(warmup_steps, steps)``.

* ``cosine`` (Loshchilov & Hutter 2017, SGDR eq. 5, single cycle):
  ``lr(k) = lr * k / W`` for ``k <= W``, then
  ``lr(k) = lr_min + (lr - lr_min) * (1 + cos(pi * (k - W) / (steps - W))) / 2``.
* ``wsd`` warmup-stable-decay (Hu et al. 2024, MiniCPM, Sec. 4; Hägele et al. 2024): warmup, hold
  ``lr`` constant, then spend the last ``D = floor(decay_fraction * steps)`` updates decaying
  linearly to ``lr_min``: ``lr(k) = lr + (lr_min - lr) * (k - (steps - D)) / D`` for
  ``k > steps - D``. The decay never starts before warmup ends (``D <= steps - W``). Because the
  stable phase is flat, a WSD run can be branched into a cool-down from any stable checkpoint.
* ``constant``: warmup, then ``lr`` forever.

Every counter beyond ``steps`` returns the final value. Example::

    from jaxlm.config import TrainConfig
    from jaxlm.optim.schedules import make_schedule
    sched = make_schedule(TrainConfig(steps=100, lr=1e-3, warmup_steps=10, schedule="wsd"))
    float(sched(0)), float(sched(9)), float(sched(99))  # -> (1e-4, 1e-3, 1e-4)
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jaxlm.config import ConfigError, TrainConfig

SCHEDULES = ("cosine", "wsd", "constant")


def _warmup(lr: float, warmup: int) -> optax.Schedule:
    # k -> lr * k / W for k in [0, W]; W == 0 never gets called for k >= 1 (see join below).
    return optax.linear_schedule(init_value=0.0, end_value=lr, transition_steps=max(warmup, 1))


def _by_update_number(t: TrainConfig) -> optax.Schedule:
    """The schedule as a function of the 1-based update number ``k``."""
    lr, steps = t.lr, t.steps
    warmup = min(t.warmup_steps, steps)
    lr_min = lr * t.min_lr_ratio
    if t.schedule == "cosine":
        if warmup >= steps:  # no room left to decay: pure warmup
            return _warmup(lr, warmup)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=steps, end_value=lr_min)
    if t.schedule == "wsd":
        if not 0.0 <= t.decay_fraction <= 1.0:
            raise ConfigError(f"train.decay_fraction={t.decay_fraction} must be in [0, 1]")
        decay = min(int(t.decay_fraction * steps), steps - warmup)
        return optax.join_schedules(
            [_warmup(lr, warmup), optax.constant_schedule(lr),
             optax.linear_schedule(init_value=lr, end_value=lr_min, transition_steps=decay)],
            boundaries=[warmup, steps - decay])
    if t.schedule == "constant":
        return optax.join_schedules([_warmup(lr, warmup), optax.constant_schedule(lr)], [warmup])
    raise ConfigError(f"train.schedule={t.schedule!r} is not one of: {', '.join(SCHEDULES)}")


def make_schedule(t: TrainConfig) -> optax.Schedule:
    """``TrainConfig -> (i -> lr)`` where ``i`` is optax's 0-based update count (jittable)."""
    by_k = _by_update_number(t)

    def schedule(count):
        return jnp.asarray(by_k(count + 1), jnp.float32)

    return schedule
