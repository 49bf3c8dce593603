"""One plan: config + target -> memory per chip, FLOPs, collectives, roofline step time, MFU.

:func:`plan` picks the most trustworthy source it can:

* ``compiled-tpu`` — TPU target and ``libtpu`` installed: the train step compiled for the
  topology; memory from XLA's memory analysis, FLOPs / bytes / collectives from the HLO.
* ``compiled-fake-devices`` — GPU target, or TPU without libtpu: compiled on fake CPU devices with
  the same mesh; FLOPs / bytes / collectives from that HLO, memory analytic (an estimate).
* ``analytic`` — nothing compiled (``compile=False``, and :func:`sweep`'s first pass): memory,
  FLOPs and collectives from formulas (:func:`analytic_collectives`, :mod:`jaxlm.plan.estimate`).
  Also when the TPU compiler refuses the step for lack of HBM (``RESOURCE_EXHAUSTED``): then
  ``fits`` is false and the compiler's own figure is kept (``memory_per_chip_bytes["temp"]``).

:func:`sweep` enumerates meshes (data × fsdp × tensor = chips), remat policies and micro-batch
counts, keeps those whose analytic memory fits, ranks them by analytic step time and compiles the
best few for the real figures.

Example (8 fake CPU devices)::

    from jaxlm.config import load_config
    from jaxlm.plan.planner import plan
    from jaxlm.plan.targets import parse_target
    cfg = load_config("tiny", ["model.vocab_size=256", "mesh.fsdp=8"])
    p = plan(cfg, parse_target("h100x8"))
    p["fits"], p["step_time_s_estimate"], [c["op"] for c in p["collectives"]]
"""

from __future__ import annotations

import dataclasses
import itertools
import re

from jax.sharding import AbstractMesh, AxisType

from jaxlm.config import Config, ConfigError
from jaxlm.plan import compile as aot
from jaxlm.plan import estimate
from jaxlm.plan.hlo import Collective, analyze
from jaxlm.plan.targets import Target
from jaxlm.sharding import MESH_AXES, mesh_shape
from jaxlm.utils.flops import flops_per_token, param_count


def abstract_spec(cfg: Config, n_chips: int):
    """StateSpec on an AbstractMesh of ``n_chips`` (shapes and shardings, no devices)."""
    from jaxlm.optim import build_optimizer
    from jaxlm.train.loop import check_batch
    from jaxlm.train.state import StateSpec

    shape = mesh_shape(cfg.mesh, n_chips)
    mesh = AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    check_batch(cfg, mesh)
    return StateSpec.build(cfg, mesh, build_optimizer(cfg))


def model_flops_per_step(cfg: Config) -> float:
    """6·N_matmul + attention, per token, times the tokens of one step (no recomputation)."""
    tokens = cfg.train.batch_size * cfg.data.seq_len
    return flops_per_token(cfg.model, cfg.model.vocab_size, cfg.data.seq_len) * tokens


def _attention_flops(cfg: Config) -> float:
    m = cfg.model
    return 12.0 * m.n_layers * m.n_heads * m.attn_head_dim * cfg.data.seq_len


def recompute_factor(cfg: Config) -> float:
    """Executed / model FLOPs: full remat reruns the layer forward (8N instead of 6N), save_dots
    reruns only the attention einsums (batched dots are not saved)."""
    m, att = cfg.model, _attention_flops(cfg)
    n = flops_per_token(m, m.vocab_size, cfg.data.seq_len) - att
    head = 6.0 * m.d_model * m.vocab_size
    layer = n - head
    extra = {"none": 0.0, "save_dots": att / 3, "full": layer / 3 + att / 3}[m.remat]
    return (n + att + extra) / (n + att)


