"""jaxlm.ops.linear_attention: three forms vs an independent float64 numpy recurrence, gradients,
state passing, document resets, bf16, and golden outputs from flash-linear-attention (fla)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.ops import linear_attention, linear_attention_reset

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "linear_attention", "fla_golden.npz")


def ref_np(q, k, v, g=None, s0=None, reset=None):
    """float64 token loop: S_t = e^{g_t}(1 - r_t) S_{t-1} + k_t v_tᵀ, o_t = q_tᵀ S_t."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, dk = q.shape
    g = np.zeros((b, t, h)) if g is None else np.broadcast_to(np.asarray(g, np.float64), (b, t, h))
    s = np.zeros((b, h, dk, v.shape[-1])) if s0 is None else np.array(s0, np.float64)
    o = np.zeros(v.shape)
    for i in range(t):
        a = np.exp(g[:, i])  # [B, H]
        if reset is not None:
            a = a * (1 - np.asarray(reset, np.float64)[:, i:i + 1])
        s = a[..., None, None] * s + k[:, i, :, :, None] * v[:, i, :, None, :]
        o[:, i] = np.einsum("bhk,bhkv->bhv", q[:, i], s)
    return o, s


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / (np.max(np.abs(b)) + 1e-30))


def inputs(seed, b=2, t=37, h=3, dk=8, dv=6, decay="data"):
    r = np.random.default_rng(seed)
    q, k = r.normal(size=(2, b, t, h, dk)).astype(np.float32) * 0.5
    v = r.normal(size=(b, t, h, dv)).astype(np.float32)
    if decay == "none":
        g = None
    elif decay == "head":
        g = np.log(1 - 2.0 ** (-1.0 - np.arange(h))).astype(np.float32)  # [H] (one strong head)
    else:
        g = np.log(r.uniform(0.6, 1.0, size=(b, t, h))).astype(np.float32)  # [B, T, H]
    return q, k, v, g


_jit = jax.jit(linear_attention_reset,
               static_argnames=("form", "chunk_size", "return_state"))


@pytest.mark.parametrize("form,chunk,decay", [
    ("naive", 64, "data"), ("recurrent", 64, "data"), ("chunked", 1, "head"),
    ("chunked", 8, "none"), ("chunked", 8, "head"), ("chunked", 8, "data"),
    ("chunked", 64, "data")])
def test_forms_match_float64_recurrence(decay, form, chunk):
    q, k, v, g = inputs(0, decay=decay)  # T=37: not a multiple of 8; H=3, K != V
    s0 = np.random.default_rng(1).normal(size=(2, 3, 8, 6)).astype(np.float32)
    o, s = _jit(q, k, v, g, None, form=form, chunk_size=chunk, initial_state=s0,
                return_state=True)
    o_ref, s_ref = ref_np(q, k, v, g, s0)
    assert o.shape == (2, 37, 3, 6) and s.shape == (2, 3, 8, 6) and s.dtype == jnp.float32
    assert rel(o, o_ref) < 2e-5 and rel(s, s_ref) < 2e-5


def test_public_signature_defaults():
    q, k, v, g = inputs(2, t=20, decay="head")
    o, o_rec = jax.jit(lambda q, k, v, g: (linear_attention(q, k, v),  # no decay, chunked
                                            linear_attention(q, k, v, g, form="recurrent")))(
        q, k, v, g)
    np.testing.assert_allclose(o, ref_np(q, k, v)[0], rtol=0, atol=2e-5 * np.abs(o).max())
    assert rel(o_rec, ref_np(q, k, v, g)[0]) < 2e-5
    with pytest.raises(ValueError, match="form"):
        linear_attention(q, k, v, form="fast")
    with pytest.raises(ValueError, match="log_decay"):
        linear_attention(q, k, v, np.zeros((2,)))


