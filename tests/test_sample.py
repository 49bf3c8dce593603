"""jaxlm.sample: cached decode against full recompute, logit filters, sampling, text round trip.

The reference for every decode test is the model run on the whole sequence so far with no cache.
Weights are N(0, 0.5²) (not the 0.02 default) so logits are peaked and greedy paths are far from
ties; a 2-layer model with GQA (4 query / 2 kv heads) unless a test says otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.data.tokenizer import get_tokenizer
from jaxlm.model import Transformer
from jaxlm.sample import filter_logits, generate, sample_text, sample_token

V = 61
B, P, N = 2, 5, 8  # one shape for most tests, so compiled functions are shared
NEG = np.finfo(np.float32).min


@functools.lru_cache(maxsize=None)
def tiny(n_kv_heads=2, scan_layers=True, vocab=V):
    """A tiny model's (graphdef, params); weights N(0, 0.5²) so logits are peaked.

    Shapes come from ``nnx.eval_shape`` and values from numpy: ``Transformer(cfg, rngs=...)``
    compiles one threefry kernel per parameter (~15 s for this model on 2 busy cores).
    """
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                      d_ff=64, scan_layers=scan_layers)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def init(path, x):  # RMSNorm scales 1, every matrix N(0, 0.5²)
        if path[-1].key == "scale":
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(init, nnx.to_pure_dict(abstract))


@functools.lru_cache(maxsize=None)
def _forward(graphdef):
    return jax.jit(lambda params, tokens, cache=None, index=None:
                   nnx.merge(graphdef, params)(tokens, cache=cache, cache_index=index))


def full_logits(graphdef, params, tokens):
    """No-cache forward on a whole sequence: [B, T] -> logits [B, T, V].

    Attention is causal, so logits[:, t] depend on tokens[:, :t+1] only: one call on a buffer of
    fixed length T gives the full-recompute logits of every prefix (and compiles once).
    """
    return np.asarray(_forward(graphdef)(params, jnp.asarray(tokens, jnp.int32))[0])


def prompt(b=B, p=P, seed=0, vocab=V):
    return np.random.default_rng(seed).integers(0, vocab, (b, p), dtype=np.int32)


# ----------------------------------------------------------------------------- cached decode

@functools.lru_cache(maxsize=None)
def greedy_reference(n_kv_heads):
    """[B, P+N] prompt + N tokens, each the argmax of a full no-cache recompute of the prefix.

    Computed with the scanned model; the unrolled one has the same weights and math (and compiling
    one reference per attention layout instead of per model keeps the test fast).
    """
    graphdef, params = tiny(n_kv_heads, True)
    seq = np.zeros((B, P + N), np.int32)
    seq[:, :P] = prompt()
    for t in range(P, P + N):
        seq[:, t] = full_logits(graphdef, params, seq)[:, t - 1].argmax(-1)
    return seq


@pytest.mark.parametrize("n_kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
def test_greedy_cached_equals_full_recompute_argmax(n_kv_heads, scan_layers):
    graphdef, params = tiny(n_kv_heads, scan_layers)
    out = generate(graphdef, params, prompt(), max_new_tokens=N, temperature=0.0)
    assert out.shape == (B, P + N) and out.dtype == np.int32
    np.testing.assert_array_equal(out, greedy_reference(n_kv_heads))
    assert len(np.unique(out[:, P:])) > 2  # a non-trivial path, not one repeated token


def test_cached_logits_match_full_recompute_every_step():
    graphdef, params = tiny()
    fwd = _forward(graphdef)
    seq = np.concatenate([prompt(), prompt(p=N, seed=1)], axis=1)  # [B, P+N]
    ref = full_logits(graphdef, params, seq)  # [B, P+N, V]
    cache = nnx.merge(graphdef, params).init_cache(B, P + N)
    logits, cache = fwd(params, jnp.asarray(seq[:, :P]), cache, 0)  # prefill [B, P, V]
    np.testing.assert_allclose(logits, ref[:, :P], atol=1e-5, rtol=1e-5)
    for t in range(P, P + N):  # one token at a time at cache_index t
        logits, cache = fwd(params, jnp.asarray(seq[:, t:t + 1]), cache, t)
        np.testing.assert_allclose(logits[:, 0], ref[:, t], atol=1e-5, rtol=1e-5)


def test_generate_edge_cases_and_eos_padding():
    graphdef, params = tiny()
    np.testing.assert_array_equal(generate(graphdef, params, prompt(), max_new_tokens=0), prompt())
    # Declare the first greedy token of row 0 to be "eos": that row must emit only eos from then.
    greedy = generate(graphdef, params, prompt(), max_new_tokens=N, temperature=0.0)
    eos = int(greedy[0, P])
    padded = generate(graphdef, params, prompt(), max_new_tokens=N, temperature=0.0, eos_id=eos)
    assert (padded[0, P:] == eos).all()
    row = greedy[1, P:]  # row 1 follows greedy up to its first eos (if any), then pads
    hit = np.flatnonzero(row == eos)
    upto = hit[0] + 1 if hit.size else N
    np.testing.assert_array_equal(padded[1, P:P + upto], row[:upto])
    assert (padded[1, P + upto:] == eos).all()
    with pytest.raises(ValueError):
        generate(graphdef, params, np.zeros((B, 0), np.int32), max_new_tokens=3)
    with pytest.raises(ValueError):
        generate(graphdef, params, prompt(), max_new_tokens=3, top_p=0.0)


# ----------------------------------------------------------------------------- filters

def test_filter_off_is_identity():
    z = jnp.asarray(np.random.default_rng(0).standard_normal((3, V)), jnp.float32)
    np.testing.assert_array_equal(filter_logits(z), z)
    np.testing.assert_array_equal(filter_logits(z, top_k=0, top_p=1.0), z)
    np.testing.assert_array_equal(filter_logits(z, top_k=V), z)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_keeps_exactly_k(k):
    z = jnp.asarray(np.random.default_rng(1).standard_normal((4, V)), jnp.float32)
    f = np.asarray(filter_logits(z, top_k=k))
    kept = f > NEG
    assert (kept.sum(-1) == k).all()
    top = np.argsort(-np.asarray(z), axis=-1)[:, :k]
    assert np.take_along_axis(kept, top, -1).all()
    np.testing.assert_array_equal(f[kept], np.asarray(z)[kept])  # kept logits unchanged


def test_top_k_keeps_ties():
    z = jnp.array([[3.0, 1.0, 3.0, 0.0, 3.0]])
    assert (np.asarray(filter_logits(z, top_k=2)) > NEG).tolist() == [[1, 0, 1, 0, 1]]


@pytest.mark.parametrize("p, expect", [(0.3, [0, 1, 0, 0]), (0.55, [1, 1, 0, 0]),
                                       (0.75, [1, 1, 0, 0]), (0.85, [1, 1, 1, 0]),
                                       (0.99, [1, 1, 1, 1])])
def test_top_p_hand_computed(p, expect):
    # probs 0.3, 0.5, 0.15, 0.05 -> sorted 0.5 | 0.8 | 0.95 | 1.0 cumulative.
    probs = np.array([[0.3, 0.5, 0.15, 0.05]])
    f = np.asarray(filter_logits(jnp.log(jnp.asarray(probs, jnp.float32)), top_p=p))
    assert (f > NEG).astype(int).tolist() == [expect]
    kept = jax.nn.softmax(jnp.asarray(f), -1)
    np.testing.assert_allclose(kept, np.where(f > NEG, probs, 0) / probs[f > NEG].sum(), atol=1e-6)


def test_top_p_then_top_k_compose():
    probs = np.array([[0.3, 0.5, 0.15, 0.05]])
    z = jnp.log(jnp.asarray(probs, jnp.float32))
    # top_k=3 renormalises to 0.5/0.95 ≈ 0.526 for the top token, so p=0.52 keeps only it.
    f = np.asarray(filter_logits(z, top_k=3, top_p=0.52))
    assert (f > NEG).astype(int).tolist() == [[0, 1, 0, 0]]


# ----------------------------------------------------------------------------- sampling

@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def draws(z, seeds, **settings):
    """sample_token once per seed: z [B, V], seeds [S] -> tokens [S, B]."""
    return jax.vmap(lambda s: sample_token(z, jax.random.key(s), **settings))(seeds)


def test_sample_token_greedy_keys_and_frequencies():
    z = jnp.log(jnp.array([[0.6, 0.3, 0.1, 0.0]]))  # [1, 4]; the last token has probability 0
    np.testing.assert_array_equal(sample_token(z, None, temperature=0.0), [0])
    seeds = jnp.arange(8000) % 4000  # every key twice
    a = np.asarray(draws(z, seeds, temperature=1.0))[:, 0]
    assert a.dtype == np.int32
    np.testing.assert_array_equal(a[:4000], a[4000:])  # same key, same token
    assert len(np.unique(a[:10])) > 1  # other keys, other tokens
    np.testing.assert_allclose(np.bincount(a[:4000], minlength=4) / 4000, [0.6, 0.3, 0.1, 0],
                               atol=0.03)
    # τ=0.5: p ∝ p², i.e. 0.78, 0.20, 0.02, so nucleus 0.7 keeps only the top token.
    np.testing.assert_array_equal(draws(z, seeds, temperature=0.5, top_p=0.7), 0)


def test_sample_token_top_k_1_is_greedy():  # (top-k membership in general: the generate test)
    z = jnp.asarray(np.random.default_rng(2).standard_normal((8, V)), jnp.float32)
    many = draws(z, jnp.arange(200), temperature=2.0, top_k=1)  # [200, 8], one candidate each
    np.testing.assert_array_equal(many, np.broadcast_to(np.argmax(z, -1), (200, 8)))


def test_generate_sampling_deterministic_and_respects_top_k():
    graphdef, params = tiny()
    kw = dict(max_new_tokens=N, temperature=1.5, top_k=3, top_p=0.95)
    a = generate(graphdef, params, prompt(), key=jax.random.key(0), **kw)
    np.testing.assert_array_equal(a, generate(graphdef, params, prompt(), key=jax.random.key(0),
                                              **kw))
    assert (a != generate(graphdef, params, prompt(), key=jax.random.key(1), **kw)).any()
    logits = full_logits(graphdef, params, a)  # [B, P+N, V]; logits[:, t-1] predict token t
    for t in range(P, P + N):  # every sampled token is among the top-3 of its step's logits
        top3 = np.argsort(-logits[:, t - 1], axis=-1)[:, :3]
        assert (top3 == a[:, t:t + 1]).any(-1).all()


def test_sample_text_byte_round_trip():
    tok = get_tokenizer("byte")
    graphdef, params = tiny(vocab=tok.vocab_size)
    kw = dict(max_new_tokens=6, temperature=0.0, top_k=0, top_p=1.0, seed=0)
    text = sample_text(graphdef, params, tok, "A", **kw)
    assert isinstance(text, str) and text.startswith("A")
    ids = generate(graphdef, params, tok.encode("A")[None], max_new_tokens=6, temperature=0.0,
                   eos_id=tok.eos_id)[0, 1:]
    stop = np.flatnonzero(ids == tok.eos_id)  # text = prompt + the bytes before the first eos
    assert text == "A" + tok.decode(ids[:stop[0]] if stop.size else ids)
    empty = sample_text(graphdef, params, tok, "", **kw)  # starts from [eos] (same 1-token shape)
    assert isinstance(empty, str)


class _IdTokenizer:
    """Token ids as space-separated text; eos outside the vocab, so it is never generated."""

    eos_id = V

    def encode(self, text):
        return np.array([int(t) for t in text.split()], np.int32)

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids if i != self.eos_id)


def test_sample_text_windows_long_generations_within_context():
    """context=8: after the first window fills, each next window re-prefills the last 4 tokens,
    so the continuation equals greedy generate() on exactly those cropped prompts."""
    tok = _IdTokenizer()
    graphdef, params = tiny()
    text = sample_text(graphdef, params, tok, "3 7", max_new_tokens=10, temperature=0.0,
                       context=8)
    out = tok.encode(text)
    assert len(out) == 12 and list(out[:2]) == [3, 7]
    first = generate(graphdef, params, out[None, :2], max_new_tokens=6, temperature=0.0)[0]
    np.testing.assert_array_equal(first, out[:8])  # window 1: prompt 2 + 6 new = context
    second = generate(graphdef, params, out[None, 4:8], max_new_tokens=4, temperature=0.0)[0]
    np.testing.assert_array_equal(second, out[4:12])  # window 2: last 4 tokens re-prefilled
    third = generate(graphdef, params, out[None, :2], max_new_tokens=10, temperature=0.0)[0]
    assert not np.array_equal(third, out)  # without windows, positions 8.. would differ
