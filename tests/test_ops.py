"""jaxlm.ops against independent float64 numpy references, written from the math (not the jax code).

Covers attention (reference + fused, GQA, document masking, causality, packing, decode mask, bf16),
RoPE (complex-rotation reference, relative-position property), RMSNorm, SwiGLU, cross-entropy with
mask and z-loss, and bits-per-byte.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops import (apply_rope, attention, attention_reference, bits_per_byte, make_mask,
                       masked_loss, rms_norm, rope_angles, swiglu, token_nll)

ATOL = 1e-5


# ----------------------------------------------------------------------------- numpy references

def ref_attention(q, k, v, segment_ids=None):
    """Explicit loops: per (batch, head, query) a softmax over keys s <= t in the same document."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b_, t_, h_, d_ = q.shape
    kv_ = k.shape[2]
    group = h_ // kv_
    out = np.zeros((b_, t_, h_, d_))
    for b in range(b_):
        for h in range(h_):
            kh = h // group  # query head h reads KV head h // (H / KV)
            for t in range(t_):
                keys = [s for s in range(t + 1)
                        if segment_ids is None or segment_ids[b][s] == segment_ids[b][t]]
                scores = np.array([q[b, t, h] @ k[b, s, kh] for s in keys]) / math.sqrt(d_)
                w = np.exp(scores - scores.max())
                w /= w.sum()
                out[b, t, h] = sum(wi * v[b, s, kh] for wi, s in zip(w, keys))
    return out


def ref_rope(x, positions, theta=10000.0):
    """Rotate each pair (x_i, x_{i+D/2}), as the complex number x_i + i·x_{i+D/2}, by p·θ_i."""
    x = np.asarray(x, np.float64)
    positions = np.asarray(positions, np.float64)
    d = x.shape[-1]
    half = d // 2
    theta_i = theta ** (-2.0 * np.arange(half) / d)  # [D/2]
    z = x[..., :half] + 1j * x[..., half:]  # [B, T, H, D/2]
    rot = np.exp(1j * positions[:, :, None, None] * theta_i)  # [B, T, 1, D/2]
    zr = z * rot
    return np.concatenate([zr.real, zr.imag], axis=-1)


def ref_rms_norm(x, g=None, eps=1e-5):
    x = np.asarray(x, np.float64)
    y = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)
    return y if g is None else y * np.asarray(g, np.float64)


def ref_swiglu(x, wg, wu, wd):
    x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
    a = x @ wg
    silu = a / (1.0 + np.exp(-a))
    return (silu * (x @ wu)) @ wd


def ref_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def ref_lse(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1)
    return m + np.log(np.exp(z - m[..., None]).sum(-1))


