"""Typed, frozen run configuration: YAML presets plus ``section.key=value`` overrides.

A run is described by one :class:`Config` made of small frozen dataclasses (model, data, train,
optim, mesh, ckpt). Presets live in ``configs/*.yaml``; any field can be overridden on the command
line with MaxText-style ``section.key=value`` arguments whose values are parsed as YAML scalars.
Unknown keys and wrong types are :class:`ConfigError` (one line, naming the key and the fix), so a
typo never silently trains the wrong model. The resolved config is written next to checkpoints
(:func:`to_yaml`) and read back on resume.

Example::

    from jaxlm.config import load_config
    cfg = load_config("configs/shakespeare.yaml", ["train.steps=100", "model.n_layers=2"])
    cfg.model.n_layers  # -> 2
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field

import yaml

from jaxlm.errors import ConfigError, suggest as _suggest
from jaxlm.utils.strict_yaml import yaml_load


# presets, bundled corpora and YAML files live in jaxlm/presets.py; re-exported here
from jaxlm.presets import (ASSETS, CORPORA, DEFAULT_CORPUS, DEFAULT_PRESET,  # noqa: F401
                           PRESETS, preset_names, read_yaml, resolve_config_path,
                           resolve_data_path)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 0  # 0 = the tokenizer's vocabulary size; larger pads the embedding
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = same as n_heads (no GQA)
    head_dim: int = 0  # per-head width K; 0 = d_model // n_heads (attention: D -> H*K -> D)
    d_ff: int = 1024  # SwiGLU hidden width
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention: str = "softmax"  # attention variant (the linear-attention family plugs in here)
    attn_impl: str = "reference"  # reference (einsum) | fused (jax.nn.dot_product_attention)
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (params always float32)
    remat: str = "none"  # none | full | save_dots
    scan_layers: bool = True
    init_std: float = 0.02
    # residual + attention-probability dropout, training only (0 = off, bit-identical to none)
    dropout: float = 0.0
    weights: str = "dense"  # how a matmul weight is parameterised (low-rank/sparse plug in here)
    # -- linear attention family (jaxlm/model/linear.py) --
    layer_pattern: str = ""  # "" = all layers `attention`; else e.g. "LLLS" repeated (S = softmax)
    linear_chunk: int = 64  # chunk size C of the chunked linear-attention kernel
    linear_norm: str = "head"  # output norm scope of tnl/retnet/simple_gla: head | all (TNL: all)
    tnl_decay: str = "official"  # official (ALiBi slopes x layer factor) | paper (eq. 10) | none
    tnl_lrpe: bool = True  # TNL: LRPE-d on the first layer (official "mix" setting)
    embed_scale: bool = False  # x_0 = sqrt(d_model) * E[tokens] (TNL / fairseq); LLaMA: off
    final_norm_gain: bool = True  # False: gain-free final SRMSNorm, eps 1e-6 (TNL); LLaMA: True
    # -- low-rank / sparse weights (jaxlm/model/lowrank.py) --
    lowrank_rank: int = 32  # r of W = s*B*A (model.weights=lowrank|sltrain), clipped to min(in, out)
    lowrank_scale: float = 0.25  # s in W = s*B*A: the papers' lora_alpha / r (0.25 at 60M)
    lowrank_init: str = "paper"  # paper (kaiming-uniform, the authors' code) | std_matched
    sparse_density: float = 0.03  # SLTrain: fraction delta of W's entries in the fixed sparse support

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def attn_head_dim(self) -> int:
        """The per-head width K actually used: ``head_dim``, or ``d_model // n_heads`` when 0."""
        return self.head_dim or self.d_model // self.n_heads


@dataclass(frozen=True)
class SourceConfig:
    """One source of a weighted mixture (``data.sources``; jaxlm/data/mixture.py)."""
    name: str = ""  # names its eval metrics: eval_bpb/<name>
    path: str = ""  # a prepared corpus (jaxlm-prepare) or a text file, like data.path
    weight: float = 0.0  # relative sampling weight (> 0; normalised over the sources)
    val_path: str = ""  # its held-out data; "" = its own val split, like data.val_path


