"""Low-rank and sparse-plus-low-rank matmul weights, drop-in replacements for ``Dense``.

Selected by ``model.weights``; each class has ``Dense``'s constructor signature
``(cfg, in_shape, out_shape, names, *, std, rngs)``, reads ``cfg.lowrank_rank``,
``cfg.lowrank_scale`` and ``cfg.sparse_density`` from the model config it is given, and is
registered in :data:`jaxlm.model.weights.WEIGHTS`, so every attention/MLP matrix switches at once
(embeddings and the output head stay dense, as in the papers). A multi-dim kernel (``wq``
``[D, H, K]``) is factorised as the matrix ``[prod(in), prod(out)]``.

``lowrank`` (the seed paper's "Low-Rank", Glentis et al. 2025 §3; seed repo ``pt_low_rank``):
W = s·B·A with no full W ever stored. In jaxlm's ``[in, out]`` layout::

    a [I, R] (= Aᵀ),  b [R, O] (= Bᵀ):   y = s · (x a) b          (2 thin matmuls, (I+O)R params)

Init: the seed repo uses kaiming-uniform for both factors; here ``a, b ~ N(0, σ²)`` with
σ² = std / (s√R), so that W = s·a b has the same per-entry std as the ``Dense`` it replaces
(fair comparisons at equal init scale) and the factors start balanced (‖a‖ ≈ ‖b‖).

``sltrain`` (Han et al., NeurIPS 2024, arXiv 2406.02214, eq. 3): W = s·B·A + S, S sparse with a
**fixed random support** of density δ (``model.sparse_density``), only its values trained::

    a [I, R] ~ N(0, 1/I),  b [R, O] = 0,  values [I, k] ~ N(0, std²),  k = max(1, round(δ O))
    W = s · a b + scatter(values at (i, col[i, j]));   y = x W   (materialised, as SLTrain)

The support is k distinct columns per row drawn once with numpy from a seed that depends only on
the matrix's shape and names, so it is a static constant of the compiled program (no index
buffer in the state — params stay float and differentiable). Simplification vs SLTrain: the
layers of a scanned stack share one support pattern (each layer has its own values), and the
support is row-balanced (exactly k per row) instead of uniform over all I·O entries.
Logical axis names: ``a`` takes the name of the first in-dim, ``b`` and the values that of the
first out-dim / in-dim, the rank axis is replicated — so FSDP/tensor sharding carries over.

Both keep factors ``a``, ``b`` under one module, which is what
:func:`jaxlm.optim.lowrank.refactor_tree` looks for (weight refactorization).

Example::

    from flax import nnx
    from jaxlm.config import ModelConfig
    from jaxlm.model import Transformer
    m = Transformer(ModelConfig(vocab_size=257, d_model=64, n_heads=4, d_ff=128,
                                weights="lowrank", lowrank_rank=8), rngs=nnx.Rngs(0))
    m.blocks.mlp.w_up.a.shape    # (4, 64, 8): [L, I, R]
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx



def _param(value, names):
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class LowRankDense(nnx.Module):
    """y = s · (x a) b, contracting the trailing ``len(in_shape)`` dims of x."""

    def __init__(self, cfg, in_shape, out_shape, names, *, std, rngs):
        rank_cfg, scale_cfg = cfg.lowrank_rank, cfg.lowrank_scale
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        i, o = math.prod(in_shape), math.prod(out_shape)
        r = min(rank_cfg, i, o)
        self.scale, self.rank = float(scale_cfg), r
        in_name, out_name = names[0], names[len(in_shape)]
        sigma = math.sqrt(std / (self.scale * math.sqrt(r)))
        self.a = _param(sigma * jax.random.normal(rngs.params(), (i, r)), (in_name, None))
        self.b = _param(sigma * jax.random.normal(rngs.params(), (r, o)), (None, out_name))

    def _flat_in(self, x):
        n = len(self.in_shape)
        return x.reshape(x.shape[:x.ndim - n] + (-1,)), x.shape[:x.ndim - n]

    def __call__(self, x):
        x2, lead = self._flat_in(x)  # [..., I]
        h = jnp.einsum("...i,ir->...r", x2, self.a[...].astype(x.dtype))
        y = jnp.einsum("...r,ro->...o", h, (self.scale * self.b[...]).astype(x.dtype))
        return y.reshape(lead + self.out_shape)


def sparse_support(i: int, o: int, k: int, key: str) -> np.ndarray:
    """``[I, k]`` int32: k distinct random columns per row, fixed by (shape, ``key``)."""
    rng = np.random.default_rng(zlib.crc32(f"{key}:{i}x{o}".encode()))
    cols = np.argsort(rng.random((i, o)), axis=1)[:, :k]
    return np.sort(cols, axis=1).astype(np.int32)


class SLTrainDense(nnx.Module):
    """y = x (s · a b + S): low-rank plus fixed-support sparse (SLTrain)."""

    def __init__(self, cfg, in_shape, out_shape, names, *, std, rngs):
        rank_cfg, scale_cfg, density = cfg.lowrank_rank, cfg.lowrank_scale, cfg.sparse_density
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        i, o = math.prod(in_shape), math.prod(out_shape)
        r = min(rank_cfg, i, o)
        self.scale, self.rank = float(scale_cfg), r
        self.k = max(1, min(o, round(density * o)))
        self.support_key = "/".join(str(n) for n in names)
        in_name, out_name = names[0], names[len(in_shape)]
        self.a = _param(jax.random.normal(rngs.params(), (i, r)) / math.sqrt(i), (in_name, None))
        self.b = _param(jnp.zeros((r, o), jnp.float32), (None, out_name))
        self.values = _param(std * jax.random.normal(rngs.params(), (i, self.k)), (in_name, None))

    def weight(self):
        """The dense ``[I, O]`` matrix W = s·a b + S (f32)."""
        i, o = self.a.shape[-2], self.b.shape[-1]
        cols = jnp.asarray(sparse_support(i, o, self.k, self.support_key))  # [I, k] constant
        rows = jnp.arange(i)[:, None]
        w = self.scale * (self.a[...] @ self.b[...])
        return w.at[rows, cols].add(self.values[...])

    def __call__(self, x):
        n = len(self.in_shape)
        lead = x.shape[:x.ndim - n]
        x2 = x.reshape(lead + (-1,))
        y = jnp.einsum("...i,io->...o", x2, self.weight().astype(x.dtype))
        return y.reshape(lead + self.out_shape)
