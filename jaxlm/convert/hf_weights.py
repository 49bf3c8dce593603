"""The Hugging Face <-> jaxlm weight mapping: ``param_map``, ``load_hf_params``, ``export_tensors``.

Weight mapping (transformers LLaMA-family names; layer i; torch ``nn.Linear`` weights are
[out, in], jaxlm kernels are [in..., out...], so a projection is transposed and reshaped)::

    model.embed_tokens.weight [V, D]                  -> embed/embedding [V, D]
    model.layers.i.input_layernorm.weight [D]         -> blocks/attn_norm/scale [L, D]
    model.layers.i.self_attn.q_proj.weight [H*K, D]   -> blocks/attn/wq/kernel [L, D, H, K]
    model.layers.i.self_attn.{k,v}_proj.weight [KV*K, D] -> blocks/attn/w{k,v}/kernel [L, D, KV, K]
    model.layers.i.self_attn.o_proj.weight [D, H*K]   -> blocks/attn/wo/kernel [L, H, K, D]
    model.layers.i.self_attn.{q,k,v}_proj.bias        -> blocks/attn/b{q,k,v}/bias [L, H|KV, K]
    model.layers.i.self_attn.{q,k}_norm.weight [K]    -> blocks/attn/{q,k}_norm/scale [L, K]
    model.layers.i.post_attention_layernorm.weight    -> blocks/mlp_norm/scale [L, D]
    model.layers.i.mlp.{gate,up}_proj.weight [F, D]   -> blocks/mlp/w_{gate,up}/kernel [L, D, F]
    model.layers.i.mlp.down_proj.weight [D, F]        -> blocks/mlp/w_down/kernel [L, F, D]
    model.norm.weight [D]                             -> final_norm/scale [D]
    lm_head.weight [V, D] (absent when tied)          -> lm_head/kernel [D, V]

RoPE layout: **no permutation**. HF-format LLaMA/Mistral/Qwen q/k weights are laid out for
rotate-half RoPE (dimension j of a head pairs with j + K/2; Meta's original checkpoints pair
(2j, 2j+1) and HF's own converter permutes them into this layout), which is exactly
:func:`jaxlm.ops.rope.apply_rope`. The reshape [H*K] -> [H, K] keeps head h at rows h*K…h*K+K-1,
and GQA groups query head h with kv head h // (H/KV) in both (``repeat_kv`` / the
[KV, G] reshape of :func:`jaxlm.ops.attention.attention_reference`).

Import streams: each tensor is read alone (:class:`jaxlm.convert.safetensors_io.Reader`),
transformed on the host and placed with ``jax.make_array_from_callback`` on the run's shardings
(each device receives only its shard); a layer-stacked parameter is a device buffer that each
layer is written into in place, so host memory holds about one tensor (measured on CPU: a 446 MiB
checkpoint whose largest tensor is 125 MiB peaked 189 MiB = 1.5 tensors above the params
themselves). Export (:func:`export_tensors`) gathers
one tensor (one layer of a stacked parameter) at a time.

Example::

    from jaxlm.config import ModelConfig
    from jaxlm.convert.hf_weights import param_map
    [e.hf for e in param_map(ModelConfig(n_layers=1))][:2]
    # ['model.embed_tokens.weight', 'model.layers.{i}.input_layernorm.weight']
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlm.config import Config, ConfigError, ModelConfig
from jaxlm.convert.safetensors_io import Reader

log = logging.getLogger("jaxlm")

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved


class Entry(NamedTuple):
    path: tuple[str, ...]  # jaxlm params path
    hf: str  # HF tensor name; "{i}" = the layer index (a layer-stacked jaxlm parameter)
    n_in: int  # kernel: leading in-dims (torch [out, in] transposed); 0: flat vector; -1: as is


def param_map(m: ModelConfig) -> list[Entry]:
    """Every jaxlm parameter of ``m`` and its HF tensor, in HF's usual order."""
    layer = [(("attn_norm", "scale"), "input_layernorm.weight", 0),
             (("attn", "wq", "kernel"), "self_attn.q_proj.weight", 1),
             (("attn", "wk", "kernel"), "self_attn.k_proj.weight", 1),
             (("attn", "wv", "kernel"), "self_attn.v_proj.weight", 1),
             (("attn", "wo", "kernel"), "self_attn.o_proj.weight", 2)]
    if m.attn_bias:
        layer += [(("attn", f"b{c}", "bias"), f"self_attn.{c}_proj.bias", 0) for c in "qkv"]
    if m.qk_norm:
        layer += [(("attn", f"{c}_norm", "scale"), f"self_attn.{c}_norm.weight", 0) for c in "qk"]
    layer += [(("mlp_norm", "scale"), "post_attention_layernorm.weight", 0),
              (("mlp", "w_gate", "kernel"), "mlp.gate_proj.weight", 1),
              (("mlp", "w_up", "kernel"), "mlp.up_proj.weight", 1),
              (("mlp", "w_down", "kernel"), "mlp.down_proj.weight", 1)]
    out = [Entry(("embed", "embedding"), "model.embed_tokens.weight", -1)]
    out += [Entry(("blocks",) + p, "model.layers.{i}." + n, k) for p, n, k in layer]
    out.append(Entry(("final_norm", "scale"), "model.norm.weight", 0))
    if not m.tie_embeddings:
        out.append(Entry(("lm_head", "kernel"), "lm_head.weight", 1))
    return out