def rand(seed, shape, dtype=np.float32):
    """numpy inputs (float32 or ml_dtypes bfloat16): no per-shape jax compilation for test data."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def qkv(seed, b, t, h, kv, d, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(s).astype(dtype)
                 for s in ((b, t, h, d), (b, t, kv, d), (b, t, kv, d)))


# Jitted entry points: one compile per shape signature instead of one per eager op. Compile time
# dominates this file on CPU; the cheaper LLVM pipeline roughly halves it (same math, no fast-math).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                    "xla_llvm_disable_expensive_passes": True})
_attn = _jit(attention, static_argnames="impl")
_attn_ref = _jit(attention_reference)
_mask = _jit(make_mask)
_rope = _jit(apply_rope, static_argnames="theta")
_rms = _jit(rms_norm, static_argnames="eps")
_swiglu = _jit(swiglu)
_nll = _jit(token_nll)
_loss = _jit(masked_loss, static_argnames="z_loss")


# Several documents of different lengths per row, incl. the 1,1,2,2,2,3 row.
SEGS = np.array([[1, 1, 2, 2, 2, 3],
                 [0, 0, 0, 0, 1, 1],
                 [5, 7, 7, 7, 7, 7]], np.int32)
B, T, H, D = 3, 6, 4, 8  # shared small shapes (so jitted functions are reused across tests)


# ----------------------------------------------------------------------------- attention

@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("with_segments", [False, True])
def test_attention_reference_matches_numpy(kv, with_segments):
    q, k, v = qkv(0, B, T, H, kv, D)
    seg = SEGS if with_segments else None
    out = _attn(q, k, v, seg, impl="reference")
    assert out.shape == (B, T, H, D) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref_attention(q, k, v, seg), atol=ATOL, rtol=1e-5)


def test_attention_single_token_documents_return_own_value():
    # Every token its own document: softmax over one key -> output is exactly that token's value.
    q, k, v = qkv(1, B, T, H, 2, D)
    seg = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    out = _attn(q, k, v, seg, impl="reference")
    np.testing.assert_allclose(np.asarray(out), np.repeat(np.asarray(v), H // 2, axis=2), atol=1e-6)


@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("with_segments", [False, True])
def test_fused_equals_reference(kv, with_segments):
    q, k, v = qkv(2, B, T, H, kv, D)
    seg = SEGS if with_segments else None
    ref = _attn(q, k, v, seg, impl="reference")
    fused = _attn(q, k, v, seg, impl="fused")
    assert fused.shape == ref.shape and fused.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(fused), np.asarray(ref), atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(fused), ref_attention(q, k, v, seg), atol=ATOL, rtol=1e-5)


def test_unknown_impl_raises():
    q, k, v = qkv(0, 1, 2, 2, 2, 4)
    with pytest.raises(ValueError):
        attention(q, k, v, impl="nope")


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_causality(impl):
    """Row 0 is the base; row j+1 has k/v perturbed at position j only. Outputs < j unchanged."""
    kv = 2
    q, k, v = qkv(3, 1, T, H, kv, D)
    rng = np.random.default_rng(33)
    qs = np.repeat(q, T + 1, axis=0)
    ks = np.repeat(k, T + 1, axis=0)
    vs = np.repeat(v, T + 1, axis=0)
    for j in range(T):
        ks[j + 1, j] += 3.0 * rng.standard_normal((kv, D)).astype(np.float32)
        vs[j + 1, j] += 3.0 * rng.standard_normal((kv, D)).astype(np.float32)
    out = np.asarray(_attn(qs, ks, vs, impl=impl))
    for j in range(T):
        np.testing.assert_allclose(out[j + 1, :j], out[0, :j], atol=1e-6, rtol=0)
        assert not np.allclose(out[j + 1, j], out[0, j])  # position j itself does see it


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_segment_isolation(impl):
    """Row 0 is the base; row n perturbs q/k/v of every token outside document n."""
    kv = 2
    seg_row = SEGS[0]  # docs {0,1}, {2,3,4}, {5}
    docs = [np.flatnonzero(seg_row == s) for s in (1, 2, 3)]
    q, k, v = qkv(4, 1, T, H, kv, D)
    rng = np.random.default_rng(44)
    n = len(docs) + 1
    qs, ks, vs = (np.repeat(a, n, axis=0) for a in (q, k, v))
    for r, idx in enumerate(docs, start=1):
        others = np.setdiff1d(np.arange(T), idx)
        for a in (qs, ks, vs):
            a[r, others] += 5.0 * rng.standard_normal(a[r, others].shape).astype(np.float32)
    seg = np.repeat(seg_row[None], n, axis=0)
    out = np.asarray(_attn(qs, ks, vs, seg, impl=impl))
    for r, idx in enumerate(docs, start=1):
        others = np.setdiff1d(np.arange(T), idx)
        np.testing.assert_allclose(out[r, idx], out[0, idx], atol=1e-6, rtol=0)
        assert not np.allclose(out[r, others], out[0, others])


def _rope_qk(q, k, pos):
    """RoPE q and k in one call (same rotation per head), per-token positions pos [B, T]."""
    h = q.shape[2]
    qk = np.asarray(_rope(np.concatenate([np.asarray(q), np.asarray(k)], axis=2), pos))
    return qk[:, :, :h], qk[:, :, h:]


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_packed_document_equals_document_alone(impl):
    """Docs A (len 3) and B (len 5) packed in one row, positions restarting at 0 and per-document
    RoPE: each document's outputs equal that document processed alone."""
    la, lb, kv = 3, 5, 2
    qa, ka, va = qkv(5, 1, la, H, kv, D)
    qb, kb, vb = qkv(6, 1, lb, H, kv, D)
    q, k, v = (np.concatenate(pair, 1) for pair in ((qa, qb), (ka, kb), (va, vb)))
    pos = np.array([list(range(la)) + list(range(lb))])
    seg = np.array([[1] * la + [2] * lb], np.int32)
    packed = np.asarray(_attn(*_rope_qk(q, k, pos), v, seg, impl=impl))

    # Each document alone, starting at position 0 with no segment ids: row 0 = doc B, row 1 = doc A
    # followed by junk tokens (which, being later, cannot affect A's outputs under causality).
    junk = lambda a: np.concatenate([a, rand(50, (1, lb - la) + a.shape[2:])], 1)
    q1, k1, v1 = (np.concatenate([b_, junk(a_)], 0) for b_, a_ in ((qb, qa), (kb, ka), (vb, va)))
    alone = np.asarray(_attn(*_rope_qk(q1, k1, np.tile(np.arange(lb), (2, 1))), v1, impl=impl))
    np.testing.assert_allclose(packed[:, la:], alone[:1], atol=ATOL)
    np.testing.assert_allclose(packed[:, :la], alone[1:, :la], atol=ATOL)
    # and against the numpy references end to end
    qr, kr = ref_rope(qb, np.arange(lb)[None]), ref_rope(kb, np.arange(lb)[None])
    np.testing.assert_allclose(packed[:, la:], ref_attention(qr, kr, vb), atol=ATOL)


