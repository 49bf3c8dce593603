"""The train state: a plain pytree, created sharded by a jitted init.

    state = {"step": int32[], "params": {...}, "opt_state": optax state, "rng": key}

``params`` is the pure nested dict of the NNX model's state (``nnx.split`` once, here); the
loss rebuilds the module with ``nnx.merge(graphdef, params)`` inside jit. Non-float leaves of it
are buffers, not parameters (SLTrain's int32 sparse support, :mod:`jaxlm.model.lowrank`): they
are saved and restored with the rest, but :func:`split_buffers` keeps them out of the gradient
and of the optimizer state. Shardings come from the
parameters' logical names through :data:`jaxlm.sharding.RULES`; optimizer moments take the sharding
of the parameter they belong to (``optax.tree_map_params``), per-parameter leaves of another shape
(low-rank moments, projectors) follow :func:`lowrank_sharding`, other leaves are replicated.
The init is ``jax.jit(init, out_shardings=...)``, so each device only ever materialises its own
shards — a model larger than one device's memory can be initialised.

Example::

    from jaxlm.config import load_config
    from jaxlm.sharding import make_mesh
    from jaxlm.optim import build_optimizer
    from jaxlm.train.state import StateSpec
    cfg = load_config(None, ["model.vocab_size=257", "model.n_layers=2"])
    spec = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
    state = spec.init()            # sharded on the mesh
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlm.config import Config, ConfigError
from jaxlm.model import Transformer
from jaxlm.sharding import fit_spec, replicated, tree_shardings


def resolve_vocab(cfg: Config, vocab_size: int) -> Config:
    """Fill ``model.vocab_size=0`` from the tokenizer; refuse a model too small for it."""
    v = cfg.model.vocab_size
    if v == 0:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
    if v < vocab_size:
        raise ConfigError(
            f"model.vocab_size={v} is smaller than the {cfg.data.tokenizer} tokenizer's "
            f"{vocab_size} tokens; set model.vocab_size>={vocab_size} (or 0 = from tokenizer)")
    return cfg


def lowrank_sharding(leaf, param_sharding):
    """Sharding of a per-parameter optimizer leaf whose shape is not the parameter's.

    GaLore/Fira moments ``[L, r, long]`` / ``[L, short, r]`` and projectors ``[L, short|long, r]``
    (jaxlm/optim/galore.py): the larger of the last two dims (never the rank r, which is clipped
    to the short side) is split over all mesh axes the parameter itself is split over, the rest
    replicated — so projections are plain sharded matmuls; the SVD gathers one matrix only on
    refresh steps. Leaves with < 2 dims (Fira's per-layer norm) are replicated. A dim the mesh
    does not divide falls back to replicated (:func:`jaxlm.sharding.fit_spec`).
    """
    mesh = param_sharding.mesh
    if leaf.ndim < 2:
        return replicated(mesh)
    axes = tuple(a for e in param_sharding.spec if e is not None
                 for a in (e if isinstance(e, tuple) else (e,)))
    entry = (axes[0] if len(axes) == 1 else axes) if axes else None
    big = leaf.ndim - 2 if leaf.shape[-2] >= leaf.shape[-1] else leaf.ndim - 1
    spec = [None] * leaf.ndim
    spec[big] = entry
    return NamedSharding(mesh, fit_spec(P(*spec), leaf.shape, mesh, "optimizer state"))


def _is_masked(x) -> bool:  # optax.partition leaves a MaskedNode where a group has no param
    return isinstance(x, optax.MaskedNode)


def _opt_leaf_sharding(leaf, param, param_sharding):
    if _is_masked(leaf):
        return leaf
    return param_sharding if leaf.shape == param.shape else lowrank_sharding(leaf, param_sharding)


def _is_buffer(leaf) -> bool:
    return not jnp.issubdtype(leaf.dtype, jnp.inexact)


def _split(tree, like):
    if not isinstance(like, dict):
        return (None, tree) if _is_buffer(like) else (tree, None)
    parts = {k: _split(tree[k], like[k]) for k in like}
    keep = lambda x: x is not None and not (isinstance(x, dict) and not x)  # noqa: E731
    return ({k: t for k, (t, _) in parts.items() if keep(t)},
            {k: b for k, (_, b) in parts.items() if keep(b)})


def split_buffers(params, like=None):
    """(trainable, buffers): the float leaves of a nested params dict and the others, as two
    nested dicts (keys with no leaf of a kind dropped). ``like`` (same layout, default
    ``params``) supplies the dtypes, e.g. abstract params for a tree of shardings. Without
    buffers (every model but SLTrain) ``trainable`` is ``params`` itself."""
    like = params if like is None else like
    if not any(_is_buffer(x) for x in jax.tree.leaves(like)):
        return params, {}
    return _split(params, like)


def merge_buffers(trainable, buffers):
    """Inverse of :func:`split_buffers`: one nested dict with the leaves of both."""
    if not isinstance(buffers, dict):
        return buffers  # a buffer leaf
    out = dict(trainable) if isinstance(trainable, dict) else {}
    for k, b in buffers.items():
        out[k] = merge_buffers(out.get(k, {}), b)
    return out if buffers else trainable


def _make_params(model_cfg, seed: int):
    return nnx.to_pure_dict(nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(seed)))[1])


@dataclasses.dataclass
class StateSpec:
    """Everything static about the train state: graphdef, abstract shapes, shardings, init."""

    cfg: Config
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    graphdef: nnx.GraphDef
    logical: dict  # params' logical PartitionSpecs
    abstract: dict  # ShapeDtypeStructs of the whole state
    shardings: dict  # NamedShardings of the whole state

    @classmethod
    def build(cls, cfg: Config, mesh, tx) -> "StateSpec":
        abs_model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed)))
        graphdef, abs_state = nnx.split(abs_model)
        logical = nnx.to_pure_dict(nnx.get_partition_spec(abs_state))
        abs_params = nnx.to_pure_dict(abs_state)
        param_sh = tree_shardings(logical, abs_params, mesh)
        abs_train, train_sh = split_buffers(abs_params)[0], split_buffers(param_sh, abs_params)[0]
        abs_opt = jax.eval_shape(tx.init, abs_train)
        opt_sh = optax.tree_map_params(
            tx, _opt_leaf_sharding, abs_opt, abs_train, train_sh,
            transform_non_params=lambda _: replicated(mesh), is_leaf=_is_masked)
        rep = replicated(mesh)
        abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abs_params,
                    "opt_state": abs_opt, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
        shardings = {"step": rep, "params": param_sh, "opt_state": opt_sh, "rng": rep}
        return cls(cfg, mesh, tx, graphdef, logical, abstract, shardings)

    def init(self) -> dict:
        """Fresh, sharded train state (jitted: no device holds a full unsharded copy)."""
        model_cfg, seed, tx = self.cfg.model, self.cfg.seed, self.tx

        def init():
            params = _make_params(model_cfg, seed)
            return {"step": jnp.zeros((), jnp.int32), "params": params,
                    "opt_state": tx.init(split_buffers(params)[0]),
                    "rng": jax.random.PRNGKey(seed)}

        with jax.set_mesh(self.mesh):
            return jax.jit(init, out_shardings=self.shardings)()

    def abstract_with_shardings(self) -> dict:
        """ShapeDtypeStructs carrying the target shardings (the restore target for orbax)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract, self.shardings)

    def model(self, params):
        """Rebuild the NNX module from a params dict (inside or outside jit)."""
        return nnx.merge(self.graphdef, params)

    def param_count(self) -> int:
        """Trainable parameters (buffers such as SLTrain's support not counted)."""
        return sum(x.size for x in jax.tree.leaves(split_buffers(self.abstract["params"])[0]))
