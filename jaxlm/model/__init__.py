"""Flax NNX modules (thin parameter holders); the math lives in :mod:`jaxlm.ops`."""

from jaxlm.model.layers import ATTENTION, Block, Dense, register_attention
from jaxlm.model.transformer import Transformer

__all__ = ["ATTENTION", "Block", "Dense", "Transformer", "register_attention"]

from jaxlm.model import lowrank as _lowrank  # noqa: E402,F401  (model.weights=lowrank|sltrain)
