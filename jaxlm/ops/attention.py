"""Causal softmax attention with grouped-query heads and document (segment) masking.

Math (Vaswani et al. 2017, eq. 1), per head h and query position t:

    o_t = sum_s softmax_s( q_t · k_s / sqrt(D) + m_ts ) v_s,
    m_ts = 0 if (s <= t and seg_s == seg_t) else -inf.

Grouped-query attention (Ainslie et al. 2023): H query heads share KV key/value heads, query head h
reads key/value head h // (H // KV). Packed sequences pass ``segment_ids`` so a token never attends
to another document; together with per-document RoPE positions each document sees exactly what it
would see alone.

Implementations of the same function, selected by ``impl`` (``model.attn_impl``):
  * ``reference`` — the einsum below, written for reading; softmax in float32; the only one with
                    attention-probability dropout. Without dropout its gradient is written out
                    (:func:`attention_fast_grad`: same values, laid out for XLA:CPU).
  * ``xla``       — ``jax.nn.dot_product_attention(implementation="xla")`` (``fused`` = old name).
  * ``cudnn``     — cuDNN flash attention (NVIDIA GPUs; bf16/fp16).
  * ``splash``    — Pallas splash attention (TPU; interpret mode on CPU).
  * ``auto``      — cudnn / splash / xla by platform, reference under training dropout.
Which runs where, their constraints and the resolution rules: :mod:`jaxlm.ops.attention_kernels`.
Tests check every one against the reference, values and gradients.

Example::

    import jax, jax.numpy as jnp
    from jaxlm.ops.attention import attention
    q = jax.random.normal(jax.random.key(0), (2, 16, 4, 8))   # [B, T, H, D]
    k = v = jax.random.normal(jax.random.key(1), (2, 16, 2, 8))  # [B, T, KV, D] (GQA, 2 groups)
    o = attention(q, k, v)                                      # [B, T, H, D]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.ops import attention_kernels as kernels
from jaxlm.ops.layers import cpu_barrier, dropout

_NEG = -1e30  # large negative instead of -inf: a fully masked row stays finite


def make_mask(q_pos, kv_pos, q_seg=None, kv_seg=None, kv_valid=None):
    """Boolean attention mask [B, T, S]: causal by position, same segment, valid cache slot.

    q_pos: [B, T], kv_pos: [B, S] integer positions in one shared coordinate (not per-document).
    """
    mask = kv_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if q_seg is not None:
        mask &= q_seg[:, :, None] == kv_seg[:, None, :]
    if kv_valid is not None:
        mask &= kv_valid[:, None, :]
    return mask


def attention_reference(q, k, v, mask, *, dropout_rate: float = 0.0, dropout_key=None):
    """Masked GQA softmax attention. q [B,T,H,D], k/v [B,S,KV,D], mask [B,T,S] -> [B,T,H,D].
    With a ``dropout_key``, attention probabilities are dropped with ``dropout_rate``."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    qg = q.reshape(b, t, kv, g, d)  # [B, T, KV, G, D]: query head h = kv_head * G + g
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)  # [B, KV, G, T, S]
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
    probs = dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, dropout_key).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)  # [B, T, KV, G, D]
    return out.reshape(b, t, h, d)


def _heads_first(x, kv):
    """[B, T, KV·G, D] -> [B, KV, G·T, D]: each key/value head's queries as one row block."""
    b, t, h, d = x.shape
    return x.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, -1, d)


def _heads_last(x, t):
    """[B, KV, G·T, D] -> [B, T, KV·G, D] (inverse of :func:`_heads_first`)."""
    b, kv, gt, d = x.shape
    return x.reshape(b, kv, gt // t, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, -1, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention_fast_grad(q, k, v, mask, causal_blocks: int = 1):
    """:func:`attention_reference` (no dropout) with its gradient written out, laid out for speed.

    Same forward values. The backward is the softmax-attention gradient (Dao et al. 2022,
    FlashAttention, Appendix B.2), per head with S = QKᵀ/√D, P = softmax(S), O = PV:

        ∂V = Pᵀ∂O,  ∂P = ∂O Vᵀ,  ∂S = P ⊙ (∂P − rowsum(∂O ⊙ O)),  ∂Q = ∂S K/√D,  ∂K = ∂Sᵀ Q/√D.

    ∂V and ∂K contract P and ∂S over their query dim. Autodiff of the einsums leaves XLA:CPU
    transposing and copying those [T, S] matrices (and P's [B, KV, G, T, S] layout) to feed its
    matmul library; here they are formed as (∂Oᵀ P)ᵀ and (Qᵀ ∂S)ᵀ, transposing only the narrow
    [T, D] operands (held by an optimization barrier on CPU), with queries laid out
    [B, KV, G·T, D] so every product is a plain row-major batched matmul.

    ``causal_blocks=n`` (needs T = S, a causal mask and n | T) takes the queries n row blocks at a
    time; block i only reads the keys before its end, (i+1)·T/n, since the mask hides the rest:
    the products and the softmax skip (n−1)/2n of the [T, S] work (1/4 for n = 2). One layer of
    the bench config, fwd + recompute + bwd: ~30 ms (autodiff) -> ~21 (n = 1) -> ~17 (n = 2)
    (bench/RESULTS.md, #18). Tested against the softmax Jacobian in float64 loops
    (tests/test_attention_impl.py)."""
    return _fast_fwd(q, k, v, mask, causal_blocks)[0]


def _fast_fwd(q, k, v, mask, blocks):
    b, t, h, d = q.shape
    kv, tb = k.shape[2], t // blocks
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, D]
    outs, res = [], []
    for r0 in range(0, t, tb):  # query rows [r0, r0 + tb): keys [0, n)
        n = k.shape[1] if blocks == 1 else r0 + tb
        qh = _heads_first(q[:, r0:r0 + tb], kv)  # [B, KV, G·Tb, D]
        m = jnp.broadcast_to(mask[:, None, None, r0:r0 + tb, :n], (b, 1, h // kv, tb, n))
        s = jnp.einsum("bkqd,bksd->bkqs", qh, kh[:, :, :n], preferred_element_type=jnp.float32)
        s = jnp.where(m.reshape(b, 1, -1, n), s * d**-0.5, _NEG)  # [B, KV, G·Tb, n]
        p = jax.nn.softmax(s, axis=-1)  # float32
        o = jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), vh[:, :, :n])  # [B, KV, G·Tb, D]
        outs.append(_heads_last(o, tb))
        res.append((qh, o, p))
    return jnp.concatenate(outs, axis=1), (kh, vh, res)


