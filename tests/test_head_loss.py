"""The fused, chunked head + cross-entropy (jaxlm/ops/head_loss.py): the same loss and gradients
as the full logits, an independent float64 reference, and the memory it saves (XLA's own
analysis of the compiled gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import load_config
from jaxlm.ops.head_loss import _sweep, auto_chunk, head_logits, head_loss, head_nll
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
    assert auto_chunk(0, 8, 2048, 256_000) == 0  # not fused: the whole logits
    assert auto_chunk(-1, 8, 256, 257) == 256  # small logits: one chunk, the whole sequence
    c = auto_chunk(-1, 8, 2048, 128_000)  # 8 GiB of logits per device: chunked
    assert 0 < c < 2048 and 2048 % c == 0 and 8 * c * 128_000 * 4 <= 32 << 20
    assert auto_chunk(-1, 64, 2048, 1 << 20) == 1  # even one position exceeds 32 MiB: 1
    assert auto_chunk(100, 8, 256, 10) == 64  # rounded down to a divisor of T
    assert auto_chunk(512, 8, 256, 10) == 256  # a chunk >= T is the whole sequence


def _weights(y, z_loss=1e-2, seed=1):
    mask = (jax.random.uniform(jax.random.key(seed), y.shape) > 0.3).astype(jnp.float32)
    denom = mask.sum()
    return mask, mask / denom, z_loss * mask / denom


@pytest.mark.parametrize("chunk", [0, 8, 32])
def test_head_loss_against_float64_closed_form(chunk):
    """Loss, nll and both gradients of the forward-pass-gradient head against numpy float64:
    ∂z = (a + 2·b·lse)·softmax(z) − a·onehot(y), ∂x = ∂z Wᵀ, ∂W = xᵀ ∂z."""
    x, w, y = _data(t=64)
    mask, a, b = _weights(y)
    (loss, nll), (gx, gw) = jax.value_and_grad(
        lambda x, w: head_loss(x, w, y, a, b, chunk), argnums=(0, 1), has_aux=True)(x, w)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    a64, b64, yy = np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(y)
    z = x64 @ w64  # [B, T, V]
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    nll_ref = lse - np.take_along_axis(z, yy[..., None], -1)[..., 0]
    p = np.exp(z - lse[..., None])
    dz = (a64 + 2 * b64 * lse)[..., None] * p - a64[..., None] * (yy[..., None] == np.arange(z.shape[-1]))
    np.testing.assert_allclose(loss, (a64 * nll_ref + b64 * lse**2).sum(), rtol=2e-6)
    np.testing.assert_allclose(nll, nll_ref, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(gx, dz @ w64.T, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gw, np.einsum("btd,btv->dv", x64, dz), rtol=1e-5, atol=1e-7)


def test_head_loss_equals_autodiff_of_token_nll():
    """The same numbers as plain autodiff of the unfused loss (to 1e-6), scaled cotangent included."""
    x, w, y = _data(t=64)
    mask, a, b = _weights(y)

    def unfused(x, w):
        nll, lse = token_nll(head_logits(x, w), y)
        return 3.0 * ((nll * mask).sum() + 1e-2 * (jnp.square(lse) * mask).sum()) / mask.sum()

    fused = lambda x, w: 3.0 * head_loss(x, w, y, a, b, 16)[0]  # noqa: E731
    v0, g0 = jax.value_and_grad(unfused, argnums=(0, 1))(x, w)
    v1, g1 = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for g_fused, g_ref in zip(g1, g0):
        np.testing.assert_allclose(g_fused, g_ref, rtol=1e-5, atol=1e-7)


def test_head_loss_chunks_cost_no_recomputation():
    """The gradient program holds exactly the three head matmuls (z = xW, ∂x = ∂zWᵀ, ∂W = xᵀ∂z),
    chunked or not, where the checkpointed chunks of head_nll recompute z (four); and XLA's memory
    analysis puts the chunked temporaries at a fraction of the whole logits'."""
    x, w, y = _data(b=2, t=512, d=64, v=32_000)
    _, a, b = _weights(y)

    def dots(fn):  # dots of the compiled gradient (this platform's branch), loop bodies once
        hlo = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(x, w).compile().as_text()
        return hlo.count(" dot(")

    def temp(fn):
        return jax.jit(jax.grad(fn, argnums=(0, 1))).lower(x, w).compile() \
            .memory_analysis().temp_size_in_bytes

    full = lambda x, w: head_loss(x, w, y, a, b, 0)[0]  # noqa: E731
    chunked = lambda x, w: head_loss(x, w, y, a, b, 32)[0]  # noqa: E731
    assert dots(full) == 3
    assert dots(chunked) == 6  # chunk 0 (peeled: it starts ∂W) and the scan body: 3 per chunk
    assert dots(_loss(32, y)) == 4  # the recomputing form this replaced in the train step
    assert temp(chunked) < 0.25 * temp(full), (temp(chunked), temp(full))


