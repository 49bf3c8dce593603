"""The output head and the cross-entropy fused over sequence chunks: the [tokens, vocab] logits
(and their gradient) are never held at once, and the head's gradients are formed in the forward
pass.

For the final hidden states x [B, T, D], the head W [D, V] and targets y [B, T], the loss needs
only two numbers per token (:mod:`jaxlm.ops.losses`)::

    z_t = x_t W,   lse_t = logsumexp(z_t),   nll_t = lse_t − z_t[y_t]

The train step's loss is a weighted sum of them, L = Σ_t a_t·nll_t + b_t·lse_t² with
a_t = m_t / Σm (the loss mask over the batch's target count) and b_t = α·a_t (PaLM's z-loss), so

    ∂L/∂z_t = (a_t + 2 b_t lse_t)·p_t − a_t·onehot(y_t),   p_t = softmax(z_t)
    ∂L/∂x_t = ∂z_t Wᵀ,   ∂L/∂W = Σ_t x_tᵀ ∂z_t

Every term is a sum over tokens, so the tokens can be taken C sequence positions at a time.
:func:`head_loss` (the train step's path) scans over T/C chunks of [B, C] tokens and, because a
and b are known before the backward pass, forms each chunk's gradients right after its logits,
then drops the chunk's [B, C, V] arrays; its backward pass only scales the stored ∂x [B, T, D]
and ∂W [D, V] by the loss's cotangent. On CPU ∂z itself is never written: with e_t = exp(z_t − max z_t),
s_t = Σ_v e_tv and r_t = (a_t + 2 b_t lse_t)/s_t, ∂z_t = r_t·e_t − a_t·onehot(y_t), so

    ∂x_t = r_t·(e_t Wᵀ) − a_t·W[:, y_t],   ∂W = Σ_t (r_t x_t)ᵀ e_t − Σ_t a_t x_t ⊗ onehot(y_t)

-- both products read e directly, the row scales go on the narrow [B·C, D] operands, and the
one-hot terms are a gather and a scatter-add of B·T columns of W / ∂W. Other platforms, and CPU
meshes of several devices, write ∂z per chunk (a fused elementwise pass on accelerators), which
stays local to each shard of a tensor-parallel vocab where the gather/scatter would not. That is the order of
Liger-Kernel's fused linear cross-entropy (Hsu et al. 2024); Wijmans et al. 2024, "Cut Your Losses
in Large-Vocabulary Language Models", goes further and never writes even a chunk's logits, with a
custom kernel. Peak memory for the head falls from O(B·T·V) to O(B·C·V) with the three matmuls of
the unfused head — no recomputation. :func:`head_nll` is the forward-only form (eval), over the
same chunks. The values equal :func:`jaxlm.ops.losses.token_nll` of the full logits (the same
rows, the same math); ∂W is summed chunk by chunk instead of in one matmul, so it agrees to
float32 rounding (~1e-6).

Chunk choice (:func:`auto_chunk`): ``model.head_chunk=-1`` (default) takes the largest divisor
of T whose chunk holds at most 32 MiB of float32 logits per device (the whole sequence when that
fits); ``N`` uses N positions (rounded down to a divisor of T); ``0`` is the reading form, not
fused: the whole [B, T, V] logits, and autodiff through :func:`jaxlm.ops.losses.token_nll`.
Why 32 MiB: on the MaxText-comparison config (8 × 256 tokens, vocab 32000, one CPU) chunks of 32
positions (31 MiB) ran as fast as 64 positions and the unchunked head, 16 positions ~9% slower
(per-chunk overhead), and 32 keep jaxlm's peak RSS at ~0.55 of MaxText's (bench/RESULTS.md,
"Issue #18").

Example::

    import jax, jax.numpy as jnp
    from jaxlm.ops.head_loss import head_loss, head_nll
    x = jax.random.normal(jax.random.key(0), (2, 64, 16)); w = jnp.ones((16, 1000)) * 0.01
    y = jnp.zeros((2, 64), jnp.int32)
    nll, lse = head_nll(x, w, y, chunk=16)    # [2, 64] each, via 4 chunks of [2, 16, 1000]
    a = jnp.full((2, 64), 1 / 128); b = jnp.zeros((2, 64))   # mean nll, no z-loss
    grads = jax.grad(lambda x, w: head_loss(x, w, y, a, b, chunk=16)[0], argnums=(0, 1))(x, w)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.ops.layers import cpu_barrier
from jaxlm.ops.losses import token_nll
from jaxlm.sharding import shard

AUTO_CHUNK_BYTES = 32 << 20  # model.head_chunk=-1: chunks of at most this much float32 logits


def largest_divisor_at_most(n: int, k: int) -> int:
    """The largest divisor of n that is <= k (>= 1)."""
    k = max(1, min(k, n))
    return next(c for c in range(k, 0, -1) if n % c == 0)


def auto_chunk(setting: int, b: int, t: int, v: int) -> int:
    """Sequence positions per head chunk for ``model.head_chunk=setting`` on [b, t] tokens per
    device and vocabulary v: 0 = not fused (whole logits); else a divisor of t (t = one chunk)."""
    if setting == 0:
        return 0
    if setting > 0:
        return largest_divisor_at_most(t, setting)
    return largest_divisor_at_most(t, max(1, AUTO_CHUNK_BYTES // (b * v * 4)))


def head_logits(x, w):
    """x [B, T, D] @ w [D, V] -> logits [B, T, V] float32 (one 2-D matmul, float32 result)."""
    b, t, d = x.shape
    return jnp.matmul(x.reshape(b * t, d), w,
                      preferred_element_type=jnp.float32).reshape(b, t, -1)  # [B, T, V]


def _sharded_logits(x, w):
    """head_logits with the logits' logical axes (vocab over ``tensor`` when a mesh is active)."""
    return shard(head_logits(x, w), ("batch", "seq", "vocab"))  # [B, C, V] float32


