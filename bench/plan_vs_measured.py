"""jaxlm-plan's estimate for this machine beside a measured train step (issue #17, "Proof").

The ``cpu`` target is this machine with its own figures measured in the same process
(:mod:`jaxlm.plan.probe`: medians of interleaved samples of a 2048³ matmul in the config's
dtype, a 64 MiB read and a 64 MiB copy, giving the read and the write rate), **right before and
right after** the timed steps: the plan uses the mean of the two probes, so the rates are those
of the minutes the step was timed in. The planner compiles the same train step (same config,
same single-device mesh), reads FLOPs and per-kernel bytes read and written from its HLO and
predicts the step time with the per-kernel roofline (:mod:`jaxlm.plan.estimate`);
``bench/throughput.py``'s ``run`` times the real step (loop of ``--steps``, median too). The
issue's bar: estimate within ±35% of the measured step. Both the probes and the step slow down
when other jobs share the cores, so run it a few times (``--repeats``) and read the ratio, not
the absolute times.

    python bench/plan_vs_measured.py                           # configs/bench_tiny_llama.yaml
    python bench/plan_vs_measured.py configs/tiny.yaml model.vocab_size=256 --steps 5

The last line printed is ``ratio=<estimate / measured median step>`` (median over repeats).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/plan_vs_measured.py")
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [section.key=value ...]")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    ns = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)

    import throughput

    from jaxlm.config import load_config
    from jaxlm.plan.cli import run
    from jaxlm.plan.probe import cpu_chip, probe_rates

    args = list(ns.args)
    path = args.pop(0) if args and "=" not in args[0] else throughput.DEFAULT_CONFIG
    cfg = load_config(path, args + ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
    ratios = []
    dtype = "float32" if cfg.model.dtype == "float32" else "bfloat16"
    for i in range(ns.repeats):
        before = probe_rates(dtype)
        measured = throughput.run(cfg, steps=ns.steps, warmup=2)
        after = probe_rates(dtype)
        rates = tuple((a + b) / 2 for a, b in zip(before, after))
        plan = run(cfg, "cpu", chip=cpu_chip(dtype, 1, rates=rates))
        road = plan["roofline"]
        est, got = plan["step_time_s_estimate"], measured["step_time_median_s"]
        ratios.append(est / got)
        chip = plan["chip"]
        print(f"[{i + 1}] probes (before / after the timed steps -> mean): matmul "
              f"{before[0] / 1e9:.1f} / {after[0] / 1e9:.1f} -> {chip['peak_flops'] / 1e9:.1f} "
              f"GFLOP/s, read {before[1] / 1e9:.2f} / {after[1] / 1e9:.2f} -> "
              f"{chip['hbm_bw'] / 1e9:.2f} GB/s, write {before[2] / 1e9:.2f} / "
              f"{after[2] / 1e9:.2f} -> {chip['write_bw'] / 1e9:.2f} GB/s")
        print(f"[{i + 1}] plan: compute {road['compute_s']:.3f} s, memory {road['memory_s']:.3f} "
              f"s, per-kernel roofline {road['busy_s']:.3f} s -> estimate {est:.3f} s "
              f"({plan['flops_per_step']:.4g} executed FLOPs, "
              f"{plan['hbm_bytes_per_chip_per_step']:.4g} bytes)")
        print(f"[{i + 1}] measured: median {got:.3f} s, loop {measured['step_time_s']:.3f} s "
              f"(matmul probe in the bench: {measured['measured_peak_flops'] / 1e9:.1f} GFLOP/s)"
              f" -> estimate / measured = {est / got:.2f}", flush=True)
    print(f"ratio={sorted(ratios)[len(ratios) // 2]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
