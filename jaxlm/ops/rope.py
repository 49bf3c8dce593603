"""Rotary position embedding (RoPE), rotate-half layout (Su et al. 2021, RoFormer eq. 34).

For a head vector x ∈ R^D split into halves (x1, x2) = (x[:D/2], x[D/2:]) and position p,

    θ_i = theta^(-2i/D),  i = 0 … D/2-1
    RoPE(x, p) = (x1 · cos(pθ) - x2 · sin(pθ),  x2 · cos(pθ) + x1 · sin(pθ)).

This is the "rotate half" pairing used by HF LLaMA (dimension i pairs with i + D/2), so weights
converted from HF checkpoints need no permutation. Positions are explicit, so packed documents can
restart at 0 and a decode step passes its absolute position.

Example::

    import jax.numpy as jnp
    from jaxlm.ops.rope import apply_rope
    x = jnp.ones((1, 4, 2, 8))                        # [B, T, H, D]
    y = apply_rope(x, jnp.arange(4)[None], theta=1e4)  # same shape, position-rotated
"""

from __future__ import annotations

import jax.numpy as jnp


def rope_angles(positions, head_dim: int, theta: float):
    """positions [B, T] -> (cos, sin) each [B, T, D/2] in float32."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [D/2]
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, positions, theta: float = 10000.0):
    """x [B, T, H, D], positions [B, T] -> rotated x (computed in float32, returned in x.dtype)."""
    cos, sin = rope_angles(positions, x.shape[-1], theta)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, D/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, T, H, D/2] each
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
