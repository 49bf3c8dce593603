"""Flax NNX modules (thin parameter holders); the math lives in :mod:`jaxlm.ops`."""

from jaxlm.model.layers import ATTENTION, Block, Dense, register_attention
from jaxlm.model.transformer import Transformer
from jaxlm.model.weights import WEIGHTS, make_dense, register_weights

__all__ = ["ATTENTION", "WEIGHTS", "Block", "Dense", "Transformer", "make_dense",
           "register_attention", "register_weights"]
