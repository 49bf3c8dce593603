"""The output head and the cross-entropy fused over sequence chunks: the [tokens, vocab] logits
(and their gradient) are never held at once.

For the final hidden states x [B, T, D], the head W [D, V] and targets y [B, T], the loss needs
only two numbers per token (:mod:`jaxlm.ops.losses`)::

    z_t = x_t W,   lse_t = logsumexp(z_t),   nll_t = lse_t − z_t[y_t]

and its gradient is, per token, ∂z_t = p_t (ḡ_t + ℓ̄_t) − ḡ_t onehot(y_t) with p_t = softmax(z_t),
so ∂x_t = ∂z_t Wᵀ and ∂W = Σ_t x_tᵀ ∂z_t. Every term is a sum over tokens, so the tokens can be
taken C sequence positions at a time: :func:`head_nll` scans over T/C chunks of [B, C] tokens,
and each chunk's logits [B, C, V] live only inside the chunk — in the forward pass (the chunk
function is ``jax.checkpoint``-ed, so only x and y are kept) and in the backward pass (the logits
are recomputed, ∂z is formed, turned into ∂x_chunk and added into ∂W, then dropped). Peak
memory for the head falls from O(B·T·V) to O(B·C·V), for one extra [B, T, D] × [D, V] matmul
(the recomputation) — the trade every large-vocabulary trainer makes (e.g. Liger-Kernel's fused
linear cross-entropy; Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language
Models", which also avoids the per-chunk logits with a custom kernel). The per-token values
equal :func:`jaxlm.ops.losses.token_nll` of the full logits (the same rows, the same math); ∂W is
summed chunk by chunk instead of in one matmul, so it agrees to float32 rounding (~1e-6).

Chunk choice (:func:`auto_chunk`): ``model.head_chunk=-1`` (default) chunks only when the
micro-batch's float32 logits would exceed 256 MiB, with chunks of at most 64 MiB of logits; ``0``
never chunks; ``N`` uses N positions (rounded down to a divisor of T).
Why not lower: chunking recomputes the head matmul in the backward pass. On the MaxText-comparison
config (8 x 256 tokens, vocab 32000: 250 MiB of logits, not chunked by default) chunks of 32
positions cut jaxlm's peak RSS from 1.5 to 1.1 GiB (rss_vs_maxtext 0.77 -> 0.57) but the step was
~5-15% slower on a quiet CPU (bench/RESULTS.md, "Memory at large vocabularies"); pass
``model.head_chunk=32`` to trade that speed for memory. Computing the head's gradients in the
forward pass (no recomputation, as Liger-Kernel's fused linear cross-entropy does) would remove
the trade-off; not done yet.

Example::

    import jax, jax.numpy as jnp
    from jaxlm.ops.head_loss import head_nll
    x = jax.random.normal(jax.random.key(0), (2, 64, 16)); w = jnp.ones((16, 1000)) * 0.01
    y = jnp.zeros((2, 64), jnp.int32)
    nll, lse = head_nll(x, w, y, chunk=16)    # [2, 64] each, via 4 chunks of [2, 16, 1000]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.ops.losses import token_nll

AUTO_LIMIT = 256 << 20  # chunk when the whole micro-batch's float32 logits exceed this
AUTO_CHUNK_BYTES = 64 << 20  # ... into chunks of logits up to this size


def largest_divisor_at_most(n: int, k: int) -> int:
    """The largest divisor of n that is <= k (>= 1)."""
    k = max(1, min(k, n))
    return next(c for c in range(k, 0, -1) if n % c == 0)


def auto_chunk(setting: int, b: int, t: int, v: int) -> int:
    """Sequence positions per chunk for ``model.head_chunk=setting`` (0 = no chunking)."""
    if setting == 0:
        return 0
    if setting > 0:
        c = largest_divisor_at_most(t, setting)
    elif b * t * v * 4 <= AUTO_LIMIT:
        return 0
    else:
        c = largest_divisor_at_most(t, max(1, AUTO_CHUNK_BYTES // (b * v * 4)))
    return 0 if c >= t else c


def head_logits(x, w):
    """x [B, T, D] @ w [D, V] -> logits [B, T, V] float32 (one 2-D matmul, float32 result)."""
    b, t, d = x.shape
    return jnp.matmul(x.reshape(b * t, d), w,
                      preferred_element_type=jnp.float32).reshape(b, t, -1)  # [B, T, V]


def head_nll(x, w, targets, chunk: int = 0):
    """x [B, T, D], w [D, V], targets [B, T] -> (nll, lse) [B, T] float32 each, as
    ``token_nll(head_logits(x, w), targets)``, holding at most [B, chunk, V] logits at a time
    (``chunk`` must divide T; 0 = all at once)."""
    b, t, d = x.shape
    if not chunk or chunk >= t:
        return token_nll(head_logits(x, w), targets)
    if t % chunk:
        raise ValueError(f"head chunk {chunk} does not divide the sequence length {t}")
    n = t // chunk
    xs = jnp.swapaxes(x.reshape(b, n, chunk, d), 0, 1)  # [N, B, C, D]
    ys = jnp.swapaxes(targets.reshape(b, n, chunk), 0, 1)  # [N, B, C]

    @jax.checkpoint  # keep only (x_chunk, y_chunk): the [B, C, V] logits are recomputed
    def one(xy):
        return token_nll(head_logits(xy[0], w), xy[1])  # ([B, C], [B, C])

    nll, lse = jax.lax.map(one, (xs, ys))  # [N, B, C] each
    back = lambda a: jnp.swapaxes(a, 0, 1).reshape(b, t)  # noqa: E731  [N, B, C] -> [B, T]
    return back(nll), back(lse)
