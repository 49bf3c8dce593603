"""model.attn_impl: every kernel against the reference (values and gradients, GQA, segment ids),
the auto-resolution table, the one-line errors, and the cuDNN argument construction (no GPU here).

Splash runs in Pallas interpret mode on CPU (the same kernel code the TPU compiles); it needs
sequences that are multiples of 128, so its tests use T = 128.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from jaxlm.errors import ConfigError
from jaxlm.ops import attention_kernels as K
from jaxlm.ops.attention import attention


def qkv(seed, b, t, h, kv, d, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, t, h, d), dtype),
            jax.random.normal(ks[1], (b, t, kv, d), dtype),
            jax.random.normal(ks[2], (b, t, kv, d), dtype))


def segments(b, t):
    """Rows of several documents of uneven lengths, one all-padding (0) row."""
    rows = [np.repeat([1, 2, 3], [t // 3, t // 2, t - t // 3 - t // 2]),
            np.repeat([4, 5], [t - 7, 7]), np.zeros(t, int), np.ones(t, int)]
    return jnp.asarray(np.stack([rows[i % 4] for i in range(b)]), jnp.int32)


def value_and_grads(impl, q, k, v, seg):
    """Output and d/d(q, k, v) of a weighted sum of squares (so every output element matters)."""
    w = jnp.arange(q.shape[-1], dtype=jnp.float32) / q.shape[-1]
    f = jax.jit(lambda q, k, v: attention(q, k, v, seg, impl=impl))
    loss = jax.jit(jax.grad(lambda q, k, v: ((f(q, k, v) ** 2) * w).sum(), argnums=(0, 1, 2)))
    return f(q, k, v), loss(q, k, v)


def assert_close_to_reference(impl, q, k, v, seg, tol):
    out, grads = value_and_grads(impl, q, k, v, seg)
    ref, ref_grads = value_and_grads("reference", q, k, v, seg)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    for got, want in zip((out,) + grads, (ref,) + ref_grads):
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=tol * scale, rtol=0)


@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("with_segments", [False, True])
def test_xla_matches_reference_values_and_grads(kv, with_segments):
    q, k, v = qkv(0, 4, 16, 4, kv, 8)
    assert_close_to_reference("xla", q, k, v, segments(4, 16) if with_segments else None, 1e-5)


def test_fused_is_an_alias_of_xla():
    q, k, v = qkv(1, 2, 8, 4, 2, 8)
    np.testing.assert_array_equal(np.asarray(attention(q, k, v, impl="fused")),
                                  np.asarray(attention(q, k, v, impl="xla")))


@pytest.mark.parametrize("kv,with_segments", [(2, True), (4, False)])
def test_splash_interpret_matches_reference(kv, with_segments):
    """GQA (2 query heads per KV head) with documents, and plain MHA, at T = 128."""
    q, k, v = qkv(2, 4, 128, 4, kv, 16)
    assert_close_to_reference("splash", q, k, v, segments(4, 128) if with_segments else None,
                              2e-5)


def test_splash_under_a_mesh_runs_in_shard_map_and_matches():
    """data=2 x fsdp=2 x tensor=2: batch over (data, fsdp), the 4 heads / 2 KV heads over
    tensor; values and gradients equal the reference's."""
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    q, k, v = qkv(3, 4, 128, 4, 2, 16)
    seg = segments(4, 128)
    with jax.set_mesh(mesh):
        text = jax.jit(lambda q, k, v: attention(q, k, v, seg, impl="splash")).lower(
            q, k, v).as_text()
        assert "manual_computation" in text or "SPMDFullToShardShape" in text  # shard_map
        assert_close_to_reference("splash", q, k, v, seg, 2e-5)


def test_splash_refuses_lengths_it_cannot_block():
    q, k, v = qkv(4, 1, 100, 2, 2, 8)
    with pytest.raises(ConfigError, match=r"multiple of 128 \(got 100\).*data.seq_len") as e:
        attention(q, k, v, impl="splash")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- resolution

F32, BF16 = jnp.float32, jnp.bfloat16


@pytest.mark.parametrize("impl,platform,kw,want", [
    ("auto", "cpu", {}, K.CPU_AUTO),
    ("auto", "gpu", {"dtype": BF16}, "cudnn"),
    ("auto", "gpu", {"dtype": F32}, "xla"),  # cuDNN flash takes bf16/fp16 only
    ("auto", "gpu", {"dtype": BF16, "head_dim": 256}, "xla"),  # > 128 before Hopper
    ("auto", "gpu", {"dtype": BF16, "head_dim": 256, "device_kind": "NVIDIA H100 80GB HBM3"},
     "cudnn"),
    ("auto", "gpu", {"dtype": BF16, "head_dim": 60}, "xla"),  # not a multiple of 8
    ("auto", "rocm", {"dtype": BF16}, "xla"),
    ("auto", "tpu", {"seq_len": 1024}, "splash"),
    ("auto", "tpu", {"seq_len": 1000}, "xla"),  # splash blocks are multiples of 128
    ("auto", "tpu", {"dropout": True}, "reference"),
    ("auto", "gpu", {"dtype": BF16, "dropout": True}, "reference"),
    ("reference", "tpu", {}, "reference"),
    ("xla", "gpu", {}, "xla"),
    ("fused", "cpu", {}, "xla"),
    ("cudnn", "gpu", {"dtype": BF16}, "cudnn"),
    ("splash", "tpu", {"seq_len": 256}, "splash"),
    ("splash", "cpu", {"seq_len": 256}, "splash"),  # Pallas interpret mode
])
def test_resolution_table(impl, platform, kw, want):
    got, reason = K.resolve_attn_impl(impl, platform, **kw)
    assert got == want and reason and "\n" not in reason


