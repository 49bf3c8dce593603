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
                    attention-probability dropout.
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

import jax
import jax.numpy as jnp

from jaxlm.ops import attention_kernels as kernels
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
    return attention_reference(q, k, v, mask, dropout_rate=dropout_rate, dropout_key=dropout_key)