def head_nll(x, w, targets, chunk: int = 0):
    """x [B, T, D], w [D, V], targets [B, T] -> (nll, lse) [B, T] float32 each, as
    ``token_nll(head_logits(x, w), targets)``, holding at most [B, chunk, V] logits at a time
    (``chunk`` must divide T; 0 = all at once)."""
    b, t, d = x.shape
    if not chunk or chunk >= t:
        return token_nll(_sharded_logits(x, w), targets)
    if t % chunk:
        raise ValueError(f"head chunk {chunk} does not divide the sequence length {t}")
    n = t // chunk
    xs = jnp.swapaxes(x.reshape(b, n, chunk, d), 0, 1)  # [N, B, C, D]
    ys = jnp.swapaxes(targets.reshape(b, n, chunk), 0, 1)  # [N, B, C]

    @jax.checkpoint  # keep only (x_chunk, y_chunk): the [B, C, V] logits are recomputed
    def one(xy):
        return token_nll(_sharded_logits(xy[0], w), xy[1])  # ([B, C], [B, C])

    nll, lse = jax.lax.map(one, (xs, ys))  # [N, B, C] each
    back = lambda a: jnp.swapaxes(a, 0, 1).reshape(b, t)  # noqa: E731  [N, B, C] -> [B, T]
    return back(nll), back(lse)


def head_loss(x, w, targets, a, b, chunk: int = 0):
    """The training loss of the head, its gradient formed in the forward pass.

    x [B, T, D], w [D, V], targets [B, T], per-token weights a, b [B, T] float32 ->
    (loss, nll): ``loss = Σ_t a_t·nll_t + b_t·lse_t²`` (a scalar) and the per-token nll [B, T].
    With a = mask/denominator and b = z_loss·mask/denominator this is the train step's loss.

    Because the weights are known before the backward pass, ∂loss/∂z_t = (a_t + 2 b_t lse_t)·p_t −
    a_t·onehot(y_t) is taken right after the chunk's logits into ∂x_chunk = ∂z Wᵀ and
    ∂W += xᵀ∂z (without writing ∂z: module docstring); the logits die with the chunk. The backward pass
    only scales the stored ∂x [B, T, D] and ∂W [D, V] by the loss's cotangent: no logits are
    recomputed (the Liger-Kernel "fused linear cross-entropy" order), so chunking costs no extra
    matmul. ``nll`` is a metric: its gradient is taken as zero (as if ``stop_gradient``-ed).
    """
    return _head_loss(x, w, targets, a, b, chunk)


