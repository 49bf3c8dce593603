"""Thin Flax NNX parameter holders for the LLaMA block; all math is in :mod:`jaxlm.ops`.

Every matmul weight comes from :func:`jaxlm.model.weights.make_dense` (``model.weights``:
dense, low-rank, SLTrain). Every ``nnx.Param`` carries logical axis names (``out_sharding``)
that :mod:`jaxlm.sharding` maps to mesh axes. ``eager_sharding=False`` keeps construction
mesh-free: shardings are applied by the jitted init in :mod:`jaxlm.train.state`, so full weights
never land on one device.

Block (pre-norm, Touvron et al. 2023 LLaMA §2.2):
    h = x + Attn(RMSNorm(x));   y = h + SwiGLU(RMSNorm(h))

The attention variant is chosen by ``model.attention`` through :data:`ATTENTION`; a new variant
registers a class with the same interface (``__call__(x, positions, segment_ids, cache)`` ->
``(y, cache)`` and ``init_cache(batch, max_len, dtype)``) via :func:`register_attention`.

Example::

    from flax import nnx
    from jaxlm.config import ModelConfig
    from jaxlm.model.layers import Block
    blk = Block(ModelConfig(d_model=64, n_heads=4, d_ff=128), rngs=nnx.Rngs(0))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import ops
from jaxlm.config import ModelConfig, register_choice
from jaxlm.model.dense import Dense, param  # noqa: F401  (re-exported: jaxlm.model.Dense)
from jaxlm.model.weights import make_dense
from jaxlm.sharding import shard


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("norm",),
                               eager_sharding=False)

    def __call__(self, x):
        return ops.rms_norm(x, self.scale[...], self.eps)


class Bias(nnx.Module):
    """An additive bias b (zeros at init; last key ``bias``: never weight-decayed), e.g. [H, K]."""

    def __init__(self, shape, names):
        self.bias = nnx.Param(jnp.zeros(shape, jnp.float32), out_sharding=names,
                              eager_sharding=False)

    def __call__(self, x):
        return x + self.bias[...].astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: W_gate, W_up [D_fsdp, F_tensor] (column-parallel), W_down [F_tensor, D_fsdp]."""

    def __init__(self, cfg: ModelConfig, *, rngs):
        d, f, std = cfg.d_model, cfg.d_ff, cfg.init_std
        out_std = std / (2 * cfg.n_layers) ** 0.5  # GPT-2 scaled init of residual outputs
        self.w_gate = make_dense(cfg, (d,), (f,), ("embed", "mlp"), std=std, rngs=rngs)
        self.w_up = make_dense(cfg, (d,), (f,), ("embed", "mlp"), std=std, rngs=rngs)
        self.w_down = make_dense(cfg, (f,), (d,), ("mlp", "embed"), std=out_std, rngs=rngs)

    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        return self.w_down(jax.nn.silu(self.w_gate(x)) * self.w_up(x))