@pytest.mark.parametrize("form", ["chunked", "naive"])
def test_state_passing_in_pieces(form):
    q, k, v, g = inputs(3, t=40)
    full = _jit(q, k, v, g, None, form=form, chunk_size=8, return_state=True)
    o1, s1 = _jit(q[:, :13], k[:, :13], v[:, :13], g[:, :13], None, form=form, chunk_size=8,
                  return_state=True)
    o2, s2 = _jit(q[:, 13:], k[:, 13:], v[:, 13:], g[:, 13:], None, form=form, chunk_size=8,
                  initial_state=s1, return_state=True)
    assert rel(jnp.concatenate([o1, o2], 1), np.asarray(full[0])) < 1e-5
    assert rel(s2, np.asarray(full[1])) < 1e-5


@pytest.mark.parametrize("form", ["chunked", "recurrent", "naive"])
def test_document_resets(form):
    """A packed row == each document run alone (reset drops the state at a document start)."""
    q, k, v, g = inputs(4, b=1, t=30)
    reset = np.zeros((1, 30), bool)
    reset[0, [0, 7, 8, 21]] = True
    o, s = _jit(q, k, v, g, reset, form=form, chunk_size=8, return_state=True,
                initial_state=np.ones((1, 3, 8, 6), np.float32))  # dropped by reset[0]
    o_ref, s_ref = ref_np(q, k, v, g, reset=reset)
    assert rel(o, o_ref) < 2e-5 and rel(s, s_ref) < 2e-5
    o_doc, _ = ref_np(q[:, 8:21], k[:, 8:21], v[:, 8:21], g[:, 8:21])
    assert rel(o[:, 8:21], o_doc) < 2e-5


def test_gradients_match_float64():
    """Chunked grads (q, k, v, data-dependent log-decay, initial state) vs float64 naive."""
    q, k, v, g = inputs(5, b=1, t=19, h=2)
    s0 = np.random.default_rng(6).normal(size=(1, 2, 8, 6)).astype(np.float32)
    w = np.random.default_rng(7).normal(size=(1, 19, 2, 6))

    def loss(form, chunk, dtype):
        def f(q, k, v, g, s0):
            o, s = linear_attention(q, k, v, g, form=form, chunk_size=chunk, initial_state=s0,
                                    return_state=True)
            return jnp.sum(o * w.astype(dtype)) + jnp.sum(jnp.sin(s))
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))

    got = loss("chunked", 4, jnp.float32)(q, k, v, g, s0)
    with jax.enable_x64():
        args64 = (jnp.asarray(a, jnp.float64) for a in (q, k, v, g, s0))
        ref = loss("naive", 4, jnp.float64)(*args64)
        ref = [np.asarray(r) for r in ref]
    for a, r in zip(got, ref):
        assert np.all(np.isfinite(a)) and rel(a, r) < 1e-4


def test_bfloat16_inputs():
    q, k, v, g = inputs(8, t=33, decay="head")
    o = _jit(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), g, None, chunk_size=8)
    assert o.dtype == jnp.bfloat16
    assert rel(o.astype(jnp.float32), ref_np(q, k, v, g)[0]) < 2e-2


def test_strong_decay_long_chunk_is_finite():
    """Slope 0.5 over a 256-chunk: e^{-128} factors underflow harmlessly, nothing overflows."""
    q, k, v, _ = inputs(9, b=1, t=300, h=1)
    g = np.full((1,), -0.5, np.float32)
    o = _jit(q, k, v, g, None, chunk_size=256)
    assert rel(o, ref_np(q, k, v, g)[0]) < 2e-5


def test_fla_golden():
    """Golden outputs of fla-core 0.6.0's naive simple-GLA / linear-attention references."""
    z = dict(np.load(FIXTURE))

    @jax.jit
    def run(z):
        out = {n: linear_attention(*(z[f"{n}_{x}"] for x in "qkvg"), chunk_size=16,  # g [H]/[B,T,H]
                                   initial_state=z[f"{n}_h0"], return_state=True)
               for n in ("const", "data")}
        return out, linear_attention(z["plain_q"], z["plain_k"], z["plain_v"], chunk_size=16)

    out, o = run(z)
    for name, (o_n, s_n) in out.items():
        assert rel(o_n, z[f"{name}_o"]) < 2e-5 and rel(s_n, z[f"{name}_ht"]) < 2e-5
    assert rel(o, z["plain_o"]) < 2e-5
