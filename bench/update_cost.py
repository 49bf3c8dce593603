"""What the optimizer update costs on the MaxText-comparison config, apart from the gradients.

Times, alternated in one process (donated state, like the train step), the clip → AdamW →
non-finite-guard update of the bench config's 20.6M parameters in four forms:

  select_optax  the guard as a ``jnp.where`` per leaf, optax's clip (the step before #18's
                seventh session)
  cond_optax    the guard as a ``lax.cond`` (jaxlm.train.step on CPU), optax's clip
  cond_jaxlm    the cond with jaxlm's clip (one scalar factor, jaxlm.optim.build) -- the step now
  one_pass      the memory floor: p, m, v updated in one hand-written elementwise pass per leaf
                (not AdamW's exact schedule; only its memory traffic matters here)

and prints the median ms of each and ``update_vs_one_pass=`` (cond_jaxlm / one_pass).

    python bench/update_cost.py [--iters 30] [key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.config import load_config
from jaxlm.optim.build import build_adamw
from jaxlm.sharding import make_mesh
from jaxlm.train.state import StateSpec, split_buffers
from jaxlm.train.step import _update_cond, _update_select


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/bench_tiny_llama.yaml")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    o = cfg.optim

    tx_jaxlm = build_adamw(cfg)  # jaxlm's clip, then AdamW
    no_clip = dataclasses.replace(cfg, optim=dataclasses.replace(o, grad_clip=0.0))
    tx_optax = optax.chain(optax.clip_by_global_norm(o.grad_clip), build_adamw(no_clip))
    spec = StateSpec.build(cfg, make_mesh(cfg.mesh), tx_jaxlm)
    params, _ = split_buffers(spec.init()["params"])
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

    def guarded(form, tx):
        def f(p, s, g):
            finite = jnp.isfinite(optax.tree.norm(g))
            return form(tx, finite, p, g, s)
        return jax.jit(f, donate_argnums=(0, 1))

    def one_pass(p, s, g):
        norm = optax.tree.norm(g)
        finite, scale = jnp.isfinite(norm), jnp.minimum(1.0, o.grad_clip / norm)

        def leaf(p, g, m, v):
            g = g * scale
            m = jnp.where(finite, o.b1 * m + (1 - o.b1) * g, m)
            v = jnp.where(finite, o.b2 * v + (1 - o.b2) * g * g, v)
            new = p - 1e-3 * (m / (jnp.sqrt(v) + o.eps) + o.weight_decay * p)
            return jnp.where(finite, new, p), m, v

        out = jax.tree.map(leaf, p, g, *s)  # a tree of (p, m, v) tuples

        def pick(i):
            return jax.tree.map(lambda t: t[i], out, is_leaf=lambda t: isinstance(t, tuple))

        return pick(0), (pick(1), pick(2))

    forms = {"select_optax": (guarded(_update_select, tx_optax), tx_optax.init),
             "cond_optax": (guarded(_update_cond, tx_optax), tx_optax.init),
             "cond_jaxlm": (guarded(_update_cond, tx_jaxlm), tx_jaxlm.init),
             "one_pass": (jax.jit(one_pass, donate_argnums=(0, 1)),
                          lambda p: tuple(jax.tree.map(jnp.zeros_like, p) for _ in range(2)))}
    state = {k: (jax.tree.map(jnp.copy, params), init(params)) for k, (_, init) in forms.items()}
    times = {k: [] for k in forms}
    for i in range(a.iters + 3):
        for k, (fn, _) in forms.items():
            t0 = time.perf_counter()
            state[k] = fn(*state[k], grads)
            jax.block_until_ready(state[k])
            if i >= 3:
                times[k].append(time.perf_counter() - t0)
    med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:14s} {v:7.1f} ms (median of {a.iters})")
    print(f"update_vs_one_pass={med['cond_jaxlm'] / med['one_pass']:.2f}")
    return med


if __name__ == "__main__":
    main()