@pytest.mark.parametrize("impl,platform,kw,match", [
    ("cudnn", "cpu", {}, "cudnn needs an NVIDIA GPU but the program is compiled for cpu"),
    ("cudnn", "tpu", {}, "compiled for tpu; use model.attn_impl=auto"),
    ("cudnn", "gpu", {"dtype": F32}, "float32 inputs .*model.dtype=bfloat16"),
    ("cudnn", "gpu", {"dtype": BF16, "head_dim": 512}, "head dim 512"),
    ("splash", "gpu", {}, "splash is a TPU kernel .* cannot run on gpu"),
    ("splash", "tpu", {"seq_len": 96}, "multiple of 128 \\(got 96\\)"),
    ("xla", "cpu", {"dropout": True}, "model.dropout .*attn_impl=xla"),
    ("flash", "cpu", {}, "model.attn_impl=flash is unknown"),
])
def test_impossible_choices_are_one_line_errors(impl, platform, kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        K.resolve_attn_impl(impl, platform, **kw)
    assert "\n" not in str(e.value)


def test_platform_comes_from_the_active_mesh_and_the_choice_is_logged_once(caplog):
    assert K.compile_platform()[0] == "cpu"
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    seen = []

    def f(q, k, v):
        seen.append(K.compile_platform()[0])
        return attention(q, k, v, impl="auto")

    K._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="jaxlm"), jax.set_mesh(mesh):
        jax.jit(f)(*qkv(5, 8, 8, 2, 2, 8))
        jax.jit(f)(*qkv(5, 8, 16, 2, 2, 8))  # a second trace (new shape): no second line
    assert seen == ["cpu", "cpu"]
    lines = [r.getMessage() for r in caplog.records if "attn_impl=auto" in r.getMessage()]
    assert lines == [f"attention: model.attn_impl=auto -> {K.CPU_AUTO} (CPU: {K.CPU_AUTO} "
                     "(no faster kernel measured on CPU; see CPU_AUTO))"]


def test_auto_under_training_dropout_is_the_reference_with_the_same_mask():
    q, k, v = qkv(6, 2, 8, 4, 2, 8)
    key = jax.random.key(7)
    auto = attention(q, k, v, impl="auto", dropout_rate=0.3, dropout_key=key)
    ref = attention(q, k, v, impl="reference", dropout_rate=0.3, dropout_key=key)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(ref))
    assert not np.allclose(np.asarray(auto), np.asarray(attention(q, k, v, impl="auto")))
    with pytest.raises(ConfigError, match="attn_impl=auto"):
        attention(q, k, v, impl="xla", dropout_rate=0.3, dropout_key=key)


# ----------------------------------------------------------------------------- cuDNN arguments

def test_cudnn_kwargs_causal_gqa_without_segments():
    kw = K.cudnn_kwargs(None)
    assert kw == {"implementation": "cudnn", "is_causal": True, "mask": None}


def test_cudnn_kwargs_segments_become_a_head_broadcast_mask_with_the_reference_meaning():
    seg = segments(4, 12)
    kw = K.cudnn_kwargs(seg)
    mask = np.asarray(kw["mask"])
    assert kw["implementation"] == "cudnn" and kw["is_causal"] is True
    assert mask.shape == (4, 1, 12, 12) and mask.dtype == bool  # [B, 1(heads), T, S]
    s = np.asarray(seg)
    np.testing.assert_array_equal(mask[:, 0], s[:, :, None] == s[:, None, :])
    # the same arguments with the XLA backend (runs here) give the reference result, GQA k/v
    # passed as they are (H=4 query heads over KV=2)
    q, k, v = qkv(8, 4, 12, 4, 2, 8)
    got = jax.nn.dot_product_attention(q, k, v, **{**kw, "implementation": "xla"})
    np.testing.assert_allclose(np.asarray(got), np.asarray(attention(q, k, v, seg)), atol=1e-5)


def test_cudnn_on_this_cpu_is_a_one_line_error():
    q, k, v = qkv(9, 1, 8, 2, 2, 8, jnp.bfloat16)
    with pytest.raises(ConfigError, match="cudnn needs an NVIDIA GPU") as e:
        attention(q, k, v, impl="cudnn")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- the layer

