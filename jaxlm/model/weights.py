"""The one registry of matmul-weight parameterisations, keyed by ``model.weights``.

Every attention / MLP projection of every block (softmax, the linear-attention family, TNL's
SGLU, hybrids) is built by :func:`make_dense`, which looks ``cfg.weights`` up in
:data:`WEIGHTS` and passes the model config explicitly, so options such as
``model.lowrank_rank`` reach every matrix (no global state, no patching). Embeddings and the
output head stay dense, as in the low-rank papers.

Built-ins (registered below, in this one place):

* ``dense``   — :class:`jaxlm.model.dense.Dense`, y = x W.
* ``lowrank`` — :class:`jaxlm.model.lowrank.LowRankDense`, W = s·B·A (Glentis et al. 2025 §3).
* ``sltrain`` — :class:`jaxlm.model.lowrank.SLTrainDense`, W = s·B·A + S (Han et al. 2024 eq. 3).

A plug-in adds a class with the constructor ``cls(cfg, in_shape, out_shape, names, *, std,
rngs)`` (``cfg`` a :class:`jaxlm.config.ModelConfig`; ``names`` the logical axis names of the
full ``in_shape + out_shape`` kernel) and a ``__call__`` contracting x's trailing
``len(in_shape)`` dims, via :func:`register_weights`.

Example::

    from flax import nnx
    from jaxlm.config import ModelConfig
    from jaxlm.model.weights import make_dense
    cfg = ModelConfig(weights="lowrank", lowrank_rank=8)
    w = make_dense(cfg, (64,), (128,), ("embed", "mlp"), std=0.02, rngs=nnx.Rngs(0))
    w.a.shape, w.b.shape          # ((64, 8), (8, 128))
"""

from __future__ import annotations

from jaxlm.config import ConfigError, ModelConfig, register_choice
from jaxlm.model.dense import Dense
from jaxlm.model.lowrank import LowRankDense, SLTrainDense

WEIGHTS: dict[str, type] = {}


def register_weights(name: str, cls: type) -> None:
    """Make ``cls`` selectable as ``model.weights=<name>``."""
    WEIGHTS[name] = cls
    register_choice("model.weights", name)


def make_dense(cfg: ModelConfig, in_shape, out_shape, names, *, std, rngs):
    """The matmul weight ``in_shape -> out_shape`` chosen by ``cfg.weights``."""
    if cfg.weights not in WEIGHTS:
        raise ConfigError(f"model.weights={cfg.weights!r} is not registered; use one of "
                          f"{', '.join(WEIGHTS)} (or register_weights a new one)")
    return WEIGHTS[cfg.weights](cfg, in_shape, out_shape, names, std=std, rngs=rngs)


register_weights("dense", Dense)
register_weights("lowrank", LowRankDense)
register_weights("sltrain", SLTrainDense)
