"""Low-rank and sparse-plus-low-rank matmul weights, drop-in replacements for ``Dense``.

Selected by ``model.weights``; each class has ``Dense``'s constructor signature
``(cfg, in_shape, out_shape, names, *, std, rngs)``, reads ``cfg.lowrank_rank`` (r, clipped to
min(I, O)), ``cfg.lowrank_scale`` (s), ``cfg.lowrank_init`` and ``cfg.sparse_density`` (δ) from
the model config it is given, and is registered in :data:`jaxlm.model.weights.WEIGHTS`, so every
attention/MLP matrix switches at once (embeddings and the output head stay dense, as in the
papers). A multi-dim kernel (``wq`` ``[D, H, K]``) is factorised as the matrix
``[I, O] = [prod(in), prod(out)]``; I is the fan-in of the papers' ``nn.Linear(I, O)``.

``lowrank`` (the seed paper's "Low-Rank", Glentis et al. 2025 §3; seed repo ``pt_low_rank``):
W = s·B·A with no full W ever stored. In jaxlm's ``[in, out]`` layout::

    a [I, R] (= Aᵀ),  b [R, O] (= Bᵀ):   y = s · (x a) b          (2 thin matmuls, (I+O)R params)

``sltrain`` (Han et al., NeurIPS 2024, arXiv 2406.02214, eq. 3): W = s·B·A + S, S sparse with a
**fixed random support** of nnz = int(δ·I·O) entries, only its values trained::

    W = s · a b + scatter(values at flat indices support)   (materialised, as SLTrain), y = x W

``model.lowrank_scale`` is s, the multiplier of the product B·A. The papers' scripts set it to
lora_alpha / r: 32/128 = 0.25 at 60M (seed repo and SLTrain), SLTrain 16/256, 16/256, 8/512 at
130M/350M/1B; the default is the 60M value, 0.25.

Init (``model.lowrank_init``), with U(±1/√n) = torch's ``kaiming_uniform_(a=√5)`` for a weight of
fan-in n (gain √(2/(1+5)) = 1/√3 times the bound √(3/n)):

* ``paper`` (default; what the authors' code does, for reproducing the seed paper's tables):
  lowrank A ~ U(±1/√I), B ~ U(±1/√R) (both ``kaiming_uniform_``, seed repo ``LoRaFaLinear``);
  sltrain A ~ U(±1/√I), B = 0, values ~ U(±1/√I) (SLTrain ``SpLoRaLinear``).
* ``std_matched`` (jaxlm's earlier init, for comparisons at the dense model's init scale):
  lowrank a, b ~ N(0, std/(s√R)) so that s·a b has the per-entry std of the ``Dense`` it
  replaces and ‖a‖ ≈ ‖b‖; sltrain a ~ N(0, 1/I), b = 0, values ~ N(0, std²).

``paper`` is the default because the seed paper's tables are what this path reproduces; pair it
with the scripts' s = α/r. With s = 1 the kaiming product s·B·A starts ≈ 2× larger than a
``Dense`` of std 0.02 at I = 64 (std 1/(3√I)), which trains slower on small models.

The SLTrain support is drawn **per matrix and per layer**, as the authors' ``randperm`` does:
the first int(δ·I·O) entries of a random permutation of the I·O flat (row-major) indices, sorted
(uniform over all entries, not row-balanced). It is stored in the model state as a
:class:`SparseSupport` — an int32 ``nnx.Variable`` that is not an ``nnx.Param`` — rather than
re-derived from a key in the forward pass: under the scanned layer stack each layer needs its
own pattern, which a compile-time constant cannot give without an [L, nnz] constant baked into
the program, and re-drawing it every step would cost an I·O permutation per matrix per step.
Stored, it is drawn once by the (jitted, sharded) init from the model seed — so it is
deterministic — and saved/restored with the checkpoint; :func:`jaxlm.train.state.split_buffers`
keeps it out of the gradient and the optimizer (8 bytes per entry in SLTrain, 4 here).
Logical axis names: ``a`` takes the name of the first in-dim, ``b`` that of the first out-dim,
the rank axis is replicated; ``values`` and ``support`` (int(δ·I·O) entries, a count no mesh
axis divides in general) are replicated over the mesh, one copy per layer.

Both keep factors ``a``, ``b`` under one module, which is what
:func:`jaxlm.optim.lowrank.refactor_tree` looks for (weight refactorization).

Example::

    from flax import nnx
    from jaxlm.config import ModelConfig
    from jaxlm.model import Transformer
    m = Transformer(ModelConfig(vocab_size=257, d_model=64, n_heads=4, d_ff=128,
                                weights="sltrain", lowrank_rank=8), rngs=nnx.Rngs(0))
    m.blocks.mlp.w_up.a.shape          # (4, 64, 8): [L, I, R]
    m.blocks.mlp.w_up.support.shape    # (4, 245): [L, int(0.03 * 64 * 128)], one draw per layer
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ConfigError


class SparseSupport(nnx.Variable):
    """Non-trainable int32 buffer: flat row-major indices of SLTrain's fixed sparse support."""


