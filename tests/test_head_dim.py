"""``model.head_dim``: a per-head width K independent of d_model / n_heads (attention projects
D -> H*K -> D), its default (0 = D / H) bit-identical to before, its validation, checkpoint
compatibility of configs written before the field existed, and the analytic counts.

Independent references: the parameter-count formula (:func:`jaxlm.utils.flops.param_count`)
against the leaves of a real model, and the shapes written out by hand.
"""

import math

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from jaxlm.config import ConfigError, ModelConfig, from_dict, load_config, to_dict
from jaxlm.model import Transformer
from jaxlm.train.compat import check_compatible, describe_changes
from jaxlm.train.loop import run
from jaxlm.utils.flops import param_count

WIDE = dict(vocab_size=61, d_model=64, n_layers=2, n_heads=4, d_ff=96)  # H*K = 128 != D = 64


def _leaves(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_attention_projects_to_heads_times_head_dim():
    cfg = ModelConfig(**WIDE, head_dim=32)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    shapes = {tuple(x.shape) for x in _leaves(model)}
    # scanned layers: a leading [L] axis; wq/wk/wv [L, D, H, K], wo [L, H, K, D]
    assert (2, 64, 4, 32) in shapes and (2, 4, 32, 64) in shapes
    n = sum(math.prod(x.shape) for x in _leaves(model))
    assert n == param_count(cfg, 61)
    assert n > param_count(ModelConfig(**WIDE), 61)  # K=32 > D/H=16: more attention weights
    logits, _ = model(jax.random.randint(jax.random.key(1), (2, 8), 0, 61))
    assert logits.shape == (2, 8, 61) and bool(np.isfinite(np.asarray(logits)).all())


def test_default_head_dim_is_bit_identical_to_d_model_over_n_heads():
    """0 and an explicit d_model / n_heads build the same arrays from the same seed."""
    a = _leaves(Transformer(ModelConfig(**WIDE), rngs=nnx.Rngs(0)))
    b = _leaves(Transformer(ModelConfig(**WIDE, head_dim=16), rngs=nnx.Rngs(0)))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert ModelConfig(**WIDE).attn_head_dim == 16


@pytest.mark.parametrize("attention,pattern", [("tnl", "LS"), ("retnet", "")])
def test_linear_attention_takes_a_head_dim_too(attention, pattern):
    cfg = ModelConfig(**WIDE, head_dim=24, attention=attention, layer_pattern=pattern)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert any(tuple(x.shape)[-3:] == (64, 4, 24) for x in _leaves(model))
    logits, _ = model(jax.random.randint(jax.random.key(1), (2, 16), 0, 61))
    assert bool(np.isfinite(np.asarray(logits)).all())


def test_a_head_dim_model_trains_and_counts_its_params(tmp_path):
    cfg = load_config("tiny", [f"out_dir={tmp_path}", "model.head_dim=32",
                               "train.steps=4", "train.log_every=2",
                               "train.eval_every=0", "ckpt.every=0"])
    m = cfg.model  # GQA too: 4 query heads share 2 KV heads, each of width 32
    assert (m.d_model, m.n_heads, m.kv_heads, m.attn_head_dim) == (64, 4, 2, 32)
    result = run(cfg)
    assert result["loss"] is not None and math.isfinite(result["loss"])
    params = result["state"]["params"]
    assert sum(x.size for x in jax.tree.leaves(params)) == param_count(result["cfg"].model, 257)
    assert result["spec"].param_count() == param_count(result["cfg"].model, 257)


def test_head_dim_validation_is_one_line():
    for extra, msg in ((["model.head_dim=-2"], "model.head_dim=-2 must be >= 0"),
                       (["model.head_dim=33"], "model.head_dim=33 must be even for RoPE"),
                       (["model.n_heads=5"], "model.d_model=64 is not divisible by "
                                             "model.n_heads=5")):
        with pytest.raises(ConfigError, match=msg) as err:
            load_config("tiny", extra)
        assert "\n" not in str(err.value)
    # an explicit head_dim frees n_heads from dividing d_model (n_kv_heads must still divide)
    cfg = load_config("tiny", ["model.n_heads=6", "model.n_kv_heads=3", "model.head_dim=16"])
    assert cfg.model.attn_head_dim == 16


def test_configs_saved_before_the_field_still_resume():
    """A config.yaml written before ``model.head_dim`` existed (no such key) loads with the default
    and is compatible with today's config; changing head_dim is a different model."""
    now = load_config("tiny", ["model.vocab_size=256"])
    old = to_dict(now)
    del old["model"]["head_dim"]
    saved = from_dict(yaml.safe_load(yaml.safe_dump(old)))
    assert saved == now
    check_compatible(saved, now)
    assert describe_changes(saved, now) == []
    other = load_config("tiny", ["model.vocab_size=256", "model.head_dim=32"])
    with pytest.raises(ConfigError, match="model.head_dim: checkpoint 0 vs now 32"):
        check_compatible(saved, other)


@pytest.mark.parametrize("extra", [{"attn_bias": True}, {"qk_norm": True},
                                   {"attn_bias": True, "qk_norm": True, "head_dim": 32}])
def test_param_count_counts_biases_and_qk_norms(extra):
    """The analytic count (the planner's) equals the real model with Qwen2/Qwen3 options."""
    cfg = ModelConfig(**WIDE, **extra)
    n = sum(math.prod(x.shape) for x in _leaves(Transformer(cfg, rngs=nnx.Rngs(0))))
    assert n == param_count(cfg, 61) > param_count(ModelConfig(**WIDE), 61)
