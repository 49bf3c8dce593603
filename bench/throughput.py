"""Training-step throughput and MFU of a config on synthetic tokens (no data pipeline).

Builds the sharded train state and the jitted train step exactly as ``jaxlm.train.loop.run`` does
(same :class:`~jaxlm.train.state.StateSpec`, optimizer, schedule and ``make_train_step``), feeds one
random-token batch built once with ``host_to_global``, runs ``--warmup`` steps (compilation
included, not timed), then times ``--steps`` steps twice:

* **loop** (the headline): ``--steps`` steps dispatched back to back, one
  ``jax.block_until_ready`` at the end; ``step_time = elapsed / steps``. This is what a training
  loop that syncs only every ``log_every`` steps sees (dispatch overlaps compute) and it counts
  every second, slow steps included.
* **median**: the same number of steps again, each blocked on individually; the median of the
  per-step times. Robust to a noisy neighbour on a shared machine; reported next to the headline.

Model FLOPs utilisation (PaLM, Chowdhery et al. 2022, App. B; see :mod:`jaxlm.utils.flops`)::

    tokens_per_s    = batch_size * seq_len / step_time
    flops_per_token = 6 * N_matmul + 12 * L * H * hd * T      (fwd+bwd, no remat recompute)
    MFU             = flops_per_token * tokens_per_s / (n_devices * peak_flops_per_device)

``peak_flops_per_device`` is ``cfg.peak_flops`` when set, else this machine's achieved dense
``2048 x 2048`` matmul rate in the config's compute dtype, measured in the same process
(:func:`jaxlm.utils.flops.measure_peak_flops`, best of 10, probed before and after the timed steps,
the higher kept): a lower bound on the datasheet peak, so this MFU is "fraction of what a big
matmul achieves here". On a machine shared with other jobs both rates move with the load; run
it a few times and keep the best. With ``--xla_force_host_platform_device_count``
the fake CPU devices share the same cores, so ``n_devices * peak`` overstates the machine and the
printed ``host utilisation`` (= MFU * n_devices) is the comparable number.

The last two lines printed are always ``tokens_per_s=<float>`` and ``mfu=<float>``; the line
before them is ``tokens_per_s_median=<float>`` (from the median step, as ``bench/vs_maxtext.sh``
compares it with MaxText's median step time).

Example (from the repository root)::

    python bench/throughput.py                                   # configs/bench_tiny_llama.yaml
    python bench/throughput.py configs/bench_tiny_llama.yaml model.remat=full --steps 10
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python bench/throughput.py configs/bench_tiny_llama.yaml mesh.fsdp=2

or from Python: ``run(load_config("configs/bench_tiny_llama.yaml"), steps=20, warmup=3)``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

DEFAULT_CONFIG = "configs/bench_tiny_llama.yaml"


def synthetic_batch(cfg, rows: int, seed: int = 0) -> dict:
    """``rows`` random-token sequences in the train-step batch format (numpy, [rows, T])."""
    import numpy as np

    t, v = cfg.data.seq_len, cfg.model.vocab_size
    tokens = np.random.default_rng(seed).integers(0, v, size=(rows, t + 1), dtype=np.int32)
    ones = np.ones((rows, t), np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy(),
            "segment_ids": ones, "loss_mask": ones, "target_bytes": ones}


def run(cfg, steps: int = 20, warmup: int = 3) -> dict:
    """Time ``steps`` train steps of ``cfg`` after ``warmup`` untimed ones; returns the figures."""
    import jax

    from jaxlm.config import ConfigError
    from jaxlm.optim import build_optimizer
    from jaxlm.sharding import host_to_global, make_mesh
    from jaxlm.train.loop import check_batch
    from jaxlm.train.state import StateSpec
    from jaxlm.train.step import make_train_step
    from jaxlm.utils.flops import flops_per_token, measure_peak_flops, mfu

    if steps < 1 or warmup < 1:
        raise ConfigError(f"--steps={steps} and --warmup={warmup} must be >= 1 "
                          "(the first warm-up step compiles)")
    if cfg.model.vocab_size <= 0:
        raise ConfigError("model.vocab_size must be set (> 0): the benchmark builds no tokenizer")
    if cfg.distributed:
        jax.distributed.initialize()

    mesh = make_mesh(cfg.mesh)
    check_batch(cfg, mesh)
    spec = StateSpec.build(cfg, mesh, build_optimizer(cfg))
    state = spec.init()
    step_fn = make_train_step(spec)
    rows = cfg.train.batch_size // jax.process_count()
    batch = host_to_global(synthetic_batch(cfg, rows, seed=cfg.seed + jax.process_index()), mesh)

    dtype = "float32" if cfg.model.dtype == "float32" else "bfloat16"
    peak_before = measure_peak_flops(dtype, n=2048, repeats=10)

    t0 = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    first_step_s = time.perf_counter() - t0  # compile + one step
    for _ in range(warmup - 1):
        state, metrics = step_fn(state, batch)
    jax.block_until_ready((state, metrics))

    t0 = time.perf_counter()  # loop: dispatch all, block once
    for _ in range(steps):
        state, metrics = step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    loop_s = (time.perf_counter() - t0) / steps

    blocked = []  # the same steps, each blocked on
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready((state, metrics))
        blocked.append(time.perf_counter() - t0)
    loss = float(jax.device_get(metrics["loss"]))
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss} after {warmup + 2 * steps} steps")

    # probed before and after the timed steps; the higher one is the least disturbed by neighbours
    measured_peak = max(peak_before, measure_peak_flops(dtype, n=2048, repeats=10))
    peak = cfg.peak_flops or measured_peak
    n_dev = mesh.devices.size
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, cfg.model.vocab_size, cfg.data.seq_len)
    tps = tokens_per_step / loop_s
    median_s = statistics.median(blocked)
    return {
        "devices": f"{n_dev} x {jax.devices()[0].device_kind} ({jax.devices()[0].platform})",
        "n_devices": n_dev, "mesh": dict(mesh.shape), "params": spec.param_count(),
        "dtype": cfg.model.dtype, "remat": cfg.model.remat, "attn_impl": cfg.model.attn_impl,
        "tokens_per_step": tokens_per_step, "flops_per_token": fpt,
        "steps": steps, "warmup": warmup, "first_step_s": first_step_s,
        "step_time_s": loop_s, "step_time_median_s": median_s, "step_time_min_s": min(blocked),
        "step_time_max_s": max(blocked), "tokens_per_s": tps,
        "tokens_per_s_median": tokens_per_step / median_s,
        "measured_peak_flops": measured_peak, "peak_flops": peak,
        "peak_source": "cfg.peak_flops" if cfg.peak_flops else f"measured {dtype} 2048^3 matmul",
        "mfu": mfu(fpt, tps, peak, n_dev),
        "mfu_median": mfu(fpt, tokens_per_step / median_s, peak, n_dev),
        "loss": loss,
    }


def hugepages_status() -> str:
    """Whether this process runs with glibc's huge-pages tunable (jaxlm/utils/hugepages.py)."""
    import os

    from jaxlm.utils.hugepages import TUNABLE, wanted

    if TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return f"transparent huge pages (GLIBC_TUNABLES={TUNABLE})"
    return f"4 KiB pages ({wanted() or 'not re-executed: run as a script to get huge pages'})"


