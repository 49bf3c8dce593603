"""Masked next-token cross-entropy with optional z-loss, and bits-per-byte.

For logits z_t ∈ R^V and target y_t:
    nll_t  = logsumexp(z_t) - z_t[y_t]                         (computed in float32)
    loss   = Σ_t m_t nll_t / Σ_t m_t  +  α · Σ_t m_t logsumexp(z_t)² / Σ_t m_t
The z-loss term (PaLM, Chowdhery et al. 2022, §5 "z_loss") keeps the softmax normaliser near 1.
Bits per byte (tokenizer-independent; Gao et al. 2020, The Pile §4):
    bpb = Σ_t m_t nll_t / (ln 2 · Σ_t m_t bytes(y_t)).

Example::

    import jax.numpy as jnp
    from jaxlm.ops.losses import token_nll
    nll, lse = token_nll(jnp.zeros((1, 3, 5)), jnp.array([[0, 1, 2]]))  # nll = log 5 each
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def token_nll(logits, targets):
    """logits [B, T, V], targets [B, T] -> (nll [B, T], logsumexp [B, T]), both float32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    return lse - target_logit, lse


def masked_loss(logits, targets, mask, z_loss: float = 0.0):
    """Mean masked NLL (+ z-loss). Returns (loss, stats) with summed nll and token counts."""
    nll, lse = token_nll(logits, targets)
    mask = mask.astype(jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)
    nll_sum = (nll * mask).sum()
    loss = nll_sum / n
    if z_loss:
        loss = loss + z_loss * (jnp.square(lse) * mask).sum() / n
    return loss, {"nll_sum": nll_sum, "tokens": mask.sum()}


def bits_per_byte(nll_sum, n_bytes):
    """Total nats over the bytes those tokens encode -> bits per byte."""
    return nll_sum / (math.log(2.0) * n_bytes)
