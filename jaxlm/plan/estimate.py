"""The planner's arithmetic: memory per chip; a roofline step time from FLOPs, bytes, collectives.

**Memory per chip** (bytes). Parameters and optimizer state are exact: the sum over the state's
leaves of ``prod(sharding.shard_shape(shape)) × itemsize`` on the planned mesh (AdamW: two float32
moments per parameter, so optimizer ≈ 2 × params). On a TPU target the rest is the compiler's
``memory_analysis()``; elsewhere it is analytic (an estimate), with ``b`` rows per chip
(``batch / (grad_accum · data · fsdp)``), ``T`` tokens, ``t`` = mesh.tensor, ``s`` = bytes of the
compute dtype, per layer and token:

    none      : s·(4D + 3(H+2K)·hd/t + 4F/t) + 8·(H/t)·T     (inputs of every matmul and
                nonlinearity, float32 attention scores and probabilities: reference attention)
    save_dots : s·(2D + (H+2K)·hd/t + 2F/t) + s·D           (projection outputs + layer input)
    full      : s·D                                          (the layer input only)

    activations = b·T·(L · per_layer(remat) + per_layer(none))    (+ one layer recomputed)
                + 12·b·C·V/t       (float32 logits, softmax, ∂logits of one head chunk of C
                                    positions, ops/head_loss.py; model.head_chunk=0: 8·b·T·V/t)
    gradients   = trainable parameter bytes per chip (float32, sharded like the parameters)

(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", §4
count the same way for GPT layers.)

**Step time** — the roofline of the JAX scaling book ("How to Scale Your Model", part 1,
"Rooflines"; part 3 for collectives), per chip, from the compiled program (:mod:`jaxlm.plan.hlo`):

    T_compute = FLOPs / peak_flops           (dot FLOPs the compiled step runs, remat included)
    T_memory  = HBM bytes / hbm_bw           (bytes of the unfused instructions, an estimate)
    T_comm    = Σ collectives  count · k · bytes · (n−1)/n / W(axes)
                k = 2 for all-reduce (reduce-scatter + all-gather), 1 otherwise; W = the ring
                bandwidth along the mesh axes (:meth:`jaxlm.plan.targets.Target.axis_bandwidth`)

Kernels run one after another on a chip, each bound by its own FLOPs or bytes (the per-kernel
roofline, over the compiled program's unfused instructions, :attr:`jaxlm.plan.hlo.HloSummary.ops`):

    T_busy = Σ_kernels max(FLOPs_k / peak_flops, bytes_k / hbm_bw)   (≥ max(T_compute, T_memory))

On the measured ``cpu`` target reads and writes run at different rates (:mod:`jaxlm.plan.probe`:
a fresh result page costs several reads), so there ``bytes_k / hbm_bw`` becomes
``read_k / hbm_bw + written_k / write_bw`` (``written_k``: the kernel's result bytes).

Assumed overlap: XLA runs FSDP / data-parallel collectives (weight all-gathers, gradient
reductions) asynchronously under the layer matmuls, so they cost only what exceeds the kernels;
collectives over ``tensor`` sit between dependent matmuls and are exposed in full:

    step ≈ T_busy + T_comm(tensor) + max(0, T_comm(other) − T_busy)

The lower bound (everything overlapped) is ``max(T_compute, T_memory, T_comm)`` and the upper
bound (no communication overlapped) ``T_busy + T_comm``; both are reported. MFU uses model FLOPs
(``6·N_matmul + 12·L·H·hd·T`` per token, :func:`jaxlm.utils.flops.flops_per_token`), not the
recomputed ones, so remat lowers MFU as it should.

Example::

    from jaxlm.plan.estimate import roofline
    r = roofline(flops=1e12, bytes_accessed=1e9, collectives=[], target=t, mesh_shape=shape)
    r["step_time_s"]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxlm.ops.head_loss import auto_chunk
from jaxlm.train.state import split_buffers


def shard_bytes(tree) -> int:
    """Bytes one chip holds of a pytree of ShapeDtypeStructs carrying NamedShardings."""
    total = 0
    for x in jax.tree.leaves(tree):
        if not hasattr(x, "shape"):
            continue
        shape = tuple(x.sharding.shard_shape(tuple(x.shape))) if getattr(x, "sharding", None) \
            else tuple(x.shape)
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def state_bytes(spec) -> dict:
    """{'params', 'optimizer', 'trainable'}: bytes per chip of the sharded train state."""
    abstract = spec.abstract_with_shardings()
    trainable = split_buffers(abstract["params"])[0]
    return {"params": shard_bytes(abstract["params"]),
            "optimizer": shard_bytes(abstract["opt_state"]),
            "trainable": shard_bytes(trainable)}


def activation_bytes(cfg, mesh_shape: dict) -> int:
    """Analytic activation memory per chip for one micro-batch (module docstring; estimate)."""
    m, t = cfg.model, mesh_shape.get("tensor", 1)
    rows = cfg.train.batch_size // cfg.train.grad_accum
    b = max(rows // (mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)), 1)
    tokens, s = b * cfg.data.seq_len, 2 if m.dtype == "bfloat16" else 4
    d, f, hd = m.d_model, m.d_ff / t, m.attn_head_dim
    qkv = (m.n_heads + 2 * m.kv_heads) * hd / t
    per_layer = {
        "none": s * (4 * d + 3 * qkv + 4 * f) + 8 * (m.n_heads / t) * cfg.data.seq_len,
        "save_dots": s * (2 * d + qkv + 2 * f) + s * d,
        "full": s * d,
    }
    layers = tokens * (m.n_layers * per_layer[m.remat]
                       + (per_layer["none"] if m.remat != "none" else 0))
    chunk = auto_chunk(m.head_chunk, b, cfg.data.seq_len, m.vocab_size)
    logits = (12 * b * chunk if chunk else 8 * tokens) * m.vocab_size / t
    return int(layers + logits)


def analytic_memory(cfg, spec) -> dict:
    """Per-chip memory without a compiler's memory analysis (module docstring)."""
    st = state_bytes(spec)
    grads = st["trainable"]
    acts = activation_bytes(cfg, dict(spec.mesh.shape))
    return {"params": st["params"], "optimizer": st["optimizer"], "gradients": grads,
            "activations": acts, "temp": grads + acts,
            "total": st["params"] + st["optimizer"] + grads + acts}


