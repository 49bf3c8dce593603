"""Learning-rate schedules: linear warmup, then cosine, WSD, constant, or an infinite schedule.

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

**Infinite schedules** (Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually
Pre-train Large Language Models", TMLR, arXiv 2403.08763, Sec. 7.4): warmup, a cooldown to a
constant ``eta_c``, a constant phase of any length -- which a later run on new data continues
without re-warming -- and an optional short final annealing when a finished model is wanted.
With ``g = k + schedule_offset`` the position on the schedule, ``C = cooldown_steps``,
``eta_c = lr * const_lr_ratio``, ``A = anneal_steps`` and ``eta_min = lr * min_lr_ratio``
(``W = warmup_steps``, not clamped to ``steps`` here)::

    warmup     g <= W:           lr(g) = lr * g / W
    cooldown   W < g <= W + C:   x = (g - W) / C
        infinite_cosine:         lr(g) = eta_c + (lr - eta_c) * (1 + cos(pi * x)) / 2
        infinite_rsqrt:          lr(g) = lr + (eta_c - lr) * h(x) / h(1),
                                 h(x) = 1 / sqrt(1 + alpha * x) - 1      (alpha = rsqrt_alpha)
    constant   g > W + C:        lr(g) = eta_c
    annealing  k > steps - A:    lr(k) = eta_c * (eta_min / eta_c) ** ((k - (steps - A)) / A)

Each phase meets the next continuously (``lr`` at ``g = W``, ``eta_c`` at ``g = W + C``,
``eta_min`` at ``k = steps``). The annealing is the last ``A`` updates of *this* run and must
start in the constant phase (config check). Continuing on new data without re-warming:
``init_from=ckpt:RUN`` + the same schedule + ``train.schedule_offset`` >= ``W + C`` (e.g. the
source run's ``train.steps``) starts the new run in the constant phase at ``eta_c``; the
annealing, if any, then happens at the end of the new run. ``schedule_offset`` only shifts the
schedule: the optimizer and data start fresh as always with ``init_from``.

What was checked: the four phases, the cosine cooldown from ``lr`` to ``eta_c`` and the
exponential annealing ``eta_c * (eta_min / eta_c) ** (progress)`` agree with a public
implementation of Eq. 1 of the follow-up paper by the same group (Singh, ..., Ibrahim, ...,
Thérien, "Beyond Cosine Decay", arXiv 2503.02844). Not checked against the PDF of 2403.08763
itself (only its abstract was reachable here): the inverse-sqrt cooldown's form ``h(x)`` and
its normalisation are written from memory of Sec. 7.4 -- ``rsqrt_alpha`` is our name for its
steepness; the annealing in the paper is exponential as here.

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

SCHEDULES = ("cosine", "wsd", "constant", "infinite_cosine", "infinite_rsqrt")


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
    if t.schedule in ("infinite_cosine", "infinite_rsqrt"):
        return _infinite(t)
    raise ConfigError(f"train.schedule={t.schedule!r} is not one of: {', '.join(SCHEDULES)}")


def _infinite(t: TrainConfig) -> optax.Schedule:
    """``infinite_cosine`` / ``infinite_rsqrt`` as a function of the 1-based update number ``k``
    (the equations in the module docstring)."""
    lr, steps, warmup, cool = t.lr, t.steps, t.warmup_steps, t.cooldown_steps
    eta_c, eta_min, anneal = lr * t.const_lr_ratio, lr * t.min_lr_ratio, t.anneal_steps
    alpha = t.rsqrt_alpha

    def h(x):
        return 1.0 / jnp.sqrt(1.0 + alpha * x) - 1.0

    def by_k(k):
        k = jnp.minimum(jnp.asarray(k, jnp.float32), steps)  # beyond the run: its final value
        g = k + t.schedule_offset
        x = jnp.clip((g - warmup) / max(cool, 1), 0.0, 1.0)
        if t.schedule == "infinite_cosine":
            cooled = eta_c + (lr - eta_c) * (1.0 + jnp.cos(jnp.pi * x)) / 2.0
        else:
            cooled = lr + (eta_c - lr) * h(x) / h(1.0)
        out = jnp.where(g <= warmup, lr * g / max(warmup, 1),
                        jnp.where(g <= warmup + cool, cooled, eta_c))
        if anneal:
            a = jnp.clip((k - (steps - anneal)) / anneal, 0.0, 1.0)
            out = jnp.where(k > steps - anneal, eta_c * (eta_min / eta_c) ** a, out)
        return out

    return by_k


def make_schedule(t: TrainConfig) -> optax.Schedule:
    """``TrainConfig -> (i -> lr)`` where ``i`` is optax's 0-based update count (jittable)."""
    by_k = _by_update_number(t)

    def schedule(count):
        return jnp.asarray(by_k(count + 1), jnp.float32)

    return schedule
