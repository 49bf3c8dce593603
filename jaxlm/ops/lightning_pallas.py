"""Lightning Attention-2 as Pallas TPU kernels (forward and backward): ``model.linear_impl=pallas``.

The function of :func:`jaxlm.ops.linear_attention_reset` with form ``chunked``: per batch element
and head, with g_t = log-decay ≤ 0 ([H] per head or [B, T, H] per token), optional resets,

    S_t = e^{g_t} S_{t-1} + k_t v_tᵀ,   o_t = q_tᵀ S_t              (LA2, arXiv 2401.04658, eq. 2)

tiled in chunks of C rows (LA2 Alg. 1). Inside chunk n, with b_r = Σ_{j≤r} g_j (cumulative within
the chunk), a_r = e^{b_r}, w_c = e^{b_C − b_c}, λ_n = e^{b_C} (each times its reset mask) and the
intra matrix D_rc = e^{b_r − b_c} [r ≥ c, same document]:

    O_n = [(Q Kᵀ) ⊙ D] V + diag(a) Q S_n                               (1)  intra + inter
    S_{n+1} = λ_n S_n + Kᵀ diag(w) V                                    (2)  state kept in VMEM

The grid is (B, H, N) with the chunk axis N sequential ("arbitrary"): the [K, V] float32 state
lives in a VMEM scratch buffer across the chunk steps of one (b, h) (LA2's "KV in SRAM"). The
backward (LA2 Alg. 2) is two more kernels, no pure-JAX recompute:

    dQ = [(dO Vᵀ) ⊙ D] K + diag(a) dO S_nᵀ        forward sweep, S_n recomputed by (2)   (3)
    dK = [(dO Vᵀ) ⊙ D]ᵀ Q + diag(w) V dS_{n+1}ᵀ   reverse sweep over the chunks          (4)
    dV = [(Q Kᵀ) ⊙ D]ᵀ dO + diag(w) K dS_{n+1}                                           (5)
    dS_n = λ_n dS_{n+1} + (diag(a) Q)ᵀ dO,  dS_N = d(final state), dS_0 = d(initial state) (6)

The decay gradient needs no kernel: o and S_T depend on the decays only through e^{G_t − G_s}
(G = global cumsum of g), so ∂L/∂G_t = q_t·dq_t − k_t·dk_t (+ ⟨dS_T, S_T⟩ at t = T) and
dg_t = Σ_{j≥t} ∂L/∂G_j (the identity of fla's simple-GLA backward; dq, dk leave the kernels in
float32 when the decay is per token so that this difference is accurate). Resets are masks
(cumulative reset counts, never g = −∞): gradients stay finite. All dots accumulate in float32;
q, k, v may be bfloat16; o has v's dtype; states are float32. T need not be a multiple of C.
There is no GQA case: the linear layers require n_kv_heads == n_heads.

Platforms: on TPU the kernels compile with Mosaic (C a multiple of 8; 128 suits the MXU);
everywhere else they run in Pallas interpret mode (``jax.lax.platform_dependent`` picks per
lowering platform, so compiling for a TPU topology from a CPU host gets the real kernels). GPUs
are refused (the carried state relies on the TPU grid running the chunk axis in order; use
``model.linear_impl=jax``). Under a mesh the call is wrapped in ``jax.shard_map`` (batch over
data/fsdp, heads over tensor): XLA does not partition a Mosaic custom call.

Why/when: the pure-JAX chunked form writes the [B, N, C, C, H] intra scores and decays and every
chunk's state to HBM; the kernels keep them in VMEM, so HBM traffic is q, k, v, o, their
gradients and a transpose of each. The TPU compiler's own analysis (v5e, B=1, H=32, K=V=128,
bf16; compile only, no chip), forward+backward, kernel vs pure JAX: C=128: temp 192 vs 324 MiB,
bytes accessed 1.8 vs 3.7 GiB at 8k tokens; 1.04 vs 1.29 GiB temp, 7.4 vs 13.6 GiB at 32k. C=64:
192 vs 643 MiB, 1.8 vs 4.3 GiB at 8k; 1.06 vs 2.59 GiB, 7.6 vs 16.3 GiB at 32k (XLA counts a kernel
by its cost estimate: each input and output once). Use it for long sequences on TPU; on CPU it is
an interpreter (tests only); its time on a chip has not been measured.

Example::

    import jax, jax.numpy as jnp
    from jaxlm.ops.lightning_pallas import lightning_attention
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 40, 2, 8))  # [B, T, H, K=V]
    g = jnp.log(jnp.array([0.9, 0.99]))                               # per-head decay [H]
    o, s = lightning_attention(q, k, v, g, chunk_size=16, return_state=True)
    o.shape, s.shape                                   # (2, 40, 2, 8), (2, 2, 8, 8)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxlm.errors import ConfigError

_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # dot_general dims: A Bᵀ
_SQ = pl.Squeezed()


def _cols(fac):
    """fac [4, C] rows (b, c, a, w) -> four [C, 1] columns (diagonal pick, no transpose)."""
    n = fac.shape[1]
    eye = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) == jax.lax.broadcasted_iota(
        jnp.int32, (n, n), 1)
    return [jnp.sum(jnp.where(eye, fac[i:i + 1, :], 0.0), axis=1, keepdims=True)
            for i in range(4)]


def _decay(fac, cols):
    """D [C, C]: e^{b_r − b_c} for r ≥ c in the same document, else 0 (masked before the exp)."""
    n = fac.shape[1]
    b_col, c_col = cols[0], cols[1]
    causal = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) >= jax.lax.broadcasted_iota(
        jnp.int32, (n, n), 1)
    mask = causal & (c_col == fac[1:2, :])
    return jnp.where(mask, jnp.exp(jnp.where(mask, b_col - fac[0:1, :], 0.0)), 0.0)


def _dot(a, b, dims=None):
    dims = dims or (((a.ndim - 1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=_F32)


def _fwd_kernel(q_ref, k_ref, v_ref, f_ref, s0_ref, o_ref, st_ref, s_scr):
    """Eqs. (1)-(2) for one chunk of one (batch, head); s_scr [K, V] carries S across chunks."""
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        s_scr[...] = s0_ref[...]

    q, k, v, fac = q_ref[...], k_ref[...], v_ref[...].astype(_F32), f_ref[...]
    cols = _cols(fac)
    s = s_scr[...]
    scores = _dot(q, k, _NT) * _decay(fac, cols)  # [C, C]
    o = _dot(scores, v) + cols[2] * _dot(q.astype(_F32), s)  # [C, V]
    o_ref[...] = o.astype(o_ref.dtype)
    s_scr[...] = cols[2][-1:, :] * s + _dot((k.astype(_F32) * cols[3]).T, v)  # λ_n = a_{C}

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        st_ref[...] = s_scr[...]


def _dq_kernel(k_ref, v_ref, do_ref, f_ref, s0_ref, dq_ref, s_scr):
    """Eq. (3): forward sweep, recomputing S_n with eq. (2)."""
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        s_scr[...] = s0_ref[...]

    fac = f_ref[...]
    cols = _cols(fac)
    dp = _dot(do_ref[...], v_ref[...], _NT) * _decay(fac, cols)  # [C, C], inputs' dtype on MXU
    k, v, do = k_ref[...].astype(_F32), v_ref[...].astype(_F32), do_ref[...].astype(_F32)
    s = s_scr[...]
    dq_ref[...] = (_dot(dp, k) + cols[2] * _dot(do, s, _NT)).astype(dq_ref.dtype)
    s_scr[...] = cols[2][-1:, :] * s + _dot((k * cols[3]).T, v)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, f_ref, dst_ref, dk_ref, dv_ref, ds0_ref, ds_scr):
    """Eqs. (4)-(6): reverse sweep (grid step n is chunk N−1−n); ds_scr [K, V] carries dS."""
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        ds_scr[...] = dst_ref[...]

    fac = f_ref[...]
    cols = _cols(fac)
    d = _decay(fac, cols)
    a_mat = _dot(q_ref[...], k_ref[...], _NT) * d  # [C, C], inputs' dtype on the MXU
    dp = _dot(do_ref[...], v_ref[...], _NT) * d
    q, k = q_ref[...].astype(_F32), k_ref[...].astype(_F32)
    v, do = v_ref[...].astype(_F32), do_ref[...].astype(_F32)
    ds = ds_scr[...]  # dS_{n+1}
    dk_ref[...] = (_dot(dp.T, q) + cols[3] * _dot(v, ds, _NT)).astype(dk_ref.dtype)
    dv_ref[...] = (_dot(a_mat.T, do) + cols[3] * _dot(k, ds)).astype(dv_ref.dtype)
    ds_scr[...] = cols[2][-1:, :] * ds + _dot((q * cols[2]).T, do)

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = ds_scr[...]


def _layout(x):
    """[B, T, H, D] -> the kernel's [B, H, T, D]. (A [B, T, H·D] view with head-column blocks
    would avoid the transpose, but on TPU merging H into the tiled minor dims is itself a copy:
    measured no better.)"""
    return jnp.swapaxes(x, 1, 2)


def _from_kernel(x, t):
    return jnp.swapaxes(x, 1, 2)[:, :t]  # [B, H, T', D] -> [B, T, H, D] without the padded tail


def _like(x, d, dtype):
    """ShapeDtypeStruct [B, H, T', d] (a sequence array like ``x`` with last dim ``d``)."""
    return jax.ShapeDtypeStruct(x.shape[:3] + (d,), dtype)


def _specs(arrays, kinds, chunk, reverse):
    """BlockSpecs over the grid (b, h, n): "seq" [B, H, T', D] arrays in [C, D] chunk blocks,
    "fac" [B, H, N, 4, C] in [4, C] blocks, "state" [B, H, K, V] whole per (b, h). The reverse
    sweep visits chunk N−1−n at grid step n."""
    def idx(n):
        return pl.num_programs(2) - 1 - n if reverse else n

    out = []
    for x, kind in zip(arrays, kinds):
        if kind == "seq":
            spec = pl.BlockSpec((_SQ, _SQ, chunk, x.shape[3]),
                                lambda b, h, n: (b, h, idx(n), 0))
        elif kind == "fac":
            spec = pl.BlockSpec((_SQ, _SQ, _SQ, 4, chunk), lambda b, h, n: (b, h, idx(n), 0, 0))
        else:
            spec = pl.BlockSpec((_SQ, _SQ) + tuple(x.shape[2:]), lambda b, h, n: (b, h, 0, 0))
        out.append(spec)
    return out


def _cost(fac, state, ins, outs, matmuls):
    """XLA's view of a kernel (it cannot see inside a custom call): matmuls = (number of
    [C, C]x[C, K+V]-sized, number of [C, K]x[K, V]-sized products per chunk)."""
    b, h, n, _, chunk = fac.shape
    dk, dv = state.shape[-2:]
    flops = 2 * b * h * n * chunk * (chunk * (dk + dv) * matmuls[0] + dk * dv * matmuls[1])
    size = lambda a: math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
    nbytes = sum(size(a) for a in ins) + sum(size(a) for a in outs)
    return pl.CostEstimate(flops=int(flops), transcendentals=int(b * h * n * chunk * chunk),
                           bytes_accessed=int(nbytes))


def _call(kernel, ins, in_kinds, outs, out_kinds, interpret):
    """One pallas_call over the grid (B, H, N), chunk axis sequential, state in VMEM scratch."""
    fac, state = ins[in_kinds.index("fac")], ins[in_kinds.index("state")]
    b, h, n, _, chunk = fac.shape
    reverse = kernel is _dkv_kernel
    matmuls = {_fwd_kernel: (1, 2), _dq_kernel: (1, 2), _dkv_kernel: (2, 3)}[kernel]
    out_specs = _specs(outs, out_kinds, chunk, reverse)
    return pl.pallas_call(
        kernel, grid=(b, h, n), out_shape=outs if len(outs) > 1 else outs[0],
        in_specs=_specs(ins, in_kinds, chunk, reverse),
        out_specs=tuple(out_specs) if len(outs) > 1 else out_specs[0],
        scratch_shapes=[pltpu.VMEM(tuple(state.shape[-2:]), _F32)],
        cost_estimate=_cost(fac, state, ins, outs, matmuls),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret)(*ins)


def _run(name, *args, **kw):
    """The kernel call ``name`` compiled by Mosaic on TPU, interpreted on any other platform."""
    fn = globals()[name]
    return jax.lax.platform_dependent(*args, tpu=functools.partial(fn, interpret=False, **kw),
                                      default=functools.partial(fn, interpret=True, **kw))


def _fwd_call(q, k, v, fac, s0, *, interpret):
    dv = s0.shape[-1]
    outs = (_like(v, dv, v.dtype), jax.ShapeDtypeStruct(s0.shape, _F32))
    return _call(_fwd_kernel, (q, k, v, fac, s0), ("seq", "seq", "seq", "fac", "state"),
                 outs, ("seq", "state"), interpret)


def _dq_call(k, v, do, fac, s0, *, dtype, interpret):
    outs = (_like(k, s0.shape[-2], dtype),)
    return _call(_dq_kernel, (k, v, do, fac, s0), ("seq", "seq", "seq", "fac", "state"),
                 outs, ("seq",), interpret)


def _dkv_call(q, k, v, do, fac, dst, *, dtype, interpret):
    dk, dv = dst.shape[-2:]
    outs = (_like(k, dk, dtype), _like(v, dv, v.dtype),
            jax.ShapeDtypeStruct(dst.shape, _F32))
    return _call(_dkv_kernel, (q, k, v, do, fac, dst), ("seq",) * 4 + ("fac", "state"),
                 outs, ("seq", "seq", "state"), interpret)


def _pad(x, chunk):
    """Zero-pad axis 1 (T) of [B, T, ...] up to a multiple of ``chunk``."""
    pad = -x.shape[1] % chunk
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x


def _factors(g, c, chunk):
    """fac [B, H, N, 4, C] = rows (b, c − c_prev, a, w) of eqs. (1)-(2): in-chunk cumsum of g
    [B, T, H], reset count relative to the chunk start (c [B, T]), row and key decays with their
    reset masks. The padded tail (g = 0, c repeated; zero k, v) leaves the state unchanged."""
    b, t, h = g.shape
    n = -(-t // chunk)
    g = _pad(g, chunk)
    c = jnp.pad(c, [(0, 0), (0, n * chunk - t)], mode="edge")
    bc = jnp.cumsum(g.reshape(b, n, chunk, h), axis=2)  # [B, N, C, H] b_r
    cc = c.reshape(b, n, chunk)  # [B, N, C]
    c_prev = jnp.concatenate([jnp.zeros((b, 1), c.dtype), cc[:, :-1, -1]], axis=1)  # [B, N]
    a = jnp.exp(bc) * (cc == c_prev[:, :, None])[..., None]  # [B, N, C, H]
    same_end = (cc == cc[:, :, -1:])[..., None]  # [B, N, C, 1]
    w = jnp.where(same_end, jnp.exp(jnp.where(same_end, bc[:, :, -1:] - bc, 0.0)), 0.0)
    crel = jnp.broadcast_to((cc - c_prev[:, :, None]).astype(_F32)[..., None], bc.shape)
    return jnp.stack([bc, crel, a, w], axis=3).transpose(0, 4, 1, 3, 2)  # [B, H, N, 4, C]


def _impl_fwd(q, k, v, g, c, s0, chunk, grad_dtype):
    qt, kt, vt = (_layout(_pad(x, chunk)) for x in (q, k, v))  # [B, H, T', D]
    fac = _factors(g, c, chunk)
    o, s = _run("_fwd_call", qt, kt, vt, fac, s0)
    return (_from_kernel(o, q.shape[1]), s), (qt, kt, vt, fac, g, s0, s)


def _impl(q, k, v, g, c, s0, chunk, grad_dtype):
    return _impl_fwd(q, k, v, g, c, s0, chunk, grad_dtype)[0]


def _impl_bwd(chunk, grad_dtype, res, cts):
    """Eqs. (3)-(6) by kernels; dg from ∂L/∂G_t = q_t·dq_t − k_t·dk_t (+ ⟨dS_T, S_T⟩ at T).
    dq, dk come out of the kernels in ``grad_dtype`` (float32 when the decay is per token, so
    that this difference is accurate; else the inputs' dtype)."""
    qt, kt, vt, fac, g, s0, s_t = res
    do, ds_t = cts
    t = g.shape[1]
    dot = _layout(_pad(do, chunk))  # [B, H, T', V]
    dq = _run("_dq_call", kt, vt, dot, fac, s0, dtype=grad_dtype)
    dk, dv, ds0 = _run("_dkv_call", qt, kt, vt, dot, fac, ds_t.astype(_F32), dtype=grad_dtype)
    dgc = (jnp.sum(qt.astype(_F32) * dq.astype(_F32), -1)
           - jnp.sum(kt.astype(_F32) * dk.astype(_F32), -1))  # [B, H, T']
    dgc = jnp.swapaxes(dgc, 1, 2)[:, :t]  # [B, T, H] ∂L/∂G_t
    dgc = dgc.at[:, -1].add(jnp.sum(ds_t * s_t, axis=(-2, -1)))
    dg = jnp.cumsum(dgc[:, ::-1], axis=1)[:, ::-1]  # dg_t = Σ_{j≥t} ∂L/∂G_j
    dq, dk, dv = (_from_kernel(x, t).astype(y.dtype) for x, y in ((dq, qt), (dk, kt), (dv, vt)))
    return dq, dk, dv, dg, None, ds0


_lightning = jax.custom_vjp(_impl, nondiff_argnums=(6, 7))
_lightning.defvjp(_impl_fwd, _impl_bwd)


def _sharded(fn, q, g, c, s0):
    """``fn`` wrapped in jax.shard_map over the active mesh (batch over data/fsdp, heads over
    tensor; a dim the mesh does not divide stays whole), or ``fn`` itself without a mesh."""
    from jax.sharding import PartitionSpec as P

    from jaxlm.sharding import fit_spec, logical_to_spec

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn
    bt, hd = logical_to_spec(("batch",))[0], logical_to_spec(("heads",))[0]
    spec = lambda entries, shape: fit_spec(P(*entries), shape, mesh, "linear attention")
    sq = spec((bt, None, hd, None), q.shape)  # q, k, v, o [B, T, H, D]
    sg = spec((bt, None, hd), g.shape)
    sc = P(sq[0], None)  # c [B, T]
    ss = P(sq[0], sq[2], None, None)  # states [B, H, K, V]
    return jax.shard_map(fn, mesh=mesh, in_specs=(sq, sq, sq, sg, sc, ss), out_specs=(sq, ss),
                         check_vma=False)


def lightning_attention(q, k, v, log_decay=None, reset=None, *, chunk_size=64,
                        initial_state=None, return_state=False):
    """Chunked linear attention by the Pallas kernels; the arguments and result of
    :func:`jaxlm.ops.linear_attention_reset` (q, k [B, T, H, K]; v [B, T, H, V]; log_decay None |
    [H] | [B, T, H]; reset [B, T] bool; initial_state [B, H, K, V]) with form ``chunked``."""
    from jaxlm.ops.linear_attention import _prepare

    if jax.default_backend() == "gpu":
        raise ConfigError("model.linear_impl=pallas is a TPU kernel (interpret mode elsewhere); "
                          "on GPU use model.linear_impl=jax")
    if chunk_size < 1:
        raise ConfigError(f"model.linear_chunk must be >= 1, got {chunk_size}")
    g, c = _prepare(q, k, v, log_decay, reset)  # g [B, T, H] float32, c [B, T] int32
    b, t, h, dk = q.shape
    if jax.default_backend() == "tpu" and chunk_size < t and chunk_size % 8:
        raise ConfigError(f"model.linear_chunk={chunk_size}: the TPU kernel needs a multiple of "
                          "8 (128 suits the MXU)")
    s0 = (jnp.zeros((b, h, dk, v.shape[-1]), _F32) if initial_state is None
          else jnp.asarray(initial_state, _F32))  # [B, H, K, V]
    per_token = log_decay is not None and jnp.ndim(log_decay) == 3
    grad_dtype = jnp.dtype(_F32 if per_token else q.dtype)
    fn = functools.partial(_lightning, chunk=min(chunk_size, t), grad_dtype=grad_dtype)
    o, s = _sharded(fn, q, g, c, s0)(q, k, v, g, c, s0)
    return (o, s) if return_state else o
