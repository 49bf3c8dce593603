"""GaLore (and Fira) as an optax ``GradientTransformation`` on layer-stacked weight matrices.

GaLore (Zhao et al., ICML 2024, arXiv 2403.03507, Alg. 2): for a weight matrix with gradient
``G`` (a×b, here in jaxlm's ``[in, out]`` kernel layout), every ``T`` updates take the SVD
``G = U S Vᵀ`` and keep a rank-``r`` projector ``P`` on the *short* side (``proj_side='std'``,
the paper's and galore-torch's default): ``P = U[:, :r]`` (a×r) when ``a <= b`` else
``P = V[:, :r]`` (b×r). Then, with ``k`` the 1-based update number,

    R_k = Pᵀ G  (r×b)   or   G P  (a×r)                          (project, Alg. 2)
    M_k = β1 M + (1-β1) R,   V_k = β2 V + (1-β2) R²              (Adam in the r-dim space)
    N_k = M_k / (√V_k + ε)                                        (transformers-style, see below)
    D_k = α · (P N_k  or  N_k Pᵀ) · √(1-β2^k) / (1-β1^k)          (project back, scale α)

and the caller applies ``W ← W - η_k D_k``. The moments are *not* re-projected when ``P``
changes (as in the official code). In torch's ``[out, in]`` layout "short side" means
``m >= n -> right projector``; in ours the rows are the inputs, so it is ``a <= b -> rows``.

Fira (Chen et al., arXiv 2410.01623, Alg. 1; fira 1.0.2) adds the gradient outside the
subspace, scaled channel-wise by how much Adam rescaled the inside (eq. 5-6) and limited in
norm growth (eq. 8, γ = 1.01):

    φ = ‖N_k‖ / (‖R_k‖ + 1e-8)    norms over the rank axis: one value per column/row of G
    S = (G - α Back(R_k)) ⊙ φ     (the official code subtracts α·Back(R), not Back(R))
    λ = max(‖S‖ / (s_{k-1} + 1e-8), γ) / γ;   S ← S / λ;   s_k = ‖S‖   (first step: λ = 1)
    D_k = (α Back(N_k) + S) · √(1-β2^k) / (1-β1^k)

``eps_mode='torch'`` (default) is the galore-torch/fira AdamW: ε added to the *uncorrected*
√V and bias correction folded into the step size. ``eps_mode='optax'`` is optax's
``scale_by_adam`` (ε added to √V̂); the two agree when ε → 0.

Why not ``optax.contrib.galore``: it projects the *long* side (its choice equals galore-torch's
``reverse_std``, not the paper's ``std``), uses optax's ε, projects every 2-D leaf (embeddings
too) by default, treats a stacked ``[L, a, b]`` kernel as one matrix or skips it, has no Fira and
no SVD sign convention. Here every leaf is a batch of matrices: leading ``[L]`` (scan) axes are
batch dims (the SVD is mapped over them), and multi-dim kernels (``wq`` ``[D, H, K]``) are flattened to
``[in, out]`` by a per-leaf :class:`Layout`. The refresh is one ``lax.cond`` around all the
SVDs (never a vmapped cond, which would run the SVD every step). SVD signs are made
canonical (the largest-|·| entry of each projector column is positive), which the oracle
fixtures use too. ``tests/test_galore.py`` checks ``proj_side='reverse_std', eps_mode='optax'``
against ``optax.contrib.galore``.

State (a plain pytree, checkpointed exactly): ``count`` and per leaf ``mu``, ``nu``
``[..., r, b]`` or ``[..., a, r]``, ``proj`` ``[..., a|b, r]`` and Fira's ``rnorm`` ``[...]``.
Sharding (jaxlm/train/state.py): moments and projectors shard their long non-rank dim over the
mesh axes of the parameter; the SVD gathers one matrix, only on refresh steps.

Example::

    import jax, jax.numpy as jnp
    from jaxlm.optim.galore import scale_by_galore
    tx = scale_by_galore(rank=2, gap=3, scale=0.25)
    w = {"k": jnp.ones((4, 8, 6))}                      # [L, in, out]
    st = tx.init(w)                                      # mu: [4, 2, 6], proj: [4, 8, 2]
    d, st = tx.update({"k": jax.random.normal(jax.random.key(0), (4, 8, 6))}, st, w)
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlm.optim.restarts import register_resettable
from jaxlm.utils.trees import path_names


class Layout(NamedTuple):
    """How a leaf ``[*batch, *in, *out]`` is a batch of ``[a, b]`` matrices."""

    n_batch: int  # leading batch dims (the scanned [L] axis)
    n_in: int  # dims after the batch dims that form the rows


def default_layout(names, x) -> Layout:
    return Layout(x.ndim - 2, 1)


class GaLoreState(NamedTuple):
    count: jax.Array  # int32 [] updates done
    mu: Any  # per leaf [..., r, b] (project rows) or [..., a, r] (project columns)
    nu: Any
    proj: Any  # per leaf [..., a, r] or [..., b, r]
    rnorm: Any  # per leaf [...] Fira limiter state ‖S_{k-1}‖ (unused until count > 0)


register_resettable(GaLoreState)  # momentum reset zeroes it: projector recomputed right away


class _Geo(NamedTuple):  # static per-leaf geometry
    batch: tuple
    a: int
    b: int
    r: int
    rows: bool  # project the rows (the in side) or the columns


class _Out(NamedTuple):  # per-leaf result of one update
    d: Any
    mu: Any
    nu: Any
    rnorm: Any


def _geometry(layout: Layout, shape, rank: int, side: str) -> _Geo:
    batch = tuple(shape[:layout.n_batch])
    a = math.prod(shape[layout.n_batch:layout.n_batch + layout.n_in])
    b = math.prod(shape[layout.n_batch + layout.n_in:])
    if side == "std":
        rows = a <= b
    elif side == "reverse_std":
        rows = a > b
    else:
        raise ValueError(f"proj_side={side!r}: expected std | reverse_std")
    return _Geo(batch, a, b, min(rank, a, b), rows)


def _low_shape(g: _Geo):
    return g.batch + ((g.r, g.b) if g.rows else (g.a, g.r))


def _proj_shape(g: _Geo):
    return g.batch + ((g.a if g.rows else g.b), g.r)


def canonical_signs(p):
    """Flip each column of ``p [..., n, r]`` so that its largest-|·| entry is positive."""
    idx = jnp.argmax(jnp.abs(p), axis=-2, keepdims=True)  # [..., 1, r]
    sign = jnp.sign(jnp.take_along_axis(p, idx, axis=-2))
    return p * jnp.where(sign == 0, 1.0, sign)


def svd_projector(g2, geo: _Geo):
    """Top-r singular vectors of ``g2 [..., a, b]`` on the projected side, f32, canonical signs."""
    flat = g2.astype(jnp.float32).reshape((-1,) + g2.shape[-2:])  # [L', a, b]
    # One matrix at a time (lax.map): a batched LAPACK SVD next to cross-device collectives
    # deadlocks XLA:CPU with several (fake) devices; the refresh is rare, so sequential is fine.
    u, _, vh = jax.lax.map(lambda m: jnp.linalg.svd(m, full_matrices=False), flat)
    u, vh = u.reshape(g2.shape[:-2] + u.shape[-2:]), vh.reshape(g2.shape[:-2] + vh.shape[-2:])
    p = u[..., :, :geo.r] if geo.rows else jnp.swapaxes(vh[..., :geo.r, :], -1, -2)
    return canonical_signs(p)


def project(g2, p, geo: _Geo):
    if geo.rows:
        return jnp.einsum("...ar,...ab->...rb", p, g2)  # [..., r, b]
    return jnp.einsum("...ab,...br->...ar", g2, p)  # [..., a, r]


def project_back(n, p, geo: _Geo):
    if geo.rows:
        return jnp.einsum("...ar,...rb->...ab", p, n)
    return jnp.einsum("...ar,...br->...ab", n, p)


def _rank_norm(x, geo: _Geo):
    """Norm over the rank axis, broadcastable against [..., a, b]."""
    return jnp.linalg.norm(x, axis=-2 if geo.rows else -1, keepdims=True)


def _replicate(tree):
    """Constrain to replicated when a mesh is active (inside jaxlm's jitted step); else no-op."""
    if jax.sharding.get_abstract_mesh().empty:
        return tree
    return jax.lax.with_sharding_constraint(tree, jax.sharding.PartitionSpec())


def _zero_state(gs) -> "GaLoreState":
    """Zero moments [.., r-side] and projectors, zero Fira norms, for leaves of geometry ``gs``."""
    is_geo = lambda x: isinstance(x, _Geo)  # noqa: E731
    zeros = lambda shape_fn: jax.tree.map(  # noqa: E731
        lambda g: jnp.zeros(shape_fn(g), jnp.float32), gs, is_leaf=is_geo)
    return GaLoreState(count=jnp.zeros((), jnp.int32), mu=zeros(_low_shape), nu=zeros(_low_shape),
                       proj=zeros(_proj_shape), rnorm=zeros(lambda g: g.batch))


def _adam_normalize(mu, nu, bc1, bc2, eps, eps_mode):
    """(N_k, step factor): Adam's normalised moment with torch's or optax's eps placement."""
    if eps_mode == "torch":
        return mu / (jnp.sqrt(nu) + eps), jnp.sqrt(bc2) / bc1
    return (mu / bc1) / (jnp.sqrt(nu / bc2) + eps), 1.0


def _fira_residual(gm, r, n, p, g, s_prev, scale, gamma, *, first):
    """Fira's scaled residual S and the limited norm kept for the next step (Fira eqs. 6-8)."""
    phi = _rank_norm(n, g) / (_rank_norm(r, g) + 1e-8)  # φ: Fira channel-wise scaling
    s = (gm - scale * project_back(r, p, g)) * phi  # S = (G - α Back(R)) ⊙ φ
    s_norm = jnp.linalg.norm(s, axis=(-2, -1))  # [...]
    limiter = jnp.maximum(s_norm / (s_prev + 1e-8), gamma) / gamma  # λ (Fira limiter)
    limiter = jnp.where(first, 1.0, limiter)  # first step: only store
    return s / limiter[..., None, None], s_norm / limiter


def scale_by_galore(rank: int, gap: int, scale: float = 0.25, *, b1: float = 0.9,
                    b2: float = 0.999, eps: float = 1e-6, proj_side: str = "std",
                    residual: str = "none", gamma: float = 1.01, eps_mode: str = "torch",
                    layout_fn: Callable = default_layout) -> optax.GradientTransformation:
    """GaLore-Adam (``residual='none'``) or Fira (``residual='fira'``) update *direction* D_k.

    Chain with ``optax.scale_by_learning_rate`` (and decay) to get ``-η_k D_k``. Every leaf it
    sees is treated as a (batch of) matrix; route other leaves elsewhere (``optax.partition``).
    ``layout_fn(path_names, leaf) -> Layout`` says how a leaf is a batch of matrices.
    """
    if residual not in ("none", "fira") or eps_mode not in ("torch", "optax"):
        raise ValueError(f"residual={residual!r}, eps_mode={eps_mode!r}")

    def geos(params):
        def one(path, x):
            return _geometry(layout_fn(path_names(path), x), x.shape, rank, proj_side)

        return jax.tree_util.tree_map_with_path(one, params)

    is_geo = lambda x: isinstance(x, _Geo)  # noqa: E731

    def init(params):
        return _zero_state(geos(params))

    def update(updates, state, params=None):
        del params
        gs = geos(updates)
        mat = jax.tree.map(lambda g, x: x.astype(jnp.float32).reshape(g.batch + (g.a, g.b)),
                           gs, updates, is_leaf=is_geo)
        # One cond for all leaves: the (batched) SVDs run only on refresh steps. Gather G before
        # the cond and keep the branches collective-free (XLA's SVD is not distributed anyway).
        proj = jax.lax.cond(
            state.count % gap == 0,
            lambda m: jax.tree.map(svd_projector, m, gs, is_leaf=lambda x: is_geo(x)),
            lambda m: _replicate(state.proj), _replicate(mat))
        k = state.count + 1
        kf = k.astype(jnp.float32)
        bc1, bc2 = 1 - b1 ** kf, 1 - b2 ** kf

        def one(g, gm, p, mu, nu, s_prev):
            r = project(gm, p, g)  # R_k = Pᵀ G or G P (GaLore Alg. 2: project)
            mu = b1 * mu + (1 - b1) * r  # M_k: Adam moments in the r-dim space
            nu = b2 * nu + (1 - b2) * r * r  # V_k
            n, step = _adam_normalize(mu, nu, bc1, bc2, eps, eps_mode)
            d = scale * project_back(n, p, g)  # α·Back(N_k): project back, scale α
            if residual == "fira":
                s, s_prev = _fira_residual(gm, r, n, p, g, s_prev, scale, gamma,
                                           first=state.count == 0)
                d = d + s
            return _Out(d * step, mu, nu, s_prev)

        out = jax.tree.map(one, gs, mat, proj, state.mu, state.nu, state.rnorm, is_leaf=is_geo)
        pick = lambda i: jax.tree.map(lambda o: o[i], out, is_leaf=lambda x: isinstance(x, _Out))  # noqa: E731,E501
        d = jax.tree.map(lambda x, u: x.reshape(u.shape).astype(u.dtype), pick(0), updates)
        return d, GaLoreState(k, pick(1), pick(2), proj, pick(3))

    return optax.GradientTransformation(init, update)


def decay_after_update(learning_rate, weight_decay: float) -> optax.GradientTransformation:
    """``u -> -η u - η·wd·(W - η u)``: transformers-style AdamW (decay the *updated* weights).

    The final stage of :func:`galore_torch_adamw`; optax's ``add_decayed_weights`` decays the
    pre-update weights instead (identical when wd = 0, as in every C4 benchmark).
    """
    sched = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def update(updates, state, params):
        lr = sched(state.count)
        out = jax.tree.map(lambda u, p: -lr * u - lr * weight_decay * (p - lr * u), updates,
                           params)
        return out, optax.ScaleByScheduleState(optax.safe_increment(state.count))

    return optax.GradientTransformation(
        lambda _: optax.ScaleByScheduleState(jnp.zeros((), jnp.int32)), update)


def galore_torch_adamw(learning_rate, rank: int, gap: int, scale: float = 0.25, *,
                       weight_decay: float = 0.0, **kw) -> optax.GradientTransformation:
    """The full galore-torch / fira AdamW update for matrices (``residual='fira'`` via kw)."""
    return optax.chain(scale_by_galore(rank, gap, scale, **kw),
                       decay_after_update(learning_rate, weight_decay))


# ----------------------------------------------------------------------- config -> optimizer
def matrix_layouts(cfg) -> dict:
    """``{param path: Layout}`` of the GaLore targets of ``cfg.model``, from logical axis names.

    Targets: the ``kernel`` of every module under ``attn`` or ``mlp`` with >= 2 non-layer dims
    (q, k, v, o, gate, up, down); embeddings, head and norms are not. The leading ``layers`` axes
    are batch dims; the rows are the dims before the ``embed`` dim's side (``wq`` [D | H, K]:
    in = D; ``wo`` [H, K | D]: in = H·K).
    """
    import dataclasses

    from flax import nnx

    from jaxlm.model import Transformer

    mcfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or 8)
    abstract = nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0)))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract)))
    out = {}

    def visit(path, spec):
        names = tuple(path_names(path))
        axes = tuple(spec)
        n_batch = len(axes) - len(tuple(a for a in axes if a != "layers"))
        rest = axes[n_batch:]
        if (names[-1] == "kernel" and len(rest) >= 2
                and any("attn" in n or "mlp" in n for n in names)):
            out[names] = Layout(n_batch, 1 if rest[0] == "embed" else len(rest) - 1)

    jax.tree_util.tree_map_with_path(
        visit, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return out


def build_galore(cfg, residual: str = "none") -> optax.GradientTransformation:
    """``optim.name=galore|fira``: GaLore/Fira on attention/MLP matrices, AdamW elsewhere.

    Inside the subspace: the galore-torch AdamW (``eps_mode='torch'`` with ``optim.eps``);
    weight decay and the LR schedule as jaxlm's ``adamw`` (decoupled, masked, optax order).
    """
    from jaxlm.config import ConfigError
    from jaxlm.optim.build import decay_mask, with_clipping
    from jaxlm.optim.schedules import make_schedule

    o = cfg.optim
    if o.rank <= 0 or o.proj_gap <= 0 or o.proj_side not in ("std", "reverse_std"):
        raise ConfigError("galore/fira need optim.rank > 0, optim.proj_gap > 0 and "
                          f"optim.proj_side in std|reverse_std (got {o.proj_side!r})")
    layouts = matrix_layouts(cfg)
    sched = make_schedule(cfg.train)
    mask = lambda p: decay_mask(p, o)  # noqa: E731
    low = optax.chain(
        scale_by_galore(o.rank, o.proj_gap, o.galore_scale, b1=o.b1, b2=o.b2, eps=o.eps,
                        proj_side=o.proj_side, residual=residual, gamma=o.fira_gamma,
                        layout_fn=lambda names, x: layouts[tuple(names)]),
        optax.add_decayed_weights(o.weight_decay, mask=mask), optax.scale_by_learning_rate(sched))
    full = optax.adamw(sched, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)

    def labels(params):
        def one(path, _):
            names = tuple(str(getattr(k, "key", k)) for k in path)
            return "galore" if names in layouts else "adamw"

        return jax.tree_util.tree_map_with_path(one, params)

    tx = optax.partition({"galore": low, "adamw": full}, labels)
    return with_clipping(o, tx)  # (+ restarts, applied by build_optimizer)
