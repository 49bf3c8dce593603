"""Hugging Face ``config.json`` <-> jaxlm model settings, for the architectures jaxlm can run.

Supported (import): ``LlamaForCausalLM`` (LLaMA 2/3, Llama-3.1 ``rope_scaling`` type
``llama3``, SmolLM = LLaMA with ``tie_word_embeddings``), ``MistralForCausalLM``,
``Qwen2ForCausalLM`` (q/k/v biases: ``model.attn_bias``) and ``Qwen3ForCausalLM`` (per-head q/k
RMSNorm: ``model.qk_norm``; ``head_dim`` may differ from hidden/heads). Field mapping::

    hidden_size -> model.d_model          intermediate_size -> model.d_ff
    num_hidden_layers -> model.n_layers   num_attention_heads -> model.n_heads
    num_key_value_heads -> model.n_kv_heads (GQA)
    head_dim -> model.head_dim            rms_norm_eps -> model.norm_eps
    rope_theta (or rope_parameters.rope_theta) -> model.rope_theta
    rope_scaling / rope_parameters {rope_type: llama3, factor, low_freq_factor, high_freq_factor,
        original_max_position_embeddings} -> model.rope_scaling=llama3 + rope_scaling_factor,
        rope_low_freq_factor, rope_high_freq_factor, rope_original_max_pos
    tie_word_embeddings -> model.tie_embeddings     vocab_size -> model.vocab_size
    max_position_embeddings -> data.seq_len (capped at 2048; raise it for longer training)

Both spellings of the RoPE settings are read: transformers 4.x (``rope_theta`` + ``rope_scaling``)
and 5.x (``rope_parameters``); export writes the 4.x spelling, which 5.x reads too. Anything
jaxlm would compute differently (another activation, MLP biases, an o_proj bias, partial
rotary, another rope type) is a one-line ConfigError. A sliding window (Mistral v0.1,
``use_sliding_window`` Qwen) is accepted with a warning: jaxlm attends over the whole context,
which is identical for sequences up to the window (data.seq_len is capped at it).

Example::

    from jaxlm.convert.hf_config import model_overrides
    model, seq_len, arch = model_overrides({"architectures": ["LlamaForCausalLM"],
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 128})
    model["d_model"]   # 64
"""

from __future__ import annotations

import logging

from jaxlm.config import Config, ConfigError

log = logging.getLogger("jaxlm")

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
MAX_SEQ_LEN = 2048  # data.seq_len of an imported model (at most max_position_embeddings)


def architecture(hf: dict, where: str) -> str:
    """The one supported architecture named in config.json, else a one-line ConfigError."""
    archs = hf.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in SUPPORTED:
        raise ConfigError(f"{where}: architecture {arch!r} is not supported; jaxlm converts "
                          f"{', '.join(SUPPORTED)} (SmolLM is LlamaForCausalLM)")
    return arch


def _need(hf: dict, key: str, where: str):
    if key not in hf:
        raise ConfigError(f"{where}: config.json has no {key!r}; add it (a transformers "
                          "config.json of a causal LM has it)")
    return hf[key]


