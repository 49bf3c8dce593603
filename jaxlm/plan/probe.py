"""This machine as a planning target: matmul FLOP/s and memory read / write rates, measured.

The ``cpu`` target (``jaxlm-plan CONFIG --target cpu``) has no datasheet: its roofline rates are
measured in the planning process. Two things made the first version (best of 5 bursts of a
128 MiB ``y = 1.0001·x``) a poor predictor of the step on a machine shared with other jobs:

* **noise** — one burst of a fraction of a second moved by ±25% between runs, while the step it
  predicts (seconds of kernels) averages the contention out. So each rate is now the **median
  of ``samples`` timings**, the matmul and memory samples **interleaved** so that all of them
  see the same background load, and ``bench/plan_vs_measured.py`` probes right before and right
  after the timed steps;
* **reads and writes differ** — on this CPU a kernel writing a fresh result (new pages: a
  fault, zeroing, write-allocate) is several times slower per byte than one reading its
  operands (12.5 vs 2.0 GB/s on the 2-core EPYC box, 2026-11-30), and a train step's kernels
  read about twice what they write. The copy probe mixed the two at a fixed 1:1. So the read
  rate and the write rate are measured separately and the planner charges each kernel's
  operand bytes at one and its result bytes at the other (:mod:`jaxlm.plan.estimate`).

Over ``S`` bytes (float32), medians over interleaved samples::

    peak_flops = 2·n³ / t(m @ m)                     n = 2048, the config's dtype
    read_bw    = S / t(sum(x))                       reads S, writes a scalar
    write_bw   = S / (t(1.0001·x) − t(sum(x)))       the copy's extra time is its S-byte write

``S`` = 64 MiB: out of the last-level cache, like the kernels that carry most of a train step's
bytes (on ``configs/bench_tiny_llama.yaml`` 95% of the step's kernel bytes are in kernels of
≥ 16 MiB, half in kernels of ≥ 66 MiB; :attr:`jaxlm.plan.hlo.HloSummary.ops`).

Example::

    from jaxlm.plan.probe import cpu_chip, probe_rates
    flops, read_bw, write_bw = probe_rates("float32", samples=5)   # FLOP/s, bytes/s, bytes/s
    chip = cpu_chip("float32", n_devices=1)                         # a jaxlm.plan.targets.Chip
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
                nbytes: int = PROBE_BYTES) -> tuple[float, float, float]:
    """(matmul FLOP/s, read bytes/s, write bytes/s): medians of ``samples`` interleaved timings
    (module docstring)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))  # [n, n]
    x = jnp.ones((nbytes // 4,), jnp.float32)  # [S / 4] float32
    kernels = {"matmul": (jax.jit(lambda m: m @ m), a), "read": (jax.jit(jnp.sum), x),
               "copy": (jax.jit(lambda v: v * 1.0001), x)}
    for fn, arg in kernels.values():  # compile + warm up
        fn(arg).block_until_ready()
    times: dict[str, list] = {k: [] for k in kernels}
    for _ in range(max(samples, 1)):
        for name, (fn, arg) in kernels.items():
            times[name].append(_timed(fn, arg))
    t = {k: statistics.median(v) for k, v in times.items()}
    write_s = t["copy"] - t["read"] if t["copy"] > t["read"] else t["copy"] / 2
    return 2.0 * n**3 / t["matmul"], x.nbytes / t["read"], x.nbytes / write_s


def cpu_chip(dtype: str, n_devices: int = 1, samples: int = 7, rates=None):
    """This machine as a :class:`jaxlm.plan.targets.Chip` (per device: fake devices share it).
    ``rates``: (FLOP/s, read bytes/s, write bytes/s) measured elsewhere (e.g. around the timed
    steps) instead of probing now. Collectives between fake devices are copies: read + write."""
    from jaxlm.plan.targets import Chip
    from jaxlm.train.compiled import host_memory_bytes

    how = "given rates" if rates else f"median of {samples} interleaved samples"
    peak, read, write = rates or probe_rates("float32" if dtype == "float32" else "bfloat16",
                                             samples)
    copy = 2.0 / (1.0 / read + 1.0 / write)  # bytes/s of moving data (each byte read + written)
    k = n_devices
    return Chip("cpu", "cpu", peak / k, host_memory_bytes() / k, read / k, copy / k, copy / k,
                source=f"measured on this machine ({how})", write_bw=write / k)
