"""Small pytree helpers shared across jaxlm: leaf path names and byte counts.

A leaf's path (``jax.tree_util`` key path: dict keys, NamedTuple fields, sequence indices) is
named the same way everywhere — checkpoint checksums, the weight-decay mask, GaLore's targets,
sharding tables — as ``"params/blocks/mlp/w_up/kernel"``.

Example::

    import jax.numpy as jnp
    from jaxlm.utils.trees import leaves_with_names, tree_bytes
    tree = {"a": {"w": jnp.zeros((2, 3))}, "b": [jnp.ones(4, jnp.int8)]}
    [name for name, _ in leaves_with_names(tree)]   # ['a/w', 'b/0']
    tree_bytes(tree)                                  # 2*3*4 + 4*1 = 28
"""

from __future__ import annotations

import math

import jax
import numpy as np


def path_str(path) -> str:
    """A key path as ``"a/b/0"`` (jax's own ``keystr`` in its simple form)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def path_names(path) -> list[str]:
    """A key path as its list of entry names: ``["a", "b", "0"]``."""
    return [jax.tree_util.keystr((k,), simple=True) for k in path]


def leaves_with_names(tree, is_leaf=None) -> list[tuple[str, object]]:
    """``[(path_str, leaf), ...]`` in tree-flatten order."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return [(path_str(p), x) for p, x in flat]


def leaf_bytes(leaf) -> int:
    """Global bytes of an array or ``ShapeDtypeStruct`` leaf (0 for anything else)."""
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        return 0
    return math.prod(shape) * np.dtype(dtype).itemsize


def tree_bytes(tree) -> int:
    """Global bytes of all array leaves of ``tree`` (shardings ignored)."""
    return sum(leaf_bytes(x) for x in jax.tree.leaves(tree))
