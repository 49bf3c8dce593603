"""Restarts for any optimizer (momentum reset + LR re-warmup) and weight refactorization of B·A.

Seed paper: Glentis et al. 2025, "Scalable Parameter and Memory Efficient Pretraining for LLM"
(arXiv 2505.22922, §4): plain low-rank training W = s·B·A (``model.weights=lowrank``,
:mod:`jaxlm.model.lowrank`) and SLTrain (W = s·B·A + S, Han et al. 2024) improve with periodic

* **momentum reset (MR)**: every N updates zero Adam's ``m``, ``v`` *and* its count (so bias
  correction restarts) — and GaLore/Fira's state, so their projector is re-computed at the same
  step — followed by a short **re-warmup**: for the first W updates after a reset the learning
  rate is multiplied by ``0.001 + 0.999·min(j, W)/W`` (j = updates since the reset; the seed
  repo's ``cosine_quick_recovery``, W = 10). The base schedule is unchanged.
* **weight refactorization (WR)**: every N updates replace (B, A) by the balanced factors of the
  same product (Lemma 4.1: B = U√Σ, A = √ΣVᵀ conditions the problem best). Instead of an m×n
  SVD we use QR + an r×r SVD (O((m+n)r² + r³)); in jaxlm's ``[in, out]`` layout the factors are
  ``a [.., in, r]`` (= Aᵀ) and ``b [.., r, out]`` (= Bᵀ), W = s·a b::

      a = Q_a R_a,  bᵀ = Q_b R_b,  R_a R_bᵀ = U_c Σ V_cᵀ
      a' = Q_a U_c √Σ,  b' = √Σ V_cᵀ Q_bᵀ        =>  a' b' = a b,  a'ᵀa' = b' b'ᵀ = Σ

WR changes parameters, so it is done inside the optimizer update (the only place that may change
them): at the end of update ``k`` with ``k % N == 0`` the returned update is ``refactor(p + u) - p``
(one ``lax.cond``, no recompile), and the reset fires at the start of the next update — the
gradient after a restart is taken at the refactored weights with fresh moments, as in the seed
repo (refactor → rebuild optimizer → continue). The seed repo wires WR+MR only for SLTrain; here
both are generic: :func:`jaxlm.optim.build_optimizer` wraps *every* registered method (adamw,
galore, fira, lowrank, sltrain, plug-ins) with :func:`with_restarts`, so ``optim.reset_every``
works for all of them and ``optim.refactor_every`` for every ``{a, b}`` factor pair.

Which sub-states a reset zeroes is a registry (:func:`register_resettable`): optax's
``ScaleByAdamState`` here, ``GaLoreState`` from :mod:`jaxlm.optim.galore`. Schedule counts and
clipping state are never reset (the base LR schedule keeps its place).

Example::

    jaxlm-train configs/shakespeare.yaml optim.reset_every=100 optim.rewarmup_steps=10
    jaxlm-train configs/shakespeare.yaml model.weights=lowrank optim.name=lowrank \\
        optim.reset_every=100 optim.refactor_every=100
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlm.config import Config, ConfigError

_RESETTABLE: list[type] = [optax.ScaleByAdamState]  # moments (+ projectors) a reset zeroes


def register_resettable(state_type: type) -> None:
    """Make momentum reset zero every sub-state of this type (e.g. a plug-in's moments)."""
    if state_type not in _RESETTABLE:
        _RESETTABLE.append(state_type)


class CountState(NamedTuple):
    count: jax.Array  # int32 [] updates done
    inner: Any


def reset_moments(state, fresh, do):
    """Replace every Adam / GaLore sub-state by ``fresh`` where ``do`` (schedule counts stay)."""
    kinds = tuple(_RESETTABLE)

    def one(old, new):
        if isinstance(old, kinds):
            return jax.tree.map(lambda o, n: jnp.where(do, n, o), old, new)
        return old

    return jax.tree.map(one, state, fresh, is_leaf=lambda x: isinstance(x, kinds))


def with_momentum_reset(inner: optax.GradientTransformation,
                        every: int) -> optax.GradientTransformation:
    """Zero the moments and bias-correction counts of ``inner`` before updates N, 2N, 3N, ..."""
    def update(updates, state, params=None):
        do = (state.count > 0) & (state.count % every == 0)
        inner_state = reset_moments(state.inner, inner.init(params), do)
        updates, inner_state = inner.update(updates, inner_state, params)
        return updates, CountState(state.count + 1, inner_state)

    return optax.GradientTransformation(
        lambda p: CountState(jnp.zeros((), jnp.int32), inner.init(p)), update)


def rewarmup(every: int, warmup: int):
    """LR multiplier after each reset: 1 before the first, then 0.001 -> 1 over ``warmup``."""
    def factor(count):
        j = (count % every).astype(jnp.float32)
        ramp = 0.001 + 0.999 * jnp.minimum(j, warmup) / max(warmup, 1)
        return jnp.where((count < every) | (warmup == 0), 1.0, ramp)

    return factor


def _refactor_one(ab):
    a, b = ab  # [m, r], [r, n]
    qa, ra = jnp.linalg.qr(a)  # [m, r], [r, r]
    qb, rb = jnp.linalg.qr(b.T)  # [n, r], [r, r]
    u, s, vh = jnp.linalg.svd(ra @ rb.T)  # the r×r core
    root = jnp.sqrt(s)[None, :]  # [1, r]
    return (qa @ u) * root, ((qb @ vh.T) * root).T


def refactor(a, b):
    """Balanced factors of ``a [.., m, r] @ b [.., r, n]`` (QR + r×r SVD; product unchanged).

    Leading (layer) dims are mapped one matrix at a time (``lax.map``; see galore.svd_projector).
    """
    lead = a.shape[:-2]
    flat = (a.astype(jnp.float32).reshape((-1,) + a.shape[-2:]),
            b.astype(jnp.float32).reshape((-1,) + b.shape[-2:]))
    a2, b2 = jax.lax.map(_refactor_one, flat)
    return a2.reshape(lead + a2.shape[1:]).astype(a.dtype), b2.reshape(lead + b2.shape[1:]).astype(b.dtype)


def refactor_tree(params):
    """Apply :func:`refactor` to every dict node holding factor leaves ``a`` and ``b``."""
    if isinstance(params, dict):
        if "a" in params and "b" in params and not isinstance(params["a"], dict):
            a2, b2 = refactor(params["a"], params["b"])
            return {**params, "a": a2, "b": b2}
        return {k: refactor_tree(v) for k, v in params.items()}
    return params


def with_refactorization(inner: optax.GradientTransformation,
                         every: int) -> optax.GradientTransformation:
    """At the end of updates N, 2N, ...: return ``refactor(p + u) - p`` instead of ``u``."""
    def update(updates, state, params=None):
        updates, inner_state = inner.update(updates, state.inner, params)
        do = (state.count + 1) % every == 0

        def refac(u):
            new = refactor_tree(jax.tree.map(jnp.add, params, u))
            return jax.tree.map(jnp.subtract, new, params)

        updates = jax.lax.cond(do, refac, lambda u: u, updates)
        return updates, CountState(state.count + 1, inner_state)

    return optax.GradientTransformation(
        lambda p: CountState(jnp.zeros((), jnp.int32), inner.init(p)), update)


def with_restarts(cfg: Config, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wrap any optimizer with MR + re-warmup (``optim.reset_every``) and WR (``refactor_every``)."""
    o = cfg.optim
    if o.reset_every < 0 or o.refactor_every < 0 or o.rewarmup_steps < 0:
        raise ConfigError("optim.reset_every, refactor_every and rewarmup_steps must be >= 0")
    if o.refactor_every and cfg.model.weights == "dense":
        raise ConfigError("optim.refactor_every re-balances factorised weights W = B*A: set "
                          "model.weights=lowrank|sltrain, or optim.refactor_every=0")
    if o.reset_every:
        tx = optax.chain(with_momentum_reset(tx, o.reset_every),
                         optax.scale_by_schedule(rewarmup(o.reset_every, o.rewarmup_steps)))
    if o.refactor_every:
        tx = with_refactorization(tx, o.refactor_every)
    return tx
