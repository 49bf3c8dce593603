"""Flax NNX modules (thin parameter holders); the math lives in :mod:`jaxlm.ops`."""

from jaxlm.model.layers import ATTENTION, Block, Dense, register_attention
from jaxlm.model.transformer import Transformer

__all__ = ["ATTENTION", "Block", "Dense", "Transformer", "register_attention"]