@pytest.mark.parametrize("kv", [2, 1])
def test_decode_mask_single_query_against_cache(kv):
    """One query at position t against a cache of S > T slots (only 0..t valid) == full result."""
    s = 10
    q, k, v = qkv(7, B, T, H, kv, D)
    full = np.asarray(_attn(q, k, v, impl="reference"))
    rng = np.random.default_rng(77)
    # Cache: first T slots hold the real k/v, the rest garbage.
    k_cache = np.concatenate([k, 10 * rng.standard_normal((B, s - T, kv, D)).astype(np.float32)], 1)
    v_cache = np.concatenate([v, 10 * rng.standard_normal((B, s - T, kv, D)).astype(np.float32)], 1)
    kv_pos = np.broadcast_to(np.arange(s), (B, s))
    for t in range(T):
        q_pos = np.full((B, 1), t)
        kv_valid = kv_pos <= t
        # Give unwritten slots positions <= t, so kv_valid (not causality alone) must remove them.
        kv_pos_garbled = np.where(kv_valid, kv_pos, 0)
        mask = _mask(q_pos, kv_pos_garbled, kv_valid=kv_valid)
        assert mask.shape == (B, 1, s)
        out = np.asarray(_attn_ref(q[:, t:t + 1], k_cache, v_cache, mask))
        np.testing.assert_allclose(out[:, 0], full[:, t], atol=ATOL)
        np.testing.assert_allclose(
            out[:, 0], ref_attention(q[:, :t + 1], k[:, :t + 1], v[:, :t + 1])[:, t], atol=ATOL)


def test_make_mask_values():
    q_pos = np.array([[0, 1, 2]])
    seg = np.array([[1, 1, 2]])
    valid = np.array([[True, False, True]])
    np.testing.assert_array_equal(np.asarray(make_mask(q_pos, q_pos)),
                                  np.tril(np.ones((3, 3), bool))[None])
    m = np.asarray(make_mask(q_pos, q_pos, seg, seg, valid))
    expect = np.array([[[1, 0, 0], [1, 0, 0], [0, 0, 1]]], bool)
    np.testing.assert_array_equal(m, expect)


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("with_segments", [False, True])
def test_bfloat16_close_to_float32(impl, with_segments):
    q, k, v = qkv(8, B, T, H, 2, D)
    seg = SEGS if with_segments else None
    out32 = _attn(q, k, v, seg, impl=impl)
    out16 = _attn(*(a.astype(jnp.bfloat16) for a in (q, k, v)), seg, impl=impl)
    assert out16.dtype == jnp.bfloat16 and out16.shape == out32.shape
    assert np.all(np.isfinite(np.asarray(out16, np.float32)))
    np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(out32), atol=5e-2,
                               rtol=5e-2)


# ----------------------------------------------------------------------------- RoPE

