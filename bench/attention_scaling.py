"""Forward+backward time per token: softmax vs the linear-attention family, T = 512 … 8192.

Tokens per call are held constant (B·T = ``--tokens``), so a constant per-token time means a
constant speed at any length (Lightning Attention-2's headline, arXiv 2401.04658 §4). Measured in
one run, each case jitted once (compile excluded), best of ``--reps`` timed calls of
``grad(sum(o · w))`` w.r.t. q, k, v. Variants (all [B, T, H, D] inputs, float32):

    softmax         jaxlm.ops.attention (reference einsum; causal)
    softmax_fused   jax.nn.dot_product_attention (XLA on CPU; cuDNN flash attention on GPU)
    linear          linear_attention, no decay (vanilla / elu+1 variants)
    lightning       linear_attention, per-head decay [H] (TNL / RetNet)
    simple_gla      linear_attention, data-dependent decay [B, T, H]

The last two lines are ``lightning_flatness=<per_token(T=8192) / per_token(T=512)>`` and
``lightning_speedup_vs_softmax_8192=<softmax / lightning time at T=8192>``.

Example::

    python bench/attention_scaling.py                       # CPU: ~2 min
    python bench/attention_scaling.py --lengths 512 2048 8192 32768 --tokens 32768   # accelerator
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.model.linear import alibi_slopes
from jaxlm.ops import attention, linear_attention


def make_fn(name: str, chunk: int):
    def attend(q, k, v, g):
        if name == "softmax":
            return attention(q, k, v)
        if name == "softmax_fused":
            return attention(q, k, v, impl="fused")
        decay = {"linear": None, "lightning": g[0, 0], "simple_gla": g}[name]  # [H] or [B,T,H]
        return linear_attention(q, k, v, decay, chunk_size=chunk)

    def loss(q, k, v, g, w):
        return jnp.sum(attend(q, k, v, g) * w)  # o [B, T, H, D] · w

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def time_case(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--tokens", type=int, default=8192, help="B·T per call")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variants", nargs="+",
                   default=["softmax", "softmax_fused", "linear", "lightning", "simple_gla"])
    a = p.parse_args(argv)
    h, d = a.heads, a.head_dim
    print(f"device={jax.devices()[0].device_kind} tokens/call={a.tokens} H={h} D={d} "
          f"chunk={a.chunk} float32, fwd+bwd, best of {a.reps}")
    print(f"{'T':>6} {'B':>3} " + " ".join(f"{v:>14}" for v in a.variants) + "   (µs/token)")
    per_token = {}
    for t in a.lengths:
        b = max(a.tokens // t, 1)
        r = np.random.default_rng(0)
        q, k, v, w = (jnp.asarray(r.normal(size=(b, t, h, d)) * 0.3, jnp.float32) for _ in range(4))
        log_g = np.log(r.uniform(0.9, 1.0, size=(b, t, h)))
        log_g[0, 0] = -alibi_slopes(h)  # lightning uses g[0, 0] = per-head TNL slopes (layer 0)
        g = jnp.asarray(log_g, jnp.float32)
        row = []
        for name in a.variants:
            sec = time_case(make_fn(name, a.chunk), (q, k, v, g, w), a.reps)
            per_token[name, t] = sec / (b * t)
            row.append(f"{per_token[name, t] * 1e6:14.3f}")
        print(f"{t:>6} {b:>3} " + " ".join(row), flush=True)
    lo, hi = min(a.lengths), max(a.lengths)
    print(f"lightning_flatness={per_token['lightning', hi] / per_token['lightning', lo]:.3f}")
    print(f"lightning_speedup_vs_softmax_{hi}="
          f"{per_token['softmax', hi] / per_token['lightning', hi]:.2f}")


if __name__ == "__main__":
    main()
