"""The linear-attention family as configurations of one kernel (:func:`jaxlm.ops.linear_attention`),
and the TransNormerLLM (TNL) block. Selected by ``model.attention``; all heads shard on ``tensor``.

Every variant computes, per head, ``S_t = α_t S_{t-1} + k_t v_tᵀ,  o_t = q_tᵀ S_t`` and differs in
the feature map on q/k, the decay α and what is applied to o (``linear_attention`` docstring):

* ``linear``     — Katharopoulos et al. 2020 (eqs. 4-6): φ(x) = elu(x)+1, α = 1, normalised read
                   o_t = φ(q_t)ᵀS_t / φ(q_t)ᵀz_t with z_t = Σ_s φ(k_s) (the kernel run on [v, 1]).
* ``retnet``     — RetNet retention, Sun et al. 2023 (eqs. 5-8): RoPE on q, k (xPos without its
                   extra scale), k·K^{-1/2}, fixed γ_h = 1 − 2^{−5−h}; out = (swish(X W_G) ⊙
                   Norm(o)) W_O. Norm = gain-free RMS per head (RetNet: GroupNorm).
* ``tnl``        — TransNormerLLM (arXiv 2307.14995) "GLA" token mixer (§3.2, eqs. 10-12):
                   q = SiLU(X W_q), k = SiLU(X W_k), v = X W_v, u = X W_u (no gate activation),
                   O = SRMSNorm(LA(q, k, v)) ⊙ u, out = O W_o; no 1/√d scaling. Decay λ_{h,l} — we
                   use the **official code schedule** (lightning-attention / TNL HF model /
                   MiniMax-01), ``model.tnl_decay=official``: ALiBi slopes s_h = 2^{−8(h+1)/H}
                   (non-power-of-2 H: slopes of the lower power of 2, then every other slope of
                   the next one) scaled by the layer factor (1 − l/(L−1) + 1e-5); log λ = −s.
                   ``paper`` = the paper's eq. 10 literally, log λ = −(8h/H)(1 − l/L), h = 0…H−1.
                   LRPE-d (TNL §3.1.1) on the first layer only (official "mix"): features doubled,
                   φ_t(x) = [x cos(θ t), x sin(θ t)], so φ_t(q)·φ_s(k) = Σ_i q_i k_i cos(θ_i(t−s));
                   θ learnable, θ_j = 10000^{−2j/(H·K)} over the H·K channels.
* ``simple_gla`` — scalar data-dependent decay per head and token (simple GLA / Mamba-2 SSD-style):
                   log α_t = logsigmoid(X W_α + b)/16 (GLA's τ = 16), q·K^{-1/2}; out = (swish(X
                   W_G) ⊙ Norm(o)) W_O.

Norm scope (``model.linear_norm``): ``head`` normalises each head alone (no communication under
tensor parallelism, default); ``all`` normalises over all heads (TNL / MiniMax fidelity; one extra
all-reduce of Σx² per token when heads are sharded).

TNL block (pre-norm, §3.3): x ← x + GLA(SRMSNorm(x)); x ← x + SGLU(SRMSNorm(x)), with
SRMSNorm(x) = x / RMS(x) (no gain, eps 1e-6, float32) and SGLU(x) = [(X W_v) ⊙ (X W_u)] W_o (a GLU
without activation). All TNL weights N(0, init_std) as in the official model code.

Document packing: ``segment_ids`` reset the recurrent state where a new document starts. Decoding:
``init_cache`` returns the O(1) state ``{"state": [B, H, K', V'] float32}``; with a cache, T > 1
tokens (prefill) run the chunked kernel from the cached state, T = 1 the recurrent step.
``model.linear_impl=pallas`` runs the chunked form (training, prefill) as the Pallas kernels of
:mod:`jaxlm.ops.lightning_pallas` (TPU; interpret mode on CPU); decoding stays pure JAX.

Example::

    import jax.numpy as jnp
    from flax import nnx
    from jaxlm.config import ModelConfig
    from jaxlm.model.linear import TNLBlock
    cfg = ModelConfig(d_model=64, n_heads=4, d_ff=128, attention="tnl", n_layers=2)
    blk = TNLBlock(cfg, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 16, 64)); pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    y, _ = blk(x, pos, layer=0)                                    # [2, 16, 64]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import ops
from jaxlm.config import ModelConfig
from jaxlm.model.layers import register_attention
from jaxlm.model.weights import make_dense
from jaxlm.sharding import shard


def srms_norm(x, eps: float = 1e-6, axes=(-1,)):
    """Simple RMSNorm (TNL §3.4): x / sqrt(mean(x²) + eps) over ``axes``, in float32, no gain."""
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axes, keepdims=True) + eps)  # 1 / RMS(x)
    return (x32 * inv).astype(x.dtype)


def alibi_slopes(n_heads: int) -> np.ndarray:
    """ALiBi slopes 2^{−8(h+1)/H} (Press et al. 2022) with the official non-power-of-2 rule. [H]."""
    def pow2(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    p = 2 ** int(math.floor(math.log2(n_heads)))
    extra = pow2(2 * p)[0::2][:n_heads - p] if p != n_heads else []
    return np.asarray(pow2(p) + extra, np.float32)


def tnl_log_decay(n_heads: int, layer, n_layers: int, schedule: str = "official"):
    """log λ_{h,l} ≤ 0 of the TNL layer ``layer`` (a Python or traced int). [H] float32."""
    h = jnp.arange(n_heads, dtype=jnp.float32)
    layer = jnp.asarray(layer, jnp.float32)
    if schedule == "official":  # s_h · (1 − l/(L−1) + 1e-5)
        return -jnp.asarray(alibi_slopes(n_heads)) * (1 - layer / max(n_layers - 1, 1) + 1e-5)
    if schedule == "paper":  # eq. 10: λ = exp(−(8h/H)(1 − l/L))
        return -(8.0 * h / n_heads) * (1 - layer / n_layers)
    if schedule == "none":
        return jnp.zeros((n_heads,), jnp.float32)
    raise ValueError(f"model.tnl_decay={schedule!r} is not one of official, paper, none")


def retnet_log_decay(n_heads: int):
    """RetNet γ_h = 1 − 2^{−5−h} (Sun et al. 2023 §2.2) as log γ. [H]."""
    return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(n_heads, dtype=jnp.float32))))


def document_resets(segment_ids):
    """segment_ids [B, T] -> reset [B, T] bool: True where a new document starts (t > 0)."""
    return jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


class LinearAttention(nnx.Module):
    """Shared holder: W_q, W_k [D, H, K], W_v [D, H, V=K], W_o [H, K, D]; variants override
    ``features`` (q, k, v, log-decay), ``finish`` (what is applied to the kernel output)."""

    def __init__(self, cfg: ModelConfig, *, rngs, layer=0):
        d, h, hd, std = cfg.d_model, cfg.n_heads, cfg.attn_head_dim, cfg.init_std
        self.cfg, self.layer, self.chunk = cfg, layer, cfg.linear_chunk
        if cfg.kv_heads != cfg.n_heads:
            raise ValueError(f"model.attention={cfg.attention} needs n_kv_heads == n_heads")
        self.n_heads, self.head_dim = h, hd
        proj = lambda: make_dense(cfg, (d,), (h, hd), ("embed", "heads", "head_dim"), std=std,
                                  rngs=rngs)
        self.wq, self.wk, self.wv = proj(), proj(), proj()
        self.wo = make_dense(cfg, (h, hd), (d,), ("heads", "head_dim", "embed"),
                             std=self.out_std(cfg), rngs=rngs)
        self.init_extra(cfg, proj, rngs)

    def out_std(self, cfg):
        return cfg.init_std / (2 * cfg.n_layers) ** 0.5  # the repo's scaled residual init

    def init_extra(self, cfg, proj, rngs):
        pass

    def state_dims(self):
        return self.head_dim, self.head_dim  # (K', V') of the recurrent state

    def init_cache(self, batch: int, max_len: int, dtype):
        """O(1) decode state, independent of ``max_len``: {"state": [B, H, K', V'] float32}."""
        return {"state": jnp.zeros((batch, self.n_heads) + self.state_dims(), jnp.float32)}

    def norm(self, o):  # o [B, T, H, V]
        axes = (-2, -1) if self.cfg.linear_norm == "all" else (-1,)
        return srms_norm(o, axes=axes)

    def __call__(self, x, positions, segment_ids=None, cache=None, cache_index=None, *, layer=None,
                 dropout_key=None):
        """x [B, T, D] -> (y [B, T, D], new cache or None). ``layer`` (may be traced) overrides
        the constructor's layer index (the scanned Transformer passes it). There are no
        attention probabilities to drop: ``dropout_key`` is accepted and unused (the blocks
        apply residual dropout)."""
        layer = self.layer if layer is None else layer
        q, k, v, g = self.features(x, positions, layer)  # [B,T,H,K'], [B,T,H,K'], [B,T,H,V'], g
        reset = None if segment_ids is None else document_resets(segment_ids)
        state = None if cache is None else cache["state"]
        form = "recurrent" if cache is not None and x.shape[1] == 1 else "chunked"
        o, state = ops.linear_attention_reset(q, k, v, g, reset, form=form, chunk_size=self.chunk,
                                              initial_state=state, return_state=True,
                                              impl=self.cfg.linear_impl)
        o = self.finish(o, x)  # [B, T, H, K]
        return self.wo(o), (None if cache is None else {"state": state})


class VanillaLinearAttention(LinearAttention):
    """elu+1 feature map, no decay, normalised by φ(q)ᵀz (kernel run on [v, 1])."""

    def state_dims(self):
        return self.head_dim, self.head_dim + 1

    def features(self, x, positions, layer):
        q = jax.nn.elu(self.wq(x)) + 1  # [B, T, H, K]
        k = jax.nn.elu(self.wk(x)) + 1
        v = self.wv(x)
        ones = jnp.ones(v.shape[:-1] + (1,), v.dtype)
        return q, k, jnp.concatenate([v, ones], axis=-1), None  # v' [B, T, H, V+1]

    def finish(self, o, x):
        num, den = o[..., :-1], o[..., -1:]  # [B, T, H, V], [B, T, H, 1]
        return num / (den + 1e-6)


class _GatedNormed(LinearAttention):
    """Gate W_G [D, H, V]: out = (swish(X W_G) ⊙ Norm(o)) W_O (RetNet eq. 8 / GLA layer)."""

    def init_extra(self, cfg, proj, rngs):
        self.wg = proj()

    def finish(self, o, x):
        return jax.nn.silu(self.wg(x)) * self.norm(o)


class Retention(_GatedNormed):
    def features(self, x, positions, layer):
        theta = self.cfg.rope_theta
        q = ops.apply_rope(self.wq(x), positions, theta)  # [B, T, H, K]
        k = ops.apply_rope(self.wk(x), positions, theta) * self.head_dim ** -0.5
        return q, k, self.wv(x), retnet_log_decay(self.n_heads)


class SimpleGLA(_GatedNormed):
    def init_extra(self, cfg, proj, rngs):
        super().init_extra(cfg, proj, rngs)
        self.w_alpha = make_dense(cfg, (cfg.d_model,), (cfg.n_heads,), ("embed", "heads"),
                                  std=cfg.init_std, rngs=rngs)
        self.b_alpha = nnx.Param(jnp.zeros((cfg.n_heads,), jnp.float32), out_sharding=("heads",),
                                 eager_sharding=False)

    def features(self, x, positions, layer):
        a = self.w_alpha(x).astype(jnp.float32) + self.b_alpha[...]  # [B, T, H]
        g = jax.nn.log_sigmoid(a) / 16.0  # log α_t ∈ (−∞, 0), τ = 16
        return self.wq(x) * self.head_dim ** -0.5, self.wk(x), self.wv(x), g


class TNLAttention(LinearAttention):
    """TNL "GLA" token mixer with LRPE-d on layer 0 and the layer-dependent decay."""

    def out_std(self, cfg):
        return cfg.init_std

    def init_extra(self, cfg, proj, rngs):
        self.wu = proj()
        if cfg.tnl_lrpe:
            hk = cfg.n_heads * cfg.attn_head_dim
            theta = 10000.0 ** (-2.0 * jnp.arange(hk, dtype=jnp.float32) / hk)
            self.lrpe_theta = nnx.Param(theta.reshape(cfg.n_heads, cfg.attn_head_dim),
                                        out_sharding=("heads", "head_dim"), eager_sharding=False)

    def state_dims(self):
        k = self.head_dim * (2 if self.cfg.tnl_lrpe else 1)
        return k, self.head_dim

    def lrpe(self, x, positions, layer):
        """[x cos(θ t), x sin(θ t)] with θ zeroed off the first layer (then [x, 0]: plain q·k)."""
        theta = self.lrpe_theta[...] * (jnp.asarray(layer) == 0)  # [H, K]
        ang = positions[:, :, None, None].astype(jnp.float32) * theta  # [B, T, H, K]
        x32 = x.astype(jnp.float32)
        return jnp.concatenate([x32 * jnp.cos(ang), x32 * jnp.sin(ang)], -1).astype(x.dtype)

    def features(self, x, positions, layer):
        q, k = jax.nn.silu(self.wq(x)), jax.nn.silu(self.wk(x))  # [B, T, H, K]
        if self.cfg.tnl_lrpe:
            q, k = self.lrpe(q, positions, layer), self.lrpe(k, positions, layer)  # [B,T,H,2K]
        g = tnl_log_decay(self.n_heads, layer, self.cfg.n_layers, self.cfg.tnl_decay)
        return q, k, self.wv(x), g

    def finish(self, o, x):
        return self.norm(o) * self.wu(x)


class SGLU(nnx.Module):
    """TNL channel mixer: [(X W_v) ⊙ (X W_u)] W_o; W_v, W_u [D, F], W_o [F, D] (no activation)."""

    def __init__(self, cfg: ModelConfig, *, rngs):
        d, f, std = cfg.d_model, cfg.d_ff, cfg.init_std
        self.w_v = make_dense(cfg, (d,), (f,), ("embed", "mlp"), std=std, rngs=rngs)
        self.w_u = make_dense(cfg, (d,), (f,), ("embed", "mlp"), std=std, rngs=rngs)
        self.w_o = make_dense(cfg, (f,), (d,), ("mlp", "embed"), std=std, rngs=rngs)

    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        return self.w_o(self.w_v(x) * self.w_u(x))


class TNLBlock(nnx.Module):
    """x ← x + GLA(SRMSNorm(x)); x ← x + SGLU(SRMSNorm(x))  (TNL §3.3; no norm gains)."""

    def __init__(self, cfg: ModelConfig, *, rngs, layer=0):
        self.attn = TNLAttention(cfg, rngs=rngs, layer=layer)
        self.mlp = SGLU(cfg, rngs=rngs)
        self.dropout = cfg.dropout  # residual dropout (model.dropout)

    def __call__(self, x, positions, segment_ids=None, cache=None, cache_index=None, *, layer=None,
                 dropout_key=None):
        keys = [None] * 2 if dropout_key is None else jax.random.split(dropout_key, 2)
        h, cache = self.attn(srms_norm(x), positions, segment_ids, cache, cache_index, layer=layer)
        x = x + ops.dropout(h, self.dropout, keys[0])
        x = x + ops.dropout(self.mlp(srms_norm(x)), self.dropout, keys[1])
        return shard(x, ("batch", "seq", "act_embed")), cache


for _name, _cls in (("linear", VanillaLinearAttention), ("retnet", Retention),
                    ("tnl", TNLAttention), ("simple_gla", SimpleGLA)):
    register_attention(_name, _cls)