def test_softmax_layer_auto_and_xla_equal_reference():
    from flax import nnx

    from jaxlm.config import load_config
    from jaxlm.model.layers import SoftmaxAttention

    out = {}
    for impl in ("auto", "xla", "reference"):
        cfg = load_config("tiny", [f"model.attn_impl={impl}"]).model
        layer = SoftmaxAttention(cfg, rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(1), (2, 16, cfg.d_model))
        pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
        out[impl] = np.asarray(layer(x, pos, segments(2, 16))[0])
    np.testing.assert_allclose(out["auto"], out["reference"], atol=1e-5)
    np.testing.assert_allclose(out["xla"], out["reference"], atol=1e-5)


# ----------------------------------------------------------------------------- reference backward


def numpy_attention_grads(q, k, v, seg, r):
    """d/d(q, k, v) of Σ r ⊙ attention(q, k, v) in float64 loops, from the softmax Jacobian
    ∂p_s/∂s_u = p_s (δ_su − p_u) (not the rowsum(∂O ⊙ O) form the implementation uses)."""
    q, k, v, r = (np.asarray(a, np.float64) for a in (q, k, v, r))
    b_, t_, h_, d_ = q.shape
    g_ = h_ // k.shape[2]
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for b in range(b_):
        for h in range(h_):
            kh = h // g_
            for t in range(t_):
                keys = [s for s in range(t + 1) if seg is None or seg[b, s] == seg[b, t]]
                sc = np.array([q[b, t, h] @ k[b, s, kh] for s in keys]) / np.sqrt(d_)
                p = np.exp(sc - sc.max())
                p /= p.sum()
                dp = np.array([r[b, t, h] @ v[b, s, kh] for s in keys])  # ∂L/∂p_s
                ds = p * (dp - p @ dp) / np.sqrt(d_)  # Jacobian of the softmax, then 1/√D
                for j, s in enumerate(keys):
                    dq[b, t, h] += ds[j] * k[b, s, kh]
                    dk[b, s, kh] += ds[j] * q[b, t, h]
                    dv[b, s, kh] += p[j] * r[b, t, h]
    return dq, dk, dv


@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("with_segments", [False, True])
@pytest.mark.parametrize("blocks", [None, 1, 3])
def test_reference_backward_matches_float64_loops(kv, with_segments, blocks):
    """impl=reference's written-out backward (ops.attention.attention_fast_grad; None: through
    ``attention``, 1 or 3 causal query blocks called directly) against the softmax Jacobian in
    float64 loops, with GQA and document masks; bf16 inputs give bf16 gradients close to the
    float32 ones."""
    from jaxlm.ops.attention import attention_fast_grad, attention_reference, make_mask

    q, k, v = qkv(11, 3, 12, 4, kv, 8)
    seg = segments(3, 12) if with_segments else None
    r = jax.random.normal(jax.random.key(12), q.shape)
    pos = jnp.broadcast_to(jnp.arange(12), (3, 12))
    mask = make_mask(pos, pos, seg, seg)
    fn = ((lambda q, k, v: attention(q, k, v, seg, impl="reference")) if blocks is None else
          (lambda q, k, v: attention_fast_grad(q, k, v, mask, blocks)))
    np.testing.assert_allclose(jax.jit(fn)(q, k, v), attention_reference(q, k, v, mask), atol=1e-6)
    grad = jax.jit(jax.grad(lambda q, k, v: (fn(q, k, v) * r).sum(), argnums=(0, 1, 2)))
    want = numpy_attention_grads(q, k, v, None if seg is None else np.asarray(seg), r)
    for got, ref in zip(grad(q, k, v), want):
        np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5, rtol=1e-5)
    got16 = grad(*(a.astype(jnp.bfloat16) for a in (q, k, v)))
    for g16, ref in zip(got16, want):
        assert g16.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g16, np.float32), ref, atol=0.1, rtol=0.1)


def test_reference_backward_copies_no_score_sized_array():
    """The compiled gradient (under remat, as in training) of impl=reference moves no [T, S]
    array through a copy or transpose: only the narrow [T, D] operands are transposed.
    Autodiff of the plain einsums (attention_reference) does (the test can fail)."""
    import re

    from jaxlm.ops.attention import attention_fast_grad, attention_reference, make_mask

    b, t = 4, 256
    q, k, v = qkv(0, b, t, 4, 4, 64)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = make_mask(pos, pos)
    for fn, moves in ((attention_fast_grad, False), (attention_reference, True)):
        f = jax.checkpoint(lambda q, k, v, fn=fn: (fn(q, k, v, mask) ** 2).sum())
        hlo = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
        big = re.findall(rf"%((?:copy|transpose)[\w.\-]*) = f32\[[\d,]*{t},{t}\]", hlo)
        assert bool(big) == moves, big