def _sweep(x, w, targets, a, b, chunk: int, grads: bool, dense_onehot: bool = False):
    """Chunk by chunk over the sequence: loss, nll [B, T] and, if ``grads``, (∂x, ∂W).

    ``dense_onehot``: write ∂z per chunk (the one-hot term as an iota compare, local to each
    vocab shard) instead of the gather/scatter after the scan, which partitions into extra
    collectives on a mesh of several devices: the accelerator / multi-device form
    (:func:`_head_loss_fwd`)."""
    bsz, t, d = x.shape
    chunk = chunk if chunk and chunk < t else t
    if t % chunk:
        raise ValueError(f"head chunk {chunk} does not divide the sequence length {t}")
    n = t // chunk

    def one(dw, xs):  # one chunk: x_c [B, C, D], xt_c [D, B·C], y_c, a_c, b_c [B, C]
        x_c, xt_c, y_c, a_c, b_c = xs
        z = _sharded_logits(x_c, w)  # [B, C, V] float32
        m = jnp.max(z, axis=-1, keepdims=True)  # [B, C, 1]
        e = jnp.exp(z - m)  # [B, C, V]
        s = jnp.sum(e, axis=-1)  # [B, C]
        lse = m[..., 0] + jnp.log(s)  # [B, C]
        nll = lse - jnp.take_along_axis(z, y_c[..., None], axis=-1)[..., 0]  # [B, C]
        loss = jnp.sum(a_c * nll + b_c * jnp.square(lse))
        if not grads:
            return dw, (loss, nll, None)
        dx, dw_c = _chunk_grads(e, s, lse, y_c, a_c, b_c, xt_c, w, x.dtype, dense_onehot)
        return (dw_c if dw is None else dw + dw_c), (loss, nll, dx.reshape(bsz, chunk, d))

    # x laid out [N, D, B·C] for ∂W = Σ x_cᵀ ∂z_c, so each product contracts the lhs's last dim:
    # XLA:CPU gives only that form to its fast matmul library (YNNPACK) -- a transposed lhs falls
    # back to Eigen, ~20% slower here. One [B, T, D] copy per step; the (CPU-only) optimization
    # barrier keeps XLA from folding the transpose back into the dot.
    xt = cpu_barrier(jnp.transpose(
        x.reshape(bsz, n, chunk, d), (1, 3, 0, 2)).reshape(n, d, bsz * chunk)) if grads else None
    if n == 1:
        dw, (loss, nll, dx) = one(None, (x, None if xt is None else xt[0], targets, a, b))
    else:
        split = lambda v: jnp.swapaxes(v.reshape((bsz, n, chunk) + v.shape[2:]), 0, 1)  # noqa: E731
        # [B, T, ...] -> [N, B, C, ...] chunks; chunk 0 starts ∂W (no zeros, no add), the rest
        # are scanned; outputs [N, B, C, ...] -> [B, T, ...]
        xs = (split(x), xt) + tuple(map(split, (targets, a, b)))
        dw, first = one(None, jax.tree.map(lambda v: v[0], xs))
        dw, rest = jax.lax.scan(one, dw, jax.tree.map(lambda v: v[1:], xs))
        loss, nll, dx = jax.tree.map(lambda f, r: jnp.concatenate([f[None], r]), first, rest)
        back = lambda v: jnp.swapaxes(v, 0, 1).reshape((bsz, t) + v.shape[3:])  # noqa: E731
        loss, nll, dx = loss.sum(), back(nll), back(dx) if grads else None
    if not grads:
        return loss, nll, None
    if not dense_onehot:
        dx, dw = _one_hot_part(x, w, targets, a, dx, dw)
    return loss, nll, (dx.astype(x.dtype), dw.astype(w.dtype))


