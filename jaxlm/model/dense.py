"""The dense matmul weight and the parameter helper: the bottom of the model's import graph.

:class:`Dense` computes y = x · W with W a full float32 kernel whose leading ``len(in_shape)``
dims contract with x's trailing dims (a plain linear map, Touvron et al. 2023 LLaMA §2 uses it
for every projection). It is the ``dense`` entry of :data:`jaxlm.model.weights.WEIGHTS`; the
low-rank / sparse parameterisations (:mod:`jaxlm.model.lowrank`) share its constructor signature
``(cfg, in_shape, out_shape, names, *, std, rngs)`` and import only this module, so the registry
can import all of them without a cycle.

Example::

    import jax.numpy as jnp
    from flax import nnx
    from jaxlm.config import ModelConfig
    from jaxlm.model.dense import Dense
    w = Dense(ModelConfig(), (64,), (4, 16), ("embed", "heads", "head_dim"), std=0.02,
              rngs=nnx.Rngs(0))
    w(jnp.ones((2, 8, 64))).shape         # (2, 8, 4, 16)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.ops.layers import matmul


def param(rngs, shape, names, std):
    """A float32 normal(0, std) parameter with logical axis names (ones when std is None)."""
    value = (jnp.ones(shape, jnp.float32) if std is None
             else std * jax.random.normal(rngs.params(), shape, jnp.float32))
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class Dense(nnx.Module):
    """y = x · W contracting the trailing ``len(in_shape)`` dims of x with W's leading dims.

    W ~ N(0, std²), shape ``in_shape + out_shape`` (``cfg`` is accepted for the shared signature
    and not read). The product is taken as one 2-D matmul ``[N, I] @ [I, O]`` (N = all leading
    dims of x, I/O = the flattened in/out dims; both reshapes are free). Written as a dot over
    ``[B, T, D]`` instead, the weight gradient contracts two dims (B and T) and XLA:CPU
    canonicalises it by physically transposing the ``[B, T, F]`` activation gradient before
    every backward matmul. The product is :func:`jaxlm.ops.layers.matmul` (x·W whose weight
    gradient xᵀ·∂y is laid out row-major for XLA:CPU's fast matmul path).
    """

    def __init__(self, cfg, in_shape, out_shape, names, *, std, rngs):
        self.n_in = len(in_shape)
        self.kernel = param(rngs, tuple(in_shape) + tuple(out_shape), names, std)

    def __call__(self, x):
        w = self.kernel[...].astype(x.dtype)
        lead, ins, outs = x.shape[:x.ndim - self.n_in], w.shape[:self.n_in], w.shape[self.n_in:]
        x2 = x.reshape(math.prod(lead), math.prod(ins))  # [N, I]
        w2 = w.reshape(math.prod(ins), math.prod(outs))  # [I, O]
        return matmul(x2, w2).reshape(lead + outs)  # [..., *out_shape]
