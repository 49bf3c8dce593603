"""Rotary position embedding (RoPE), rotate-half layout (Su et al. 2021, RoFormer eq. 34).

For a head vector x ∈ R^D split into halves (x1, x2) = (x[:D/2], x[D/2:]) and position p,

    θ_i = theta^(-2i/D),  i = 0 … D/2-1
    RoPE(x, p) = (x1 · cos(pθ) - x2 · sin(pθ),  x2 · cos(pθ) + x1 · sin(pθ)).

This is the "rotate half" pairing used by HF LLaMA (dimension i pairs with i + D/2), so weights
converted from HF checkpoints need no permutation. Positions are explicit, so packed documents can
restart at 0 and a decode step passes its absolute position.

Llama-3.1 frequency remapping (``model.rope_scaling=llama3``; Meta's Llama 3.1 reference code and
transformers' ``rope_type: llama3``). With factor s, low/high frequency factors a < b and the
original context length L₀, each frequency's wavelength λ_i = 2π / θ_i is compared with
λ_low = L₀ / a and λ_high = L₀ / b:

    θ'_i = θ_i                                  if λ_i < λ_high   (high frequencies: kept)
    θ'_i = θ_i / s                              if λ_i > λ_low    (low frequencies: slowed by s)
    θ'_i = (1 - γ_i) · θ_i / s + γ_i · θ_i      otherwise, γ_i = (L₀ / λ_i - a) / (b - a)

(the attention scale is unchanged: llama3 has no attention factor).

Example::

    import jax.numpy as jnp
    from jaxlm.ops.rope import apply_rope
    x = jnp.ones((1, 4, 2, 8))                        # [B, T, H, D]
    y = apply_rope(x, jnp.arange(4)[None], theta=1e4)  # same shape, position-rotated
    z = apply_rope(x, jnp.arange(4)[None], theta=5e5, scaling=("llama3", 8.0, 1.0, 4.0, 8192))
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def llama3_inv_freq(inv_freq, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_pos: int):
    """θ [D/2] -> θ' [D/2]: Llama-3.1's remapping (module docstring), float32."""
    wavelen = 2 * math.pi / inv_freq  # λ_i
    low_wavelen = original_max_pos / low_freq_factor  # λ_low
    high_wavelen = original_max_pos / high_freq_factor  # λ_high
    gamma = (original_max_pos / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - gamma) * inv_freq / factor + gamma * inv_freq
    out = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, out).astype(jnp.float32)


def rope_inv_freq(head_dim: int, theta: float, scaling=None):
    """θ [D/2] float32; ``scaling``: None or ("llama3", factor, low, high, original_max_pos)."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [D/2]
    if scaling is None:
        return inv_freq
    kind, *args = scaling
    if kind != "llama3":
        raise ValueError(f"unknown rope scaling {kind!r} (supported: llama3)")
    return llama3_inv_freq(inv_freq, *args)


def rope_angles(positions, head_dim: int, theta: float, scaling=None):
    """positions [B, T] -> (cos, sin) each [B, T, D/2] in float32."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)  # [D/2]
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, positions, theta: float = 10000.0, scaling=None):
    """x [B, T, H, D], positions [B, T] -> rotated x (computed in float32, returned in x.dtype).

    ``scaling``: None (plain RoPE) or ``("llama3", factor, low, high, original_max_pos)``."""
    cos, sin = rope_angles(positions, x.shape[-1], theta, scaling)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, D/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, T, H, D/2] each
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
