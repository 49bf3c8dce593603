"""Parameter count, training FLOPs per token, a matmul peak-FLOP/s probe, and state memory.

Parameter count of the LLaMA model (``hd = model.head_dim or d_model // n_heads``,
``KV = kv_heads``, ``F = d_ff``, ``L = n_layers``, ``V`` = padded vocabulary)::

    N_total = V*D                                        # token embedding
            + L * (D*H*hd + 2*D*KV*hd + H*hd*D           # wq, wk, wv, wo (no biases)
                   + 3*D*F                               # SwiGLU w_gate, w_up, w_down
                   + 2*D)                                # attn_norm, mlp_norm gains
            + D                                          # final_norm
            + D*V  (unless tie_embeddings)               # lm_head

Training FLOPs per token (PaLM, Chowdhery et al. 2022, App. B; nanoGPT ``estimate_mfu``)::

    flops_per_token = 6 * N_matmul + 12 * L * H * hd * T

``N_matmul`` counts every parameter that takes part in a matmul: all attention and MLP kernels
plus the output head ``D*V`` (also when tied); it excludes the input-embedding gather and the norm
gains. ``6 = 2`` (multiply-add) ``* 3`` (forward + two backward matmuls). The attention term is
``QK^T`` and ``PV``: ``2 matmuls * 2 * T * H*hd`` forward per token, times 3 for fwd+bwd, using the
full ``T x T`` score matrix -- it is *not* halved for causality (the PaLM convention; fused
kernels that skip masked blocks do less work, so their MFU is slightly overstated).
Recomputation (remat) is not counted: this is model FLOPs, so MFU, not HFU.

``MFU = flops_per_token * tokens_per_second / (n_devices * peak_flops_per_device)``. Pass a
datasheet peak (``cfg.peak_flops``) for the conventional number; :func:`measure_peak_flops`
gives the achievable dense-matmul rate of the current device instead (a lower bound on peak).

Example::

    from jaxlm.config import ModelConfig
    from jaxlm.utils.flops import param_count, flops_per_token
    m = ModelConfig(d_model=256, n_layers=4, n_heads=4, d_ff=1024)
    param_count(m, 256), flops_per_token(m, 256, seq_len=256)  # -> (4327680, 28704768.0)
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig
from jaxlm.utils.trees import leaf_bytes


def _layer_matmul_params(m: ModelConfig) -> int:
    d, hd = m.d_model, m.attn_head_dim
    attn = d * (m.n_heads * hd) + 2 * d * (m.kv_heads * hd) + (m.n_heads * hd) * d
    return attn + 3 * d * m.d_ff


def param_count(model_cfg: ModelConfig, vocab_size: int) -> int:
    """Exact number of parameters of the LLaMA model (see the module docstring)."""
    m, v = model_cfg, vocab_size
    per_layer = _layer_matmul_params(m) + 2 * m.d_model
    if m.attn_bias:  # Qwen2: biases on q, k, v
        per_layer += (m.n_heads + 2 * m.kv_heads) * m.attn_head_dim
    if m.qk_norm:  # Qwen3: RMSNorm gains [K] on q and on k
        per_layer += 2 * m.attn_head_dim
    head = 0 if m.tie_embeddings else m.d_model * v
    return v * m.d_model + m.n_layers * per_layer + m.d_model + head


def flops_per_token(model_cfg: ModelConfig, vocab_size: int, seq_len: int) -> float:
    """Training (fwd+bwd) FLOPs per token: ``6*N_matmul + 12*L*H*hd*T`` (module docstring)."""
    m = model_cfg
    n_matmul = m.n_layers * _layer_matmul_params(m) + m.d_model * vocab_size
    attention = 12 * m.n_layers * m.n_heads * m.attn_head_dim * seq_len
    return float(6 * n_matmul + attention)


def mfu(flops_per_tok: float, tokens_per_second: float, peak_flops: float,
        n_devices: int = 1) -> float:
    """Model FLOPs utilisation in [0, 1]; ``peak_flops`` is per device."""
    return flops_per_tok * tokens_per_second / (n_devices * peak_flops)


def measure_peak_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """Achieved FLOP/s of a jitted ``n x n @ n x n`` matmul on the default device (best of
    ``repeats`` after a warm-up): ``2 n^3 / seconds``. float32 uses JAX's default matmul
    precision (TF32 on recent NVIDIA GPUs, bf16 passes on TPU)."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype=jnp.dtype(dtype))
    b = jax.random.normal(kb, (n, n), dtype=jnp.dtype(dtype))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()  # compile + warm up
    best = math.inf
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


class StateBytes(NamedTuple):
    params: int  # global bytes of the parameters
    opt_state: int  # global bytes of the optimizer state
    total: int  # params + opt_state
    per_device: int  # bytes one device holds of params + opt_state (shards; replicated = full)


def _leaf_bytes(leaf, n_shards_fn: Callable[[Any], int] | None) -> tuple[int, int]:
    """(global bytes, bytes of one shard) of an array / ShapeDtypeStruct leaf."""
    nbytes = leaf_bytes(leaf)  # 0 for non-array leaves (python scalars, None)
    if not nbytes:
        return 0, 0
    shape, itemsize = leaf.shape, jnp.dtype(leaf.dtype).itemsize
    if n_shards_fn is not None:
        return nbytes, -(-nbytes // max(int(n_shards_fn(leaf)), 1))
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None and hasattr(sharding, "shard_shape"):
        return nbytes, math.prod(sharding.shard_shape(tuple(shape))) * itemsize
    return nbytes, nbytes  # no sharding information: assume replicated


def estimate_state_bytes(abstract_params, abstract_opt_state,
                         n_shards_fn: Callable[[Any], int] | None = None) -> StateBytes:
    """Bytes of the training state: global totals and what one device holds.

    Leaves may be arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``), optionally
    carrying ``.sharding``; each leaf's per-device share is its shard size,
    ``prod(sharding.shard_shape(shape)) * itemsize`` (= nbytes / number of distinct shards), or
    ``ceil(nbytes / n_shards_fn(leaf))`` when ``n_shards_fn`` is given. Leaves without sharding
    count as replicated. Activations, gradients and XLA temporaries are not included.
    """
    def total(tree):
        sizes = [_leaf_bytes(x, n_shards_fn) for x in jax.tree.leaves(tree)]
        return sum(s[0] for s in sizes), sum(s[1] for s in sizes)

    p_bytes, p_dev = total(abstract_params)
    o_bytes, o_dev = total(abstract_opt_state)
    return StateBytes(p_bytes, o_bytes, p_bytes + o_bytes, p_dev + o_dev)


def format_bytes(n: float) -> str:
    """``1536 -> '1.50 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