def hf_shape(shape, n_in: int) -> tuple[int, ...]:
    """The HF tensor shape of a jaxlm parameter of (one layer's) ``shape``."""
    if n_in < 0:
        return tuple(shape)
    if n_in == 0:
        return (math.prod(shape),)
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))  # torch [out, in]


def to_jaxlm(a: np.ndarray, n_in: int, shape) -> np.ndarray:
    """HF tensor -> jaxlm layout ``shape`` (kernel: [out, in] -> [in, out] -> [in..., out...])."""
    return (a.T if n_in > 0 else a).reshape(shape)


def to_hf(a: np.ndarray, n_in: int) -> np.ndarray:
    """jaxlm parameter (one layer) -> HF tensor (inverse of :func:`to_jaxlm`)."""
    if n_in < 0:
        return a
    if n_in == 0:
        return a.reshape(-1)
    return a.reshape(math.prod(a.shape[:n_in]), -1).T  # [in, out] -> torch [out, in]


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, prefix + (k,))
    else:
        yield prefix


def _check_coverage(entries: list[Entry], abstract: dict) -> None:
    want = set(_paths(abstract))
    have = {e.path for e in entries}
    if want != have:
        extra = sorted("/".join(p) for p in want - have)
        raise ConfigError(f"Hugging Face weights cannot fill this model (no HF tensor for "
                          f"{', '.join(extra[:3])}); use a LLaMA-style model "
                          "(model.attention=softmax, model.weights=dense)")


def _hf_names(entries: list[Entry], n_layers: int) -> list[str]:
    return [e.hf.format(i=i) for e in entries for i in (range(n_layers) if "{i}" in e.hf
                                                       else [None])]


def _check_names(r: Reader, entries: list[Entry], m: ModelConfig) -> None:
    """Every needed tensor present; every other tensor harmless (ConfigError otherwise)."""
    needed = _hf_names(entries, m.n_layers)
    names = set(r.names())
    missing = [n for n in needed if n not in names]
    if missing:
        raise ConfigError(f"{r.dir}: the checkpoint has no tensor {missing[0]}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                          + "; its config.json does not match its weights")
    for name in sorted(names - set(needed)):
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and m.tie_embeddings):
            continue
        if name.endswith("o_proj.bias") and not np.any(r.get(name)):
            continue  # Qwen3 attention_bias=true: an all-zero o_proj bias changes nothing
        raise ConfigError(f"{r.dir}: tensor {name} has no place in a jaxlm model (an "
                          "unsupported feature of this checkpoint); jaxlm would compute "
                          "something else, so nothing was converted")