def analytic_collectives(cfg: Config, shape: dict, layer_param_bytes: float) -> list:
    """The collectives the SPMD partitioner is expected to insert, per chip per step:

    * FSDP: all-gather every layer's weights (compute dtype) in the forward, again in the
      backward when the forward is rematerialised, and reduce-scatter their float32 gradients;
      bytes = the gathered / un-scattered size (the layer's weights / tensor).
    * tensor: all-reduce the [b, T, D] block output after the row-parallel wo and w_down, in
      the forward and (their transposes) in the backward: 4 per layer per micro-batch.
    * data: all-reduce the gradients once per step (bytes = the chip's gradient shard / fsdp).
    """
    m, accum = cfg.model, cfg.train.grad_accum
    s = 2 if m.dtype == "bfloat16" else 4
    out: list[Collective] = []
    if shape["fsdp"] > 1:
        gathered = layer_param_bytes * shape["fsdp"]  # float32 per-chip shard -> full f32 layer
        passes = 2 if m.remat != "none" else 1
        out.append(Collective("all-gather", ["fsdp"], int(gathered * s / 4), shape["fsdp"],
                              m.n_layers * passes * accum))
        out.append(Collective("reduce-scatter", ["fsdp"], int(gathered), shape["fsdp"],
                              m.n_layers * accum))
    if shape["tensor"] > 1:
        rows = cfg.train.batch_size // accum // (shape["data"] * shape["fsdp"])
        act = rows * cfg.data.seq_len * m.d_model * s
        out.append(Collective("all-reduce", ["tensor"], int(act), shape["tensor"],
                              4 * m.n_layers * accum))
    if shape["data"] > 1:
        out.append(Collective("all-reduce", ["data"], int(layer_param_bytes * m.n_layers),
                              shape["data"], 1))
    return out


def _layer_param_bytes(spec) -> float:
    """Per-chip bytes of the stacked layer parameters (the ``blocks`` subtree)."""
    params = spec.abstract_with_shardings()["params"]
    blocks = params.get("blocks", params) if isinstance(params, dict) else params
    return estimate.shard_bytes(blocks) / spec.cfg.model.n_layers


def _collective_rows(colls, target, shape) -> list[dict]:
    return [{"op": c.op, "mesh_axes": c.mesh_axes, "bytes": c.bytes * c.count,
             "bytes_each": c.bytes, "count": c.count, "group_size": c.group_size,
             "time_s": estimate.collective_time(c, target, shape)} for c in colls]


def _result(cfg, target, source, shape, memory, flops_chip, bytes_chip, colls, extra,
            ops=None) -> dict:
    road = estimate.roofline(flops_chip, bytes_chip, colls, target, shape, ops)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    step = road["step_time_s"]
    model_flops = model_flops_per_step(cfg)
    by_axis: dict[str, int] = {}
    for c in colls:
        key = ",".join(c.mesh_axes)
        by_axis[key] = by_axis.get(key, 0) + c.bytes * c.count
    hbm = target.chip.hbm_bytes
    return {
        "target": target.name, "chips": target.n_chips, "chip": dataclasses.asdict(target.chip),
        "source": source, "mesh": shape,
        "model": {"params": param_count(cfg.model, cfg.model.vocab_size), "dtype": cfg.model.dtype,
                  "remat": cfg.model.remat, "batch_size": cfg.train.batch_size,
                  "seq_len": cfg.data.seq_len, "grad_accum": cfg.train.grad_accum},
        "fits": memory["total"] <= hbm, "headroom": 1.0 - memory["total"] / hbm,
        "memory_per_chip_bytes": memory, "hbm_per_chip_bytes": hbm,
        "flops_per_step": flops_chip * target.n_chips, "model_flops_per_step": model_flops,
        "hbm_bytes_per_chip_per_step": bytes_chip,
        "collectives": _collective_rows(colls, target, shape),
        "collective_bytes_per_step_by_axis": by_axis,
        "roofline": road, "step_time_s_estimate": step,
        "tokens_per_s_estimate": tokens / step if step else 0.0,
        "mfu_estimate": model_flops / (step * target.n_chips * target.chip.peak_flops)
        if step else 0.0, **extra}


def analytic_hbm_bytes(cfg: Config, spec, memory: dict) -> float:
    """HBM traffic per chip per step, an estimate: the state read and written by the update
    (params, two moments, gradients), the gathered weights read in each pass (forward, two
    backward matmuls, + the remat forward) per micro-batch, activations written and read once."""
    passes = 3 + (cfg.model.remat != "none")
    s = 2 if cfg.model.dtype == "bfloat16" else 4
    weights = _layer_param_bytes(spec) * cfg.model.n_layers * spec.mesh.shape["fsdp"] * s / 4
    return (2 * (memory["params"] + memory["optimizer"] + memory["gradients"])
            + passes * weights * cfg.train.grad_accum + 2 * memory["activations"])