def _param(value, names):
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def kaiming_uniform(key, shape, fan_in: int):
    """U(±1/√fan_in): torch ``kaiming_uniform_(w, a=√5)`` (std 1/√(3·fan_in)). float32."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def sparse_support(key, i: int, o: int, nnz: int):
    """``[nnz]`` int32: sorted distinct flat indices into an ``[I, O]`` matrix, uniform over all
    I·O entries (SLTrain's ``randperm(I·O)[:nnz]``, sorted)."""
    if i * o >= 2 ** 31:
        raise ConfigError(f"model.weights=sltrain: a {i}x{o} matrix has more entries than int32 "
                          "indices address; use smaller matrices (d_model / d_ff)")
    return jnp.sort(jax.random.permutation(key, i * o)[:nnz]).astype(jnp.int32)


def _factor_dims(cfg, in_shape, out_shape, names):
    """(I, O, R, in axis name, out axis name) of a kernel ``in_shape -> out_shape``."""
    i, o = math.prod(in_shape), math.prod(out_shape)
    if cfg.lowrank_init not in ("paper", "std_matched"):
        raise ConfigError(f"model.lowrank_init={cfg.lowrank_init!r}: use paper or std_matched")
    return i, o, min(cfg.lowrank_rank, i, o), names[0], names[len(in_shape)]


class LowRankDense(nnx.Module):
    """y = s · (x a) b, contracting the trailing ``len(in_shape)`` dims of x."""

    def __init__(self, cfg, in_shape, out_shape, names, *, std, rngs):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        i, o, r, in_name, out_name = _factor_dims(cfg, in_shape, out_shape, names)
        self.scale, self.rank = float(cfg.lowrank_scale), r
        if cfg.lowrank_init == "paper":
            a = kaiming_uniform(rngs.params(), (i, r), fan_in=i)  # A [r, I] in torch
            b = kaiming_uniform(rngs.params(), (r, o), fan_in=r)  # B [O, r] in torch
        else:
            sigma = math.sqrt(std / (abs(self.scale) * math.sqrt(r)))
            a = sigma * jax.random.normal(rngs.params(), (i, r))
            b = sigma * jax.random.normal(rngs.params(), (r, o))
        self.a = _param(a, (in_name, None))
        self.b = _param(b, (None, out_name))

    def __call__(self, x):
        n = len(self.in_shape)
        lead = x.shape[:x.ndim - n]
        x2 = x.reshape(lead + (-1,))  # [..., I]
        h = jnp.einsum("...i,ir->...r", x2, self.a[...].astype(x.dtype))  # [..., R]
        y = jnp.einsum("...r,ro->...o", h, (self.scale * self.b[...]).astype(x.dtype))  # [..., O]
        return y.reshape(lead + self.out_shape)  # [..., *out_shape]


class SLTrainDense(nnx.Module):
    """y = x (s · a b + S): low-rank plus a fixed-support sparse part (SLTrain)."""

    def __init__(self, cfg, in_shape, out_shape, names, *, std, rngs):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        i, o, r, in_name, out_name = _factor_dims(cfg, in_shape, out_shape, names)
        if not 0.0 < cfg.sparse_density < 1.0:
            raise ConfigError(f"model.sparse_density={cfg.sparse_density}: SLTrain needs a "
                              "fraction strictly between 0 and 1 (the paper uses 0.03)")
        self.scale, self.rank = float(cfg.lowrank_scale), r
        self.nnz = int(cfg.sparse_density * i * o)  # SLTrain: int(sp_ratio · total_elements)
        if cfg.lowrank_init == "paper":
            a = kaiming_uniform(rngs.params(), (i, r), fan_in=i)
            values = kaiming_uniform(rngs.params(), (self.nnz,), fan_in=i)
        else:
            a = jax.random.normal(rngs.params(), (i, r)) / math.sqrt(i)
            values = std * jax.random.normal(rngs.params(), (self.nnz,))
        self.a = _param(a, (in_name, None))
        self.b = _param(jnp.zeros((r, o), jnp.float32), (None, out_name))
        self.values = _param(values, (None,))
        self.support = SparseSupport(sparse_support(rngs.params(), i, o, self.nnz),
                                     out_sharding=(None,), eager_sharding=False)

    def weight(self):
        """The dense ``[I, O]`` matrix W = s·a b + S (f32)."""
        i, o = self.a.shape[-2], self.b.shape[-1]
        w = self.scale * (self.a[...] @ self.b[...])  # [I, O]
        w = w.reshape(i * o).at[self.support[...]].add(self.values[...])  # [I·O] flat, scatter S
        return w.reshape(i, o)  # [I, O]

    def __call__(self, x):
        n = len(self.in_shape)
        lead = x.shape[:x.ndim - n]
        x2 = x.reshape(lead + (-1,))  # [..., I]
        y = jnp.einsum("...i,io->...o", x2, self.weight().astype(x.dtype))  # [..., O]
        return y.reshape(lead + self.out_shape)  # [..., *out_shape]
