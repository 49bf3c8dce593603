"""The LLaMA-style decoder-only language model (Touvron et al. 2023), layers stacked and scanned.

    x_0 = E[tokens]                          E: [V_tensor, D_fsdp]
    x_l = Block_l(x_{l-1}),  l = 1 … L       (pre-norm attention + SwiGLU, see layers.py)
    logits = RMSNorm(x_L) · W_head           W_head: [D_fsdp, V_tensor] (or Eᵀ when tied), float32

TransNormerLLM options (Qin et al. 2023, arXiv 2307.14995, and its official model code):
``model.embed_scale`` uses x_0 = √D · E[tokens], and ``model.final_norm_gain=False`` makes the
final norm the gain-free SRMSNorm(x) = x / √(mean(x²) + 1e-6) (TNL §3.4), a norm with no
parameter. Both are off for LLaMA and on in ``configs/tnl_*.yaml``.

All L blocks are created at once by ``nnx.vmap`` so each parameter has a leading ``[L]`` axis
(logical name ``layers``), and the forward pass runs them with ``jax.lax.scan``: the compiled
program contains one block, so compile time does not grow with depth. ``model.scan_layers=False``
unrolls the same stacked weights with a Python loop (same checkpoints, easier to profile).
Rematerialisation (``model.remat``) wraps the per-layer body in ``jax.checkpoint``:
``none`` keeps every activation, ``full`` recomputes the whole block in the backward pass,
``save_dots`` keeps only the matmul outputs without batch dims (projections) and recomputes the
rest.

Linear attention and hybrids (``model.attention`` a linear variant, ``model.layer_pattern``
such as "LLLS" = one softmax layer every 4, MiniMax-01 uses 7:1, Qwen3-Next 3:1): the layers are
grouped into repeating units of the pattern; ``nnx.vmap`` stacks the units (params
``blocks/layer{j}/…`` with a leading [n_layers / p] axis) and the scan runs one unit per step,
passing the unit index so TNL layers know their depth l = unit·p + j (layer-dependent decay,
LRPE on layer 0). Softmax-only models keep the original one-Block-per-layer stack.

Decoding uses a cache pytree with the same leading ``[L]`` axis; a call with ``cache`` processes T
new tokens written at ``cache_index`` (prefill: the prompt; decode: one token).

Example::

    import jax.numpy as jnp
    from flax import nnx
    from jaxlm.config import ModelConfig
    from jaxlm.model import Transformer
    model = Transformer(ModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=128, vocab_size=257),
                        rngs=nnx.Rngs(0))
    logits, _ = model(jnp.zeros((2, 16), jnp.int32))          # [2, 16, 257] float32
    hybrid = Transformer(ModelConfig(d_model=64, n_layers=4, n_heads=4, d_ff=128, vocab_size=257,
                                     attention="tnl", layer_pattern="LLLS"), rngs=nnx.Rngs(0))
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig, layer_pattern
from jaxlm.model.dense import param
from jaxlm.model.layers import Block, RMSNorm
from jaxlm.model.linear import TNLBlock, srms_norm
from jaxlm.ops.head_loss import head_logits
from jaxlm.sharding import shard

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the block
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Unit(nnx.Module):
    """One repeat of the layer pattern: blocks ``layer0 … layer{p-1}`` (hybrid / linear models)."""

    def __init__(self, cfg: ModelConfig, pattern: str, *, rngs):
        self.pattern = pattern
        softmax_cfg = dataclasses.replace(cfg, attention="softmax")
        for j, kind in enumerate(pattern):
            if kind == "S":
                blk = Block(softmax_cfg, rngs=rngs)
            else:
                blk = TNLBlock(cfg, rngs=rngs) if cfg.attention == "tnl" else Block(cfg, rngs=rngs)
            setattr(self, f"layer{j}", blk)

    def init_cache(self, batch, max_len, dtype):
        return {f"layer{j}": getattr(self, f"layer{j}").attn.init_cache(batch, max_len, dtype)
                for j in range(len(self.pattern))}

    def __call__(self, x, positions, segment_ids, cache, cache_index, unit, dropout_key=None):
        """Runs the p blocks; ``unit`` (traced) gives layer index unit·p + j to TNL blocks."""
        new, p = {}, len(self.pattern)
        keys = [None] * p if dropout_key is None else jax.random.split(dropout_key, p)
        for j in range(p):
            blk, name = getattr(self, f"layer{j}"), f"layer{j}"
            c = None if cache is None else cache[name]
            kw = {"layer": unit * p + j} if isinstance(blk, TNLBlock) else {}
            x, new[name] = blk(x, positions, segment_ids, c, cache_index, dropout_key=keys[j],
                               **kw)
        return x, (None if cache is None else new)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be resolved (> 0) before building")
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        v, d = cfg.vocab_size, cfg.d_model
        self.embed = nnx.Module()
        self.embed.embedding = param(rngs, (v, d), ("vocab", "embed"), cfg.init_std)
        pattern = layer_pattern(cfg)
        # softmax-only models keep one stacked Block per layer (the original checkpoint layout)
        self.pattern = None if set(pattern) == {"S"} else pattern
        n_stack = cfg.n_layers if self.pattern is None else cfg.n_layers // len(pattern)

        @nnx.split_rngs(splits=n_stack)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            if self.pattern is None:
                return Block(dataclasses.replace(cfg, attention="softmax"), rngs=rngs)
            return Unit(cfg, pattern, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.n_stack = n_stack
        # None: the gain-free SRMSNorm of TNL (no parameter)
        self.final_norm = RMSNorm(d, cfg.norm_eps) if cfg.final_norm_gain else None
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Module()
            self.lm_head.kernel = param(rngs, (d, v), ("embed", "vocab"), cfg.init_std)

    def init_cache(self, batch: int, max_len: int):
        """Per-layer decode caches stacked on a leading [L] (or [units]) axis: KV for softmax
        layers, the O(1) recurrent state for linear ones."""
        mod = self.blocks if self.pattern is not None else self.blocks.attn  # no [L] state used
        one = mod.init_cache(batch, max_len, self.dtype)
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (self.n_stack,) + x.shape), one)

    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, cache_index=None,
                 dropout_key=None):
        """tokens [B, T] int -> (logits [B, T, V] float32, new cache or None).

        ``dropout_key`` (training only; ``model.dropout`` > 0): one key split into one per layer,
        each block's attention-probability and residual dropout draw from it. Without it (eval,
        sampling) nothing is dropped. Training and eval take :meth:`hidden` and
        :meth:`head_inputs` instead, to fuse the head with the loss (jaxlm/ops/head_loss.py)."""
        x, cache = self.hidden(tokens, positions, segment_ids, cache, cache_index, dropout_key)
        return self.head(x), cache

    def hidden(self, tokens, positions=None, segment_ids=None, cache=None, cache_index=None,
               dropout_key=None):
        """tokens [B, T] -> (x_L [B, T, D], new cache or None): everything before the head."""
        b, t = tokens.shape
        if positions is None:
            start = 0 if cache_index is None else cache_index
            positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))
        x = self.embed_tokens(tokens)  # [B, T, D]
        graphdef, stacked = nnx.split(self.blocks)

        keys = None if dropout_key is None else jax.random.split(dropout_key, self.n_stack)

        def body(x, layer):
            state, layer_cache, idx, key = layer
            args = (x, positions, segment_ids, layer_cache, cache_index)
            if self.pattern is not None:
                args += (idx,)
            y, new_cache = nnx.merge(graphdef, state)(*args, dropout_key=key)
            return y, new_cache

        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.cfg.remat],
                                  prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            x, cache = jax.lax.scan(body, x, (stacked, cache, jnp.arange(self.n_stack), keys))
        else:
            outs = []
            for i in range(self.n_stack):
                layer = jax.tree.map(lambda a: a[i], (stacked, cache)) + (
                    i, None if keys is None else keys[i])
                x, c = body(x, layer)
                outs.append(c)
            cache = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
        return x, cache

    def embed_tokens(self, tokens):
        """tokens [B, T] -> x_0 [B, T, D] = E[tokens] (× √D with ``model.embed_scale``)."""
        # FSDP all-gathers the table's D dim before the lookup (as for every weight); gathering
        # straight from E[V_tensor, D_fsdp] would give x[B, T, D_fsdp], and XLA's only way to
        # reach x[B_(data,fsdp), T, D] from there is an "involuntary full rematerialization".
        table = shard(self.embed.embedding[...], ("vocab", None))  # [V_tensor, D]
        x = jnp.take(table, tokens, axis=0)  # [B, T, D] float32
        if self.cfg.embed_scale:
            x = x * math.sqrt(self.cfg.d_model)  # TNL: √D · E[tokens]
        return shard(x.astype(self.dtype), ("batch", "seq", "act_embed"))

    def head_inputs(self, x):
        """x_L [B, T, D] -> (final-normed x [B, T, D], head weight W [D, V] in compute dtype)."""
        x = srms_norm(x) if self.final_norm is None else self.final_norm(x)
        w = (self.embed.embedding[...].T if self.cfg.tie_embeddings
             else self.lm_head.kernel[...])  # [D, V]
        return x, w.astype(self.dtype)

    def head(self, x):
        """x_L [B, T, D] -> logits [B, T, V] float32: final norm, then the output head."""
        # one 2-D matmul [B*T, D] @ [D, V] (see Dense: no transposed copy of the [B*T, V]
        # logits gradient in the backward pass)
        return shard(head_logits(*self.head_inputs(x)), ("batch", "seq", "vocab"))