def plan_analytic(cfg: Config, target: Target) -> dict:
    """Everything from formulas (no compile): the sweep's first pass, and ``--analytic``."""
    cfg = aot.resolve_vocab_size(cfg)
    spec = abstract_spec(cfg, target.n_chips)
    shape = dict(spec.mesh.shape)
    memory = estimate.analytic_memory(cfg, spec)
    flops = model_flops_per_step(cfg) * recompute_factor(cfg) / target.n_chips
    bytes_chip = analytic_hbm_bytes(cfg, spec, memory)
    colls = analytic_collectives(cfg, shape, _layer_param_bytes(spec))
    return _result(cfg, target, "analytic", shape, memory, flops, bytes_chip, colls,
                   {"estimate_notes": ["memory, FLOPs, HBM bytes and collectives are analytic "
                                       "estimates (nothing compiled)"]})


_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM "
                  r"\(([\d.]+)([KMGT])\)")


def _compiler_oom(cfg: Config, target: Target, err: Exception) -> dict | None:
    """The TPU compiler's out-of-HBM refusal as a plan (``fits`` false, the compiler's temp bytes;
    FLOPs / collectives / step time analytic), or None when ``err`` is something else."""
    found = _OOM.search(str(err))
    if "RESOURCE_EXHAUSTED" not in str(err) or not found:
        return None
    unit = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    temp, avail = (float(found.group(i)) * unit[found.group(i + 1)] for i in (1, 3))
    p = plan_analytic(cfg, target)
    mem = p["memory_per_chip_bytes"]
    for key in ("gradients", "activations"):  # the compiler's temporaries hold both
        mem.pop(key, None)
    mem.update(temp=int(temp), total=int(mem["params"] + mem["optimizer"] + temp))
    remat = "" if cfg.model.remat == "full" else " or model.remat=full"
    p.update(fits=False, headroom=1.0 - mem["total"] / p["hbm_per_chip_bytes"])
    p["estimate_notes"] = [
        f"the TPU compiler refused the step: its temporaries need {found.group(1)}"
        f"{found.group(2)} of the {found.group(3)}{found.group(4)} HBM per chip (RESOURCE_"
        f"EXHAUSTED); raise train.grad_accum{remat}, or use more chips or a smaller batch",
        "FLOPs, HBM bytes, collectives and step time are analytic estimates "
        "(nothing compiled)"]
    return p