@pytest.mark.parametrize("theta", [10000.0, 500000.0, 10.0])
def test_rope_matches_complex_reference(theta):
    x = rand(9, (2, 5, 3, D))
    pos = np.array([[0, 1, 2, 3, 4], [7, 0, 100, 3, 2048]])
    out = np.asarray(_rope(x, pos, theta=theta))
    assert out.shape == x.shape and out.dtype == np.float32
    # float32 angle p·θ_i at p = 2048 carries ~1e-4 absolute rounding; small positions are tight
    np.testing.assert_allclose(out, ref_rope(x, pos, theta), atol=5e-4)
    np.testing.assert_allclose(out[0], ref_rope(x, pos, theta)[0], atol=ATOL)


def test_rope_angles_values():
    theta = 10000.0
    cos, sin = _jit(rope_angles, static_argnums=(1, 2))(np.array([[0, 1, 5]]), D, theta)
    assert cos.shape == (1, 3, D // 2) and cos.dtype == jnp.float32
    ang = np.array([0, 1, 5], np.float64)[:, None] * theta ** (-2.0 * np.arange(D // 2) / D)
    np.testing.assert_allclose(np.asarray(cos[0]), np.cos(ang), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin[0]), np.sin(ang), atol=1e-6)


def test_rope_position_zero_is_identity_and_norm_preserved():
    x = rand(10, (2, 5, 3, D))
    out0 = np.asarray(_rope(x, np.zeros((2, 5), np.int32)))
    np.testing.assert_array_equal(out0, np.asarray(x))
    y = np.asarray(_rope(x, np.array([[3, 17, 50, 999, 5], [1, 2, 3, 4, 5]])))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(np.asarray(x), axis=-1),
                               rtol=1e-5)


def test_rope_relative_position_property():
    """q·k after RoPE depends only on p_q - p_k. Row r holds q at p_q[r], k at p_k[r]."""
    d = 16
    rng = np.random.default_rng(12)
    qv = rng.standard_normal(d).astype(np.float32)
    kvec = rng.standard_normal(d).astype(np.float32)
    deltas = [0, 1, 3, 10]
    shifts = [0, 1, 5, 37, 200]
    pq = np.array([dl + sh for dl in deltas for sh in shifts])
    pk = np.array([sh for _ in deltas for sh in shifts])
    n = len(pq)
    x = np.stack([np.broadcast_to(qv, (n, d)), np.broadcast_to(kvec, (n, d))], axis=1)  # [n, 2, d]
    # positions per token: token 0 = q, token 1 = k
    y = np.asarray(_rope(x[:, :, None, :], np.stack([pq, pk], axis=1)))[:, :, 0]  # [n, 2, d]
    scores = (y[:, 0] * y[:, 1]).sum(-1).reshape(len(deltas), len(shifts))
    np.testing.assert_allclose(scores, scores[:, :1].repeat(len(shifts), 1), atol=1e-4)
    # reference agrees, and the score really depends on the offset
    yr = ref_rope(x[:, :, None, :], np.stack([pq, pk], axis=1))[:, :, 0]
    np.testing.assert_allclose(scores, (yr[:, 0] * yr[:, 1]).sum(-1).reshape(scores.shape),
                               atol=1e-4)
    assert np.ptp(scores[:, 0]) > 1e-2


def test_rope_bf16_returns_bf16():
    x = rand(13, (2, 5, 3, D), jnp.bfloat16)
    pos = np.broadcast_to(np.arange(5), (2, 5))
    y = _rope(x, pos)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), ref_rope(np.asarray(x, np.float32), pos),
                               atol=3e-2)


# ----------------------------------------------------------------------------- RMSNorm / SwiGLU

def test_rms_norm_with_and_without_scale():
    x = rand(14, (2, 3, D)) * 3.0
    g = rand(15, (D,))
    np.testing.assert_allclose(np.asarray(_rms(x, g)), ref_rms_norm(x, g), atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(_rms(x)), ref_rms_norm(x), atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(_rms(x, g, eps=0.5)), ref_rms_norm(x, g, eps=0.5),
                               atol=ATOL, rtol=1e-5)
    # without scale and eps: unit root-mean-square
    ms = np.mean(np.asarray(_rms(x, eps=0.0), np.float64) ** 2, axis=-1)
    np.testing.assert_allclose(ms, 1.0, atol=1e-5)
    # zero input stays finite (eps)
    assert np.all(np.asarray(_rms(np.zeros_like(x))) == 0.0)


