"""Every matmul weight of every model variant comes from the ``model.weights`` registry with the
configured shapes (dense kernels, low-rank factors of rank min(r, I, O), SLTrain values)."""

import math

import pytest
from flax import nnx

from jaxlm.config import ConfigError, ModelConfig
from jaxlm.model import WEIGHTS, Transformer, make_dense
from jaxlm.model.dense import Dense
from jaxlm.model.lowrank import LowRankDense, SLTrainDense

RANK, DENSITY = 8, 0.1  # rank differs from the default 32; d_model 32 > 8 > n_heads 4
TINY = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=48,
            lowrank_rank=RANK, sparse_density=DENSITY)
VARIANTS = [("softmax", ""), ("linear", ""), ("retnet", ""), ("tnl", ""), ("simple_gla", ""),
            ("tnl", "LS"), ("simple_gla", "SL")]
# parameters that are not matmul weights (embedding / head stay dense, as in the papers)
NON_MATMUL = {"embed/embedding", "lm_head/kernel", "final_norm/scale"}
NON_MATMUL_LEAVES = {"scale", "lrpe_theta", "b_alpha"}


def _build(attention, pattern, weights):
    cfg = ModelConfig(**TINY, attention=attention, layer_pattern=pattern, weights=weights)
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def _path(p):
    return "/".join(str(k) for k in p)


def _matmuls(model):
    """{module path: module} of every module of a registered weight class."""
    kinds = tuple(WEIGHTS.values())
    return {_path(p): m for p, m in nnx.iter_graph(model) if isinstance(m, kinds)}


def _reference_shapes(attention, pattern):
    """{path: (lead, I, O, kernel shape)} of the dense model's kernels."""
    out = {}
    for path, m in _matmuls(_build(attention, pattern, "dense")).items():
        shape = m.kernel.shape
        lead = shape[:1]  # the stacked [L] / [units] axis
        ins, outs = shape[1:1 + m.n_in], shape[1 + m.n_in:]
        out[path] = (lead, math.prod(ins), math.prod(outs), shape)
    return out


def _check(kind, m, lead, i, o, shape):
    if kind == "dense":
        assert type(m) is Dense and m.kernel.shape == shape
        return {"kernel"}
    r = min(RANK, i, o)
    assert m.a.shape == lead + (i, r) and m.b.shape == lead + (r, o)
    if kind == "lowrank":
        assert type(m) is LowRankDense
        return {"a", "b"}
    assert type(m) is SLTrainDense
    nnz = int(DENSITY * i * o)  # SLTrain: int(δ·I·O) entries of each matrix
    assert m.values.shape == lead + (nnz,) and m.support.shape == lead + (nnz,)
    return {"a", "b", "values"}


@pytest.mark.parametrize("kind", ["dense", "lowrank", "sltrain"])
@pytest.mark.parametrize("attention,pattern", VARIANTS)
def test_every_matmul_weight_follows_model_weights(attention, pattern, kind):
    ref = _reference_shapes(attention, pattern)
    model = _build(attention, pattern, kind)
    mods = _matmuls(model)
    assert set(mods) == set(ref) and len(ref) >= 7  # q k v o + 3 MLP matrices at least
    covered = set()
    for path, (lead, i, o, shape) in ref.items():
        leaves = _check(kind, mods[path], lead, i, o, shape)
        covered |= {f"{path}/{leaf}" for leaf in leaves}
    # the whole param tree: every other parameter is a known non-matmul one
    for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = _path(p)
        assert path in covered or path in NON_MATMUL or p[-1] in NON_MATMUL_LEAVES, path


def test_rank_reaches_linear_attention_projections():
    """The bug of issue #12: linear attention's wq/wk/wv/wo ignored model.lowrank_rank."""
    m = _build("linear", "", "lowrank")
    for name in ("wq", "wk", "wv", "wo"):
        assert getattr(m.blocks.layer0.attn, name).a.shape[-1] == RANK
    assert m.blocks.layer0.mlp.w_up.a.shape[-1] == RANK


def test_register_and_unknown_weights():
    class Doubled(Dense):
        def __call__(self, x):
            return 2 * super().__call__(x)

    from jaxlm.model.weights import register_weights
    from jaxlm.config import load_config
    register_weights("doubled_test", Doubled)
    try:
        assert load_config(None, ["model.weights=doubled_test"]).model.weights == "doubled_test"
        w = make_dense(ModelConfig(weights="doubled_test"), (4,), (3,), ("embed", "mlp"),
                       std=0.02, rngs=nnx.Rngs(0))
        assert type(w) is Doubled
    finally:
        del WEIGHTS["doubled_test"]
    with pytest.raises(ConfigError, match="model.weights='nope' is not registered"):
        make_dense(ModelConfig(weights="nope"), (4,), (3,), ("embed", "mlp"), std=0.02,
                   rngs=nnx.Rngs(0))