def _rope(hf: dict, where: str) -> dict:
    """model.rope_* overrides from either RoPE spelling."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(f"{where}: partial_rotary_factor != 1 is not supported (jaxlm rotates "
                          "the whole head)")
    out = {"rope_theta": float(theta)}
    if kind == "llama3":
        out.update(rope_scaling="llama3", rope_scaling_factor=float(params["factor"]),
                   rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_pos=int(params["original_max_position_embeddings"]))
    elif kind != "default":
        raise ConfigError(f"{where}: rope type {kind!r} is not supported (supported: default, "
                          "llama3)")
    return out


def _refuse_unsupported(hf: dict, where: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act={act!r} is not supported (jaxlm's MLP is SwiGLU, "
                          "silu)")
    if hf.get("mlp_bias"):
        raise ConfigError(f"{where}: mlp_bias=true is not supported (jaxlm's MLP has no biases)")


def _window(hf: dict, arch: str) -> int | None:
    """The sliding window jaxlm would ignore (None when the model attends over everything)."""
    window = hf.get("sliding_window")
    if arch.startswith("Qwen") and not hf.get("use_sliding_window", False):
        return None
    return int(window) if window else None


def model_overrides(hf: dict, where: str = "config.json") -> tuple[dict, int, str]:
    """config.json dict -> (model.* fields, data.seq_len, architecture)."""
    arch = architecture(hf, where)
    _refuse_unsupported(hf, where)
    d, heads = int(_need(hf, "hidden_size", where)), int(_need(hf, "num_attention_heads", where))
    head_dim = hf.get("head_dim") or d // heads
    model = {"vocab_size": int(_need(hf, "vocab_size", where)), "d_model": d,
             "n_layers": int(_need(hf, "num_hidden_layers", where)), "n_heads": heads,
             "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
             "head_dim": 0 if head_dim * heads == d else int(head_dim),
             "d_ff": int(_need(hf, "intermediate_size", where)),
             "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
             "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
             "attn_bias": arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
             "qk_norm": arch == "Qwen3ForCausalLM",
             "init_std": float(hf.get("initializer_range", 0.02)), **_rope(hf, where)}
    seq_len = min(int(hf.get("max_position_embeddings") or MAX_SEQ_LEN), MAX_SEQ_LEN)
    window = _window(hf, arch)
    if window:
        log.warning("%s: sliding_window=%d is not modelled (jaxlm attends over the whole "
                    "context); identical up to %d tokens, data.seq_len capped there", where,
                    window, window)
        seq_len = min(seq_len, window)
    return model, seq_len, arch


def export_architecture(cfg: Config) -> str:
    """The HF architecture that computes what ``cfg.model`` computes (ConfigError if none)."""
    m = cfg.model
    if (m.attention != "softmax" or m.layer_pattern or m.weights != "dense" or m.embed_scale
            or not m.final_norm_gain):
        raise ConfigError("jaxlm-to-hf exports LLaMA-style models only (model.attention=softmax, "
                          "model.weights=dense, no layer_pattern / embed_scale, final_norm_gain="
                          "true); this run's model has no Hugging Face equivalent")
    if m.qk_norm:
        return "Qwen3ForCausalLM"  # attention_bias=attn_bias (its o_proj bias written as zeros)
    return "Qwen2ForCausalLM" if m.attn_bias else "LlamaForCausalLM"


def hf_config(cfg: Config, arch: str, bos: int | None, eos: int | None) -> dict:
    """The config.json of an exported run (transformers 4.x RoPE spelling)."""
    m = cfg.model
    hd = m.attn_head_dim
    max_pos = cfg.data.seq_len
    if m.rope_scaling:
        max_pos = max(max_pos, int(m.rope_original_max_pos * m.rope_scaling_factor))
    out = {"architectures": [arch], "model_type": MODEL_TYPES[arch],
           "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.d_ff,
           "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
           "num_key_value_heads": m.kv_heads, "head_dim": hd, "hidden_act": "silu",
           "max_position_embeddings": max_pos, "rms_norm_eps": m.norm_eps,
           "rope_theta": m.rope_theta, "rope_scaling": None,
           "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
           "attention_dropout": 0.0, "bos_token_id": bos, "eos_token_id": eos,
           "use_cache": True, "torch_dtype": "float32"}
    if m.rope_scaling:
        out["rope_scaling"] = {"rope_type": "llama3", "factor": m.rope_scaling_factor,
                               "low_freq_factor": m.rope_low_freq_factor,
                               "high_freq_factor": m.rope_high_freq_factor,
                               "original_max_position_embeddings": m.rope_original_max_pos}
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=False, mlp_bias=False)
    else:  # Qwen2 / Qwen3: full attention in every layer
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.n_layers)
        if arch == "Qwen3ForCausalLM":
            out["attention_bias"] = m.attn_bias
    return out
