"""Normalisation and feed-forward math of the LLaMA block (pure functions on arrays).

RMSNorm (Zhang & Sennrich 2019, eq. 4):   y = x / sqrt(mean(x²) + eps) · g
    computed in float32 whatever the input dtype, returned in the input dtype.
SwiGLU (Shazeer 2020, eq. 6, "FFN_SwiGLU"): y = (SiLU(x W_gate) ⊙ (x W_up)) W_down
Dropout (Srivastava et al. 2014, "inverted" form): y = x ⊙ m / (1 − p), m ~ Bernoulli(1 − p),
    so E[y] = x and nothing changes at evaluation time (no key: the identity).
matmul: y = x w for x [N, I], w [I, O], with ∂x = ∂y wᵀ and ∂w = xᵀ ∂y (every projection of the
    model, via jaxlm.model.Dense); its backward lays ∂w out row-major on CPU (see matmul).

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


def cpu_barrier(x):
    """An optimization barrier on CPU, the identity elsewhere: keeps a transpose written for
    XLA:CPU's matmul library as its own copy instead of letting XLA fold it back into the next
    dot (see :func:`matmul`); other backends choose their own layouts."""
    return jax.lax.platform_dependent(x, cpu=jax.lax.optimization_barrier, default=lambda x: x)


@jax.custom_vjp
def matmul(x, w):
    """x [N, I] @ w [I, O] -> [N, O], with the weight gradient ∂w = xᵀ·∂y laid out for XLA:CPU.

    Plain autodiff gives ∂w as a dot contracting both operands' leading dim N; XLA:CPU sends a
    dot to its fast matmul library (YNNPACK) only when the lhs contracts its last dim, so that
    product falls back to Eigen and ran 30–40% slower here than the same product row-major (the
    forward and ∂x = ∂y·wᵀ already have that form). On CPU the backward therefore transposes
    the narrower of x and ∂y first -- an optimization barrier keeps XLA from folding the
    transpose back into the dot -- and on every other platform it is autodiff's own product:
    the values are the same products either way (float32 rounding aside)."""
    return x @ w


def _weight_grad_cpu(x, g):
    """xᵀ g [I, O] from row-major products: (xᵀ)[I, N]·g, or ((gᵀ)[O, N]·x)ᵀ when O < I."""
    keep = jax.lax.optimization_barrier
    if x.shape[1] <= g.shape[1]:
        return keep(x.T) @ g  # [I, N] @ [N, O]
    return keep(keep(g.T) @ x).T  # ([O, N] @ [N, I])ᵀ: the smaller transpose, twice


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(res, g):
    x, w = res
    dw = jax.lax.platform_dependent(x, g, cpu=_weight_grad_cpu, default=lambda x, g: x.T @ g)
    return g @ w.T, dw.astype(w.dtype)  # ∂x [N, I], ∂w [I, O]


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def swiglu(x, w_gate, w_up, w_down):
    """x [B, T, D]; w_gate, w_up [D, F]; w_down [F, D] -> [B, T, D]."""
    gate = jnp.einsum("btd,df->btf", x, w_gate)
    up = jnp.einsum("btd,df->btf", x, w_up)
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, w_down)