def test_rms_norm_bf16_returns_bf16():
    x = (rand(16, (2, 3, D)) * 3.0).astype(jnp.bfloat16)
    g = rand(17, (D,), jnp.bfloat16)
    y = _rms(x, g)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               ref_rms_norm(np.asarray(x, np.float32), np.asarray(g, np.float32)),
                               atol=2e-2, rtol=2e-2)
    assert _rms(x).dtype == jnp.bfloat16


def test_swiglu_matches_numpy():
    f = 16
    x = rand(18, (2, 3, D))
    wg, wu, wd = rand(19, (D, f)) * 0.5, rand(20, (D, f)) * 0.5, rand(21, (f, D)) * 0.5
    out = _swiglu(x, wg, wu, wd)
    assert out.shape == x.shape
    np.testing.assert_allclose(np.asarray(out), ref_swiglu(x, wg, wu, wd), atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- losses

LB, LT, LV = 2, 6, 256  # one logits shape for all loss tests (V = 256: 8 bits per byte if uniform)


def _targets(seed, shape, vsz):
    return np.random.default_rng(seed).integers(0, vsz, shape).astype(np.int32)


def _ref_nll(logits, targets):
    return -np.take_along_axis(ref_log_softmax(logits), np.asarray(targets)[..., None], -1)[..., 0]


def test_token_nll_matches_log_softmax():
    b, t, vsz = LB, LT, LV
    logits = rand(22, (b, t, vsz)) * 4.0
    targets = _targets(23, (b, t), vsz)
    nll, lse = _nll(logits, targets)
    assert nll.shape == (b, t) and nll.dtype == jnp.float32 and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(nll), _ref_nll(logits, targets), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), ref_lse(logits), atol=1e-5, rtol=1e-5)
    # bf16 logits: computed and returned in float32
    nll16, lse16 = _nll(logits.astype(jnp.bfloat16), targets)
    assert nll16.dtype == jnp.float32 and lse16.dtype == jnp.float32
    # large logits don't overflow (nll is shift invariant)
    nll_big, _ = _nll(logits + 1e4, targets)
    np.testing.assert_allclose(np.asarray(nll_big), _ref_nll(logits, targets), atol=2e-3)


def test_masked_loss_mask_and_z_loss():
    b, t, vsz = LB, LT, LV
    logits = rand(24, (b, t, vsz)) * 3.0
    targets = _targets(25, (b, t), vsz)
    mask = np.array([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0]], bool)
    m = mask.astype(np.float64)
    nll = _ref_nll(logits, targets)
    lse = ref_lse(logits)
    loss, stats = _loss(logits, targets, mask)
    np.testing.assert_allclose(float(loss), (nll * m).sum() / m.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(stats["nll_sum"]), (nll * m).sum(), rtol=1e-5)
    assert float(stats["tokens"]) == m.sum()

    # masked-out tokens don't matter: scramble their logits and targets
    noise = 50.0 * np.random.default_rng(26).standard_normal(logits.shape).astype(np.float32)
    scrambled = np.where(mask[..., None], logits, noise)
    loss2, _ = _loss(scrambled, np.where(mask, targets, 0), mask)
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)

    # z-loss adds alpha * masked mean of lse^2 (and leaves nll_sum alone)
    alpha = 1e-2
    loss_z, stats_z = _loss(logits, targets, mask, z_loss=alpha)
    expect = (nll * m).sum() / m.sum() + alpha * (lse ** 2 * m).sum() / m.sum()
    np.testing.assert_allclose(float(loss_z), expect, rtol=1e-5)
    np.testing.assert_allclose(float(loss_z) - float(loss), alpha * (lse ** 2 * m).sum() / m.sum(),
                               rtol=1e-4)
    np.testing.assert_allclose(float(stats_z["nll_sum"]), (nll * m).sum(), rtol=1e-5)

    # all-masked batch: loss 0, no NaN
    loss0, stats0 = _loss(logits, targets, np.zeros_like(mask), z_loss=alpha)
    assert float(loss0) == 0.0 and float(stats0["tokens"]) == 0.0

    # float 0/1 mask behaves like the bool one
    loss_f, _ = _loss(logits, targets, m.astype(np.float32))
    np.testing.assert_allclose(float(loss_f), float(loss), rtol=1e-7)


