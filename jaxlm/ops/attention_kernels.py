"""Which softmax-attention kernel runs where (``model.attn_impl``), and the two accelerator kernels.

All kernels compute the same function as :func:`jaxlm.ops.attention.attention_reference`:
causal GQA softmax attention with document masks, per head h and query t,

    o_t = sum_s softmax_s( q_t · k_s / sqrt(K) + m_ts ) v_s,
    m_ts = 0 if (s <= t and seg_s == seg_t) else -inf,

query head h reading key/value head h // (H // KV).

``model.attn_impl`` (:func:`resolve_attn_impl` turns it into one of the last four):

==========  ======================================================================================
auto        GPU: ``cudnn`` when its constraints hold (bf16/fp16, head dim a multiple of 8 and
            <= 128, <= 256 on Hopper and later), else ``xla``; TPU: ``splash`` when the sequence
            is a multiple of 128, else ``xla``; CPU: ``reference`` (as fast as ``xla`` on CPU
            within noise, faster with GQA; see ``CPU_AUTO``); training with ``model.dropout``
            > 0: ``reference`` (the only one with attention-probability dropout).
reference   the einsum of :mod:`jaxlm.ops.attention` (softmax in float32), everywhere.
xla         ``jax.nn.dot_product_attention(implementation="xla")``, everywhere (``fused`` is its
            old name and still accepted).
cudnn       ``implementation="cudnn"``: cuDNN flash attention, NVIDIA GPUs only. Segment ids: the
            public jax API (0.10 and 0.12) has no segment ids for cuDNN (only padding lengths;
            its packed-offsets form is private), so documents go in as a dense boolean
            [B, 1, T, T] mask, which jax turns into an additive bias inside the fused kernel:
            O(B·T²) bytes for the bias (and its gradient) instead of XLA's O(B·H·T²) float32
            scores. Arguments: :func:`cudnn_kwargs` (unit-tested; no GPU in CI).
splash      ``jax.experimental.pallas.ops.tpu.splash_attention`` (Pallas/Mosaic), TPU; on CPU it
            runs in Pallas interpret mode (slow, for tests). The sequence must be a multiple of
            128 (its kv block); blocks are the largest of 512/256/128 dividing T. Causal mask +
            ``SegmentIds``; GQA as the MQA kernel vmapped over the KV heads (each serving its
            G = H/KV query heads); under a mesh it runs in ``jax.shard_map`` with the batch over
            (data, fsdp) and heads over tensor (heads replicated when tensor does not divide H
            and KV).
==========  ======================================================================================

An explicit impl the platform cannot run (``cudnn`` off an NVIDIA GPU or outside its
constraints, ``splash`` on a GPU or at a length it cannot take) is a one-line ConfigError. The
platform is that of the devices the program is compiled for — the active mesh's (so a TPU-topology
ahead-of-time compile on a CPU machine resolves ``auto`` to ``splash``) — else
``jax.default_backend()``. The choice and its reason are logged once (logger ``jaxlm``).

Example::

    import jax.numpy as jnp
    from jaxlm.ops.attention_kernels import resolve_attn_impl
    resolve_attn_impl("auto", "gpu", dtype=jnp.float32, head_dim=64, seq_len=1024)
    # ('xla', 'GPU: float32 inputs (cuDNN flash attention takes bf16/fp16), so XLA')
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import ConfigError

log = logging.getLogger("jaxlm")

IMPLS = ("auto", "reference", "xla", "cudnn", "splash")
ALIASES = {"fused": "xla"}
SPLASH_BLOCKS = (512, 256, 128)  # kv/q block sizes tried, largest first; 128 = one lane tile
_HOPPER_OR_LATER = ("H100", "H200", "H800", "H20", "GH200", "B100", "B200", "GB200", "B300")
# CPU: auto -> reference. bench/throughput.py, interleaved runs on a 2-core CPU shared with
# other jobs (load 2-10, so +-30% noise), median-step tokens/s, reference vs xla:
#   tiny preset (T=64, 4 heads over 2 KV heads), 5 pairs: 21.3k vs 17.6k (reference won 5/5);
#   tiny with n_kv_heads=4, 3 pairs: 31.0k vs 38.5k (xla 2/3); tiny at T=128, 3 pairs: 24.9k vs
#   24.4k (reference 2/3); shakespeare preset (T=128, MHA), 4 pairs: 2.69k vs 3.11k (xla 4/4);
#   bench_tiny_llama (T=256), 2 pairs: 320 vs 356.
# No clear winner on CPU; reference keeps the CPU default bit-identical to the results recorded
# before auto existed (the old default) and wins on the GQA tiny preset, so auto picks it.
CPU_AUTO = "reference"


def compile_platform() -> tuple[str, str]:
    """(platform, device kind) of the devices being compiled for: the active mesh's, else the
    default backend's. Platform is ``cpu``, ``gpu`` (NVIDIA), ``rocm`` or ``tpu``."""
    mesh = jax.sharding.get_abstract_mesh()
    dev = None if mesh.empty else getattr(mesh, "abstract_device", None)
    if dev is not None and dev.platform:
        platform, kind = dev.platform, dev.device_kind or ""
    else:
        platform, kind = jax.default_backend(), jax.devices()[0].device_kind
    return normalize_platform(platform, kind), kind