@dataclass(frozen=True)
class DataConfig:
    # -- bucketing / packing (jaxlm/data/bucketing.py) --
    format: str = "auto"  # pack/dd corpus: auto (by extension) | text | jsonl | arrayrecord
    doc_separator: str = "\n\n"  # text corpora: literal document separator ("re:<regex>" = regex)
    text_field: str = "text"  # jsonl: the field holding each document's text
    cache_dir: str = ""  # token cache (memory-mapped); "" = ~/.cache/jaxlm/tokens
    min_bucket: int = 256  # dd: smallest bucket; buckets are 2^k from here up to data.seq_len
    buckets: str = ""  # dd: explicit comma-separated powers of two (overrides min_bucket)
    curriculum: str = "grow_p2"  # dd: uniform | grow_p2 | grow_linear (odds per bucket)
    cycles: int = 8  # dd: curriculum cycles per training run (train.steps) (paper: Grow-P2 x 8)
    curriculum_weights: str = "paper"  # dd: paper (Algorithm 1: odds o_i) | repo (o_i x tokens)
    dd_overflow: str = "random"  # dd: random (repo default, P(L) ∝ 1/L) | greedy (max pieces)
    pack_bins: int = 0  # pack: first-fit packing bins (0 = the local batch size)
    path: str = ""  # a text file; "" = the bundled tinyshakespeare
    val_path: str = ""  # separate validation file; "" = split off val_fraction of `path`
    val_fraction: float = 0.1
    seq_len: int = 256
    tokenizer: str = "byte"  # byte | gpt2 | sentencepiece | hf (a tokenizer.json or its dir)
    tokenizer_path: str = ""  # gpt2: dir with vocab.json+merges.txt; sentencepiece: .model ("" = bundled)
    mode: str = "concat"  # concat (bucketing/packing modes plug in here)
    shuffle: bool = True
    # weighted mixture: [{name, path, weight}, ...] instead of data.path (jaxlm/data/mixture.py)
    sources: tuple[SourceConfig, ...] = ()


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    stop_at: int = 0  # end this run early at this step (0 = run to `steps`); schedule still spans `steps`
    batch_size: int = 32  # global sequences per optimizer step
    grad_accum: int = 1  # micro-batches per step (batch_size must divide evenly)
    lr: float = 1e-3
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # floor of the decay, as a fraction of lr
    decay_fraction: float = 0.2  # wsd: fraction of steps spent in the final decay
    z_loss: float = 0.0  # coefficient of the log(Z)^2 auxiliary loss (PaLM uses 1e-4)
    log_every: int = 10
    eval_every: int = 200  # 0 = only at the end
    eval_batches: int = 8
    sample_tokens: int = 200  # tokens sampled at the end of jaxlm-train (0 = none)
    # A step whose loss or gradients are NaN/inf is never applied (params and optimizer state
    # stay as they were; the step counter and data still advance). skip: count it (metrics.jsonl
    # `nonfinite_skips`, a log line) and go on; stop: end the run with an error at the next
    # metrics fetch, before any checkpoint after it, so the latest checkpoint is the last good.
    nonfinite: str = "skip"  # skip | stop

    def __post_init__(self):
        if self.nonfinite not in ("skip", "stop"):
            raise ConfigError(f"train.nonfinite={self.nonfinite!r} is not one of: skip, stop")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    wd_norms: bool = False  # apply weight decay to norm gains too
    wd_embeddings: bool = False  # apply weight decay to embeddings / output head too
    grad_clip: float = 1.0  # global-norm clip (0 = off)
    # -- low-rank optimizers (jaxlm/optim/lowrank.py) --
    rank: int = 32  # GaLore/Fira projection rank r (clipped to each matrix's short side)
    proj_gap: int = 200  # GaLore/Fira: refresh the projector by SVD every T updates
    galore_scale: float = 0.25  # GaLore/Fira: alpha, the scale of the back-projected update
    proj_side: str = "std"  # std (project the short side, as the paper) | reverse_std (optax.contrib)
    fira_gamma: float = 1.01  # Fira norm-growth limiter
    reset_every: int = 0  # momentum reset every N updates, any optimizer (0 = off)
    rewarmup_steps: int = 10  # after each reset, ramp the LR linearly over this many updates
    refactor_every: int = 0  # lowrank/sltrain: re-balance B, A by SVD every N updates (0 = off)


@dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1 = fill with the remaining devices
    tensor: int = 1


@dataclass(frozen=True)
class CkptConfig:
    every: int = 500  # save every N steps (0 = only at the end)
    keep: int = 3
    async_save: bool = True


@dataclass(frozen=True)
class Config:
    out_dir: str = "out/run"
    seed: int = 0
    distributed: bool = False  # multi-process run: jaxlm.distributed.initialize (docs/multihost.md)
    # Explicit cluster (auto-detected on Cloud TPU, Slurm, Open MPI; give them elsewhere):
    coordinator_address: str = ""  # host:port of process 0 ("" = auto / $JAX_COORDINATOR_ADDRESS)
    num_processes: int = 0  # processes in the job (0 = auto-detect)
    process_id: int = -1  # this process's index in [0, num_processes) (-1 = auto-detect)
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = measure with a matmul probe
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)


_EXAMPLES = {bool: "true", int: "8", float: "0.5", str: "text"}


def _coerce(key: str, value, typ):
    """Check/convert one leaf value against its annotated type (int, float, bool, str)."""
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r} "
                      f"(write e.g. {key}={_EXAMPLES.get(typ, '...')})")