def _chunk_grads(e, s, lse, y_c, a_c, b_c, xt_c, w, dtype, dense_onehot: bool):
    """One chunk's ∂x [B·C, D] and ∂W contribution [D, V] from e = exp(z − m) [B, C, V].

    ∂z = r·e − a·onehot(y) with r = (a + 2b·lse)/s per row. CPU form: the row scale r moves onto
    the narrow operands -- ∂x = r ⊙ (e Wᵀ), ∂W_c = (x ⊙ r)ᵀ e -- and the one-hot part is added
    after the scan (:func:`_one_hot_part`), so no [B, C, V] ∂z pass is written: both products
    read e. ``dense_onehot``: ∂z written, the one-hot part by an iota compare."""
    bsz, chunk = y_c.shape
    r = (a_c + 2.0 * b_c * lse) / s  # [B, C]
    if dense_onehot:
        is_target = y_c[..., None] == jnp.arange(e.shape[-1])  # [B, C, V] one-hot (iota)
        dz = (e * r[..., None] - jnp.where(is_target, a_c[..., None], 0.0)).astype(dtype)
        dz = dz.reshape(bsz * chunk, -1)  # [B·C, V]
        dx = jnp.matmul(dz, w.T, preferred_element_type=jnp.float32)  # [B·C, D]
        return dx, jnp.matmul(xt_c, dz, preferred_element_type=jnp.float32)  # [D, V]
    r = r.reshape(bsz * chunk)  # [B·C]
    e2 = e.reshape(bsz * chunk, -1).astype(dtype)  # [B·C, V]
    dx = r[:, None] * jnp.matmul(e2, w.T, preferred_element_type=jnp.float32)  # [B·C, D]
    dw_c = jnp.matmul((xt_c * r).astype(dtype), e2,
                      preferred_element_type=jnp.float32)  # [D, B·C] @ [B·C, V]
    return dx, dw_c


def _one_hot_part(x, w, targets, a, dx, dw):
    """The −a·onehot(y) term of ∂z for all tokens at once: ∂x_t −= a_t·W[:, y_t] (a gather of
    B·T columns of W) and ∂W[:, y_t] −= a_t·x_t (a scatter-add into B·T columns), [B, T, D] work
    instead of a [B, T, V] pass."""
    bsz, t, d = x.shape
    y = targets.reshape(bsz * t)  # [N]
    ax = (a[..., None] * x.astype(jnp.float32)).reshape(bsz * t, d)  # [N, D]
    wy = jnp.take(w, y, axis=1).astype(jnp.float32).T.reshape(bsz, t, d)  # W[:, y]ᵀ [B, T, D]
    return dx - a[..., None] * wy, dw.at[:, y].add(-ax.T)  # [B, T, D], [D, V]


def _head_loss_fwd(x, w, targets, a, b, chunk):
    # one CPU device: ∂z never written (one [B·C, V] pass fewer per chunk); elsewhere the
    # shard-local form
    sweep = functools.partial(_sweep, chunk=chunk, grads=True)
    loss, nll, res = jax.lax.platform_dependent(
        x, w, targets, a, b, cpu=functools.partial(sweep, dense_onehot=_multi_device()),
        default=functools.partial(sweep, dense_onehot=True))
    return (loss, nll), res


def _multi_device() -> bool:
    """Whether the active mesh has more than one device. There the CPU form's gather/scatter
    partitions into extra collectives (an all-to-all of a ∂W shard under a split vocab), and
    XLA:CPU, running independent collectives side by side on fake devices, could deadlock on
    them (a rendezvous timeout in tests/test_precision.py, ~1 run in 4)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.size > 1


def _head_loss_bwd(chunk, res, cotangents):
    dx, dw = res
    g = cotangents[0]  # the loss's cotangent (a scalar); nll's is ignored (a metric)
    return (g * dx).astype(dx.dtype), (g * dw).astype(dw.dtype), None, None, None


_head_loss = jax.custom_vjp(lambda x, w, targets, a, b, chunk: _sweep(
    x, w, targets, a, b, chunk, grads=False)[:2], nondiff_argnums=(5,))
_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)