def normalize_platform(platform: str, device_kind: str = "") -> str:
    platform = platform.lower()
    if platform in ("gpu", "cuda"):
        return "rocm" if device_kind.upper().startswith("AMD") else "gpu"
    return platform


def cudnn_unsupported(dtype, head_dim: int, device_kind: str = "") -> str | None:
    """Why cuDNN flash attention cannot take these inputs (None = it can)."""
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"{dtype} inputs (cuDNN flash attention takes bf16/fp16)"
    limit = 256 if any(m in device_kind for m in _HOPPER_OR_LATER) else 128
    if head_dim % 8 or head_dim > limit:
        return f"head dim {head_dim} (cuDNN needs a multiple of 8, <= {limit} on this GPU)"
    return None


def splash_block(seq_len: int) -> int | None:
    """The splash q/kv block for a sequence of ``seq_len`` (None: no block divides it)."""
    return next((b for b in SPLASH_BLOCKS if seq_len % b == 0), None)


def _auto(platform, dtype, head_dim, seq_len, device_kind):
    if platform == "gpu":
        why = cudnn_unsupported(dtype, head_dim, device_kind)
        if why is None:
            return "cudnn", "GPU: cuDNN flash attention"
        return "xla", f"GPU: {why}, so XLA"
    if platform == "tpu":
        if splash_block(seq_len) is None:
            return "xla", f"TPU: sequence {seq_len} is not a multiple of 128 (splash), so XLA"
        return "splash", "TPU: splash attention (Pallas)"
    if platform == "cpu":
        return CPU_AUTO, f"CPU: {CPU_AUTO} (no faster kernel measured on CPU; see CPU_AUTO)"
    return "xla", f"{platform}: XLA"


def resolve_attn_impl(impl: str, platform: str, *, dtype=jnp.float32, dropout: bool = False,
                      head_dim: int = 64, seq_len: int = 128, device_kind: str = ""
                      ) -> tuple[str, str]:
    """``model.attn_impl`` -> (reference | xla | cudnn | splash, reason) for ``platform``
    (cpu | gpu | rocm | tpu). ``dropout``: training with ``model.dropout`` > 0. An explicit impl
    the platform cannot run is a one-line ConfigError (module docstring)."""
    impl = ALIASES.get(impl, impl)
    if impl not in IMPLS:
        raise ConfigError(f"model.attn_impl={impl} is unknown; use one of {', '.join(IMPLS)}")
    if dropout:
        if impl in ("auto", "reference"):
            return "reference", "attention dropout (model.dropout > 0) needs the reference einsum"
        raise ConfigError(f"model.dropout drops attention probabilities, which "
                          f"model.attn_impl={impl} does not expose; use model.attn_impl=auto")
    if impl == "auto":
        return _auto(platform, dtype, head_dim, seq_len, device_kind)
    if impl == "cudnn":
        if platform != "gpu":
            raise ConfigError(f"model.attn_impl=cudnn needs an NVIDIA GPU but the program is "
                              f"compiled for {platform}; use model.attn_impl=auto")
        why = cudnn_unsupported(dtype, head_dim, device_kind)
        if why is not None:
            raise ConfigError(f"model.attn_impl=cudnn cannot take {why}; set "
                              "model.dtype=bfloat16 / model.head_dim, or model.attn_impl=auto")
    if impl == "splash":
        if platform in ("gpu", "rocm"):
            raise ConfigError("model.attn_impl=splash is a TPU kernel (interpret mode on CPU) and "
                              f"cannot run on {platform}; use model.attn_impl=auto")
        check_splash_len(seq_len)
        if platform == "cpu":
            return "splash", "splash in Pallas interpret mode on CPU (slow: for tests)"
    return impl, f"model.attn_impl={impl}"


def check_model(m, devices, seq_lens) -> None:
    """Before anything is built: ConfigError if ``m.attn_impl`` (a ModelConfig's) cannot run on
    ``devices`` (the mesh's) at any of the run's sequence lengths ``seq_lens``; a model without
    softmax layers passes. The same rule as at trace time, one line instead of a compile error."""
    from jaxlm.config_checks import layer_pattern

    if "S" not in layer_pattern(m):
        return
    dev = devices[0]
    platform = normalize_platform(dev.platform, getattr(dev, "device_kind", "") or "")
    for t in sorted(set(seq_lens)):
        resolve_attn_impl(m.attn_impl, platform, dtype=jnp.dtype(m.dtype), dropout=m.dropout > 0,
                          head_dim=m.attn_head_dim, seq_len=t, device_kind=dev.device_kind)


