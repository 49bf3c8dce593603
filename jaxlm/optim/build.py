"""Optimizer factory: ``cfg.optim.name`` -> an ``optax.GradientTransformation``, via a registry.

``adamw`` is AdamW with decoupled weight decay (Loshchilov & Hutter 2019, Alg. 2), preceded by
global-norm gradient clipping (``optim.grad_clip > 0``). With ``g`` the (clipped) gradient,
``t`` the 1-based update number and ``lr_t`` the scheduled learning rate
(:func:`~jaxlm.optim.schedules.make_schedule`)::

    m_t = b1 * m_{t-1} + (1 - b1) * g          v_t = b2 * v_{t-1} + (1 - b2) * g**2
    m^  = m_t / (1 - b1**t)                     v^  = v_t / (1 - b2**t)
    p_t = p_{t-1} - lr_t * (m^ / (sqrt(v^) + eps) + wd * mask * p_{t-1})

This is optax's (and PyTorch's) convention: the decay is multiplied by the scheduled ``lr_t``,
i.e. Alg. 2 with its ``alpha * eta_t`` folded into ``lr_t`` and ``lambda = wd``. The weight-decay
mask (:func:`decay_mask`) is a pure function of parameter *paths*, never of shapes: norm gains
(last key ``scale``), biases, and embeddings / output head (any key containing ``embed`` or
``lm_head``) are not decayed unless ``optim.wd_norms`` / ``optim.wd_embeddings`` say so.
Stacked (scanned) layers carry a leading ``[n_layers]`` axis, which is why ndim is not used.

Plug-ins add optimizers with :func:`register_optimizer` (which also extends the validated
``optim.name`` choices); a builder takes the full :class:`~jaxlm.config.Config`.
:func:`build_optimizer` wraps whatever the builder returns with the generic restarts of
:mod:`jaxlm.optim.restarts` (momentum reset + LR re-warmup, weight refactorization), so
``optim.reset_every`` works for every method, ``adamw`` included, and counts the updates it
applies (:class:`UpdateCount`) so the train step can log the learning rate the update used:
:func:`learning_rate` (the schedule times the restarts' re-warmup factor) at that count.

Example::

    import jax.numpy as jnp
    from jaxlm.config import Config
    from jaxlm.optim import build_optimizer, lr_at
    tx = build_optimizer(Config())
    params = {"blocks": {"mlp": {"w_gate": {"kernel": jnp.ones((2, 4, 8))}}},
              "final_norm": {"scale": jnp.ones(4)}}
    opt_state = tx.init(params)
    updates, opt_state = tx.update(params, opt_state, params)  # grads, state, params
    lr_at(Config(), 0)  # learning rate of the first update
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm.config import Config, ConfigError, OptimConfig, register_choice
from jaxlm.optim.schedules import make_schedule
from jaxlm.utils.trees import path_names

OptimizerBuilder = Callable[[Config], optax.GradientTransformation]
OPTIMIZERS: dict[str, OptimizerBuilder] = {}


def register_optimizer(name: str, builder: OptimizerBuilder) -> None:
    """Make ``optim.name=<name>`` build ``builder(cfg)``; also accepted by config validation."""
    OPTIMIZERS[name] = builder
    register_choice("optim.name", name)


class UpdateCount(NamedTuple):
    """The outermost optimizer state: how many updates were applied. It lives in the optimizer
    state, so a step whose update is not applied (non-finite guard) does not advance it either."""
    count: jax.Array  # int32 []
    inner: Any


def count_updates(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        updates, inner_state = inner.update(updates, state.inner, params)
        return updates, UpdateCount(state.count + 1, inner_state)

    return optax.GradientTransformation(
        lambda p: UpdateCount(jnp.zeros((), jnp.int32), inner.init(p)), update)


def build_optimizer(cfg: Config) -> optax.GradientTransformation:
    """The optimizer named by ``cfg.optim.name`` (raises ConfigError if it is not registered),
    with the restarts of ``optim.reset_every`` / ``optim.refactor_every`` when they are set,
    its state an :class:`UpdateCount`."""
    from jaxlm.optim.restarts import with_restarts

    builder = OPTIMIZERS.get(cfg.optim.name)
    if builder is None:
        raise ConfigError(f"optim.name={cfg.optim.name!r} is not a registered optimizer "
                          f"(available: {', '.join(sorted(OPTIMIZERS))})")
    return count_updates(with_restarts(cfg, builder(cfg)))


def learning_rate(cfg: Config) -> optax.Schedule:
    """``count -> lr`` that the update with 0-based index ``count`` applies: the schedule times,
    with ``optim.reset_every``, the re-warmup factor (:func:`jaxlm.optim.restarts.rewarmup`).
    Both read the same count as the optimizer's own schedules (none of them is ever reset)."""
    from jaxlm.optim.restarts import rewarmup

    base = make_schedule(cfg.train)
    if not cfg.optim.reset_every:
        return base
    factor = rewarmup(cfg.optim.reset_every, cfg.optim.rewarmup_steps)
    return lambda count: base(count) * factor(jnp.asarray(count))


def applied_lr(cfg: Config, opt_state: UpdateCount) -> jax.Array:
    """The learning rate the next update of ``opt_state`` (from :func:`build_optimizer`) uses."""
    return learning_rate(cfg)(opt_state.count)


def lr_at(cfg: Config, step) -> float:
    """Learning rate of the update with 0-based index ``step`` (optax's count before it runs)."""
    return float(learning_rate(cfg)(step))


def _decays(names: list[str], o: OptimConfig) -> bool:
    last = names[-1] if names else ""
    if last == "bias":
        return False
    if last == "scale":
        return o.wd_norms
    if any("embed" in n or "lm_head" in n for n in names):
        return o.wd_embeddings
    return True


def decay_mask(params: Any, optim_cfg: OptimConfig) -> Any:
    """Pytree of bools (same structure as ``params``): True where weight decay applies.

    Works on nested dicts and on ``nnx.State`` (whose leaves are ``nnx.Variable`` nodes: the
    decision is made per Variable and broadcast into it, so the structure matches exactly).
    """
    def leaf(path, x):
        decision = _decays(path_names(path), optim_cfg)
        if isinstance(x, nnx.Variable):
            return jax.tree.map(lambda _: decision, x)
        return decision

    return jax.tree_util.tree_map_with_path(
        leaf, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def with_clipping(optim_cfg: OptimConfig, tx: optax.GradientTransformation):
    """Prefix ``tx`` with global-norm clipping when ``optim.grad_clip > 0`` (shared by builders)."""
    if optim_cfg.grad_clip > 0:
        return optax.chain(clip_by_global_norm(optim_cfg.grad_clip), tx)
    return tx


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """g · min(1, max_norm / ‖g‖₂) (Pascanu et al. 2013), as ``optax.clip_by_global_norm``
    (the same empty state) but with one scalar factor: optax divides every entry by the norm, a
    per-entry division that XLA:CPU does not repeat inside the two moment updates that read the
    clipped gradient, so it wrote the clipped gradients out first -- an extra pass over all of
    them (the AdamW update alone: 28 -> 21 ms on the bench config, bench/update_cost.py)."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)  # a scalar
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def build_adamw(cfg: Config) -> optax.GradientTransformation:
    o = cfg.optim
    adamw = optax.adamw(
        make_schedule(cfg.train), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
        mask=functools.partial(decay_mask, optim_cfg=o))
    return with_clipping(o, adamw)


register_optimizer("adamw", build_adamw)
