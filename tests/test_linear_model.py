"""Linear-attention model family: decay schedules, LRPE, the TNL mixer vs a float64 numpy reference,
layer-dependent decay through the scan, hybrid patterns, cached decode == full recompute, packed
documents, tensor-parallel training == single device, and a short loss decrease."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.model import ATTENTION, Transformer
from jaxlm.model.linear import (TNLAttention, TNLBlock, alibi_slopes, retnet_log_decay, srms_norm,
                                tnl_log_decay)

TINY = dict(d_model=32, n_layers=4, n_heads=2, n_kv_heads=2, d_ff=48, vocab_size=40,
            linear_chunk=4)


def test_decay_schedules():
    np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    s12 = np.concatenate([2.0 ** -np.arange(1, 9), 2.0 ** (-8 * np.array([1, 3, 5, 7]) / 16)])
    np.testing.assert_allclose(alibi_slopes(12), s12, rtol=1e-6)  # non-power-of-2 rule
    np.testing.assert_allclose(tnl_log_decay(8, 0, 5), -alibi_slopes(8) * (1 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(tnl_log_decay(8, 4, 5), -alibi_slopes(8) * 1e-5, rtol=1e-4)
    np.testing.assert_allclose(tnl_log_decay(4, 1, 4, "paper"), -(8 * np.arange(4) / 4) * 0.75)
    np.testing.assert_allclose(np.exp(retnet_log_decay(3)), 1 - 2.0 ** -np.array([5, 6, 7]),
                               rtol=1e-6)


def test_srms_norm_and_lrpe_identity():
    x = np.random.default_rng(0).normal(size=(3, 5, 8)).astype(np.float32)
    ref = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(srms_norm(x), ref, rtol=1e-5)
    cfg = ModelConfig(**dict(TINY, attention="tnl"))
    attn = TNLAttention(cfg, rngs=nnx.Rngs(0))
    r = np.random.default_rng(1)
    q, k = r.normal(size=(2, 1, 2, 2, 16)).astype(np.float32)  # [B=1, T=2, H, K]
    pos = np.array([[3, 11]])
    fq, fk = attn.lrpe(q, pos, 0), attn.lrpe(k, pos, 0)  # [1, 2, 2, 32]
    theta = np.asarray(attn.lrpe_theta[...], np.float64)  # [H, K]
    got = np.einsum("hk,hk->h", fq[0, 1], fk[0, 0])  # query at t=11, key at s=3
    want = np.einsum("hk,hk,hk->h", q[0, 1], k[0, 0], np.cos(theta * 8))
    np.testing.assert_allclose(got, want, rtol=1e-4)
    np.testing.assert_allclose(attn.lrpe(q, pos, 2)[..., :16], q, rtol=1e-6)  # not layer 0
    np.testing.assert_array_equal(attn.lrpe(q, pos, 2)[..., 16:], 0)


def test_tnl_mixer_matches_float64_numpy():
    """TNL token mixer (layer 1: decay, no LRPE) vs an independent numpy float64 implementation."""
    cfg = ModelConfig(**dict(TINY, attention="tnl", linear_norm="all"))
    attn = TNLAttention(cfg, rngs=nnx.Rngs(2))
    x = np.random.default_rng(3).normal(size=(1, 9, 32)).astype(np.float32)
    pos = np.arange(9)[None]
    y, y0 = jax.jit(lambda x: (attn(x, pos, layer=1)[0], attn(x, pos, layer=0)[0]))(x)
    assert np.abs(np.asarray(y - y0)).max() > 1e-3  # layer 0: other decay + LRPE
    w = {n: np.asarray(getattr(attn, n).kernel[...], np.float64) for n in ("wq", "wk", "wv", "wu",
                                                                            "wo")}
    silu = lambda a: a / (1 + np.exp(-a))
    proj = lambda n: np.einsum("btd,dhk->bthk", x.astype(np.float64), w[n])
    q, k, v, u = silu(proj("wq")), silu(proj("wk")), proj("wv"), proj("wu")
    lam = np.exp(-alibi_slopes(2).astype(np.float64) * (1 - 1 / 3 + 1e-5))  # [H]
    o = np.zeros_like(v)
    for t in range(9):  # o_t = Σ_{s≤t} λ^{t-s} (q_t·k_s) v_s
        for s in range(t + 1):
            o[:, t] += (lam ** (t - s) * np.einsum("bhk,bhk->bh", q[:, t], k[:, s]))[..., None] \
                * v[:, s]
    o = o / np.sqrt(np.mean(o ** 2, axis=(-2, -1), keepdims=True) + 1e-6) * u
    ref = np.einsum("bthk,hkd->btd", o, w["wo"])
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_layer_index_reaches_scanned_tnl_layers():
    """Scanned model == blocks applied one by one with their layer index l (decay depends on l)."""
    cfg = ModelConfig(**dict(TINY, attention="tnl", n_layers=2))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    toks = jax.random.randint(jax.random.key(1), (1, 8), 0, 40)
    pos = jnp.broadcast_to(jnp.arange(8), (1, 8))
    graphdef, state = nnx.split(model.blocks)

    @jax.jit
    def run(toks):
        def manual(layer_of):
            x = jnp.take(model.embed.embedding[...], toks, axis=0)
            for i in range(2):
                unit = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
                x, _ = unit.layer0(x, pos, layer=layer_of(i))
            return model.final_norm(x) @ model.lm_head.kernel[...]
        return model(toks)[0], manual(lambda i: i)

    logits, by_layer = run(toks)
    np.testing.assert_allclose(logits, by_layer, atol=2e-5)


def _prefill_and_decode(call, toks, cache, n_prefill):
    """call(tokens_or_x, cache, index) -> (out, cache): prefill n_prefill, then one at a time."""
    out, cache = call(toks[:, :n_prefill], cache, 0)
    outs = [out]
    for i in range(n_prefill, toks.shape[1]):
        out, cache = call(toks[:, i:i + 1], cache, i)
        outs.append(out)
    return jnp.concatenate(outs, 1), cache


def test_hybrid_cached_decode_equals_full_recompute():
    """TNL + softmax hybrid: mixed caches (O(1) state for L, KV for S); decode == full."""
    cfg = ModelConfig(**dict(TINY, attention="tnl", layer_pattern="LS", n_layers=2))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    toks = jax.random.randint(jax.random.key(1), (2, 8), 0, 40)

    @jax.jit
    def run(toks):
        call = lambda t, c, i: model(t, cache=c, cache_index=i)
        return model(toks)[0], *_prefill_and_decode(call, toks, model.init_cache(2, 8), 6)

    full, dec, cache = run(toks)
    np.testing.assert_allclose(dec, full, atol=2e-5 * np.abs(full).max())
    assert set(cache) == {"layer0", "layer1"}
    assert cache["layer0"]["state"].shape == (1, 2, 2, 32, 16)  # [U, B, H, 2K (LRPE), V]
    assert cache["layer1"]["k"].shape == (1, 2, 8, 2, 16)  # [U, B, S, KV, K]


def test_variant_modules_decode_equals_full():
    """linear (elu+1, normalised), retnet, simple_gla: chunked full pass == prefill + recurrent."""
    mods = [ATTENTION[a](ModelConfig(**dict(TINY, attention=a)), rngs=nnx.Rngs(0))
            for a in ("linear", "retnet", "simple_gla")]
    x = jax.random.normal(jax.random.key(3), (2, 9, 32))
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))

    @jax.jit
    def run(x):
        res = []
        for m in mods:
            call = lambda t, c, i, m=m: m(t, pos[:, i:i + t.shape[1]], cache=c)
            res.append((m(x, pos)[0], _prefill_and_decode(call, x, m.init_cache(2, 9, x.dtype),
                                                           5)[0]))
        return res

    for full, dec in run(x):
        assert np.all(np.isfinite(full))
        np.testing.assert_allclose(dec, full, atol=2e-5 * np.abs(full).max())


def test_packed_documents_equal_separate_runs():
    """Hybrid TNL model: a packed row (per-document positions) == each document alone."""
    cfg = ModelConfig(**dict(TINY, attention="tnl", layer_pattern="LS", n_layers=2))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    toks = jax.random.randint(jax.random.key(2), (1, 12), 0, 40)
    seg = jnp.array([[1] * 6 + [2] * 6])
    pos = jnp.array([list(range(6)) * 2])

    @jax.jit
    def run(toks):
        packed = model(toks, pos, seg)[0]  # [1, 12, V]
        alone = model(toks.reshape(2, 6))[0]  # [2, 6, V]: each document in its own row
        return packed, alone.reshape(1, 12, -1)

    packed, alone = run(toks)
    np.testing.assert_allclose(packed, alone, atol=2e-5)


def test_bad_layer_pattern():
    with pytest.raises(ValueError, match="layer_pattern"):
        Transformer(ModelConfig(**dict(TINY, attention="tnl", layer_pattern="LLS")),
                    rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="softmax"):
        Transformer(ModelConfig(**dict(TINY, layer_pattern="LS")), rngs=nnx.Rngs(0))


def test_tensor_parallel_forward_matches_single_device():
    """Hybrid TNL with heads on `tensor` (mesh data=2, tensor=4): sharded == unsharded logits."""
    from jax.sharding import NamedSharding

    from jaxlm.sharding import logical_to_spec, make_mesh
    from jaxlm.config import MeshConfig
    cfg = ModelConfig(**dict(TINY, attention="tnl", layer_pattern="LS", n_layers=2, n_heads=4,
                             n_kv_heads=4, linear_norm="head"))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    toks = jax.random.randint(jax.random.key(4), (2, 8), 0, 40)
    fwd = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t)[0])
    ref = fwd(state, toks)
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    specs = nnx.get_partition_spec(state)
    sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(
        mesh, logical_to_spec(tuple(s.value) if hasattr(s, "value") else tuple(s)))),
        state, specs)
    wq = sharded["blocks"]["layer0"]["attn"]["wq"]["kernel"]  # [U, D, H, K]
    assert wq.sharding.spec[2] == "tensor"
    with jax.set_mesh(mesh):
        out = fwd(sharded, toks)
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_head_norm_adds_no_all_reduce_under_tensor_parallelism():
    """Heads on `tensor`=8: per-head norm -> only W_o's all-reduce; full-width norm -> one more."""
    import re

    from jax.sharding import NamedSharding

    from jaxlm.config import MeshConfig
    from jaxlm.sharding import logical_to_spec, make_mesh
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=8))
    x = jnp.ones((2, 8, 32))
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    counts = {}
    for norm in ("head", "all"):
        cfg = ModelConfig(**dict(TINY, attention="tnl", n_heads=8, n_kv_heads=8, linear_norm=norm))
        graphdef, state = nnx.split(TNLAttention(cfg, rngs=nnx.Rngs(0)))
        specs = nnx.get_partition_spec(state)
        state = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(
            mesh, logical_to_spec(tuple(s.value) if hasattr(s, "value") else tuple(s)))),
            state, specs)
        f = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, pos, layer=1)[0])
        with jax.set_mesh(mesh):
            hlo = f.lower(state, x).compile().as_text()
        counts[norm] = len(re.findall(r"all-reduce(?:-start)?\(", hlo))
    assert counts == {"head": 1, "all": 2}
