"""Cross-field checks of a :class:`jaxlm.config.Config`: choices, ranges and combinations that
types alone cannot express. :func:`validate` runs on every config built (``from_dict``), so a bad
value is a one-line :class:`ConfigError` before anything starts; plug-ins extend the choice lists
with :func:`register_choice`.

Example::

    from jaxlm.config import load_config
    load_config(None, ["model.dropout=1.5"])  # ConfigError: model.dropout=1.5 must be in [0, 1)
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import TYPE_CHECKING

from jaxlm.errors import ConfigError, suggest as _suggest
from jaxlm.utils.files import check_local_dir, url_scheme

if TYPE_CHECKING:  # the dataclasses live in jaxlm.config, which imports this module
    from jaxlm.config import Config, DataConfig, MeshConfig, ModelConfig

_CHOICES = {
    "model.attention": ("softmax", "linear", "retnet", "tnl", "simple_gla"),
    "model.weights": ("dense", "lowrank", "sltrain"),
    "model.lowrank_init": ("paper", "std_matched"),
    "model.attn_impl": ("auto", "reference", "xla", "cudnn", "splash", "fused"),
    "model.linear_impl": ("jax", "pallas"),
    "log.wandb_mode": ("", "online", "offline"),
    "model.dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "save_dots"),
    "data.tokenizer": ("byte", "gpt2", "sentencepiece", "hf"),
    "data.mode": ("concat", "pack", "dd"),
    "data.curriculum_weights": ("paper", "repo"),
    "data.dd_overflow": ("random", "greedy"),
    "train.schedule": ("cosine", "wsd", "constant", "infinite_cosine", "infinite_rsqrt"),
    "optim.name": ("adamw", "galore", "fira", "lowrank", "sltrain"),
}


def register_choice(key: str, value: str) -> None:
    """Let a plug-in (attention variant, optimizer, data mode) extend a validated choice list."""
    if value not in _CHOICES[key]:
        _CHOICES[key] = _CHOICES[key] + (value,)


def _leaves(cfg: Config):
    """('train.lr', 1e-3), ('seed', 0), ... for every field of the config."""
    for name, value in dataclasses.asdict(cfg).items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for key, leaf in items:
            yield (f"{name}.{key}" if key else name), leaf


def layer_pattern(m: ModelConfig) -> str:
    """The repeating unit of layer kinds: "S" softmax, "L" ``model.attention`` (a linear variant);
    ConfigError if it is malformed. ``model.layer_pattern=""`` means every layer is
    ``model.attention``. A pattern of length p must divide n_layers; layer l has kind
    pattern[l % p] (e.g. "LLLS": one softmax layer every 4)."""
    pattern = m.layer_pattern or ("S" if m.attention == "softmax" else "L")
    if set(pattern) - {"L", "S"} or m.n_layers % len(pattern):
        raise ConfigError(f"model.layer_pattern={m.layer_pattern!r}: use only L/S, with a length "
                          f"that divides model.n_layers={m.n_layers}")
    if "L" in pattern and m.attention == "softmax":
        raise ConfigError("model.layer_pattern has L layers but model.attention=softmax; choose a "
                          "linear variant (linear, retnet, tnl, simple_gla)")
    return pattern


def check_mesh_sizes(mesh: MeshConfig) -> None:
    """Each mesh size is positive or -1 (fill), and at most one is -1 (the device count is
    checked when the mesh is made: :func:`jaxlm.sharding.mesh_shape`)."""
    sizes = (mesh.data, mesh.fsdp, mesh.tensor)
    named = " ".join(f"mesh.{a}={s}" for a, s in zip(("data", "fsdp", "tensor"), sizes))
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"{named}: each mesh size must be positive or -1 (fill)")
    if sum(s == -1 for s in sizes) > 1:
        raise ConfigError(f"{named}: at most one mesh size may be -1 (fill); give the others "
                          "explicit sizes")


def validate(cfg: Config) -> Config:
    """Cross-field checks that types alone cannot express. Raises ConfigError."""
    _check_ranges(cfg)
    _check_model(cfg.model)
    _check_train(cfg)
    _check_cluster(cfg)
    _check_sources(cfg.data)
    _check_local_paths(cfg)
    return cfg


def _check_ranges(cfg: Config) -> None:
    """Choices, finite floats, and the sign / range of single values."""
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(allowed)}"
                              f"{_suggest(str(value), allowed, key + '=')}")
    for key, value in _leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number")
    if not cfg.out_dir.strip():
        raise ConfigError("out_dir is empty; set out_dir=<a directory for checkpoints and logs>")
    m, t = cfg.model, cfg.train
    positive = {"model.d_model": m.d_model, "model.n_layers": m.n_layers,
                "model.n_heads": m.n_heads, "model.d_ff": m.d_ff,
                "data.seq_len": cfg.data.seq_len,
                "train.steps": t.steps, "train.batch_size": t.batch_size,
                "train.grad_accum": t.grad_accum, "train.log_every": t.log_every,
                "ckpt.keep": cfg.ckpt.keep, "model.rope_theta": m.rope_theta,
                "model.norm_eps": m.norm_eps, "optim.eps": cfg.optim.eps}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")
    non_negative = {"train.eval_every": t.eval_every, "train.eval_batches": t.eval_batches,
                    "train.sample_tokens": t.sample_tokens, "train.z_loss": t.z_loss,
                    "ckpt.every": cfg.ckpt.every, "optim.weight_decay": cfg.optim.weight_decay,
                    "optim.grad_clip": cfg.optim.grad_clip, "model.init_std": m.init_std,
                    "peak_flops": cfg.peak_flops, "data.pack_bins": cfg.data.pack_bins}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    for key, value in {"optim.b1": cfg.optim.b1, "optim.b2": cfg.optim.b2}.items():
        if not 0 <= value < 1:
            raise ConfigError(f"{key}={value} must be in [0, 1)")


def _check_model(m: ModelConfig) -> None:
    if m.head_chunk < -1:
        raise ConfigError(f"model.head_chunk={m.head_chunk} must be -1 (auto), 0 (off) or a "
                          "number of positions per chunk")
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if m.dropout and m.attn_impl not in ("auto", "reference"):
        raise ConfigError("model.dropout drops attention probabilities, which "
                          f"model.attn_impl={m.attn_impl} does not expose; use "
                          "model.attn_impl=reference (or auto, which picks it under dropout)")
    if m.vocab_size < 0:
        raise ConfigError(f"model.vocab_size={m.vocab_size} must be >= 0 (0 = from tokenizer)")
    if m.head_dim < 0:
        raise ConfigError(f"model.head_dim={m.head_dim} must be >= 0 (0 = d_model / n_heads)")
    if m.head_dim and m.head_dim % 2:
        raise ConfigError(f"model.head_dim={m.head_dim} must be even for RoPE; e.g. "
                          f"model.head_dim={m.head_dim + 1}")
    if not m.head_dim and m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}"
                          "; choose n_heads that divides d_model")
    if m.attn_head_dim % 2:
        raise ConfigError(f"head dim d_model/n_heads={m.attn_head_dim} must be even for RoPE; "
                          "change model.d_model or model.n_heads")
    if m.n_kv_heads < 0 or m.n_heads % m.kv_heads:
        raise ConfigError(
            f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}; "
            "choose n_kv_heads dividing n_heads (0 = n_heads)")
    layer_pattern(m)


def _check_train(cfg: Config) -> None:
    t = cfg.train
    prof = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", t.profile)
    if t.profile and not (prof and 1 <= int(prof[1]) <= int(prof[2])):
        raise ConfigError(f"train.profile={t.profile!r}: write START:STOP, the first and last "
                          "step to trace, 1 <= START <= STOP (e.g. train.profile=5:7)")
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}; "
            "choose a grad_accum that divides batch_size")
    if not 0 <= t.stop_at <= t.steps:
        raise ConfigError(f"train.stop_at={t.stop_at} must be in [0, train.steps={t.steps}]")
    if t.lr <= 0:
        raise ConfigError(f"train.lr={t.lr} must be > 0 (e.g. train.lr=1e-3)")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    if t.warmup_steps < 0:  # warmup longer than the run is clamped by the schedule
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be >= 0")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in (0, 1)")
    if not 0 <= cfg.seed < 2**32:  # grain's shuffle takes a uint32; jax's key an int64
        raise ConfigError(f"seed={cfg.seed} must be in [0, {2**32 - 1}] (write e.g. seed=1234)")
    for key, value in _leaves(cfg):  # e.g. train.steps=1e30: an OverflowError deep inside later
        if isinstance(value, int) and not -2**63 <= value < 2**63:
            raise ConfigError(f"{key}={value} is too large (it must fit in 64 bits)")


def _check_cluster(cfg: Config) -> None:
    """The multi-process coordinates and the mesh sizes."""
    host, _, port = cfg.coordinator_address.rpartition(":")
    if cfg.coordinator_address and not (host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"coordinator_address={cfg.coordinator_address!r} must be HOST:PORT "
                          "with a port in 1-65535 (e.g. coordinator_address=10.0.0.1:12345)")
    if cfg.num_processes < 0:
        raise ConfigError(f"num_processes={cfg.num_processes} must be >= 0 (0 = auto-detect)")
    if cfg.process_id < -1 or (cfg.num_processes and cfg.process_id >= cfg.num_processes):
        raise ConfigError(f"process_id={cfg.process_id} must be in [0, num_processes="
                          f"{cfg.num_processes}) or -1 (auto-detect)")
    if not cfg.distributed and (cfg.coordinator_address or cfg.num_processes
                                or cfg.process_id >= 0):
        raise ConfigError("coordinator_address / num_processes / process_id are set but "
                          "distributed=false; add distributed=true")
    check_mesh_sizes(cfg.mesh)


def _check_sources(d: DataConfig) -> None:
    """``data.sources``: unique metric-safe names, paths, positive weights; not with data.path."""
    if not d.sources:
        return
    if d.path or d.val_path:
        raise ConfigError("data.sources replaces data.path / data.val_path; set one or the other "
                          "(give each source its own path and val_path)")
    seen = set()
    for i, s in enumerate(d.sources):
        key = f"data.sources[{i}]"
        if not s.name or not all(c.isalnum() or c in "-_." for c in s.name):
            raise ConfigError(f"{key}.name={s.name!r}: give every source a name of letters, "
                              "digits, '-', '_' or '.' (it names the eval_bpb/<name> metric)")
        if s.name in seen:
            raise ConfigError(f"{key}.name={s.name!r} is used twice; source names must be unique")
        seen.add(s.name)
        if not s.path:
            raise ConfigError(f"{key} ({s.name}) has no path; set path: to a prepared corpus "
                              "directory or a text file")
        if not (s.weight > 0 and math.isfinite(s.weight)):
            raise ConfigError(f"{key}.weight={s.weight} ({s.name}) must be a positive number "
                              "(weights are relative; e.g. 0.9 and 0.1)")


def _check_local_paths(cfg: Config) -> None:
    """``out_dir`` and ``data.cache_dir`` (written) and ``init_from``'s directory (read) must be
    local or mounted paths, not URLs: ``out_dir=gs://b/run`` is one line saying to mount the
    bucket with gcsfuse, before anything creates a stray local ``gs:`` directory. (Data files
    with a URL are refused the same way when the data source opens them: jaxlm/presets.py.)"""
    check_local_dir(cfg.out_dir, "out_dir")
    if cfg.data.cache_dir:
        check_local_dir(cfg.data.cache_dir, "data.cache_dir")
    kind, _, path = cfg.init_from.partition(":")
    if url_scheme(path):
        how = ("download it (huggingface-cli download NAME --local-dir DIR)" if kind == "hf"
               else "mount the bucket with gcsfuse, or copy it locally")
        raise ConfigError(f"init_from={cfg.init_from}: {path} is a URL; jaxlm reads checkpoints "
                          f"and models from local or mounted directories: {how}, and pass "
                          f"init_from={kind}:LOCAL_DIR")
