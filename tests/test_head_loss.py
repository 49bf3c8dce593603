"""The fused, chunked head + cross-entropy (jaxlm/ops/head_loss.py): the same loss and gradients
as the full logits, an independent float64 reference, and the memory it saves (XLA's own
analysis of the compiled gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import load_config
from jaxlm.ops.head_loss import auto_chunk, head_logits, head_nll
from jaxlm.ops.losses import token_nll


def _data(b=2, t=64, d=16, v=300, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (b, t, d))
    w = jax.random.normal(k[1], (d, v)) * 0.3
    y = jax.random.randint(k[2], (b, t), 0, v)
    return x, w, y


def _loss(chunk, y):
    def f(x, w):
        nll, lse = head_nll(x, w, y, chunk)
        return nll.sum() + 1e-3 * jnp.square(lse).sum()  # both outputs carry a gradient
    return f


@pytest.mark.parametrize("chunk", [8, 16, 32])
def test_chunked_equals_full_logits_values_and_gradients(chunk):
    x, w, y = _data()
    nll_full, lse_full = token_nll(head_logits(x, w), y)
    nll, lse = head_nll(x, w, y, chunk)
    np.testing.assert_allclose(nll, nll_full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lse, lse_full, rtol=1e-6, atol=1e-6)
    v0, (gx0, gw0) = jax.value_and_grad(_loss(0, y), argnums=(0, 1))(x, w)
    v1, (gx1, gw1) = jax.value_and_grad(_loss(chunk, y), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_allclose(gx1, gx0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw1, gw0, rtol=1e-5, atol=1e-5)


def test_against_float64_numpy():
    x, w, y = (np.asarray(a) for a in _data(b=1, t=12, d=8, v=50, seed=3))
    z = x[0].astype(np.float64) @ w.astype(np.float64)  # [T, V]
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    nll_ref = lse - z[np.arange(12), y[0]]
    nll, _ = head_nll(jnp.asarray(x), jnp.asarray(w), jnp.asarray(y), chunk=4)
    np.testing.assert_allclose(np.asarray(nll)[0], nll_ref, rtol=2e-6, atol=2e-6)


def test_chunking_cuts_the_compiled_temporaries():
    """XLA's memory analysis of the compiled gradient at vocab 32k: chunks of 32 of 512 positions
    need well under a quarter of the temporaries of the full [B, T, V] logits."""
    x, w, y = _data(b=2, t=512, d=64, v=32_000)

    def temp(chunk):
        fn = jax.jit(jax.grad(_loss(chunk, y), argnums=(0, 1)))
        return fn.lower(x, w).compile().memory_analysis().temp_size_in_bytes

    full, chunked = temp(0), temp(32)
    logits_bytes = 2 * 512 * 32_000 * 4
    assert full >= logits_bytes  # the full path holds at least one [B, T, V] float32 array
    assert chunked < 0.25 * full, (chunked, full)


def test_auto_chunk_rule():
    assert auto_chunk(0, 8, 2048, 256_000) == 0  # off
    assert auto_chunk(-1, 8, 256, 257) == 0  # small logits: no chunking (nothing changes)
    c = auto_chunk(-1, 8, 2048, 128_000)  # 8 GiB of logits per device: chunked
    assert 0 < c < 2048 and 2048 % c == 0 and 8 * c * 128_000 * 4 <= 64 << 20
    assert auto_chunk(100, 8, 256, 10) == 64  # rounded down to a divisor of T
    assert auto_chunk(512, 8, 256, 10) == 0  # a chunk >= T is no chunking


def test_train_step_with_chunks_matches_full_head():
    """The whole train step (model.head_chunk=16 vs 0): same loss, same updated params."""
    from jaxlm.optim import build_optimizer
    from jaxlm.sharding import make_mesh
    from jaxlm.train.state import StateSpec
    from jaxlm.train.step import make_train_step

    out = {}
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 257, (8, 65)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "positions": np.broadcast_to(np.arange(64, dtype=np.int32), (8, 64)).copy(),
             "segment_ids": np.ones((8, 64), np.int32), "loss_mask": np.ones((8, 64), np.float32),
             "target_bytes": np.ones((8, 64), np.int32)}
    for chunk in (0, 16):
        cfg = load_config("tiny", [f"model.head_chunk={chunk}", "model.vocab_size=257"])
        spec = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
        state, metrics = make_train_step(spec)(spec.init(), batch)
        out[chunk] = (float(metrics["loss"]), jax.device_get(state["params"]))
    assert out[16][0] == pytest.approx(out[0][0], rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 out[0][1], out[16][1])
