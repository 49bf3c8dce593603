"""Hardware targets of ``jaxlm-plan``: one table of published per-chip figures, and name parsing.

A target is ``<chip>-<N>`` for TPUs (``v4-N``, ``v5e-N``, ``v5p-N``, ``v6e-N``; N = chips, not
TensorCores: Google Cloud's own names for v4 and v5p count cores, so its ``v5p-128`` is 64 chips
= ``v5p-64`` here), ``<k>x <chip>-<N>`` for k slices joined by the data-center network
(``2x v5e-256``), or ``<gpu>x<N>`` for GPU clusters of 8-GPU NVLink nodes (``h100x64``,
``h200x8``, ``a100x32``), or ``cpu`` / ``cpux<N>`` (this machine, peak FLOP/s and memory
bandwidth measured, for checking the estimate against a measured step).

Bandwidths are bytes/s **per chip**: ``ici_bw`` is the bidirectional bandwidth one chip has to
its neighbours along one mesh axis laid out on one torus dimension (two links, one each way), so
a ring collective over that axis moves data at ``ici_bw`` (the JAX scaling book's ``W_ici``
for a bidirectional ring); ``dcn_bw`` is what a chip gets across slices / nodes.

Example::

    from jaxlm.plan.targets import parse_target
    t = parse_target("v5e-16")
    t.chip.peak_flops, t.n_chips, t.tpu_topology     # 1.97e14, 16, 'v5e:4x4'
"""

from __future__ import annotations

import dataclasses
import math
import re

from jaxlm.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    kind: str  # tpu | gpu | cpu
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bytes: float  # memory per chip
    hbm_bw: float  # bytes/s per chip
    ici_bw: float  # bytes/s per chip along one mesh axis (TPU ICI ring / GPU NVLink)
    dcn_bw: float  # bytes/s per chip across slices (TPU DCN) / nodes (GPU InfiniBand)
    torus_dims: int = 2  # TPU: 2-D (v5e, v6e) or 3-D (v4, v5p) torus
    node: int = 8  # GPU: GPUs per NVLink node; TPU: chips per host (v5e/v6e 8, v4/v5p 4)
    source: str = ""
    # bytes/s at which kernels write their results, when it differs from reading (the measured
    # cpu target: fresh output pages cost far more than reads); 0 = hbm_bw for both
    write_bw: float = 0.0


GiB, GB = 1024**3, 1e9
CHIPS: dict[str, Chip] = {
    # Cloud TPU v4 page (docs.cloud.google.com/tpu/docs/v4): 275 TFLOP/s bf16 per chip, 32 GiB
    # HBM2 at 1200 GB/s, 3-D torus. ICI: 6 links of ~45 GB/s each way (scaling book "How to
    # Think About TPUs" table: v4 one-way 4.5e10 B/s per link) -> 9e10 B/s bidirectional per axis.
    "v4": Chip("v4", "tpu", 275e12, 32 * GiB, 1200 * GB, 9e10, 6.25e9, 3, 4,
               source="cloud.google.com/tpu/docs/v4; ICI: jax-ml.github.io/scaling-book/tpus"),
    # Cloud TPU v5e page: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, ICI 1600 Gbps per chip
    # (4 ports, "bidirectional ICI bandwidth 400 GBps"), 2-D torus, per host 2 x 100 Gbps NICs
    # for 8 chips -> DCN 2.5e9 B/s per chip. A ring along one torus axis uses 2 of the 4 ports;
    # scaling book: 4.5e10 B/s one way per link -> 9e10 B/s per chip per axis (both directions).
    "v5e": Chip("v5e", "tpu", 197e12, 16 * GiB, 819 * GB, 9e10, 2.5e9, 2,
                source="cloud.google.com/tpu/docs/v5e; ICI: jax-ml.github.io/scaling-book/tpus"),
    # Cloud TPU v5p page: 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s, ICI 4800 Gbps per chip
    # (bidirectional 1200 GBps, 6 ports), 3-D torus, DCN 50 Gbps per chip.
    # Scaling book: 9e10 B/s one way per link -> 1.8e11 B/s bidirectional per axis.
    "v5p": Chip("v5p", "tpu", 459e12, 95 * GiB, 2765 * GB, 1.8e11, 6.25e9, 3, 4,
                source="cloud.google.com/tpu/docs/v5p; ICI: jax-ml.github.io/scaling-book/tpus"),
    # Cloud TPU v6e page: 918 TFLOP/s bf16, 32 GB HBM at 1600 GB/s, ICI 3200 Gbps per chip
    # (4 ports), 2-D torus, 4 x 200 Gbps NICs per 8-chip host -> DCN 12.5e9 B/s per chip.
    "v6e": Chip("v6e", "tpu", 918e12, 32 * GiB, 1600 * GB, 1.8e11, 12.5e9, 2,
                source="cloud.google.com/tpu/docs/v6e; ICI: jax-ml.github.io/scaling-book/tpus"),
    # NVIDIA H100 SXM5 datasheet: BF16 tensor 1979 TFLOP/s *with sparsity* -> 989 dense; 80 GB
    # HBM3 at 3.35 TB/s; NVLink 4 900 GB/s bidirectional (450 each way) through NVSwitch.
    # Inter-node: DGX H100 has one 400 Gb/s ConnectX-7 InfiniBand NIC per GPU -> 50 GB/s.
    "h100": Chip("h100", "gpu", 989e12, 80 * GB, 3350 * GB, 450 * GB, 50 * GB,
                 source="nvidia.com H100 datasheet; DGX H100 user guide (8x 400 Gb/s IB)"),
    # NVIDIA H200 SXM: same Hopper compute as H100 (989 dense bf16), 141 GB HBM3e at 4.8 TB/s,
    # NVLink 4 900 GB/s; HGX H200 nodes, one 400 Gb/s NIC per GPU assumed as for H100.
    "h200": Chip("h200", "gpu", 989e12, 141 * GB, 4800 * GB, 450 * GB, 50 * GB,
                 source="nvidia.com H200 product page / datasheet"),
    # NVIDIA A100 SXM4 80GB datasheet: BF16 tensor 312 TFLOP/s dense, 80 GB HBM2e at 2039 GB/s,
    # NVLink 3 600 GB/s bidirectional; DGX A100: 8x 200 Gb/s HDR IB -> 25 GB/s per GPU.
    # [from the datasheet as remembered; not re-fetched in this session]
    "a100": Chip("a100", "gpu", 312e12, 80 * GB, 2039 * GB, 300 * GB, 25 * GB,
                 source="nvidia.com A100 datasheet (80GB SXM); DGX A100 (8x 200 Gb/s HDR)"),
}