def plan(cfg: Config, target: Target, devices=None, compile: bool = True) -> dict:
    """The plan of ``cfg`` on ``target`` (module docstring). ``devices``: fake CPU devices to
    compile on (default: the first ``target.n_chips`` of this process)."""
    if not compile:
        return plan_analytic(cfg, target)
    tpu = target.chip.kind == "tpu" and aot.have_libtpu()
    if tpu:
        devices = aot.tpu_devices(target.tpu_topology, target.n_slices, target.chip.node)
    elif devices is None:
        devices = aot.fake_devices(target.n_chips)
    try:
        out = aot.compile_train_step(cfg, devices)
    except Exception as err:  # noqa: BLE001 - only the TPU compiler's out-of-HBM is a result
        oom = _compiler_oom(aot.resolve_vocab_size(cfg), target, err) if tpu else None
        if oom is None:
            raise
        return oom
    cfg, spec, shape = out.cfg, out.spec, dict(out.spec.mesh.shape)
    summary = analyze(out.compiled.as_text(), shape)
    xla_mem = aot.memory_analysis(out.compiled)
    notes = ["step time, tokens/s and MFU are roofline estimates (jaxlm/plan/estimate.py): "
             "upper bounds on speed, kernels at peak FLOP/s or HBM bandwidth"]
    hbm_bytes, ops = summary.bytes_accessed, summary.ops
    if tpu and xla_mem:
        source, memory = "compiled-tpu", estimate.compiled_memory(spec, xla_mem)
    else:
        source, memory = "compiled-fake-devices", estimate.analytic_memory(cfg, spec)
        notes.append("memory beyond params/optimizer is analytic (an estimate): a CPU compile's "
                     "memory analysis is not the target's")
        if target.chip.kind != "cpu":  # a CPU compile fuses far less than a GPU one
            hbm_bytes, ops = analytic_hbm_bytes(cfg, spec, memory), None
            notes.append("HBM traffic is analytic (state, gathered weights, activations): the "
                         "CPU compile's kernels are not the target's")
        if target.chip.kind == "tpu":
            notes.append("libtpu is not installed (pip install 'jaxlm[plan]'): compiled on fake "
                         "CPU devices instead of the TPU compiler")
    if ops is not None:
        notes.append("HBM bytes per step: each kernel's operands + results in the compiled HLO "
                     "(an estimate)")
    colls = list(summary.collectives)
    if target.n_slices > 1 and not any("data" in c.mesh_axes for c in colls):
        # multi-slice: the per-slice HLO holds only the ICI collectives; the gradient all-reduce
        # across slices (data-center network) runs in the runtime, so it is added analytically
        grads = estimate.state_bytes(spec)["trainable"]
        colls.append(Collective("all-reduce", ["data"], grads, target.n_slices, 1))
        notes.append(f"the gradient all-reduce across the {target.n_slices} slices (DCN) is not "
                     "in the per-slice HLO: added analytically (float32 gradient shard)")
    if summary.unknown_trip_counts:
        notes.append(f"{summary.unknown_trip_counts} while loop(s) of unknown trip count were "
                     "counted once")
    extra = {"compile_s": out.compile_s, "estimate_notes": notes,
             "xla_cost_analysis_per_chip": aot.cost_analysis(out.compiled),
             "xla_memory_analysis_per_chip": xla_mem}
    return _result(cfg, target, source, shape, memory, summary.flops, hbm_bytes, colls, extra,
                   ops)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(cfg: Config, n_chips: int, remats=("none", "save_dots", "full"),
               accums=(1, 2, 4, 8)) -> list[Config]:
    """Configs for every (data, fsdp, tensor) with data·fsdp·tensor = n_chips, tensor dividing
    the heads, KV heads and the MLP width (else jaxlm.sharding.fit_spec replicates those weights
    and every chip of the tensor group repeats their matmuls: llama_1b's d_ff = 5461 at
    tensor=2 compiles to 30% more FLOPs), each remat policy and micro-batch count that splits
    the batch."""
    from jaxlm.config import replace

    m, out = cfg.model, []
    for tensor, data in itertools.product(_divisors(n_chips), _divisors(n_chips)):
        if n_chips % (tensor * data) or m.n_heads % tensor or m.kv_heads % tensor \
                or m.d_ff % tensor:
            continue
        fsdp = n_chips // (tensor * data)
        for remat, accum in itertools.product(remats, accums):
            rows = cfg.train.batch_size
            if rows % accum or (rows // accum) % (data * fsdp):
                continue
            out.append(replace(cfg, mesh={"data": data, "fsdp": fsdp, "tensor": tensor},
                               model={"remat": remat}, train={"grad_accum": accum}))
    return out


def sweep(cfg: Config, target: Target, top: int = 3, compile: bool = True,
          devices=None) -> list[dict]:
    """Rank candidate meshes by estimated step time among those that fit (module docstring).

    Every candidate is planned analytically; the ``top`` fastest that fit are then compiled
    (when ``compile``) and re-ranked on their compiled estimates."""
    cfg = aot.resolve_vocab_size(cfg)
    rows = []
    for c in candidates(cfg, target.n_chips):
        try:
            rows.append((c, plan_analytic(c, target)))
        except ConfigError:
            continue
    fitting = sorted((r for r in rows if r[1]["fits"]), key=lambda r: r[1]["step_time_s_estimate"])
    if not fitting:
        return []
    best = fitting[:top]
    if compile:
        compiled = []
        for c, _ in best:
            try:
                compiled.append(plan(c, target, devices=devices))
            except ConfigError:
                continue
        results = [r for r in compiled if r["fits"]] or compiled
    else:
        results = [r for _, r in best]
    return sorted(results, key=lambda r: r["step_time_s_estimate"])


def devices_needed(target: Target) -> int:
    """Fake CPU devices a plan of ``target`` compiles on (0 when the TPU compiler is used)."""
    if target.chip.kind == "tpu" and aot.have_libtpu():
        return 0
    return target.n_chips

