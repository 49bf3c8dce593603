"""SLTrain's per-matrix sparse support and the papers' low-rank / sparse init; TNL's embedding
scale and gain-free final norm (issue #14 item 2)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ConfigError, ModelConfig, load_config
from jaxlm.model import Transformer
from jaxlm.model.linear import srms_norm
from jaxlm.model.lowrank import LowRankDense, SLTrainDense, SparseSupport

TINY = dict(vocab_size=40, d_model=32, n_layers=3, n_heads=4, d_ff=48, weights="sltrain",
            lowrank_rank=4, sparse_density=0.05)


def _supports(model):
    """{module path: int32 support [L, nnz]} of every SLTrain matrix."""
    return {"/".join(map(str, p)): np.asarray(m.support[...]) for p, m in nnx.iter_graph(model)
            if isinstance(m, SLTrainDense)}


def test_support_is_per_matrix_per_layer_exact_and_seeded():
    model = Transformer(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    sup = _supports(model)
    assert set(sup) == {f"blocks/{s}" for s in ("attn/wq", "attn/wk", "attn/wv", "attn/wo",
                                                 "mlp/w_gate", "mlp/w_up", "mlp/w_down")}
    for path, s in sup.items():
        i, o = (32, 32) if "attn" in path else ((48, 32) if "down" in path else (32, 48))
        nnz = int(0.05 * i * o)
        assert s.shape == (3, nnz) and s.dtype == np.int32, path
        for layer in s:  # distinct, sorted, in range: a subset of the I·O flat indices
            assert np.all(np.diff(layer) > 0) and 0 <= layer[0] and layer[-1] < i * o
        assert not np.array_equal(s[0], s[1]) and not np.array_equal(s[1], s[2]), path
    # wq/wk/wv (same shape and axis names) and gate/up each draw their own pattern
    assert not np.array_equal(sup["blocks/attn/wq"], sup["blocks/attn/wk"])
    assert not np.array_equal(sup["blocks/attn/wk"], sup["blocks/attn/wv"])
    assert not np.array_equal(sup["blocks/mlp/w_gate"], sup["blocks/mlp/w_up"])
    again = _supports(Transformer(ModelConfig(**TINY), rngs=nnx.Rngs(0)))
    other = _supports(Transformer(ModelConfig(**TINY), rngs=nnx.Rngs(1)))
    for path, s in sup.items():
        np.testing.assert_array_equal(again[path], s)  # deterministic from the seed
        assert not np.array_equal(other[path], s)
    # a buffer, not a parameter: the optimizer's view (nnx.Param) has no support
    assert isinstance(model.blocks.attn.wq.support, SparseSupport)
    assert not any(p[-1] == "support" for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def test_support_is_uniform_over_all_entries_not_row_balanced():
    layer = SLTrainDense(ModelConfig(sparse_density=0.02), (256,), (256,), ("embed", "mlp"),
                         std=0.02, rngs=nnx.Rngs(3))
    rows = np.bincount(np.asarray(layer.support[...]) // 256, minlength=256)
    assert rows.sum() == int(0.02 * 256 * 256) == 1310
    assert rows.max() - rows.min() >= 5  # binomial row counts (mean 5.1), not exactly k per row


def _std_close(x, want, rel=0.05):
    got = float(np.std(np.asarray(x)))
    assert abs(got - want) <= rel * want, (got, want)


def test_paper_init_statistics():
    """kaiming_uniform_(a=√5) of fan-in n is U(±1/√n): std 1/√(3n), |w| ≤ 1/√n."""
    i, o, r = 256, 512, 32
    names = ("embed", "mlp")
    lr = LowRankDense(ModelConfig(lowrank_rank=r), (i,), (o,), names, std=0.02, rngs=nnx.Rngs(0))
    _std_close(lr.a[...], 1 / math.sqrt(3 * i))  # A [r, I] in torch: fan-in I
    _std_close(lr.b[...], 1 / math.sqrt(3 * r))  # B [O, r] in torch: fan-in r
    assert float(jnp.abs(lr.b[...]).max()) <= 1 / math.sqrt(r)
    sl = SLTrainDense(ModelConfig(lowrank_rank=r, sparse_density=0.05), (i,), (o,), names,
                      std=0.02, rngs=nnx.Rngs(0))
    _std_close(sl.a[...], 1 / math.sqrt(3 * i))
    assert float(jnp.abs(sl.b[...]).max()) == 0.0  # B = 0: W starts as S
    assert sl.values.shape == (int(0.05 * i * o),)
    _std_close(sl.values[...], 1 / math.sqrt(3 * i))  # values U(±1/√in)
    assert float(jnp.abs(sl.values[...]).max()) <= 1 / math.sqrt(i)
    w = np.asarray(sl.weight()).reshape(-1)
    np.testing.assert_array_equal(np.flatnonzero(w), np.asarray(sl.support[...]))


def test_std_matched_init_and_bad_options():
    cfg = ModelConfig(lowrank_rank=32, lowrank_init="std_matched", lowrank_scale=0.5)
    lr = LowRankDense(cfg, (256,), (512,), ("embed", "mlp"), std=0.02, rngs=nnx.Rngs(0))
    _std_close(cfg.lowrank_scale * (lr.a[...] @ lr.b[...]), 0.02, rel=0.1)  # like the Dense
    sl = SLTrainDense(cfg, (256,), (512,), ("embed", "mlp"), std=0.02, rngs=nnx.Rngs(0))
    _std_close(sl.values[...], 0.02)
    with pytest.raises(ConfigError, match="model.sparse_density=1.5"):
        SLTrainDense(ModelConfig(sparse_density=1.5), (8,), (8,), ("embed", "mlp"), std=0.02,
                     rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="model.lowrank_init"):
        load_config(None, ["model.lowrank_init=kaiming"])


def test_embed_scale_and_gain_free_final_norm():
    base = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_ff=48)
    plain = Transformer(ModelConfig(**base), rngs=nnx.Rngs(0))
    tnl = Transformer(ModelConfig(**base, embed_scale=True, final_norm_gain=False),
                      rngs=nnx.Rngs(0))
    tokens = jnp.array([[1, 5, 7, 39]])
    table = np.asarray(plain.embed.embedding[...])
    np.testing.assert_array_equal(np.asarray(plain.embed_tokens(tokens)), table[[[1, 5, 7, 39]]])
    np.testing.assert_allclose(np.asarray(tnl.embed_tokens(tokens)),
                               math.sqrt(32) * table[[[1, 5, 7, 39]]], rtol=1e-6)
    # the final norm: no parameter at all, and x / RMS(x) before the head
    paths = {p for p, _ in nnx.to_flat_state(nnx.state(tnl, nnx.Param))}
    assert ("final_norm", "scale") not in paths and tnl.final_norm is None
    assert {p for p, _ in nnx.to_flat_state(nnx.state(plain, nnx.Param))} - paths == {
        ("final_norm", "scale")}
    x = jax.random.normal(jax.random.key(0), (1, 4, 32)) * 3.0
    head = np.asarray(tnl.lm_head.kernel[...])
    np.testing.assert_allclose(np.asarray(tnl.head(x)), np.asarray(srms_norm(x)) @ head,
                               rtol=1e-5, atol=1e-5)
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs",
                                   "tnl_shakespeare.yaml"), [])
    assert cfg.model.embed_scale and not cfg.model.final_norm_gain
    assert not ModelConfig().embed_scale and ModelConfig().final_norm_gain  # LLaMA default


def test_support_restores_after_a_checkpoint_round_trip_and_never_trains(tmp_path):
    """A run stopped at step 3 and resumed ends bit-identical to an uninterrupted one; the support
    is the seed's draw (never updated) and the optimizer state holds nothing of it."""
    from jaxlm.optim import build_optimizer
    from jaxlm.sharding import make_mesh
    from jaxlm.train.checkpoint import Checkpointer
    from jaxlm.train.loop import run
    from jaxlm.train.state import StateSpec

    tiny = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")

    def cfg(out, *extra):
        return load_config(tiny, [f"out_dir={out}", "train.steps=6", "train.eval_every=0",
                                  "ckpt.every=0", "model.weights=sltrain", "optim.name=sltrain",
                                  "model.lowrank_rank=4", "model.sparse_density=0.1", *extra])

    full = run(cfg(tmp_path / "full"))
    assert run(cfg(tmp_path / "resumed", "train.stop_at=3"))["step"] == 3
    second = run(cfg(tmp_path / "resumed"))
    assert second["start_step"] == 3
    a, b = (jax.tree.map(np.asarray, jax.device_get(r["state"])) for r in (full, second))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    c = load_config(os.path.join(tmp_path, "full", "config.yaml"), [])  # vocab resolved
    spec = StateSpec.build(c, make_mesh(c.mesh), build_optimizer(c))
    fresh = jax.device_get(spec.init()["params"])
    ckpt = Checkpointer(str(tmp_path / "full"), c.ckpt)
    restored = jax.device_get(ckpt.restore(6, spec.abstract_with_shardings())["params"])
    ckpt.close()
    sup = lambda t: t["blocks"]["attn"]["wq"]["support"]  # noqa: E731
    np.testing.assert_array_equal(sup(a["params"]), sup(fresh))  # not trained, seed's draw
    np.testing.assert_array_equal(sup(restored), sup(fresh))
    assert sup(fresh).dtype == np.int32 and not np.array_equal(sup(fresh)[0], sup(fresh)[1])
    assert not np.allclose(a["params"]["blocks"]["attn"]["wq"]["values"],
                           fresh["blocks"]["attn"]["wq"]["values"])  # the values did train
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(
        a["opt_state"])]
    assert paths and not any("support" in p for p in paths)
