"""bench/matmul_bound.py's census of a step's products: scan bodies count once per iteration, and
of a ``platform_dependent`` choice (ops.layers.matmul's weight gradient) only this backend's
branch counts. (Timing the products is the benchmark's job, not a test's.)"""

import os
import sys

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from matmul_bound import step_dots  # noqa: E402

from jaxlm.ops.layers import matmul  # noqa: E402


def test_scan_bodies_count_per_iteration_and_one_platform_branch():
    x, ws = jnp.ones((16, 8)), jnp.ones((3, 8, 8))

    def loss(x, ws):
        y, _ = jax.lax.scan(lambda h, w: (jnp.tanh(matmul(h, w)), None), x, ws)  # 3 layers
        return y.sum()

    dots = step_dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, ws).jaxpr)
    # per layer: forward x·w, backward ∂y·wᵀ and one weight-gradient product (CPU branch only)
    assert sum(dots.values()) == 9, dots
    # the CPU branch's ∂w = (xᵀ)[8, 16]·∂y[16, 8] contracts the lhs's last dim
    assert dots[((8, 16), (16, 8), (((1,), (0,)), ((), ())), "float32", "float32")] == 3, dots