def test_no_vocab_sized_gradient_pass():
    """∂z = r·e − a·onehot(y) is never written: its row scale r goes onto the [B·C, D] operands
    and the one-hot part is a gather/scatter of B·T columns, so the only elementwise work on
    [.., V] arrays in the gradient is the softmax's own (z − m, exp); no one-hot compare, select
    or scaling of a [.., V] array (the form before wrote ∂z with all three)."""
    x, w, y = _data(b=2, t=64, d=16, v=1000)
    _, a, b = _weights(y)
    allowed = {"sub", "exp", "broadcast_in_dim", "reshape", "convert_element_type", "dot_general",
               "reduce_max", "reduce_sum", "squeeze", "expand_dims", "gather", "scatter-add",
               "scatter_add", "transpose", "copy", "pjit", "scan", "custom_vjp_call",
               "custom_vjp_call_jaxpr", "dynamic_slice", "slice", "concatenate"}

    def vocab_ops(jaxpr, out):  # primitives with a [tokens.., V] output (not ∂W's [D, V] ones)
        for eqn in jaxpr.eqns:
            shapes = [getattr(v.aval, "shape", ()) for v in eqn.outvars]
            if any(s[-1:] == (1000,) and s != w.shape for s in shapes):
                out.add(eqn.primitive.name)
            for p in eqn.params.values():
                for j in (p if isinstance(p, (list, tuple)) else [p]):
                    inner = getattr(j, "jaxpr", None)
                    if inner is not None and hasattr(inner, "eqns"):
                        vocab_ops(inner, out)
        return out

    for chunk in (0, 16):  # the CPU form (other platforms write ∂z: test below)
        fn = lambda x, w: _sweep(x, w, y, a, b, chunk, grads=True)[2]  # noqa: E731
        ops = vocab_ops(jax.make_jaxpr(fn)(x, w).jaxpr, set())
        assert "exp" in ops and "dot_general" in ops, ops  # the walk reaches the chunk body
        assert not ops - allowed, ops - allowed


@pytest.mark.parametrize("chunk", [0, 16])
def test_dense_onehot_form_equals_the_cpu_form(chunk):
    """The accelerators' form (∂z written per chunk, one-hot by iota compare) and the CPU form
    (scaled e, one-hot by gather/scatter) give the same loss and gradients."""
    x, w, y = _data(b=2, t=64, d=16, v=300)
    _, a, b = _weights(y)
    loss0, nll0, (dx0, dw0) = _sweep(x, w, y, a, b, chunk, True, dense_onehot=False)
    loss1, nll1, (dx1, dw1) = _sweep(x, w, y, a, b, chunk, True, dense_onehot=True)
    np.testing.assert_array_equal(nll0, nll1)
    np.testing.assert_allclose(loss0, loss1, rtol=1e-6)
    np.testing.assert_allclose(dx0, dx1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw0, dw1, rtol=1e-5, atol=1e-7)


def test_weight_gradient_product_contracts_the_lhs_last_dim():
    """XLA:CPU sends a dot to its fast matmul library (YNNPACK) only when the lhs contracts its
    last dim; ∂W = Σ x_cᵀ∂z_c written as ``x_c.T @ dz`` compiles to a dot contracting the lhs's
    dim 0 (Eigen, ~20% slower here). head_loss lays x out as [N, D, B·C] behind an optimization
    barrier, so no compiled dot of the gradient contracts a lhs's leading dim -- chunked or not."""
    import re

    x, w, y = _data(b=2, t=64, d=32, v=512)
    _, a, b = _weights(y)
    for chunk in (0, 16):
        hlo = jax.jit(jax.grad(lambda x, w: head_loss(x, w, y, a, b, chunk)[0], argnums=(0, 1))) \
            .lower(x, w).compile().as_text()
        dots = re.findall(r"= f32\[[\d,]*\]\{[\d,]*\} dot\([^\n]*", hlo)
        assert len(dots) >= 3, hlo  # z, ∂x, ∂W (fused computations' dots included)
        assert not [d for d in dots if "lhs_contracting_dims={0}" in d], dots


def test_train_step_with_chunks_matches_full_head():
    """The whole train step, fused in chunks (model.head_chunk=16) vs the unfused reading form
    (0: whole logits, autodiff): same loss, same updated params."""
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


def test_loss_fn_gradients_equal_autodiff_of_the_model_head():
    """The train step's loss (forward-pass head gradients, z-loss, a loss mask) against plain
    autodiff of model.head -> masked_loss, for every parameter of the model."""
    from jaxlm.ops.losses import masked_loss
    from jaxlm.optim import build_optimizer
    from jaxlm.sharding import make_mesh
    from jaxlm.train.state import StateSpec
    from jaxlm.train.step import loss_fn

    cfg = load_config("tiny", ["model.head_chunk=16", "model.vocab_size=257"])
    spec = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
    params = spec.init()["params"]
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 257, (8, 65)).astype(np.int32)
    mask = (rng.random((8, 64)) > 0.2).astype(np.float32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
             "positions": np.broadcast_to(np.arange(64, dtype=np.int32), (8, 64)).copy(),
             "segment_ids": np.ones((8, 64), np.int32)}

    def reference(p):
        model = spec.model(p)
        x, _ = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
        return masked_loss(model.head(x), batch["targets"], mask, z_loss=1e-3)[0]

    ours = lambda p: loss_fn(spec, p, batch, jnp.asarray(mask.sum()), 1e-3)[0]  # noqa: E731
    v0, g0 = jax.jit(jax.value_and_grad(reference))(params)
    v1, g1 = jax.jit(jax.value_and_grad(ours))(params)
    assert float(v1) == pytest.approx(float(v0), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g1, g0)