_PATH_KEYS = ("out_dir", "data.path", "data.val_path", "data.tokenizer_path", "data.cache_dir")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r} "
                          f"(write e.g. {where}.key=value)")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            hint = _suggest(str(key), names, prefix) or (
                f"; valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: "
                f"{', '.join(sorted(names))}")
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value or {}, f"{prefix}{key}.")
        elif typing.get_origin(typ) is tuple:  # data.sources: a list of mappings
            kwargs[key] = _build_list(typing.get_args(typ)[0], value, prefix + key)
        else:
            kwargs[key] = _coerce(prefix + key, value, typ)
            if prefix + key in _PATH_KEYS or (prefix.startswith("data.sources[")  # ~ expanded
                                              and key in ("path", "val_path")):  # like data.path
                kwargs[key] = os.path.expanduser(kwargs[key])
    return cls(**kwargs)


def _build_list(cls, value, key: str) -> tuple:
    """A YAML list of mappings -> a tuple of ``cls`` (``data.sources``)."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r} (write e.g. "
                          f"{key}='[{{name: a, path: DIR_A, weight: 0.8}}, "
                          "{name: b, path: DIR_B, weight: 0.2}]')")
    return tuple(_build(cls, item, f"{key}[{i}].") for i, item in enumerate(value))


def _set_path(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{p}' is not a section")
    old = node.get(parts[-1])
    # `train.steps=3 train={lr: 1}`: merge, never drop the earlier override silently
    node[parts[-1]] = _merge(old, value) if isinstance(old, dict) and isinstance(value, dict) \
        else value


_SECTIONS = ("model", "data", "train", "optim", "mesh", "ckpt")


def parse_overrides(overrides: typing.Sequence[str]) -> dict:
    """``["train.steps=10", "model.dtype=bfloat16"]`` -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"bad override {item!r}: expected section.key=value "
                              "(e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        try:
            # undecodable argv bytes (surrogateescape) only occur in strings such as file names,
            # which YAML's reader refuses: take those verbatim
            undecodable = any("\udc80" <= c <= "\udcff" for c in raw)
            value = raw if undecodable or raw == "" else yaml_load(raw, f"override {item!r}")
        except yaml.YAMLError as e:
            raise ConfigError(f"bad value for {key}: {raw!r} is not valid YAML "
                              f"({e.__class__.__name__}); quote or fix it") from None
        if value is None and key.strip() in _SECTIONS:  # would silently reset the whole section
            raise ConfigError(f"override {item!r} would drop every {key.strip()}.* setting of "
                              f"the config file; set single keys instead (e.g. "
                              f"{key.strip()}.key=value)")
        _set_path(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(data: dict) -> Config:
    return validate(_build(Config, data))


def load_config(path: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Build a validated :class:`Config` from an optional YAML file (or preset name) and dotted
    overrides."""
    data = read_yaml(resolve_config_path(path)) if path else {}
    return from_dict(_merge(data, parse_overrides(overrides)))


def to_dict(cfg) -> dict:
    """Nested plain dicts (tuples of sections, e.g. ``data.sources``, become lists for YAML)."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x
    return plain(dataclasses.asdict(cfg))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: Config, **sections) -> Config:
    """``replace(cfg, train={"steps": 5})`` -> a new Config with those fields changed."""
    return from_dict(_merge(to_dict(cfg), sections))


_CHOICES = {
    "model.attention": ("softmax", "linear", "retnet", "tnl", "simple_gla"),
    "model.weights": ("dense", "lowrank", "sltrain"),
    "model.lowrank_init": ("paper", "std_matched"),
    "model.attn_impl": ("reference", "fused"),
    "model.dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "save_dots"),
    "data.tokenizer": ("byte", "gpt2", "sentencepiece", "hf"),
    "data.mode": ("concat", "pack", "dd"),
    "data.curriculum_weights": ("paper", "repo"),
    "data.dd_overflow": ("random", "greedy"),
    "train.schedule": ("cosine", "wsd", "constant"),
    "optim.name": ("adamw", "galore", "fira", "lowrank", "sltrain"),
}


def register_choice(key: str, value: str) -> None:
    """Let a plug-in (attention variant, optimizer, data mode) extend a validated choice list."""
    if value not in _CHOICES[key]:
        _CHOICES[key] = _CHOICES[key] + (value,)


def _leaves(cfg: Config):
    """('train.lr', 1e-3), ('seed', 0), ... for every field of the config."""
    for name, value in to_dict(cfg).items():
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
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if m.dropout and m.attn_impl == "fused":
        raise ConfigError("model.dropout drops attention probabilities, which "
                          "model.attn_impl=fused does not expose; use model.attn_impl=reference")
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
