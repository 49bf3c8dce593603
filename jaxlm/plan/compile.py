"""Compile the real train step ahead of time for a target, without its hardware or any memory.

The step is ``jaxlm.train.step.make_train_step(spec).jitted`` — the very function the training
loop runs, with the state's and batch's shardings — lowered with **abstract** inputs
(``jax.ShapeDtypeStruct`` carrying ``NamedSharding`` on the target's devices) and compiled:

* TPU targets with ``libtpu`` installed (``pip install "jaxlm[plan]"``): the devices come from
  ``jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name="v5e:16x16",
  ...)`` — a description of the pod, no chip needed — and XLA's TPU compiler produces the real
  program. Its ``memory_analysis()`` (argument / output / alias / temp bytes per chip) is the
  compiler's own figure (the approach of MaxText's ``train_compile.py``).
* Otherwise (GPU targets, or no libtpu): fake CPU devices of the same count and mesh shape
  (``--xla_force_host_platform_device_count``). The SPMD partitioner is the same, so the
  collectives, their sizes and the FLOPs are those of the target program; the memory figures of
  a CPU compile are not a GPU's, so :mod:`jaxlm.plan.estimate` uses analytic memory there.

Example (8 fake CPU devices, as in tests/conftest.py)::

    import jax
    from jaxlm.config import load_config
    from jaxlm.plan.compile import compile_train_step
    cfg = load_config("tiny", ["model.vocab_size=256", "mesh.fsdp=4"])
    out = compile_train_step(cfg, jax.devices("cpu")[:4])
    out.compiled.memory_analysis(), out.spec.mesh.shape
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time

import jax
import jax.numpy as jnp

from jaxlm.config import Config, ConfigError

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask", "target_bytes")


def have_libtpu() -> bool:
    """True when the TPU compiler (``libtpu``, the ``jaxlm[plan]`` extra) is importable."""
    return importlib.util.find_spec("libtpu") is not None


def tpu_devices(topology: str, n_slices: int = 1, chips_per_host: int = 4):
    """The devices of a TPU topology (``"v5e:4x4"``) described, not attached: compile-only.

    ``chips_per_host``: 8 on v5e / v6e hosts (2x4), 4 on v4 / v5p (2x2x1) — it decides which
    devices share a process, which :func:`jaxlm.sharding.check_process_layout` checks."""
    import os

    from jax.experimental import topologies

    # compile-only: several planner processes may load libtpu at once (no chip is claimed)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    dims = [int(x) for x in topology.split(":")[1].split("x")] + [1]
    host = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}[chips_per_host]
    bounds = tuple(min(h, d) for h, d in zip(host, dims))  # a slice smaller than a host
    topo = topologies.get_topology_desc(
        platform="tpu", topology_name=topology, chip_config_name="default",
        chips_per_host_bounds=bounds, num_slices=n_slices)
    return list(topo.devices)


def fake_devices(n: int):
    """``n`` CPU devices (the process must have been started with enough of them)."""
    devs = jax.devices("cpu")
    if len(devs) < n:
        raise ConfigError(f"{n} fake CPU devices are needed but this process has {len(devs)}; "
                          f"start it with XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                          "(jaxlm-plan does this itself)")
    return devs[:n]


def resolve_vocab_size(cfg: Config) -> Config:
    """``model.vocab_size=0`` -> the tokenizer's size (the planner needs a concrete shape)."""
    if cfg.model.vocab_size:
        return cfg
    from jaxlm.data.tokenizer import get_tokenizer
    from jaxlm.train.state import resolve_vocab

    tok = get_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    return resolve_vocab(cfg, tok.vocab_size)


def abstract_batch(cfg: Config, mesh) -> dict:
    """ShapeDtypeStructs of one global [batch_size, seq_len] batch split over (data, fsdp)."""
    from jaxlm.sharding import batch_sharding

    shape = (cfg.train.batch_size, cfg.data.seq_len)
    sharding = batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in BATCH_KEYS}


@dataclasses.dataclass
class CompiledStep:
    cfg: Config
    spec: object  # jaxlm.train.state.StateSpec
    compiled: object  # jax.stages.Compiled
    compile_s: float
    platform: str  # "tpu" | "cpu"


def make_mesh(cfg: Config, devices):
    """jaxlm's mesh over ``devices``; over several TPU slices a hybrid mesh whose ``data`` axis
    spans the slices (data-center network) and whose fsdp/tensor axes stay inside one (ICI)."""
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    from jaxlm import sharding

    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) <= 1:
        return sharding.make_mesh(cfg.mesh, devices=devices)
    k, shape = len(slices), sharding.mesh_shape(cfg.mesh, len(devices))
    if shape[0] % k:
        raise ConfigError(f"{k} slices: mesh.data={shape[0]} must be a multiple of {k} (the data "
                          "axis spans the slices over the data-center network)")
    grid = mesh_utils.create_hybrid_device_mesh((shape[0] // k, shape[1], shape[2]), (k, 1, 1),
                                                devices)
    sharding.check_process_layout(grid)
    return Mesh(grid, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def build_spec(cfg: Config, devices):
    """StateSpec on a mesh over ``devices`` (abstract: nothing is allocated)."""
    from jaxlm.optim import build_optimizer
    from jaxlm.train.loop import check_batch
    from jaxlm.train.state import StateSpec

    mesh = make_mesh(cfg, devices)
    check_batch(cfg, mesh)
    return StateSpec.build(cfg, mesh, build_optimizer(cfg))


def compile_train_step(cfg: Config, devices) -> CompiledStep:
    """Lower and compile the train step for ``devices`` with abstract inputs (module docstring)."""
    from jaxlm.train.step import make_train_step

    cfg = resolve_vocab_size(cfg)
    spec = build_spec(cfg, devices)
    state = spec.abstract_with_shardings()
    batch = abstract_batch(cfg, spec.mesh)
    step = make_train_step(spec)
    t0 = time.perf_counter()
    with jax.set_mesh(spec.mesh):
        compiled = step.jitted.lower(state, batch).compile()
    return CompiledStep(cfg, spec, compiled, time.perf_counter() - t0, devices[0].platform)


def memory_analysis(compiled) -> dict:
    """XLA's per-chip memory analysis of a compiled program ({} if the backend has none)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    if m is None:
        return {}
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
           "generated_code": m.generated_code_size_in_bytes}
    out["total"] = out["arguments"] + out["outputs"] - out["alias"] + out["temp"] \
        + out["generated_code"]
    return out


def cost_analysis(compiled) -> dict:
    """XLA's cost analysis (flops, bytes accessed) as reported: the body of a while loop (the
    layer scan) is counted once, so :mod:`jaxlm.plan.hlo` recounts with trip counts."""
    try:
        c = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return {}
    c = c[0] if isinstance(c, (list, tuple)) else (c or {})
    return {"flops": float(c.get("flops", 0.0)),
            "bytes_accessed": float(c.get("bytes accessed", 0.0))}
