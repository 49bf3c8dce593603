"""The LLaMA-style decoder-only language model (Touvron et al. 2023), layers stacked and scanned.

    x_0 = E[tokens]                          E: [V_tensor, D_fsdp]
    x_l = Block_l(x_{l-1}),  l = 1 … L       (pre-norm attention + SwiGLU, see layers.py)
    logits = RMSNorm(x_L) · W_head           W_head: [D_fsdp, V_tensor] (or Eᵀ when tied), float32

All L blocks are created at once by ``nnx.vmap`` so each parameter has a leading ``[L]`` axis
(logical name ``layers``), and the forward pass runs them with ``jax.lax.scan``: the compiled
program contains one block, so compile time does not grow with depth. ``model.scan_layers=False``
unrolls the same stacked weights with a Python loop (same checkpoints, easier to profile).
Rematerialisation (``model.remat``) wraps the per-layer body in ``jax.checkpoint``:
``none`` keeps every activation, ``full`` recomputes the whole block in the backward pass,
``save_dots`` keeps only the matmul outputs without batch dims (projections) and recomputes the
rest.

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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.model.layers import Block, RMSNorm, param
from jaxlm.sharding import shard

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the block
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be resolved (> 0) before building")
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        v, d = cfg.vocab_size, cfg.d_model
        self.embed = nnx.Module()
        self.embed.embedding = param(rngs, (v, d), ("vocab", "embed"), cfg.init_std)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(d, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Module()
            self.lm_head.kernel = param(rngs, (d, v), ("embed", "vocab"), cfg.init_std)

    def init_cache(self, batch: int, max_len: int):
        """Per-layer decode caches stacked on a leading [L] axis."""
        one = self.blocks.attn.init_cache(batch, max_len, self.dtype)  # attn holds no [L] state
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (self.cfg.n_layers,) + x.shape), one)

    def __call__(self, tokens, positions=None, segment_ids=None, cache=None, cache_index=None):
        """tokens [B, T] int -> (logits [B, T, V] float32, new cache or None)."""
        b, t = tokens.shape
        if positions is None:
            start = 0 if cache_index is None else cache_index
            positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))
        x = jnp.take(self.embed.embedding[...], tokens, axis=0).astype(self.dtype)  # [B, T, D]
        x = shard(x, ("batch", "seq", "act_embed"))

        graphdef, stacked = nnx.split(self.blocks)

        def body(x, layer):
            state, layer_cache = layer
            y, new_cache = nnx.merge(graphdef, state)(x, positions, segment_ids, layer_cache,
                                                      cache_index)
            return y, new_cache

        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.cfg.remat],
                                  prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            x, cache = jax.lax.scan(body, x, (stacked, cache))
        else:
            outs = []
            for i in range(self.cfg.n_layers):
                layer = jax.tree.map(lambda a: a[i], (stacked, cache))
                x, c = body(x, layer)
                outs.append(c)
            cache = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)

        x = self.final_norm(x)
        w = (self.embed.embedding[...].T if self.cfg.tie_embeddings
             else self.lm_head.kernel[...])  # [D, V]
        logits = jnp.einsum("btd,dv->btv", x, w.astype(self.dtype),
                            preferred_element_type=jnp.float32)
        return shard(logits, ("batch", "seq", "vocab")), cache