class SoftmaxAttention(nnx.Module):
    """GQA softmax attention with RoPE; W_q[D_fsdp, H_tensor, K], W_o[H_tensor, K, D_fsdp].

    K = ``model.head_dim`` (0: D / H), so H*K need not equal D (e.g. 64 heads of 128 at D=4096).
    Options for Hugging Face architectures (each off by default, then the computation is the
    plain one): ``model.attn_bias`` adds biases b_q [H, K], b_k, b_v [KV, K] to the projections
    (Qwen2); ``model.qk_norm`` applies RMSNorm over K (gain [K], eps ``model.norm_eps``) to every
    q and k head before RoPE (Qwen3); ``model.rope_scaling=llama3`` remaps RoPE frequencies
    (Llama 3.1, :func:`jaxlm.ops.rope.llama3_inv_freq`).

    ``model.attn_impl`` picks the training/prefill kernel (auto | reference | xla | cudnn |
    splash), resolved when the step is traced for its devices
    (:func:`jaxlm.ops.attention_kernels.resolve_attn_impl`); KV-cached decoding always uses the
    reference einsum."""

    def __init__(self, cfg: ModelConfig, *, rngs, layer: int = 0):
        d, h, kv, std = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.init_std
        hd = cfg.attn_head_dim  # K: model.head_dim, or d_model // n_heads
        self.theta, self.impl, self.dropout = cfg.rope_theta, cfg.attn_impl, cfg.dropout
        self.wq = make_dense(cfg, (d,), (h, hd), ("embed", "heads", "head_dim"), std=std,
                             rngs=rngs)
        self.wk = make_dense(cfg, (d,), (kv, hd), ("embed", "kv_heads", "head_dim"), std=std,
                             rngs=rngs)
        self.wv = make_dense(cfg, (d,), (kv, hd), ("embed", "kv_heads", "head_dim"), std=std,
                             rngs=rngs)
        self.wo = make_dense(cfg, (h, hd), (d,), ("heads", "head_dim", "embed"),
                             std=std / (2 * cfg.n_layers) ** 0.5, rngs=rngs)
        self.kv_shape = (kv, hd)
        self.rope_scaling = cfg.rope_scaling_args  # None or ("llama3", ...) (hashable, static)
        self.has_bias, self.qk_norm = cfg.attn_bias, cfg.qk_norm
        if cfg.attn_bias:
            self.bq = Bias((h, hd), ("heads", "head_dim"))
            self.bk = Bias((kv, hd), ("kv_heads", "head_dim"))
            self.bv = Bias((kv, hd), ("kv_heads", "head_dim"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps)
            self.k_norm = RMSNorm(hd, cfg.norm_eps)

    def _qkv(self, x, positions):
        """x [B, T, D] -> q [B, T, H, K], k, v [B, T, KV, K]: projections (+ bias), q/k norm,
        RoPE."""
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.has_bias:
            q, k, v = self.bq(q), self.bk(k), self.bv(v)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = ops.apply_rope(q, positions, self.theta, self.rope_scaling)
        k = ops.apply_rope(k, positions, self.theta, self.rope_scaling)
        return q, k, v

    def init_cache(self, batch: int, max_len: int, dtype):
        shape = (batch, max_len) + self.kv_shape  # [B, S, KV, K]
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def __call__(self, x, positions, segment_ids=None, cache=None, cache_index=None,
                 dropout_key=None):
        q, k, v = self._qkv(x, positions)  # [B, T, H, K], [B, T, KV, K] x 2
        if cache is None:
            o = ops.attention(q, k, v, segment_ids, impl=self.impl, dropout_rate=self.dropout,
                              dropout_key=dropout_key)
        else:  # write the T new keys at cache_index, attend over the whole (masked) cache
            k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype),
                                                        cache_index, axis=1)
            v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype),
                                                        cache_index, axis=1)
            cache = {"k": k_all, "v": v_all}
            b, s = k_all.shape[:2]
            kv_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
            mask = ops.make_mask(positions, kv_pos)  # [B, T, S]: causal over the filled prefix
            o = ops.attention_reference(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask)
        return self.wo(o), cache


ATTENTION: dict[str, type] = {"softmax": SoftmaxAttention}


def register_attention(name: str, cls: type) -> None:
    """Add an attention variant selectable as ``model.attention=<name>``."""
    ATTENTION[name] = cls
    register_choice("model.attention", name)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, layer: int = 0):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = ATTENTION[cfg.attention](cfg, rngs=rngs, layer=layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg, rngs=rngs)
        self.dropout = cfg.dropout  # residual dropout (model.dropout)

    def __call__(self, x, positions, segment_ids=None, cache=None, cache_index=None,
                 dropout_key=None):
        """``dropout_key`` (training only): attention-probability and residual dropout."""
        keys = [None] * 3 if dropout_key is None else jax.random.split(dropout_key, 3)
        h, cache = self.attn(self.attn_norm(x), positions, segment_ids, cache, cache_index,
                             dropout_key=keys[0])
        x = x + ops.dropout(h, self.dropout, keys[1])
        x = x + ops.dropout(self.mlp(self.mlp_norm(x)), self.dropout, keys[2])
        return shard(x, ("batch", "seq", "act_embed")), cache
