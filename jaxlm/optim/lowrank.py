"""``optim.name=lowrank|sltrain`` and the memory accounting of every method.

Seed paper: Glentis et al. 2025, "Scalable Parameter and Memory Efficient Pretraining for LLM"
(arXiv 2505.22922, §4). Plain low-rank training factorises each attention/MLP matrix from
initialisation, W = s·B·A (``model.weights=lowrank``, :mod:`jaxlm.model.lowrank`); SLTrain (Han
et al. 2024) adds a fixed random sparse part, W = s·B·A + S (``model.weights=sltrain``). Both
train with AdamW (optax semantics, as the seed's ``torch.optim.AdamW``); the paper's two fixes —
weight refactorization (``optim.refactor_every``) and momentum reset with LR re-warmup
(``optim.reset_every``, ``optim.rewarmup_steps``) — are generic wrappers in
:mod:`jaxlm.optim.restarts` that :func:`jaxlm.optim.build_optimizer` applies to every method.

:func:`state_bytes` counts parameters + optimizer state of a config from shapes only
(``jax.eval_shape``); :func:`method_memory` compares every method on one model (``jaxlm-train``
logs it at start when the run uses a low-rank method or weight) and
``bench/optimizer_memory.py`` tabulates it for the papers' presets.

Example::

    jaxlm-train configs/shakespeare.yaml model.weights=lowrank optim.name=lowrank \\
        optim.reset_every=100 optim.refactor_every=100 optim.rewarmup_steps=10
"""

from __future__ import annotations

import math

import jax
import optax

from jaxlm.config import Config, ConfigError
from jaxlm.optim.build import build_adamw, register_optimizer
# re-exported: the restart wrappers used to live here
from jaxlm.optim.restarts import (refactor, refactor_tree, reset_moments,  # noqa: F401
                                  rewarmup, with_momentum_reset, with_refactorization,
                                  with_restarts)


def _build_factored(kind: str):
    def build(cfg: Config) -> optax.GradientTransformation:
        if cfg.model.weights != kind:
            raise ConfigError(f"optim.name={kind} trains factorised weights: set "
                              f"model.weights={kind} (model.weights={cfg.model.weights!r})")
        return build_adamw(cfg)  # + restarts, applied by build_optimizer

    return build


register_optimizer("lowrank", _build_factored("lowrank"))
register_optimizer("sltrain", _build_factored("sltrain"))


# ------------------------------------------------------------------------- memory accounting
METHODS = {  # method -> (model.weights, optim.name)
    "adamw": ("dense", "adamw"), "galore": ("dense", "galore"), "fira": ("dense", "fira"),
    "lowrank": ("lowrank", "lowrank"), "sltrain": ("sltrain", "sltrain")}


def method_config(cfg: Config, method: str) -> Config:
    """``cfg`` switched to ``method`` (model.weights and optim.name together)."""
    from jaxlm.config import replace
    weights, name = METHODS[method]
    return replace(cfg, model={"weights": weights}, optim={"name": name})


def state_entries(cfg: Config) -> tuple[int, int, int]:
    """(parameter entries, optimizer-state entries, SLTrain support indices) from shapes only.

    ``jax.eval_shape`` of the model init and of ``tx.init``; scalar counters count as one entry.
    The SLTrain support is a non-trainable int32 buffer of the model state (no optimizer state):
    its int(δ·I·O) indices per matrix are reported separately.
    """
    from flax import nnx

    from jaxlm.model import Transformer
    from jaxlm.model.lowrank import SLTrainDense
    from jaxlm.optim.build import build_optimizer

    model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    opt = jax.eval_shape(build_optimizer(cfg).init, params)
    count = lambda t: sum(math.prod(x.shape) for x in jax.tree.leaves(t))  # noqa: E731
    support = sum(math.prod(m.support.shape) for _, m in nnx.iter_graph(model)
                  if isinstance(m, SLTrainDense))
    return count(params), count(opt), support


def state_bytes(cfg: Config, bytes_per_entry: int = 4) -> int:
    """Bytes of parameters + optimizer state (+ int32 SLTrain indices) for ``cfg``'s method."""
    p, o, idx = state_entries(cfg)
    return (p + o) * bytes_per_entry + 4 * idx


def method_memory(cfg: Config) -> str:
    """``adamw 1.22 MiB (1.00x) | galore* 1.07 MiB (0.87x) | ...``: float32 parameters + optimizer
    state of this model under each low-rank method (``jax.eval_shape``: nothing is allocated);
    ``*`` marks this run's method. Restarts are left out (they add two counters)."""
    from jaxlm.config import replace
    from jaxlm.utils.flops import format_bytes

    base = replace(cfg, optim={"reset_every": 0, "refactor_every": 0})
    sizes = {m: state_bytes(method_config(base, m)) for m in METHODS}
    this = (cfg.model.weights, cfg.optim.name)
    if this not in METHODS.values():  # e.g. a plug-in optimizer: show this run's too
        sizes[f"{cfg.optim.name}/{cfg.model.weights}"] = state_bytes(base)
    return " | ".join(
        f"{m}{'*' if METHODS.get(m, this) == this else ''} {format_bytes(b)} "
        f"({b / sizes['adamw']:.2f}x)" for m, b in sizes.items())
