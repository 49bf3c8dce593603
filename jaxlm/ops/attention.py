"""Causal softmax attention with grouped-query heads and document (segment) masking.

Math (Vaswani et al. 2017, eq. 1), per head h and query position t:

    o_t = sum_s softmax_s( q_t · k_s / sqrt(D) + m_ts ) v_s,
    m_ts = 0 if (s <= t and seg_s == seg_t) else -inf.

Grouped-query attention (Ainslie et al. 2023): H query heads share KV key/value heads, query head h
reads key/value head h // (H // KV). Packed sequences pass ``segment_ids`` so a token never attends
to another document; together with per-document RoPE positions each document sees exactly what it
would see alone.

Two implementations of the same function, selected by ``impl``:
  * ``reference`` — the einsum below, written for reading; softmax in float32.
  * ``fused``     — ``jax.nn.dot_product_attention`` (XLA on CPU/TPU, cuDNN flash attention on GPU
                    when there is no document mask). Tests check the two agree.

Example::

    import jax, jax.numpy as jnp
    from jaxlm.ops.attention import attention
    q = jax.random.normal(jax.random.key(0), (2, 16, 4, 8))   # [B, T, H, D]
    k = v = jax.random.normal(jax.random.key(1), (2, 16, 2, 8))  # [B, T, KV, D] (GQA, 2 groups)
    o = attention(q, k, v)                                      # [B, T, H, D]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.ops.layers import dropout

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


def attention(q, k, v, segment_ids=None, *, impl: str = "reference", dropout_rate: float = 0.0,
              dropout_key=None):
    """Causal self-attention over a full sequence (training and prefill).

    q: [B, T, H, D]; k, v: [B, T, KV, D]; segment_ids: optional [B, T] int (document ids;
    tokens attend only within their document). Returns [B, T, H, D] in q's dtype. Attention-
    probability dropout (training only) needs ``reference``: the fused kernel has no dropout.
    """
    b, t = q.shape[:2]
    if impl == "fused" and dropout_key is not None and dropout_rate > 0:
        raise ValueError("attention dropout needs impl='reference' (the fused kernel has none)")
    if impl == "fused":
        mask = None
        if segment_ids is not None:
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, S]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
    if impl != "reference":
        raise ValueError(f"unknown attention impl {impl!r} (reference | fused)")
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = make_mask(pos, pos, segment_ids, segment_ids)
    return attention_reference(q, k, v, mask, dropout_rate=dropout_rate, dropout_key=dropout_key)
