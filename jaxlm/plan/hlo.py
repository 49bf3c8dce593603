"""Read a compiled (optimized, SPMD-partitioned) HLO module: FLOPs, bytes and collectives.

XLA's ``cost_analysis()`` counts the body of a ``while`` loop once, and jaxlm scans its layers
(``model.scan_layers``), so for a scanned model it reports about one layer's worth of work. This
module walks the module's call graph instead and weights every instruction by how often it runs:

    runs(C) = Σ over call sites of C:  runs(caller) × (trip count if C is a while body, else 1)

with the trip count XLA itself wrote into the while's ``backend_config`` (``known_trip_count``).
On that weighting, per chip (the HLO is one partition's program):

* ``dot`` FLOPs  = 2 × prod(output dims) × prod(lhs contracting dims)  (multiply-add = 2 FLOPs);
  ``convolution`` (TPU HLO writes batched matmuls as windowed convolutions) = 2 × batch × output
  features × input features × the kernel taps that land on real input (not padding or dilation
  holes), as XLA's cost analysis counts them.
* HBM bytes ≈ Σ over instructions outside fusions (fusion = one kernel): operand + result bytes
  (slices and in-place updates: only the data they move; collectives: none, they are
  communication — :func:`kernel_bytes`). Shape plumbing (parameter, tuple, bitcast, constant,
  while, call) is free.
  Each such kernel's (FLOPs, bytes, bytes written) is kept too (``ops``), for a per-kernel
  roofline; written = its results' bytes (less what an in-place update aliases), the rest read.
* collectives: all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute (and their
  async ``-start`` halves; one ``channel_id`` counted once, as TPU async collective fusions
  repeat it) with the bytes of the full buffer (the gathered output,
  the un-scattered input, the reduced operand) and the mesh axes their replica groups span.

Replica groups are decoded into mesh axes by :mod:`jaxlm.plan.replica_groups`.

Example::

    from jaxlm.plan.hlo import analyze
    a = analyze(compiled.as_text(), {"data": 1, "fsdp": 4, "tensor": 1})
    a.flops, a.bytes_accessed, [(c.op, c.mesh_axes, c.bytes, c.count) for c in a.collectives]
"""

from __future__ import annotations

import dataclasses
import math
import re

from jaxlm.plan.replica_groups import decode_groups, group_axes, permute_axes

COLLECTIVE_OPS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                  "collective-permute")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16,
         "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
         "c64": 64, "c128": 128, "f8e4m3fn": 8, "f8e5m2": 8, "f8e4m3fnuz": 8, "f8e5m2fnuz": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_BITS) + r")\[([\d,]*)\]")
_FREE = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "iota",
         "all-gather-done", "all-reduce-done", "collective-permute-done", "async-done",
         "copy-done", "send-done", "recv-done", "slice-done"}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # result shape text (an array or a tuple)
    op: str
    operands: list
    attrs: str
    raw: str = ""  # the text inside the parentheses (a constant's value)


@dataclasses.dataclass
class Collective:
    op: str  # all-gather | reduce-scatter | all-reduce | all-to-all | collective-permute
    mesh_axes: list  # jaxlm mesh axes the replica groups span (["?"] if undecoded)
    bytes: int  # per chip per occurrence: the full (un-sharded within the group) buffer
    group_size: int
    count: int  # occurrences per step (loop trip counts applied)


@dataclasses.dataclass
class HloSummary:
    flops: float  # per chip per step, dots + convolutions, trip counts applied
    bytes_accessed: float  # per chip per step, estimate (see module docstring)
    collectives: list  # of Collective, aggregated by (op, mesh_axes, bytes, group_size)
    unknown_trip_counts: int  # while loops without known_trip_count (counted once)
    # (FLOPs, bytes, bytes written) per unfused kernel, runs applied
    ops: list = dataclasses.field(default_factory=list)