def _read(r: Reader, name: str, n_in: int, shape) -> np.ndarray:
    want = hf_shape(shape, n_in)
    got = r.shape(name)
    if got != want:
        raise ConfigError(f"{r.dir}: tensor {name} has shape {list(got)}, the model config "
                          f"expects {list(want)}; the model shapes differ (vocab_size, "
                          "hidden sizes or heads)")
    return to_jaxlm(r.get(name), n_in, shape)


def _place(host: np.ndarray, sharding) -> jax.Array:
    """A host array onto ``sharding``: each device receives only its own slice."""
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _load_entry(r: Reader, e: Entry, abstract, sharding, n_layers: int) -> jax.Array:
    """One jaxlm parameter on its sharding. A layer-stacked one [L, ...] is a zero buffer on
    device that each layer is written into in place (donated), so the host holds one HF tensor
    and the devices the parameter plus one layer."""
    if "{i}" not in e.hf:
        return _place(_read(r, e.hf, e.n_in, abstract.shape), sharding)
    spec = tuple(sharding.spec)[1:]  # one layer: the stacked spec without its [L] entry
    layer_sh = NamedSharding(sharding.mesh, P(*spec))
    buf = jax.jit(lambda: jnp.zeros(abstract.shape, jnp.float32), out_shardings=sharding)()
    put = jax.jit(lambda b, x, i: jax.lax.dynamic_update_index_in_dim(b, x, i, 0),
                  donate_argnums=0, out_shardings=sharding)
    for i in range(n_layers):
        layer = _place(_read(r, e.hf.format(i=i), e.n_in, abstract.shape[1:]), layer_sh)
        buf = put(buf, layer, i)  # [L, ...] with layer i filled
    return buf


def load_hf_params(hf_dir: str, cfg: Config, spec) -> dict:
    """The parameters of the HF checkpoint in ``hf_dir`` as jaxlm's params pytree, sharded like
    ``spec.shardings["params"]`` (``spec``: :class:`jaxlm.train.state.StateSpec` of ``cfg``).

    Streams tensor by tensor (host memory ~ one tensor). ``cfg.model`` must describe the
    checkpoint's shapes (:func:`jaxlm.convert.hf_config.model_overrides` of its config.json
    gives the model fields); a missing tensor, a shape mismatch (e.g. vocab_size), an
    unsupported dtype or a tensor jaxlm has no place for is a one-line ConfigError. Used by
    ``jaxlm-convert hf-to-jaxlm`` and ``init_from=hf:DIR``.
    """
    entries = param_map(cfg.model)
    abstract, shardings = spec.abstract["params"], spec.shardings["params"]
    _check_coverage(entries, abstract)
    params: dict = {}
    with Reader(hf_dir) as r:
        _check_names(r, entries, cfg.model)
        for e in entries:
            _set(params, e.path, _load_entry(r, e, _get(abstract, e.path),
                                             _get(shardings, e.path), cfg.model.n_layers))
    return params


def export_tensors(cfg: Config, params: dict, extra_zero: dict | None = None):
    """({HF name: shape} in writing order, fetch(name) -> float32 numpy) for ``params``;
    ``extra_zero`` {name: shape} adds all-zero tensors (Qwen3's o_proj bias)."""
    shapes, where = {}, {}
    for e in param_map(cfg.model):
        leaf = _get(params, e.path)
        if "{i}" in e.hf:
            for i in range(cfg.model.n_layers):
                name = e.hf.format(i=i)
                shapes[name], where[name] = hf_shape(leaf.shape[1:], e.n_in), (leaf, i, e.n_in)
        else:
            shapes[e.hf], where[e.hf] = hf_shape(leaf.shape, e.n_in), (leaf, None, e.n_in)
    for name, shape in (extra_zero or {}).items():
        shapes[name], where[name] = tuple(shape), None

    def fetch(name: str) -> np.ndarray:
        if where[name] is None:
            return np.zeros(shapes[name], np.float32)
        leaf, i, n_in = where[name]
        one = leaf if i is None else leaf[i]  # gathers this tensor (one layer) only
        return to_hf(np.asarray(jax.device_get(one), np.float32), n_in)

    return shapes, fetch

