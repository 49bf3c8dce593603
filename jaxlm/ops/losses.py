"""Masked next-token cross-entropy with optional z-loss, and bits-per-byte.

For logits z_t ∈ R^V and target y_t:
    nll_t  = logsumexp(z_t) - z_t[y_t]                         (computed in float32)
    loss   = Σ_t m_t nll_t / Σ_t m_t  +  α · Σ_t m_t logsumexp(z_t)² / Σ_t m_t
The z-loss term (PaLM, Chowdhery et al. 2022, §5 "z_loss") keeps the softmax normaliser near 1.
Bits per byte (tokenizer-independent; Gao et al. 2020, The Pile §4):
    bpb = Σ_t m_t nll_t / (ln 2 · Σ_t m_t bytes(y_t)).

Gradient (hand-written, :func:`token_nll` is a ``jax.custom_vjp``). With p_t = softmax(z_t) and
upstream cotangents ḡ_t (of nll_t) and ℓ̄_t (of lse_t):
    ∂/∂z_t = p_t · (ḡ_t + ℓ̄_t) − ḡ_t · onehot(y_t)
one fused pass over the [tokens, V] logits (p recomputed as exp(z − lse), the one-hot an iota
compare). Plain autodiff of the same forward builds the softmax term, scatters the target term into
a zero [tokens, V] array and adds the two: at V = 32000 that is several extra [tokens, V] float32
temporaries, which cost more than the exp on a CPU.

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
    return _nll_lse(logits.astype(jnp.float32), targets)


def _nll_lse_fwd(logits, targets):
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # [B, T, 1], for stability
    lse = (m + jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True)))[..., 0]  # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    return (lse - target_logit, lse), (logits, targets, lse)


def _nll_lse_bwd(res, cotangents):
    logits, targets, lse = res
    g_nll, g_lse = cotangents  # [B, T] each
    probs = jnp.exp(logits - lse[..., None])  # [B, T, V], softmax recomputed (fuses into dz)
    is_target = targets[..., None] == jnp.arange(logits.shape[-1])  # [B, T, V] one-hot (iota)
    dz = probs * (g_nll + g_lse)[..., None] - jnp.where(is_target, g_nll[..., None], 0.0)
    return dz, None  # no gradient for the integer targets


_nll_lse = jax.custom_vjp(lambda logits, targets: _nll_lse_fwd(logits, targets)[0])
_nll_lse.defvjp(_nll_lse_fwd, _nll_lse_bwd)


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
