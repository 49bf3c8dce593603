"""This machine as a planning target: its matmul FLOP/s and memory bandwidth, measured robustly.

The ``cpu`` target (``jaxlm-plan CONFIG --target cpu``) has no datasheet: its two roofline rates
are measured in the planning process. A single best-of-5 burst (what this module replaced) moved
by ±25% between runs on a machine shared with other jobs, and the step estimate with it, while
the step it predicts — seconds of kernels — averages the contention out. So each rate is the
**median of ``samples`` timings**, matmul and memory samples **interleaved** (both see the same
background load), over a window of a few seconds:

    peak_flops = median_i( 2·n³ / t_matmul,i )           n = 2048, the config's dtype
    mem_bw     = median_i( 2·S / t_copy,i )              y = 1.0001·x over S bytes (read + write)

``S`` defaults to 64 MiB: out of the last-level cache, like the kernels that carry most of a
train step's bytes (on ``configs/bench_tiny_llama.yaml`` half of the step's kernel bytes are
in kernels of ≥ 66 MiB, 95% in kernels of ≥ 16 MiB; :attr:`jaxlm.plan.hlo.HloSummary.ops`).
The median, not the best: the step runs under the same load as the typical sample, not the
luckiest one. Call :func:`cpu_chip` right before the timed steps (``bench/plan_vs_measured.py``
probes before and after them and plans with the mean of the two).

Example::

    from jaxlm.plan.probe import cpu_chip, probe_rates
    flops, bw = probe_rates("float32", samples=5)     # FLOP/s, bytes/s of this machine
    chip = cpu_chip("float32", n_devices=1)           # a jaxlm.plan.targets.Chip
"""

from __future__ import annotations

import statistics
import time

PROBE_BYTES = 64 * 2**20


def _timed(fn, arg) -> float:
    t0 = time.perf_counter()
    fn(arg).block_until_ready()
    return time.perf_counter() - t0


def probe_rates(dtype: str = "float32", samples: int = 7, n: int = 2048,
                nbytes: int = PROBE_BYTES) -> tuple[float, float]:
    """(matmul FLOP/s, memory bytes/s): medians of ``samples`` interleaved timings (docstring)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))  # [n, n]
    x = jnp.ones((nbytes // 4,), jnp.float32)  # [S / 4] float32
    matmul = jax.jit(lambda m: m @ m)
    copy = jax.jit(lambda v: v * 1.0001)
    matmul(a).block_until_ready()  # compile + warm up
    copy(x).block_until_ready()
    flops, bws = [], []
    for _ in range(max(samples, 1)):
        flops.append(2.0 * n**3 / _timed(matmul, a))
        bws.append(2.0 * x.nbytes / _timed(copy, x))
    return statistics.median(flops), statistics.median(bws)


def cpu_chip(dtype: str, n_devices: int = 1, samples: int = 7, rates=None):
    """This machine as a :class:`jaxlm.plan.targets.Chip` (per device: fake devices share it).
    ``rates``: (FLOP/s, bytes/s) measured elsewhere (e.g. around the timed steps) instead."""
    from jaxlm.plan.targets import Chip
    from jaxlm.train.compiled import host_memory_bytes

    how = "given rates" if rates else f"median of {samples} interleaved samples"
    peak, bw = rates or probe_rates("float32" if dtype == "float32" else "bfloat16", samples)
    return Chip("cpu", "cpu", peak / n_devices, host_memory_bytes() / n_devices, bw / n_devices,
                bw / n_devices, bw / n_devices, source=f"measured on this machine ({how})")
