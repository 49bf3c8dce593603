"""Normalisation and feed-forward math of the LLaMA block (pure functions on arrays).

RMSNorm (Zhang & Sennrich 2019, eq. 4):   y = x / sqrt(mean(x²) + eps) · g
    computed in float32 whatever the input dtype, returned in the input dtype.
SwiGLU (Shazeer 2020, eq. 6, "FFN_SwiGLU"): y = (SiLU(x W_gate) ⊙ (x W_up)) W_down
Dropout (Srivastava et al. 2014, "inverted" form): y = x ⊙ m / (1 − p), m ~ Bernoulli(1 − p),
    so E[y] = x and nothing changes at evaluation time (no key: the identity).

Example::

    import jax.numpy as jnp
    from jaxlm.ops.layers import rms_norm, swiglu
    x = jnp.ones((2, 3, 8))                                    # [B, T, D]
    y = rms_norm(x, jnp.ones(8))                               # [B, T, D]
    z = swiglu(x, jnp.ones((8, 16)), jnp.ones((8, 16)), jnp.ones((16, 8)))  # [B, T, D]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x, scale=None, eps: float = 1e-5):
    """x [..., D], scale [D] or None (no gain) -> [..., D] in x.dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)


def dropout(x, rate: float, key=None):
    """Zero each entry of x with probability ``rate`` and scale the rest by 1 / (1 - rate);
    the identity when ``key`` is None or ``rate`` is 0 (evaluation, sampling)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def swiglu(x, w_gate, w_up, w_down):
    """x [B, T, D]; w_gate, w_up [D, F]; w_down [F, D] -> [B, T, D]."""
    gate = jnp.einsum("btd,df->btf", x, w_gate)
    up = jnp.einsum("btd,df->btf", x, w_up)
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, w_down)
