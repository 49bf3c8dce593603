"""How close the train step runs to its own matmuls: a lower bound on the step time from the
matrix products alone, and the measured step against it, in one run.

Every ``dot_general`` of the train step's jaxpr (the one ``make_train_step`` compiles; a
``scan`` body counts once per iteration: layers, head chunks) is timed on its own -- the same
shapes, dtypes and dimension numbers, jitted alone, best of ``--repeats`` -- and the times are
summed::

    bound_s = Σ_dots  count · t_alone(dot)            (no elementwise work, no gaps, no memory
                                                      traffic beyond what each product needs)
    step_vs_matmul_bound = bound_s / step_s            (1.0 = the step is nothing but its matmuls)

The step is timed in the same process (median of ``--steps`` blocked steps, after a warm-up,
interleaved with the probes' own runs), so machine load hits both. The table also says which
products run slowly for their size: on XLA:CPU a dot whose lhs contracts its leading dim (a
weight gradient xᵀ·∂y) does not go to YNNPACK (``fast=no``) and runs at a fraction of the rate
of the same product in row-major form (:mod:`jaxlm.ops.head_loss` lays x out for that reason).

Example (from the repository root)::

    python bench/matmul_bound.py                                  # configs/bench_tiny_llama.yaml
    python bench/matmul_bound.py configs/bench_tiny_llama.yaml model.remat=none --steps 8

Prints one line per distinct product, then ``matmul_bound_tokens_per_s=`` and
``step_vs_matmul_bound=``.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

DEFAULT_CONFIG = "configs/bench_tiny_llama.yaml"


def step_dots(jaxpr, mult: int = 1, out=None) -> collections.Counter:
    """{(lhs shape, rhs shape, dimension_numbers, dtypes): count} over a jaxpr's equations,
    sub-jaxprs included; a scan body's products count ``length`` times, and of a
    ``platform_dependent`` choice only the branch for this backend counts."""
    import jax

    out = collections.Counter() if out is None else out
    backend = jax.default_backend()
    for eqn in jaxpr.eqns:
        if "branches_platforms" in eqn.params:  # jax.lax.platform_dependent: this platform's only
            plats = eqn.params["branches_platforms"]
            here = [i for i, p in enumerate(plats) if p and backend in p]
            pick = here[0] if here else plats.index(None)
            step_dots(eqn.params["branches"][pick].jaxpr, mult, out)
            continue
        if eqn.primitive.name == "dot_general":
            a, b = eqn.invars
            dn = eqn.params["dimension_numbers"]
            key = (a.aval.shape, b.aval.shape, tuple(tuple(map(tuple, p)) for p in dn),
                   str(a.aval.dtype), str(b.aval.dtype))
            out[key] += mult
        inner = mult * (eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1)
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    step_dots(sub, inner, out)
    return out


def time_dot(key, repeats: int) -> tuple[float, float, bool]:
    """(best seconds, FLOPs, whether XLA:CPU gave it to YNNPACK) of one product alone."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sa, sb, dn, ta, tb = key
    a, b = jnp.full(sa, 0.01, ta), jnp.full(sb, 0.01, tb)
    fn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dn)).lower(a, b).compile()  # once
    fast = "__ynn_fusion" in fn.as_text()
    out = jax.block_until_ready(fn(a, b)).shape
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(a, b))
        best = min(best, time.perf_counter() - t0)
    (ca, _), _ = dn
    return best, 2.0 * np.prod(out) * np.prod([sa[i] for i in ca]), fast


def run(cfg, steps: int = 10, repeats: int = 10) -> dict:
    """Time the step and its products; returns the table rows and the two figures."""
    import jax

    from jaxlm.optim import build_optimizer
    from jaxlm.sharding import host_to_global, make_mesh
    from jaxlm.train.state import StateSpec
    from jaxlm.train.step import make_train_step
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/, from any cwd
    from throughput import synthetic_batch

    mesh = make_mesh(cfg.mesh)
    spec = StateSpec.build(cfg, mesh, build_optimizer(cfg))
    state = spec.init()
    step_fn = make_train_step(spec)
    batch = host_to_global(synthetic_batch(cfg, cfg.train.batch_size, seed=cfg.seed), mesh)
    with jax.set_mesh(mesh):
        dots = step_dots(jax.make_jaxpr(step_fn.jitted)(state, batch).jaxpr)
    for _ in range(2):  # compile + warm
        state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)

    rows, times = [], []

    def one_step():
        nonlocal state
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)

    for key, count in sorted(dots.items(), key=lambda kv: -kv[1]):
        t, flops, fast = time_dot(key, repeats)
        rows.append({"lhs": key[0], "rhs": key[1], "dims": key[2], "count": count, "s": t,
                     "flops": flops, "fast": fast})
        if len(times) < steps:  # a step after each probe: both see the same machine load
            one_step()
    while len(times) < steps:
        one_step()
    bound = sum(r["count"] * r["s"] for r in rows)
    step_s = statistics.median(times)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    return {"rows": rows, "bound_s": bound, "step_s": step_s, "tokens_per_step": tokens,
            "flops": sum(r["count"] * r["flops"] for r in rows)}


def report(r: dict) -> str:
    lines = [f"{'count':>5}  {'lhs':<22} {'rhs':<22} {'(contract), (batch)':<36} "
             f"{'ms alone':>8} {'GFLOP/s':>8}  fast"]
    for x in r["rows"]:
        lines.append(f"{x['count']:>5}  {str(x['lhs']):<22} {str(x['rhs']):<22} "
                     f"{str(x['dims']):<36} {x['s'] * 1e3:8.3f} {x['flops'] / x['s'] / 1e9:8.1f}"
                     f"  {'yes' if x['fast'] else 'no'}")
    lines += [
        f"matmuls alone    {r['bound_s'] * 1e3:.1f} ms per step ({r['flops'] / 1e9:.1f} GFLOP at "
        f"{r['flops'] / r['bound_s'] / 1e9:.1f} GFLOP/s)",
        f"step, measured   {r['step_s'] * 1e3:.1f} ms (median, same process)",
        f"matmul_bound_tokens_per_s={r['tokens_per_step'] / r['bound_s']:.1f}",
        f"step_vs_matmul_bound={r['bound_s'] / r['step_s']:.3f}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    """CLI: ``[CONFIG.yaml] [section.key=value ...] [--steps N] [--repeats N]``."""
    parser = argparse.ArgumentParser(prog="python bench/matmul_bound.py",
                                     description="The train step vs its matmuls alone.")
    parser.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [section.key=value ...]")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--repeats", type=int, default=10, help="runs per product (best kept)")
    ns = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)

    from jaxlm.config import ConfigError, load_config

    path, overrides = DEFAULT_CONFIG, ns.args
    if ns.args and ns.args[0].endswith((".yaml", ".yml")):
        path, overrides = ns.args[0], ns.args[1:]
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(run(cfg, steps=ns.steps, repeats=ns.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    from jaxlm.utils.hugepages import reexec_with_hugepages

    reexec_with_hugepages()  # as bench/throughput.py: the step measured the way jaxlm-train runs
    sys.exit(main())
