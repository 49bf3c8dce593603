"""Autoregressive sampling: one prefill of the prompt, then a cached, jitted decode loop.

    cache  = model.init_cache(B, P + N)                     # k, v: [L, B, P+N, KV, K]
    logits = model(prompt, cache, cache_index=0)            # prefill: all P prompt tokens at once
    for i in 0 … N-2:                                        # jax.lax.fori_loop, one compiled body
        logits = model(x_{P+i}, cache, cache_index=P+i)     # one new token, position P+i

Why a cache: without one, step t re-runs the model on all t tokens (t queries × t keys of
attention, O(t²), and O(t) projections/MLP), so N steps cost O(N³) attention. The KV cache keeps
every earlier token's keys and values, so a step computes one query against t cached keys: O(t).
The cost is memory, 2·L·B·(P+N)·KV·K elements. Positions come from ``cache_index``; RoPE has no
hard length limit, but a model is not expected to produce good text beyond its training seq_len.

Sampling from logits z [B, V] (applied in this order, as in HF ``generate``):
  * temperature τ: p = softmax(z / τ); τ > 1 flattens the distribution, τ → 0 approaches argmax
    (``temperature=0`` means exactly greedy argmax).
  * top-k: keep the k largest logits (ties at the k-th value are kept), mask the rest.
  * top-p (nucleus, Holtzman et al. 2020 §3.1): keep the smallest set of tokens, most likely first,
    whose probability mass is ≥ p (always at least the top token), mask the rest and renormalise.
Masked logits are set to the most negative float, so they have probability 0 after softmax.

Compiled once per (graphdef, B, P, N, temperature, top_k, top_p); pad prompts to a few
fixed lengths to bound compilations. Rows that emit ``eos_id`` keep emitting it (padding).

Example::

    from flax import nnx
    from jaxlm.config import ModelConfig
    from jaxlm.data.tokenizer import get_tokenizer
    from jaxlm.model import Transformer
    from jaxlm.sample import sample_text
    tok = get_tokenizer("byte")
    model = Transformer(ModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=128, vocab_size=257),
                        rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    print(sample_text(graphdef, nnx.to_pure_dict(state), tok, "ROMEO:", max_new_tokens=32,
                      temperature=0.8, top_k=40, top_p=0.95, seed=0))   # untrained: noise
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def filter_logits(logits, *, top_k: int = 0, top_p: float = 1.0):
    """Mask all but the top-k / nucleus-p logits. logits [B, V] float -> [B, V] (masked = min)."""
    neg = jnp.finfo(logits.dtype).min
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]  # [B, 1]: the k-th largest logit
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        z = jnp.sort(logits, axis=-1)[..., ::-1]  # [B, V] descending
        probs = jax.nn.softmax(z, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        n_keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)  # [B, 1]
        threshold = jnp.take_along_axis(z, n_keep - 1, axis=-1)  # smallest kept logit
        logits = jnp.where(logits < threshold, neg, logits)
    return logits


def sample_token(logits, key, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """logits [B, V] -> next tokens [B] int32; ``temperature == 0`` is greedy (key unused)."""
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature",
                                             "top_k", "top_p"))
def _generate(graphdef, params, prompt, key, eos_id, *, max_new_tokens, temperature, top_k, top_p):
    """prompt [B, P] int32 -> [B, P + N] int32 (prefill + N-1 cached decode steps).

    ``eos_id`` is traced (int32 scalar, -1 = none), so it does not trigger a recompile."""
    b, p = prompt.shape
    n = max_new_tokens

    def sample(logits, i):  # logits [B, V] -> new token i [B]; its key is fold_in(key, i)
        key_i = None if temperature == 0 else jax.random.fold_in(key, i)
        return sample_token(logits, key_i, temperature=temperature, top_k=top_k, top_p=top_p)

    def forward(tokens, cache, index):  # tokens [B, T] -> (logits of the last position [B, V])
        logits, cache = nnx.merge(graphdef, params)(tokens, cache=cache, cache_index=index)
        return logits[:, -1], cache

    def emit(out, tok, done, i):  # rows that already emitted eos keep emitting eos
        tok = jnp.where(done, eos_id, tok)
        done = done | (tok == eos_id)
        return jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1), tok, done

    cache = nnx.merge(graphdef, params).init_cache(b, p + n)  # k, v: [L, B, P+N, KV, K]
    last, cache = forward(prompt, cache, 0)  # prefill: the whole prompt in one call
    out = jnp.zeros((b, n), jnp.int32)  # [B, N] new tokens
    out, tok, done = emit(out, sample(last, 0), jnp.zeros((b,), bool), 0)

    def step(i, carry):  # feed token P+i, sample token P+i+1
        out, cache, tok, done = carry
        last, cache = forward(tok[:, None], cache, p + i)
        out, tok, done = emit(out, sample(last, i + 1), done, i + 1)
        return out, cache, tok, done

    out, *_ = jax.lax.fori_loop(0, n - 1, step, (out, cache, tok, done))
    return jnp.concatenate([prompt, out], axis=1)


def generate(graphdef, params, prompt, *, max_new_tokens: int, key=None, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None) -> np.ndarray:
    """Continue ``prompt`` [B, P] int (all rows length P ≥ 1) by N tokens -> np [B, P + N] int32.

    ``key``: a PRNG key (default ``jax.random.key(0)``; unused when ``temperature == 0``).
    ``top_k=0`` and ``top_p=1.0`` switch those filters off. If ``eos_id`` is given, a row that
    emitted it keeps emitting it.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be [B, P] with P >= 1, got shape {prompt.shape}")
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                         f"{temperature=}, {top_p=}, {top_k=}")
    if max_new_tokens <= 0:
        return np.asarray(prompt)
    key = jax.random.key(0) if key is None else key
    eos = jnp.int32(-1 if eos_id is None else eos_id)
    out = _generate(graphdef, params, prompt, key, eos, max_new_tokens=int(max_new_tokens),
                    temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    return np.asarray(out)


def sample_text(graphdef, params, tokenizer, prompt: str | bytes, *, max_new_tokens: int,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                context: int = 0) -> str:
    """``prompt`` + its sampled continuation up to eos; an empty prompt starts from eos as BOS.

    ``context`` > 0 is the longest sequence the model sees (its training ``seq_len``): longer
    generations proceed in windows — when the window is full, the last ``context // 2`` tokens
    become the next prompt (re-prefilled at positions 0…), as nanoGPT crops its context. This
    keeps every position inside the trained range and compiles at most two shapes.
    """
    ids = np.asarray(tokenizer.encode(prompt), np.int32)
    if len(ids) == 0:
        ids = np.array([tokenizer.eos_id], np.int32)
    out, remaining, key = ids, max_new_tokens, jax.random.key(seed)
    while remaining > 0:
        window = out
        if context and len(out) + remaining > context and len(out) > context // 2:
            window = out[-(context // 2):]  # crop: keep the last half-context as the prompt
        n = remaining if not context else min(remaining, context - len(window))
        key, sub = jax.random.split(key)
        gen = generate(graphdef, params, window[None], max_new_tokens=n, key=sub,
                       temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_id=tokenizer.eos_id)[0]
        new = gen[len(window):]
        stop = np.flatnonzero(new == tokenizer.eos_id)
        out = np.concatenate([out, new[:stop[0]] if stop.size else new])
        remaining = 0 if stop.size else remaining - n
    return tokenizer.decode(out)  # decode skips the eos used as BOS