def compiled_memory(spec, analysis: dict) -> dict:
    """Per-chip memory from XLA's memory analysis of the compiled step (TPU targets)."""
    st = state_bytes(spec)
    return {"params": st["params"], "optimizer": st["optimizer"],
            "arguments": analysis["arguments"], "outputs": analysis["outputs"],
            "alias": analysis["alias"], "temp": analysis["temp"],
            "generated_code": analysis["generated_code"], "total": analysis["total"]}


def collective_time(c, target, mesh_shape: dict) -> float:
    """Seconds per step of one aggregated collective (:class:`jaxlm.plan.hlo.Collective`)."""
    n = max(c.group_size, 1)
    if n == 1 or c.bytes == 0:
        return 0.0
    axes = [a for a in c.mesh_axes if a in mesh_shape] or list(mesh_shape)
    bw = target.axis_bandwidth(axes, mesh_shape)
    if c.op == "collective-permute":
        return c.count * c.bytes / bw
    k = 2.0 if c.op == "all-reduce" else 1.0
    return c.count * k * c.bytes * (n - 1) / n / bw


def _kernel_memory_s(op, chip) -> float:
    """Seconds one kernel (FLOPs, bytes[, bytes written]) spends on memory: bytes / hbm_bw, or
    read / hbm_bw + written / write_bw where the chip writes at another rate (cpu target)."""
    nbytes, written = op[1], (op[2] if len(op) > 2 else 0.0)
    if not chip.write_bw:
        return nbytes / chip.hbm_bw
    return (nbytes - written) / chip.hbm_bw + written / chip.write_bw


def roofline(flops: float, bytes_accessed: float, collectives, target, mesh_shape: dict,
             ops=None) -> dict:
    """Per-chip compute / memory / communication times and the step estimate (docstring).

    ``ops``: (FLOPs, bytes, bytes written) of each kernel (:attr:`jaxlm.plan.hlo.HloSummary.ops`);
    with them the busy time is the per-kernel roofline Σ max(FLOPs/peak, bytes/bw), else the
    aggregate max(T_compute, T_memory)."""
    chip = target.chip
    t_compute, t_memory = flops / chip.peak_flops, bytes_accessed / chip.hbm_bw
    if chip.write_bw:  # no per-kernel split known yet: half the bytes read, half written
        t_memory = bytes_accessed / 2 * (1 / chip.hbm_bw + 1 / chip.write_bw)
    busy = max(t_compute, t_memory)
    if ops:
        mem = [_kernel_memory_s(op, chip) for op in ops]
        t_memory = sum(mem) if chip.write_bw else t_memory
        busy = sum(max(op[0] / chip.peak_flops, m) for op, m in zip(ops, mem))
    by_axis: dict[str, float] = {}
    for c in collectives:
        key = ",".join(c.mesh_axes)
        by_axis[key] = by_axis.get(key, 0.0) + collective_time(c, target, mesh_shape)
    t_comm = sum(by_axis.values())
    exposed_tensor = sum(v for k, v in by_axis.items() if "tensor" in k.split(","))
    hidden = t_comm - exposed_tensor
    step = busy + exposed_tensor + max(0.0, hidden - busy)
    return {"compute_s": t_compute, "memory_s": t_memory, "busy_s": busy, "comm_s": t_comm,
            "comm_s_by_axis": by_axis, "exposed_comm_s": step - busy,
            "step_time_s": step, "lower_bound_s": max(t_compute, t_memory, t_comm),
            "upper_bound_s": busy + t_comm,
            "bound": max((t_compute, "compute"), (t_memory, "memory"),
                         (t_comm, "communication"))[1],
            "overlap": "fsdp/data collectives overlap the kernels; tensor collectives exposed; "
                       "each kernel is max(FLOPs/peak, bytes/HBM bw), kernels run one after "
                       "another" if ops else "fsdp/data collectives overlap compute; tensor "
                       "collectives exposed; compute and HBM traffic overlap (aggregate max)"}