def _fast_bwd(blocks, res, do):
    kh, vh, per_block = res
    (b, kv, s_len, d), tb, f32 = kh.shape, do.shape[1] // blocks, jnp.float32
    dq, dk_t, dv_t = [], 0.0, 0.0
    for i, (qh, o, p) in enumerate(per_block):
        n = p.shape[-1]
        doh = _heads_first(do[:, i * tb:(i + 1) * tb], kv)  # [B, KV, G·Tb, D]
        dp = jnp.einsum("bkqd,bksd->bkqs", doh, vh[:, :, :n], preferred_element_type=f32)
        delta = jnp.sum(doh.astype(f32) * o.astype(f32), axis=-1, keepdims=True)  # rowsum(∂O⊙O)
        ds = (p * (dp - delta) * d**-0.5).astype(qh.dtype)  # ∂S/√D  [B, KV, G·Tb, n]
        dq.append(_heads_last(jnp.einsum("bkqs,bksd->bkqd", ds, kh[:, :, :n]), tb))
        pad = ((0, 0), (0, 0), (0, 0), (0, s_len - n))  # keys [n, S) get nothing from this block
        dk_t += jnp.pad(jnp.einsum("bkdq,bkqs->bkds", cpu_barrier(qh.transpose(0, 1, 3, 2)), ds,
                                   preferred_element_type=f32), pad)  # [B, KV, D, S]
        dv_t += jnp.pad(jnp.einsum("bkdq,bkqs->bkds", cpu_barrier(doh.transpose(0, 1, 3, 2)),
                                   p.astype(doh.dtype), preferred_element_type=f32), pad)
    dk = cpu_barrier(dk_t.astype(kh.dtype)).transpose(0, 3, 1, 2)  # [B, S, KV, D]
    dv = cpu_barrier(dv_t.astype(vh.dtype)).transpose(0, 3, 1, 2)
    return jnp.concatenate(dq, axis=1), dk, dv, None


attention_fast_grad.defvjp(_fast_fwd, _fast_bwd)


def resolve(q, impl: str, *, dropout: bool = False) -> str:
    """``impl`` (auto | reference | xla | fused | cudnn | splash) -> the impl that runs for q
    [B, T, H, K] on the devices being compiled for (logged once; see
    :mod:`jaxlm.ops.attention_kernels`)."""
    platform, kind = kernels.compile_platform()
    picked, reason = kernels.resolve_attn_impl(impl, platform, dtype=q.dtype, dropout=dropout,
                                               head_dim=q.shape[-1], seq_len=q.shape[1],
                                               device_kind=kind)
    kernels.log_choice(impl, picked, reason)
    return picked


def attention(q, k, v, segment_ids=None, *, impl: str = "reference", dropout_rate: float = 0.0,
              dropout_key=None):
    """Causal self-attention over a full sequence (training and prefill).

    q: [B, T, H, D]; k, v: [B, T, KV, D]; segment_ids: optional [B, T] int (document ids;
    tokens attend only within their document). Returns [B, T, H, D] in q's dtype. ``impl``:
    auto | reference | xla (alias fused) | cudnn | splash (module docstring). Attention-
    probability dropout (training only, a ``dropout_key``) needs ``reference`` (``auto`` picks it).
    """
    b, t = q.shape[:2]
    training_dropout = dropout_key is not None and dropout_rate > 0
    impl = resolve(q, impl, dropout=training_dropout)
    if impl == "xla":
        mask = None
        if segment_ids is not None:
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, S]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                            implementation="xla")
    if impl == "cudnn":
        return kernels.cudnn_attention(q, k, v, segment_ids)
    if impl == "splash":
        interpret = kernels.compile_platform()[0] == "cpu"
        return kernels.splash_attention(q, k, v, segment_ids, interpret=interpret)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = make_mask(pos, pos, segment_ids, segment_ids)
    if not training_dropout:  # 2 causal query blocks from T = 128 on (4 were slower here, #18)
        return attention_fast_grad(q, k, v, mask, 2 if t % 2 == 0 and t >= 128 else 1)
    return attention_reference(q, k, v, mask, dropout_rate=dropout_rate, dropout_key=dropout_key)
