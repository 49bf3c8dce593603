"""One device mesh, logical axis names, and the single rules table that maps one to the other.

Model code never names mesh axes. Every parameter carries *logical* names (``("embed", "mlp")``),
activations are constrained at block boundaries with logical names (``("batch", "seq",
"act_embed")``), and :data:`RULES` says which mesh axis each logical name is split over:

    W_gate[D_fsdp, F_tensor]     — FSDP shards the embed dim, Megatron column-split of the MLP,
    W_down[F_tensor, D_fsdp]     — row-split: one all-reduce over `tensor` after the matmul,
    x[B_(data,fsdp), T, D]       — the batch is split over data and fsdp together.

(notation of the JAX scaling book: ``A[I_X, J]`` = dim I split over mesh axis X.) FSDP costs an
all-gather of each layer's weights in the forward and a reduce-scatter of its gradients in the
backward; tensor parallelism costs one all-reduce of activations per row-parallel matmul.

The mesh uses ``AxisType.Auto``: XLA's partitioner propagates shardings from the jit in/out
shardings and these constraints. Sizes come from config; one size may be ``-1`` (fill).

Example::

    from jaxlm.config import MeshConfig
    from jaxlm.sharding import make_mesh, logical_to_spec
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    logical_to_spec(("embed", "mlp"))        # PartitionSpec('fsdp', 'tensor')
"""

from __future__ import annotations

import logging
import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxlm.config import ConfigError, MeshConfig, check_mesh_sizes

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated). The only sharding table.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # activations / data
    "seq": None,
    "act_embed": None,  # activation hidden dim stays whole between blocks
    "vocab": "tensor",  # embedding rows and logits columns
    "embed": "fsdp",  # parameter hidden dim: fully sharded data parallel
    "mlp": "tensor",  # SwiGLU hidden dim: column-parallel in, row-parallel out
    "heads": "tensor",  # attention heads: Megatron split
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,  # stacked (scanned) layer axis
    "norm": None,
}

log = logging.getLogger("jaxlm")


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve the ``-1`` (fill) entry and check the product equals the device count."""
    check_mesh_sizes(cfg)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    named = " ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % fixed:
            raise ConfigError(
                f"{named} cannot fill {n_devices} devices ({fixed} does not divide "
                f"{n_devices}); make the sizes other than -1 multiply to a divisor of {n_devices}")
        sizes[sizes.index(-1)] = n_devices // fixed
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"{named} uses {math.prod(sizes)} devices but there are {n_devices}; make the sizes "
            f"multiply to {n_devices} or set one to -1 (fill)")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    check_process_layout(mesh.devices)
    return mesh


def batch_shards_by_process(grid) -> dict[int, set[int]]:
    """[data, fsdp, tensor] grid of devices -> {process index: the batch shards its devices hold}.

    The batch is split over (data, fsdp): device (i, j, k) holds batch shard ``i * fsdp + j``.
    """
    fsdp = grid.shape[1]
    out: dict[int, set[int]] = {}
    for (i, j, _), device in np.ndenumerate(grid):
        out.setdefault(device.process_index, set()).add(i * fsdp + j)
    return out


def check_process_layout(grid) -> None:
    """Each process loads only its own rows (:func:`host_to_global`), so every batch shard must
    live on exactly one process and all processes must hold equally many. A mesh whose ``tensor``
    axis spans processes breaks this (two processes would each supply the same rows)."""
    shards = batch_shards_by_process(grid)
    if len(shards) < 2:
        return
    owned = [len(s) for s in shards.values()]
    if len(set().union(*shards.values())) != sum(owned) or len(set(owned)) != 1:
        sizes = dict(zip(MESH_AXES, grid.shape))
        raise ConfigError(
            f"mesh {sizes} puts a batch shard on several of the {len(shards)} processes; "
            f"make mesh.data*mesh.fsdp a multiple of {len(shards)} and keep mesh.tensor "
            "within one process's devices")


def logical_to_spec(names, rules=RULES) -> P:
    """Logical names -> PartitionSpec of mesh axes (unknown names are a programming error)."""
    return P(*(rules[n] if n is not None else None for n in names))


def _axis_size(mesh, entry) -> int:
    if entry is None:
        return 1
    axes = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: P, shape, mesh, what: str = "") -> P:
    """Replicate any dim the mesh does not divide (e.g. a byte vocab of 257 over tensor=2).

    Replicating is always correct, only less memory-efficient, so it is a logged fallback rather
    than an error.
    """
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        size = _axis_size(mesh, entry)
        if size > 1 and dim % size:
            log.warning("%s: dim %d not divisible by mesh %s=%d; replicating it", what, dim,
                        entry, size)
            entry = None
        out.append(entry)
    return P(*out)


def tree_shardings(logical_specs, abstract, mesh):
    """Pytree of logical PartitionSpecs + matching ShapeDtypeStructs -> NamedShardings."""

    def one(path, spec, leaf):
        what = jax.tree_util.keystr(path)
        mesh_spec = fit_spec(logical_to_spec(tuple(spec)), leaf.shape, mesh, what)
        return NamedSharding(mesh, mesh_spec)

    return jax.tree_util.tree_map_with_path(
        one, logical_specs, abstract, is_leaf=lambda x: isinstance(x, P))


def shard(x, names):
    """Constrain an activation to logical ``names`` when a mesh is active (no-op otherwise)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = fit_spec(logical_to_spec(names), x.shape, mesh, "activation")
    return jax.lax.with_sharding_constraint(x, spec)


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_to_global(local: dict, mesh) -> dict:
    """Per-process numpy batch -> global jax.Arrays split over (data, fsdp).

    Each process holds only its rows; ``make_array_from_process_local_data`` stitches them into one
    global array without any host ever holding the full batch.
    """
    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return {k: one(v) for k, v in local.items()}
