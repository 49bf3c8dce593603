"""Low-rank / SLTrain weights, weight refactorization, momentum reset + re-warmup, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm.config import ConfigError, ModelConfig, load_config
from jaxlm.model import WEIGHTS, Transformer
from jaxlm.model.lowrank import LowRankDense, SLTrainDense
from jaxlm.optim import build_optimizer
from jaxlm.optim.lowrank import (method_config, refactor, refactor_tree, rewarmup,
                                 state_entries, with_momentum_reset, with_refactorization)

TINY = ["model.vocab_size=257", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
        "model.n_kv_heads=2", "model.d_ff=64", "model.lowrank_rank=4"]


def _model(weights, *extra):  # abstract (shapes and names only)
    cfg = load_config(None, TINY + [f"model.weights={weights}", *extra])
    return cfg, nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))


def test_registry_shapes_and_logical_names():
    assert WEIGHTS["lowrank"] is LowRankDense and WEIGHTS["sltrain"] is SLTrainDense
    _, m = _model("lowrank")
    assert m.blocks.attn.wo.a.shape == (2, 32, 4)  # [L, H*K, r]: multi-dim in flattened
    assert m.blocks.attn.wk.b.shape == (2, 4, 16)  # [L, r, KV*K]
    specs = nnx.get_partition_spec(nnx.state(m))
    assert tuple(specs["blocks"]["mlp"]["w_up"]["a"].get_value()) == ("layers", "embed", None)
    assert tuple(specs["blocks"]["mlp"]["w_up"]["b"].get_value()) == ("layers", None, "mlp")


def test_lowrank_layer_forward_and_init_scale():
    layer = LowRankDense(ModelConfig(lowrank_init="std_matched"), (64,), (4, 32),
                         ("embed", "heads", "head_dim"), std=0.02,
                         rngs=nnx.Rngs(0))  # rank 32 (default), s = 1
    w = layer.scale * (layer.a[...] @ layer.b[...])  # [64, 128]
    assert 0.015 < float(jnp.std(w)) < 0.025  # the Dense it replaces uses std 0.02
    x = jax.random.normal(jax.random.key(0), (2, 3, 64))
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray((x @ w).reshape(2, 3, 4, 32)),
                               atol=1e-5)


def test_refactor_preserves_product_and_balances():
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (3, 12, 4)) * 3.0  # unbalanced on purpose
    b = jax.random.normal(k2, (3, 4, 9)) * 0.1
    a2, b2 = refactor(a, b)
    np.testing.assert_allclose(np.asarray(a2 @ b2), np.asarray(a @ b), atol=1e-5)
    gram_a = np.asarray(jnp.swapaxes(a2, -1, -2) @ a2)
    gram_b = np.asarray(b2 @ jnp.swapaxes(b2, -1, -2))
    np.testing.assert_allclose(gram_a, gram_b, atol=1e-4)  # both = Sigma
    np.testing.assert_allclose(gram_a, gram_a * np.eye(4), atol=1e-4)  # diagonal


def test_refactorization_leaves_the_layer_output_unchanged():
    x = jax.random.normal(jax.random.key(4), (3, 16))
    for cls in (LowRankDense, SLTrainDense):
        layer = cls(ModelConfig(), (16,), (24,), ("embed", "mlp"), std=0.02, rngs=nnx.Rngs(1))
        graphdef, state = nnx.split(layer)
        params = nnx.to_pure_dict(state)
        params["b"] = params["b"] + 0.1  # SLTrain's b starts at 0
        params["a"] = params["a"] * 5.0  # unbalanced

        def out(p):
            st = nnx.state(layer)
            nnx.replace_by_pure_dict(st, p)
            return np.asarray(nnx.merge(graphdef, st)(x))

        new = refactor_tree(params)
        assert not np.allclose(np.asarray(new["a"]), np.asarray(params["a"]))
        np.testing.assert_allclose(out(new), out(params), atol=1e-5)


def test_refactorization_inside_the_update_every_N():
    tx = with_refactorization(optax.sgd(0.1), every=2)
    p = {"m": {"a": jnp.ones((6, 2)) * jnp.arange(1.0, 3.0), "b": jnp.ones((2, 5))}}
    s = tx.init(p)
    for k in range(4):
        g = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), p)
        u, s = tx.update(g, s, p)
        plain = jax.tree.map(lambda x, y: x - 0.1 * y, p, g)
        new = optax.apply_updates(p, u)
        balanced = np.allclose(np.asarray(new["m"]["a"]).T @ np.asarray(new["m"]["a"]),
                               np.asarray(new["m"]["b"]) @ np.asarray(new["m"]["b"]).T,
                               atol=1e-4)
        np.testing.assert_allclose(np.asarray(new["m"]["a"] @ new["m"]["b"]),
                                   np.asarray(plain["m"]["a"] @ plain["m"]["b"]), atol=1e-5)
        assert balanced == (k % 2 == 1)  # refactored at the end of updates 2 and 4
        p = new


def test_momentum_reset_zeroes_moments_and_count():
    inner = optax.adam(1e-2)
    tx = with_momentum_reset(inner, every=3)
    p = jnp.ones((4,))
    s = tx.init(p)
    gs = jax.random.normal(jax.random.key(1), (5, 4))
    for k in range(4):
        u, s = tx.update(gs[k], s, p)
    adam = s.inner[0]
    assert int(adam.count) == 1  # reset before update 4 (count 3): bias correction restarts
    np.testing.assert_allclose(np.asarray(adam.mu), 0.1 * np.asarray(gs[3]), rtol=1e-6)
    u_fresh, _ = inner.update(gs[3], inner.init(p), p)
    np.testing.assert_allclose(np.asarray(u), np.asarray(u_fresh), rtol=1e-6)  # a step-1 update


def test_rewarmup_factor():
    f = rewarmup(every=100, warmup=10)
    got = [float(f(jnp.asarray(c))) for c in (0, 99, 100, 105, 110, 150, 200)]
    np.testing.assert_allclose(got, [1, 1, 0.001, 0.001 + 0.999 * 0.5, 1, 1, 0.001], rtol=1e-6)


def test_sltrain_sparse_gradient_is_gathered_dense_gradient():
    layer = SLTrainDense(ModelConfig(sparse_density=0.25), (8,), (12,), ("embed", "mlp"),
                         std=0.02, rngs=nnx.Rngs(0))
    flat = np.asarray(layer.support[...])  # [nnz] flat indices into the [8, 12] matrix
    assert flat.shape == (int(0.25 * 8 * 12),) == (24,) and len(set(flat)) == 24
    x = jax.random.normal(jax.random.key(3), (5, 8))
    graphdef, state = nnx.split(layer)

    def loss_values(v):
        st = nnx.State(dict(state))
        st["values"] = nnx.Param(v)
        return jnp.sum(jnp.sin(nnx.merge(graphdef, st)(x)))

    g_vals = jax.grad(loss_values)(layer.values[...])
    w = layer.weight()
    g_dense = jax.grad(lambda w: jnp.sum(jnp.sin(x @ w)))(w)
    np.testing.assert_allclose(np.asarray(g_vals), np.asarray(g_dense).reshape(-1)[flat],
                               rtol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "galore", "fira"])
def test_momentum_reset_is_generic(name):
    """``optim.reset_every`` through build_optimizer: every Adam/GaLore sub-state restarts."""
    from jaxlm.optim.galore import GaLoreState

    def run(reset_every):
        cfg = load_config(None, TINY + [f"optim.name={name}", "optim.rank=2", "optim.proj_gap=2", "optim.grad_clip=0",
                                        f"optim.reset_every={reset_every}"])
        model = Transformer(cfg.model, rngs=nnx.Rngs(0))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        grads = [jax.tree.map(lambda x, k=k: jnp.sin(x * 100.0 + k), params) for k in range(4)]
        tx = build_optimizer(cfg)
        s = tx.init(params)
        for g in grads:
            _, s = tx.update(g, s, params)
        kinds = (optax.ScaleByAdamState, GaLoreState)
        subs = [x for x in jax.tree.leaves(s, is_leaf=lambda x: isinstance(x, kinds))
                if isinstance(x, kinds)]
        return subs, grads[-1]

    subs, _ = run(0)
    assert subs and all(int(x.count) == 4 for x in subs)
    subs, g4 = run(3)  # reset before update 4: one update since, moments from g4 alone
    assert subs and all(int(x.count) == 1 for x in subs)
    for x in subs:
        if isinstance(x, optax.ScaleByAdamState):
            for mu, g in zip(jax.tree.leaves(x.mu), jax.tree.leaves(g4)):
                if mu.shape == g.shape and mu.size:
                    np.testing.assert_allclose(np.asarray(mu), 0.1 * np.asarray(g), rtol=1e-5,
                                               atol=1e-7)


def test_optimizer_needs_matching_weights_and_restarts_build():
    with pytest.raises(ConfigError, match="model.weights=lowrank"):
        build_optimizer(load_config(None, TINY + ["optim.name=lowrank"]))
    with pytest.raises(ConfigError, match="optim.refactor_every re-balances"):
        build_optimizer(load_config(None, TINY + ["optim.refactor_every=5"]))
    cfg = load_config(None, TINY + ["model.weights=sltrain", "optim.name=sltrain",
                                    "optim.reset_every=4", "optim.refactor_every=4"])
    assert build_optimizer(cfg) is not None


def test_memory_accounting_matches_the_papers_formulas():
    """Per m×n target: full 3mn (W+m+v), GaLore mn + r·min + 2r·max, low-rank 3(m+n)r."""
    cfg = load_config(None, TINY + ["optim.rank=4", "model.tie_embeddings=true"])
    p_full, o_full, _ = state_entries(method_config(cfg, "adamw"))
    p_gal, o_gal, _ = state_entries(method_config(cfg, "galore"))
    p_lr, o_lr, _ = state_entries(method_config(cfg, "lowrank"))
    mats = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]  # q k v o g u d
    L, r = 2, 4
    rest = 257 * 32 + (2 * L + 1) * 32  # embedding (tied head) + norms
    full = L * sum(a * b for a, b in mats)
    # scalar counters: build_optimizer's update count + adam + schedule (adamw); + galore + its
    # schedule (galore)
    assert p_full == full + rest and o_full == 2 * (full + rest) + 3
    galore = L * sum(min(a, b) * r + 2 * r * max(a, b) + 1 for a, b in mats)  # + fira norm
    assert p_gal == p_full and o_gal == galore + 2 * rest + 5
    lowrank = L * sum((a + b) * r for a, b in mats)
    assert p_lr == lowrank + rest and o_lr == 2 * (lowrank + rest) + 3
    p_sl, o_sl, idx = state_entries(method_config(cfg, "sltrain"))  # + int(δ·m·n) values, δ 0.03
    nnz = L * sum(int(0.03 * a * b) for a, b in mats)
    assert p_sl == lowrank + nnz + rest and o_sl == 2 * p_sl + 3 and idx == nnz