def check_splash_len(seq_len: int) -> int:
    block = splash_block(seq_len)
    if block is None:
        raise ConfigError(f"model.attn_impl=splash needs a sequence length that is a multiple of "
                          f"128 (got {seq_len}); set data.seq_len (and data.min_bucket) to a "
                          "multiple of 128 or use model.attn_impl=auto")
    return block


_LOGGED: set = set()


def log_choice(requested: str, impl: str, reason: str) -> None:
    """Log the picked impl and why, once per distinct (request, pick, reason)."""
    key = (requested, impl, reason)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("attention: model.attn_impl=%s -> %s (%s)", requested, impl, reason)


# ----------------------------------------------------------------------------- cuDNN


def cudnn_kwargs(segment_ids=None) -> dict:
    """Keyword arguments of ``jax.nn.dot_product_attention(q, k, v, **kw)`` for the cuDNN path.

    q [B, T, H, K] and k, v [B, T, KV, K] go in unchanged (cuDNN takes H % KV == 0 heads
    natively: no repeat of k/v); scale is the default 1/sqrt(K). Causal by ``is_causal``;
    ``segment_ids`` [B, T] -> ``mask`` [B, 1, T, T] (same document; broadcast over heads)."""
    kw = {"implementation": "cudnn", "is_causal": True, "mask": None}
    if segment_ids is not None:
        kw["mask"] = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B,1,T,S]
    return kw


def cudnn_attention(q, k, v, segment_ids=None):
    return jax.nn.dot_product_attention(q, k, v, **cudnn_kwargs(segment_ids))


# ----------------------------------------------------------------------------- splash


def _splash_kernel(seq_len: int, group: int, block: int, interpret: bool):
    """The MQA splash kernel for one KV head serving ``group`` query heads (causal mask).

    Built inside each trace: its mask tables become constants of that program (jax caches the
    numpy mask processing itself); a kernel cached across traces would leak tracers."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.CausalMask((seq_len, seq_len)) for _ in range(group)])
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    return sa.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _splash_local(q, k, v, segment_ids, *, block: int, interpret: bool):
    """Splash attention on one shard: q [B, T, H, K], k/v [B, T, KV, K], segment_ids [B, T]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    kernel = _splash_kernel(t, g, block, interpret)
    q = (q * d**-0.5).astype(q.dtype)  # the kernel does not scale
    qg = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, K]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, K]

    def one_row(qr, kr, vr, seg):  # [KV, G, T, K], [KV, T, K] x 2, [T] or None
        ids = None if seg is None else SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(qr, kr, vr)

    if segment_ids is None:
        out = jax.vmap(lambda a, c, e: one_row(a, c, e, None))(qg, kt, vt)
    else:
        out = jax.vmap(one_row)(qg, kt, vt, segment_ids.astype(jnp.int32))  # [B, KV, G, T, K]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)  # [B, T, H, K]


def _splash_specs(mesh, q_shape, kv_heads):
    """PartitionSpecs (q/k/v, segment ids) for shard_map: batch over (data, fsdp) when it
    divides, heads over tensor when it divides both H and KV (else replicated)."""
    from jax.sharding import PartitionSpec as P

    from jaxlm.sharding import RULES

    def size(axes):
        axes = axes if isinstance(axes, tuple) else (axes,)
        return int(np.prod([mesh.shape[a] for a in axes if a in mesh.shape]))

    batch, heads = RULES["batch"], RULES["heads"]
    if batch is None or q_shape[0] % size(batch):
        batch = None
    if heads is None or q_shape[2] % size(heads) or kv_heads % size(heads):
        heads = None
    return P(batch, None, heads, None), P(batch, None)


def splash_attention(q, k, v, segment_ids=None, *, interpret: bool = False):
    """Causal GQA splash attention, q [B, T, H, K], k/v [B, T, KV, K] -> [B, T, H, K]; inside
    ``jax.shard_map`` over the active mesh, if any (module docstring)."""
    block = check_splash_len(q.shape[1])
    local = functools.partial(_splash_local, block=block, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, segment_ids)
    x_spec, seg_spec = _splash_specs(mesh, q.shape, k.shape[2])
    if segment_ids is None:
        fn = jax.shard_map(lambda a, c, e: local(a, c, e, None), in_specs=(x_spec,) * 3,
                           out_specs=x_spec, check_vma=False)
        return fn(q, k, v)
    fn = jax.shard_map(local, in_specs=(x_spec,) * 3 + (seg_spec,), out_specs=x_spec,
                       check_vma=False)
    return fn(q, k, v, segment_ids)