# TPU slice shapes by chip count (Cloud TPU pages' topology tables); chips per host bounds as
# MaxText's AOT path passes them for a 4-chip host block.
_TORUS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
             256: "16x16"}
_TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
             256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    chip: Chip
    n_chips: int  # all chips, all slices
    n_slices: int = 1

    @property
    def per_slice(self) -> int:
        return self.n_chips // self.n_slices

    @property
    def tpu_topology(self) -> str:
        """``v5e:4x4`` etc. (TPU only): the name ``jax.experimental.topologies`` takes."""
        table = _TORUS_3D if self.chip.torus_dims == 3 else _TORUS_2D
        chip = {"v5e": "v5e", "v6e": "v6e", "v5p": "v5p", "v4": "v4"}[self.chip.name]
        return f"{chip}:{table[self.per_slice]}"

    @property
    def torus_shape(self) -> tuple[int, ...]:
        if self.chip.kind != "tpu":
            return ()
        return tuple(int(x) for x in self.tpu_topology.split(":")[1].split("x"))

    def axis_bandwidth(self, mesh_axes: list[str], mesh_shape: dict) -> float:
        """Bytes/s per chip for a ring collective over ``mesh_axes`` (see module docstring).

        TPU: an axis whose devices cross slices runs at DCN speed; otherwise the ICI ring
        bandwidth times the number of torus dimensions the axis spans (mesh axes are laid out
        over the torus in order, innermost = last). GPU: NVLink inside a node, InfiniBand when
        the group spans nodes. CPU: the measured memory bandwidth (fake devices share RAM).
        """
        c = self.chip
        inner = math.prod(mesh_shape[a] for a in list(mesh_shape)[list(mesh_shape).index(
            mesh_axes[-1]) + 1:]) if mesh_axes and mesh_axes[-1] in mesh_shape else 1
        size = math.prod(mesh_shape.get(a, 1) for a in mesh_axes)
        if c.kind == "cpu":
            return c.ici_bw
        if c.kind == "gpu":
            return c.ici_bw if inner * size <= c.node else c.dcn_bw
        if inner * size > self.per_slice:
            return c.dcn_bw
        spans, covered = 0, 1
        for dim in self.torus_shape:  # dims the axis covers beyond the inner axes
            if covered >= inner * size:
                break
            if covered * dim > inner:
                spans += 1
            covered *= dim
        return c.ici_bw * max(spans, 1)


def parse_target(name: str, cpu_chip: Chip | None = None) -> Target:
    """``v5e-16`` / ``2x v5e-256`` / ``h100x64`` / ``cpu`` -> :class:`Target` (module docstring).

    ``cpu_chip``: the measured figures of this machine for the ``cpu`` target (without them the
    cpu target carries zeros: enough to count its devices, not to plan).
    """
    raw = name.strip().lower()
    m = re.fullmatch(r"(?:(\d+)\s*x\s*)?(v4|v5e|v5p|v6e)-(\d+)", raw)
    if m:
        slices, chip, per = int(m.group(1) or 1), CHIPS[m.group(2)], int(m.group(3))
        table = _TORUS_3D if chip.torus_dims == 3 else _TORUS_2D
        if per not in table or slices < 1:
            raise ConfigError(f"--target {name}: {chip.name} slices come in {sorted(table)} "
                              "chips (N counts chips, not TensorCores)")
        return Target(f"{slices}x {chip.name}-{per}" if slices > 1 else f"{chip.name}-{per}",
                      chip, slices * per, slices)
    m = re.fullmatch(r"(h100|h200|a100)x(\d+)", raw)
    if m:
        n = int(m.group(2))
        if n < 1 or (n > 8 and n % 8):
            raise ConfigError(f"--target {name}: a GPU cluster is 1-8 GPUs or whole 8-GPU nodes")
        return Target(raw, CHIPS[m.group(1)], n)
    m = re.fullmatch(r"cpu(?:x(\d+))?", raw)
    if m:  # figures unknown until measured (jaxlm.plan.cli.cpu_chip): zeros until then
        chip = cpu_chip or Chip("cpu", "cpu", 0.0, 0.0, 0.0, 0.0, 0.0, source="not measured")
        return Target(raw, chip, max(int(m.group(1) or 1), 1))
    raise ConfigError(f"--target {name!r} is not a known target; use v4-N, v5e-N, v5p-N, v6e-N "
                      "(N chips; '2x v5e-256' for 2 slices), h100xN, h200xN, a100xN or cpu")