def test_masked_loss_gradient():
    logits = rand(27, (1, 3, 5))
    targets = np.array([[0, 4, 2]], np.int32)
    mask = np.ones((1, 3), bool)
    g = _jit(jax.grad(lambda z: masked_loss(z, targets, mask)[0]))(logits)
    # d(mean nll)/dz = (softmax(z) - onehot(y)) / n
    p = np.exp(ref_log_softmax(logits))
    onehot = np.eye(5)[targets]
    np.testing.assert_allclose(np.asarray(g), (p - onehot) / 3.0, atol=1e-6)


def test_bits_per_byte_uniform_closed_form():
    b, t, vsz = LB, LT, LV
    logits = np.zeros((b, t, vsz), np.float32)
    targets = _targets(28, (b, t), vsz)
    nll, lse = _nll(logits, targets)
    np.testing.assert_allclose(np.asarray(nll), math.log(vsz), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lse), math.log(vsz), rtol=1e-6)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
    loss, stats = _loss(logits, targets, mask)
    np.testing.assert_allclose(float(loss), math.log(vsz), rtol=1e-6)
    nll_sum, n_tok = float(stats["nll_sum"]), float(stats["tokens"])
    assert n_tok == 5
    # one byte per token with V = 256 -> exactly 8 bits per byte
    np.testing.assert_allclose(bits_per_byte(nll_sum, n_tok), 8.0, rtol=1e-6)
    # 3 bytes per token on average -> log2(V) / 3
    np.testing.assert_allclose(bits_per_byte(nll_sum, 3 * n_tok), math.log2(vsz) / 3.0, rtol=1e-6)
    # works on jax scalars (as returned in stats) too
    np.testing.assert_allclose(float(bits_per_byte(stats["nll_sum"], jnp.float32(2 * n_tok))),
                               4.0, rtol=1e-6)
    # plain Python numbers too
    assert abs(bits_per_byte(10 * math.log(2.0), 5) - 2.0) < 1e-12


# ----------------------------------------------------------------------------- matmul (Dense)


@pytest.mark.parametrize("i,o", [(24, 40), (40, 24)])  # both of the CPU weight-gradient forms
def test_matmul_gradients_against_float64(i, o):
    """ops.layers.matmul: y = x·w, ∂x = ∂y·wᵀ, ∂w = xᵀ·∂y (its custom backward) against numpy
    float64, for I ≤ O (xᵀ formed first) and I > O ((∂yᵀ·x)ᵀ)."""
    from jaxlm.ops.layers import matmul

    k = jax.random.split(jax.random.key(3), 3)
    x, w = jax.random.normal(k[0], (16, i)), jax.random.normal(k[1], (i, o))
    r = jax.random.normal(k[2], (16, o))  # L = Σ r ⊙ y  =>  ∂y = r
    y, (dx, dw) = jax.value_and_grad(lambda x, w: (matmul(x, w) * r).sum(), argnums=(0, 1))(x, w)
    x64, w64, r64 = (np.asarray(a, np.float64) for a in (x, w, r))
    np.testing.assert_allclose(y, (x64 @ w64 * r64).sum(), rtol=1e-5)
    np.testing.assert_allclose(dx, r64 @ w64.T, atol=ATOL)
    np.testing.assert_allclose(dw, x64.T @ r64, atol=ATOL)


def test_matmul_weight_gradient_is_row_major_on_cpu():
    """The compiled CPU gradient of matmul holds no dot contracting a lhs's leading dim (the
    form XLA:CPU leaves to Eigen); plain autodiff of x @ w does (the test can fail)."""
    import re

    from jaxlm.ops.layers import matmul

    for fn, transposed in ((matmul, False), (jnp.matmul, True)):
        for i, o in ((32, 48), (48, 32)):  # I ≤ O and I > O
            hlo = jax.jit(jax.grad(lambda x, w, r: (fn(x, w) * r).sum(), argnums=1)) \
                .lower(jnp.ones((64, i)), jnp.ones((i, o)), jnp.ones((64, o))).compile().as_text()
            dots = re.findall(r" dot\([^\n]*", hlo)
            assert dots, hlo
            assert any("lhs_contracting_dims={0}" in d for d in dots) == transposed, dots