def shape_bytes(shape: str) -> list[int]:
    """Bytes of each array in a shape text (one entry for an array, several for a tuple)."""
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        out.append(n * _BITS[dtype] // 8)
    return out


def _dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _split_top(text: str, open_c: str = "(", close_c: str = ")") -> tuple[str, str]:
    """(inside, rest) of ``text`` which starts with ``open_c``: balanced-bracket split."""
    depth = 0
    for i, c in enumerate(text):
        depth += c in "({[" and 1 or 0
        depth -= c in ")}]" and 1 or 0
        if depth == 0:
            return text[1:i], text[i + 1:]
    return text[1:], ""


def parse_instr(line: str) -> Instr | None:
    line = line.strip()
    if line.startswith("ROOT "):
        line = line[5:]
    m = re.match(r"%?([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        inner, rest = _split_top(rest)
        shape = "(" + inner + ")"
    else:
        shape, _, rest = rest.partition(" ")
    rest = rest.lstrip()
    om = re.match(r"([\w\-]+)\(", rest)
    if not om:
        return None
    operands, attrs = _split_top(rest[om.end() - 1:])
    names = re.findall(r"%([\w.\-]+)", operands)
    return Instr(m.group(1), shape, om.group(1), names, attrs, operands)


def parse_module(text: str) -> tuple[dict, str]:
    """{computation name: [Instr]}, name of the ENTRY computation."""
    comps: dict[str, list] = {}
    entry, current = "", None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h:
            current = h.group(2)
            comps[current] = []
            entry = current if h.group(1) else entry
            continue
        if line.startswith("}"):
            current = None
        elif current is not None:
            ins = parse_instr(line)
            if ins is not None:
                comps[current].append(ins)
    return comps, entry


def _callees(ins: Instr) -> list[tuple[str, str]]:
    """(kind, computation) pairs an instruction calls: body, condition, calls, to_apply, ..."""
    out = []
    for kind, names in re.findall(
            r"\b(body|condition|calls|to_apply|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)",
            ins.attrs):
        out += [(kind, n) for n in re.findall(r"%?([\w.\-]+)", names)]
    return out


def trip_count(ins: Instr, comps: dict) -> int | None:
    """XLA's ``known_trip_count`` of a while; else (TPU HLO omits it) the bound N of a
    condition ``i < N`` against a constant (jax's scan/fori loops count from 0 by 1)."""
    m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', ins.attrs)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", ins.attrs)
    instrs = comps.get(cond.group(1), []) if cond else []
    consts = {i.name: i.raw for i in instrs if i.op == "constant"}
    for i in instrs:
        if i.op == "compare" and "direction=LT" in i.attrs and len(i.operands) == 2 \
                and i.operands[1] in consts and consts[i.operands[1]].strip().isdigit():
            return int(consts[i.operands[1]])
    return None


def run_counts(comps: dict, entry: str) -> tuple[dict, set, int]:
    """(runs per computation, names of fused computations, while loops of unknown trip count)."""
    runs: dict[str, float] = {entry: 1.0}
    fused: set[str] = set()
    unknown = 0
    order = [entry]
    for comp in order:  # breadth-first; HLO call graphs are DAGs, each callee visited once
        for ins in comps.get(comp, []):
            trips = trip_count(ins, comps) if ins.op == "while" else None
            if ins.op == "while" and trips is None:
                unknown += 1
            for kind, callee in _callees(ins):
                if callee not in comps:
                    continue
                mult = (trips or 1) if kind == "body" else 1
                if ins.op == "fusion" or kind == "to_apply":
                    fused.add(callee)
                if callee not in runs:
                    order.append(callee)
                runs[callee] = runs.get(callee, 0.0) + runs[comp] * mult
    return runs, fused, unknown


def _dot_flops(ins: Instr, table: dict) -> float:
    if ins.op == "convolution":
        return _conv_flops(ins, table)
    out = math.prod(_dims(ins.shape))
    lhs = _dims(table.get(ins.operands[0], "")) if ins.operands else []
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
    k = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i) if m and lhs else 1
    return 2.0 * out * k


def _window(attrs: str, n_spatial: int) -> list[dict]:
    m = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(re.findall(r"(\w+)=([\w_]+)", m.group(1))) if m else {}

    def per_dim(key, default):
        vals = fields.get(key, "").split("x") if key in fields else [default] * n_spatial
        return vals + [default] * (n_spatial - len(vals))

    pads = [p.split("_") for p in per_dim("pad", "0_0")]
    return [{"size": int(a), "stride": int(b), "lhs_dilate": int(c), "pad_lo": int(p[0])}
            for a, b, c, p in zip(per_dim("size", "1"), per_dim("stride", "1"),
                                  per_dim("lhs_dilate", "1"), pads)]


def _conv_flops(ins: Instr, table: dict) -> float:
    """2 × batch × out features × in features × valid kernel taps (padding and lhs-dilation
    holes excluded), the way XLA's cost analysis counts a convolution; TPU HLO writes many
    batched matmuls as convolutions with windows."""
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    if not m or len(ins.operands) < 2:
        return 0.0
    ll, rl, ol = m.groups()
    lhs, rhs, out = (_dims(table.get(ins.operands[0], "")), _dims(table.get(ins.operands[1], "")),
                     _dims(ins.shape))
    if not (lhs and rhs and out):
        return 0.0
    spatial = sorted(c for c in ol if c.isdigit())
    taps = 1
    for d, w in zip(spatial, _window(ins.attrs, len(spatial))):
        n, o, dl = lhs[ll.index(d)], out[ol.index(d)], w["lhs_dilate"]
        extent = (n - 1) * dl
        taps *= sum(1 for j in range(o) for t in range(w["size"])
                    if 0 <= (x := j * w["stride"] + t - w["pad_lo"]) <= extent and x % dl == 0)
    return 2.0 * out[ol.index("b")] * out[ol.index("f")] * rhs[rl.index("i")] * taps


def _collective_bytes(ins: Instr, op: str, group: int) -> int:
    sizes = shape_bytes(ins.shape)
    if ins.op.endswith("-start") and len(sizes) > 1:
        if op == "collective-permute":
            sizes = sizes[:1]  # (input, output, contexts...): one buffer moves
        elif op == "all-gather":
            sizes = sizes[len(sizes) // 2:]  # (inputs..., outputs...)
    total = sum(sizes)
    return total * group if op == "reduce-scatter" else total


def _is_communication(ins: Instr) -> bool:
    """A collective, or a TPU async-collective fusion: its time is the communication term."""
    op = ins.op[:-6] if ins.op.endswith("-start") else ins.op
    return op in COLLECTIVE_OPS or ins.name.startswith("async-collective") or any(
        c.startswith("async_collective") for _, c in _callees(ins))


def kernel_bytes(ins: Instr, table: dict) -> int:
    """HBM bytes one kernel reads and writes (an estimate): operands + results, except that a
    slice reads only what it returns, an update in place (dynamic-update-slice, or a fusion
    whose output aliases an operand: ``output_to_operand_aliasing``, or a dynamic-update-slice
    fusion, whose largest operand is the buffer) moves only the new data,
    and collectives count as communication, not here."""
    return sum(kernel_traffic(ins, table))


def kernel_traffic(ins: Instr, table: dict) -> tuple[int, int]:
    """(bytes read, bytes written) of one kernel; their sum is :func:`kernel_bytes`."""
    if _is_communication(ins):
        return 0, 0
    operands = [sum(shape_bytes(table.get(o, ""))) for o in ins.operands]
    out = shape_bytes(ins.shape)
    if ins.op in ("dynamic-slice", "slice"):
        return sum(out), sum(out)
    if ins.op == "slice-start":  # ((operand), result, context)
        moved = out[1] if len(out) > 1 else sum(out)
        return moved, moved
    if ins.op == "dynamic-update-slice":
        moved = operands[1] if len(operands) > 1 else 0
        return moved, moved
    aliased = {int(i) for i in re.findall(r":\s*\((\d+),", ins.attrs.split(
        "output_to_operand_aliasing=", 1)[1].split("}}", 1)[0] + "}}")} \
        if "output_to_operand_aliasing=" in ins.attrs else set()
    if ins.op == "fusion" and "dynamic-update-slice" in ins.name and operands:
        aliased.add(operands.index(max(operands)))  # updates its largest operand in place
    moved = sum(b for i, b in enumerate(operands) if i not in aliased)
    written = sum(out) - sum(operands[i] for i in aliased if i < len(operands))
    return moved, written


def _fusion_flops(comps: dict):
    """name -> dot FLOPs of one run of a computation, nested fusions included (memoised)."""
    memo: dict[str, float] = {}

    def flops(name: str) -> float:
        if name not in memo:
            memo[name] = 0.0
            instrs = comps.get(name, [])
            table = {i.name: i.shape for i in instrs}
            memo[name] = sum(_dot_flops(i, table) for i in instrs
                             if i.op in ("dot", "convolution")) + sum(
                flops(c) for i in instrs if i.op == "fusion"
                for k, c in _callees(i) if k == "calls")
        return memo[name]

    return flops


def _collective(ins: Instr, mesh_shape: dict):
    """(op, mesh axes, bytes, group size) of one collective instruction."""
    op = ins.op[:-6] if ins.op.endswith("-start") else ins.op
    if op == "collective-permute":
        axes, group = permute_axes(ins.attrs, mesh_shape)
    else:
        groups = decode_groups(ins.attrs)
        axes, group = (["?"], 0) if groups is None else group_axes(groups, mesh_shape)
    return op, tuple(axes), _collective_bytes(ins, op, max(group, 1)), group


def analyze(text: str, mesh_shape: dict) -> HloSummary:
    """FLOPs, bytes, per-kernel work and collectives per chip per step (module docstring)."""
    comps, entry = parse_module(text)
    runs, fused, unknown = run_counts(comps, entry)
    fusion_flops = _fusion_flops(comps)
    flops = 0.0
    ops: list[tuple] = []  # (FLOPs, bytes, bytes written) of each unfused instruction, weighted
    agg: dict[tuple, int] = {}
    seen: set = set()  # channel ids: the TPU compiler repeats one async collective inside its
    # start, done and collective-matmul fusions (one channel_id); it runs once
    for comp, instrs in comps.items():
        r = runs.get(comp, 0.0)
        if not r:
            continue
        table = {i.name: i.shape for i in instrs}
        for ins in instrs:
            own = _dot_flops(ins, table) if ins.op in ("dot", "convolution") else 0.0
            flops += r * own
            if comp not in fused and ins.op not in _FREE:
                read, written = kernel_traffic(ins, table)
                inner = sum(fusion_flops(c) for k, c in _callees(ins) if k == "calls") \
                    if ins.op == "fusion" else 0.0
                ops.append((r * (own + inner), r * (read + written), r * written))
            op = ins.op[:-6] if ins.op.endswith("-start") else ins.op
            channel = re.search(r"channel_id=(\d+)", ins.attrs)
            if op not in COLLECTIVE_OPS or (channel and channel.group(1) in seen):
                continue
            seen.add(channel.group(1) if channel else None)
            key = _collective(ins, mesh_shape)
            agg[key] = agg.get(key, 0) + int(round(r))
    colls = [Collective(op, list(axes), b, g, c) for (op, axes, b, g), c in agg.items()]
    colls.sort(key=lambda c: (c.op, c.mesh_axes, -c.bytes))
    return HloSummary(flops, sum(op[1] for op in ops), colls, unknown, ops)
