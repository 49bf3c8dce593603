"""Typed, frozen run configuration: YAML presets plus ``section.key=value`` overrides.

A run is described by one :class:`Config` made of small frozen dataclasses (model, data, train,
optim, mesh, ckpt, log). Presets live in ``configs/*.yaml``; any field can be overridden on the command
line with MaxText-style ``section.key=value`` arguments whose values are parsed as YAML scalars.
Unknown keys and wrong types are :class:`ConfigError` (one line, naming the key and the fix), so a
typo never silently trains the wrong model. The resolved config is written next to checkpoints
(:func:`to_yaml`) and read back on resume. Cross-field checks (choices, ranges, combinations) are
in :mod:`jaxlm.config_checks`; :func:`from_dict` runs them on every config.

Example::

    from jaxlm.config import load_config
    cfg = load_config("configs/shakespeare.yaml", ["train.steps=100", "model.n_layers=2"])
    cfg.model.n_layers  # -> 2
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field

import yaml

from jaxlm.config_checks import (_CHOICES, check_mesh_sizes, layer_pattern,  # noqa: F401
                                 register_choice, validate)
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
    # Llama-3.1 RoPE frequency remapping (jaxlm/ops/rope.py): "" = none | llama3
    rope_scaling: str = ""
    rope_scaling_factor: float = 8.0  # llama3: s, the low frequencies are divided by it
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths > original_max_pos / this: scaled
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths < original_max_pos / this: kept
    rope_original_max_pos: int = 8192  # llama3: the pre-extension context length L0
    attn_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE, weight [head_dim] (Qwen3)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention: str = "softmax"  # attention variant (the linear-attention family plugs in here)
    # softmax attention kernel (jaxlm/ops/attention.py): auto (cuDNN on GPU, splash on TPU, XLA on
    # CPU) | reference (einsum, for reading) | xla | cudnn | splash; "fused" = xla (older configs)
    attn_impl: str = "auto"
    linear_impl: str = "jax"  # chunked linear attention: jax (pure JAX) | pallas (Pallas kernel)
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (params always float32)
    remat: str = "none"  # none | full | save_dots
    scan_layers: bool = True
    init_std: float = 0.02
    # residual + attention-probability dropout, training only (0 = off, bit-identical to none)
    dropout: float = 0.0
    # head + loss fused over sequence chunks, gradients in the forward pass (jaxlm/ops/head_loss.py):
    # -1 = auto (chunks of <= 32 MiB of logits), N = N positions per chunk, 0 = not fused
    head_chunk: int = -1
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

    def __post_init__(self):
        if self.rope_scaling not in ("", "llama3"):
            raise ConfigError(f"model.rope_scaling={self.rope_scaling!r} is not one of: '' "
                              "(none), llama3")
        if self.rope_scaling and not (
                self.rope_scaling_factor > 0 and self.rope_original_max_pos > 0
                and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
            raise ConfigError("model.rope_scaling=llama3 needs rope_scaling_factor > 0, "
                              "rope_original_max_pos > 0 and 0 < rope_low_freq_factor < "
                              "rope_high_freq_factor")

    @property
    def rope_scaling_args(self):
        """None, or ("llama3", factor, low, high, original_max_pos) for jaxlm.ops.apply_rope."""
        if not self.rope_scaling:
            return None
        return (self.rope_scaling, self.rope_scaling_factor, self.rope_low_freq_factor,
                self.rope_high_freq_factor, self.rope_original_max_pos)

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
    schedule: str = "cosine"  # cosine | wsd | constant | infinite_cosine | infinite_rsqrt
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
    profile: str = ""  # "START:STOP": jax.profiler trace of those steps -> <out_dir>/profile
    dump_hlo: bool = False  # write each compiled train step's HLO to <out_dir>/hlo/
    # -- infinite schedules (train.schedule=infinite_cosine|infinite_rsqrt; optim/schedules.py):
    # warmup -> cooldown to a constant lr -> constant (continuable) -> optional final annealing
    cooldown_steps: int = 200  # infinite_*: updates of the cooldown from lr to const_lr_ratio*lr
    const_lr_ratio: float = 0.25  # infinite_*: the constant phase's lr, as a fraction of lr
    anneal_steps: int = 0  # infinite_*: the run's last N updates anneal (exponentially) to
    #                        lr*min_lr_ratio; 0 = no annealing (end in the constant phase)
    rsqrt_alpha: float = 10.0  # infinite_rsqrt: steepness alpha of the inverse-sqrt cooldown
    # infinite_*: update k of this run uses the schedule's value at k + schedule_offset, so a run
    # continued with init_from (e.g. offset = the source run's steps) starts in the constant phase
    schedule_offset: int = 0

    def __post_init__(self):
        if self.nonfinite not in ("skip", "stop"):
            raise ConfigError(f"train.nonfinite={self.nonfinite!r} is not one of: skip, stop")
        check_infinite(self)


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
class LogConfig:
    wandb: bool = False  # also log to Weights & Biases (pip install wandb; process 0 only)
    wandb_project: str = "jaxlm"
    wandb_run: str = ""  # run name; "" = the out_dir's last path component
    wandb_mode: str = ""  # "" = wandb's default ($WANDB_MODE, else online) | online | offline


@dataclass(frozen=True)
class Config:
    out_dir: str = "out/run"
    seed: int = 0
    # start from another run's parameters (fresh optimizer, data, schedule; train/init_from.py):
    # "" = random init | ckpt:OUT_DIR (its latest step) | ckpt:OUT_DIR@STEP | hf:HF_DIR
    init_from: str = ""
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
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        if self.init_from:
            parse_init_from(self.init_from)  # ConfigError if malformed


def check_infinite(t: TrainConfig) -> None:
    """The infinite schedules' phases (jaxlm/optim/schedules.py); ConfigError if inconsistent."""
    infinite = t.schedule.startswith("infinite_")
    if t.schedule_offset and not infinite:
        raise ConfigError(f"train.schedule_offset={t.schedule_offset} only applies to the infinite "
                          f"schedules (train.schedule=infinite_cosine|infinite_rsqrt), not "
                          f"{t.schedule}; cosine/wsd re-warm and re-decay on a fresh schedule")
    for key in ("cooldown_steps", "anneal_steps", "schedule_offset"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 0")
    if not 0 < t.const_lr_ratio <= 1:
        raise ConfigError(f"train.const_lr_ratio={t.const_lr_ratio} must be in (0, 1]")
    if not t.rsqrt_alpha > 0:
        raise ConfigError(f"train.rsqrt_alpha={t.rsqrt_alpha} must be > 0")
    if infinite and t.anneal_steps:
        if t.anneal_steps > t.steps:
            raise ConfigError(f"train.anneal_steps={t.anneal_steps} is longer than the run "
                              f"(train.steps={t.steps})")
        if not t.min_lr_ratio > 0:
            raise ConfigError("train.anneal_steps anneals exponentially to lr*train.min_lr_ratio, "
                              "which must be > 0 (e.g. train.min_lr_ratio=0.01)")
        start = t.steps - t.anneal_steps + t.schedule_offset  # schedule position where it starts
        if start < t.warmup_steps + t.cooldown_steps:
            raise ConfigError(
                f"train.anneal_steps={t.anneal_steps} would start annealing at schedule step "
                f"{start}, before the constant phase (warmup_steps + cooldown_steps = "
                f"{t.warmup_steps + t.cooldown_steps}); lower anneal_steps or raise train.steps")


def parse_init_from(value: str) -> tuple[str, str, int | None]:
    """``init_from`` -> (kind, path, step): ("ckpt", "out/a", 500) for ``ckpt:out/a@500``,
    ("ckpt", "out/a", None) for its latest step, ("hf", DIR, None); ConfigError if malformed.
    In a ckpt: path the last ``@`` always starts the step number."""
    kind, sep, rest = value.partition(":")
    if not sep or kind not in ("ckpt", "hf") or not rest.strip():
        raise ConfigError(f"init_from={value!r}: write init_from=ckpt:OUT_DIR, "
                          "init_from=ckpt:OUT_DIR@STEP or init_from=hf:HF_DIR")
    step = None
    if kind == "ckpt" and "@" in rest:
        rest, _, num = rest.rpartition("@")
        if not num.isdigit() or not rest:
            raise ConfigError(f"init_from={value!r}: the part after '@' must be a step number "
                              "(e.g. init_from=ckpt:out/base@500)")
        step = int(num)
    return kind, os.path.expanduser(rest), step


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


_SECTIONS = ("model", "data", "train", "optim", "mesh", "ckpt", "log")


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
