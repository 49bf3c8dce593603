"""Dropout (``model.dropout``): inverted-dropout statistics, the identity at rate 0 and without a
key (evaluation and sampling call the model without one), a different mask per key, and exact
resume (the mask comes from the checkpointed rng and the step number)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import ops
from jaxlm.config import ConfigError, ModelConfig, load_config
from jaxlm.model import Transformer
from jaxlm.train.loop import run

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")
SMALL = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ff=64)


def test_dropout_statistics():
    x = jnp.ones((200, 500))
    y = np.asarray(ops.dropout(x, 0.3, jax.random.key(0)))
    kept = (y != 0).mean()
    assert abs(kept - 0.7) < 0.005  # Bernoulli(0.7) over 1e5 entries: std 0.0015
    np.testing.assert_allclose(y[y != 0], 1 / 0.7, rtol=1e-6)  # inverted: E[y] = x
    assert ops.dropout(x, 0.3, None) is x and ops.dropout(x, 0.0, jax.random.key(0)) is x


@pytest.mark.parametrize("attention,pattern", [("softmax", ""), ("tnl", "LS")])
def test_model_dropout_only_with_a_key(attention, pattern):
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 61)
    cfg = ModelConfig(**SMALL, attention=attention, layer_pattern=pattern)
    off = Transformer(cfg, rngs=nnx.Rngs(0))
    on = Transformer(ModelConfig(**SMALL, attention=attention, layer_pattern=pattern,
                                 dropout=0.2), rngs=nnx.Rngs(0))
    base, _ = off(tokens)
    # rate 0 with a key, and rate > 0 without one (eval, sampling): bit-identical to no dropout
    np.testing.assert_array_equal(off(tokens, dropout_key=jax.random.key(3))[0], base)
    np.testing.assert_array_equal(on(tokens)[0], base)
    a, _ = on(tokens, dropout_key=jax.random.key(3))
    b, _ = on(tokens, dropout_key=jax.random.key(4))
    assert not np.allclose(a, base) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, on(tokens, dropout_key=jax.random.key(3))[0])


def test_dropout_with_fused_attention_is_refused():
    with pytest.raises(ConfigError, match="model.dropout .*attn_impl=reference"):
        load_config(TINY, ["model.dropout=0.1", "model.attn_impl=fused"])
    with pytest.raises(ConfigError, match=r"model.dropout=1.0 must be in \[0, 1\)"):
        load_config(TINY, ["model.dropout=1.0"])


def _params(result):
    return jax.tree.map(np.asarray, jax.device_get(result["state"]["params"]))


def test_dropout_run_resumes_exactly(tmp_path):
    common = ["model.dropout=0.2", "train.steps=6", "train.log_every=1", "train.eval_every=0",
              "ckpt.every=0", "train.grad_accum=2", "train.batch_size=16"]
    full = run(load_config(TINY, [f"out_dir={tmp_path / 'full'}", *common]))
    run(load_config(TINY, [f"out_dir={tmp_path / 'split'}", *common, "train.stop_at=3"]))
    resumed = run(load_config(TINY, [f"out_dir={tmp_path / 'split'}", *common]))
    jax.tree.map(np.testing.assert_array_equal, _params(full), _params(resumed))
    assert full["loss"] == resumed["loss"]


def test_sampling_never_drops():
    from jaxlm.data.tokenizer import get_tokenizer
    from jaxlm.sample import sample_text

    tok = get_tokenizer("byte")
    graphs = [nnx.split(Transformer(ModelConfig(**{**SMALL, "vocab_size": 257}, dropout=p),
                                    rngs=nnx.Rngs(0))) for p in (0.0, 0.5)]
    params = nnx.to_pure_dict(graphs[0][1])
    texts = [sample_text(g, params, tok, "ab", max_new_tokens=8, temperature=1.0, seed=1)
             for g, _ in graphs]
    assert texts[0] == texts[1]