def report(r: dict) -> str:
    """The human-readable report; its last two lines are ``tokens_per_s=`` and ``mfu=``."""
    lines = [
        f"devices          {r['devices']}",
        f"mesh             {r['mesh']}",
        f"model            {r['params']:,} params, {r['dtype']}, remat {r['remat']}, "
        f"attention {r['attn_impl']}",
        f"tokens/step      {r['tokens_per_step']:,}",
        f"flops/token      {r['flops_per_token']:.4g}",
        f"first step       {r['first_step_s']:.2f} s (compile + 1 step, excluded)",
        f"step time        {r['step_time_s'] * 1e3:.1f} ms  (loop of {r['steps']} steps, one block"
        f" at the end; headline)",
        f"step time, each  median {r['step_time_median_s'] * 1e3:.1f} ms, min "
        f"{r['step_time_min_s'] * 1e3:.1f}, max {r['step_time_max_s'] * 1e3:.1f} "
        f"(blocked per step) -> {r['tokens_per_s_median']:.1f} tok/s, mfu {r['mfu_median']:.4f}",
        f"peak             {r['peak_flops'] / 1e9:.1f} GFLOP/s per device ({r['peak_source']};"
        f" measured {r['measured_peak_flops'] / 1e9:.1f})",
        f"achieved         {r['flops_per_token'] * r['tokens_per_s'] / 1e9:.1f} GFLOP/s (model)",
        f"loss             {r['loss']:.4f} (sanity only: one random batch, repeated, is memorised)",
        f"host memory      {hugepages_status()}",
    ]
    if r["n_devices"] > 1 and r["devices"].endswith("(cpu)"):
        lines.append(f"host utilisation {r['mfu'] * r['n_devices']:.4f} (fake CPU devices share "
                     "the cores: MFU x n_devices vs one device's matmul peak)")
    lines += [f"tokens_per_s_median={r['tokens_per_s_median']:.2f}",
              f"tokens_per_s={r['tokens_per_s']:.2f}", f"mfu={r['mfu']:.4f}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    """CLI: ``[CONFIG.yaml] [section.key=value ...] [--steps N] [--warmup N]``; 2 on config errors."""
    parser = argparse.ArgumentParser(
        prog="python bench/throughput.py",
        description="Train-step throughput and MFU on synthetic tokens.")
    parser.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [section.key=value ...]",
                        help=f"a preset (default {DEFAULT_CONFIG}) and dotted overrides")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first, compilation included (default 3)")
    ns = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)

    from jaxlm.config import ConfigError, load_config

    args = list(ns.args)
    path = args.pop(0) if args and "=" not in args[0] else DEFAULT_CONFIG
    try:
        r = run(load_config(path, args), steps=ns.steps, warmup=ns.warmup)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(r), flush=True)
    return 0


if __name__ == "__main__":
    from jaxlm.utils.hugepages import reexec_with_hugepages

    reexec_with_hugepages()  # as jaxlm-train does: huge pages for XLA:CPU's step memory
    sys.exit(main())
