"""Causal linear attention with a scalar (per-head, optionally per-token) decay, in three forms.

Math (per batch element and head; Lightning Attention-2, Qin et al. 2024, arXiv 2401.04658, §3.1
eqs. 2-4; TransNormerLLM, arXiv 2307.14995, eq. 10; simple-GLA / Mamba-2 SSD when the decay is
data-dependent). With ``g_t = log_decay_t ≤ 0`` (natural log of the per-step decay α_t = e^{g_t}):

    S_t = e^{g_t} · S_{t-1} + k_t v_tᵀ          S: [K, V] state, S_0 = initial_state (or 0)
    o_t = q_tᵀ S_t                               (the current token is read with weight 1)

Unrolled ("parallel" form, LA2 eq. 3): o_t = Σ_{s≤t} (q_t·k_s) e^{G_t − G_s} v_s + e^{G_t} q_tᵀ S_0,
with G_t = Σ_{j≤t} g_j. No feature map, 1/√d scaling or normalisation happens here: the variants
in :mod:`jaxlm.model.linear` apply those around this function.

Three forms of the same function (tests check them against each other and a float64 recurrence):

* ``naive``     — the masked quadratic form above, O(T²) (teaching reference).
* ``recurrent`` — ``lax.scan`` over tokens with the O(1) state (decoding; do not train with it:
                  its backward stores T states).
* ``chunked``   — Lightning Attention-2 tiling (LA2 Alg. 1) with chunk size C: inside chunk n,
                  with b_r = Σ_{j≤r} g_j (cumulative *within* the chunk, so |b| stays small),
                      O_n = [(Q Kᵀ) ⊙ D] V + diag(e^{b}) Q S_n,       D_rc = e^{b_r − b_c} [r ≥ c]
                      S_{n+1} = e^{b_C} S_n + Σ_c e^{b_C − b_c} k_c v_cᵀ
                  The intra terms are batched matmuls over all chunks at once; only the tiny
                  chunk-level recurrence S_n → S_{n+1} is a ``lax.scan`` (N = T/C steps).
                  Every decay factor is an exponential of a difference b_r − b_c ≤ 0 (masked
                  *before* the exp), so nothing overflows (TNL §3.2.1 "robust inference").

State and all accumulations are float32; q, k, v may be bfloat16; o has v's dtype. T need not be a
multiple of C (the tail is zero-padded: zero k, v and g = 0 leave the state unchanged).
``impl="pallas"`` runs the chunked form as Pallas kernels (:mod:`jaxlm.ops.lightning_pallas`).

Document packing: :func:`linear_attention_reset` takes ``reset [B, T]`` (True where a new document
starts, i.e. S_t = k_t v_tᵀ + 0·S_{t-1}). It is implemented with cumulative reset counts c_t
(intra term kept iff c_r = c_c, carried state kept iff no reset since the chunk start), never with
g = −inf, so gradients stay finite.

Example::

    import jax, jax.numpy as jnp
    from jaxlm.ops import linear_attention
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 100, 4, 8))   # [B, T, H, K=V]
    g = jnp.log(jnp.array([0.9, 0.99, 0.999, 1.0]))                     # per-head decay [H]
    o, s = linear_attention(q, k, v, g, chunk_size=16, return_state=True)  # [2,100,4,8], [2,4,8,8]
    o2 = linear_attention(q, k, v, g, form="naive")                     # same values
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FORMS = ("chunked", "recurrent", "naive")
IMPLS = ("jax", "pallas")  # chunked form: pure JAX | Pallas kernels (jaxlm.ops.lightning_pallas)
_F32 = jnp.float32


def _prepare(q, k, v, log_decay, reset):
    """Broadcast log_decay to g [B, T, H] float32 and reset to int counts c [B, T]."""
    b, t, h, _ = q.shape
    if k.shape[:3] != (b, t, h) or v.shape[:3] != (b, t, h) or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"need q, k [B, T, H, K] and v [B, T, H, V]; got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if log_decay is None:
        g = jnp.zeros((b, t, h), _F32)
    else:
        log_decay = jnp.asarray(log_decay, _F32)
        if log_decay.shape not in ((h,), (b, t, h)):
            raise ValueError(f"log_decay must be None, [H]={h} or [B, T, H]={(b, t, h)}; "
                             f"got {log_decay.shape}")
        g = jnp.broadcast_to(log_decay, (b, t, h))
    c = (jnp.zeros((b, t), jnp.int32) if reset is None
         else jnp.cumsum(jnp.asarray(reset, jnp.int32), axis=1))  # [B, T] documents started
    return g, c


def _naive(q, k, v, g, c, s0):
    """O(T²) masked quadratic form with a global cumsum of g (teaching reference)."""
    t = q.shape[1]
    gc = jnp.cumsum(g, axis=1)  # [B, T, H] G_t
    diff = gc[:, :, None, :] - gc[:, None, :, :]  # [B, T(t), T(s), H] G_t - G_s
    mask = (jnp.tril(jnp.ones((t, t), bool))[None, :, :, None]
            & (c[:, :, None] == c[:, None, :])[..., None])  # [B, T, T, 1] causal & same doc
    decay = jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)  # [B, T, T, H]
    scores = jnp.einsum("bthk,bshk->btsh", q, k, preferred_element_type=_F32) * decay
    o = jnp.einsum("btsh,bshv->bthv", scores, v.astype(_F32))
    inter = jnp.exp(gc) * (c == 0)[..., None]  # [B, T, H] initial state survives to t
    o = o + jnp.einsum("bthk,bhkv->bthv", q.astype(_F32), s0) * inter[..., None]
    s_last = s0 * jnp.exp(gc[:, -1])[..., None, None] * (c[:, -1] == 0)[:, None, None, None]
    last = mask[:, -1]  # [B, T, 1]: s in the last token's document
    w = jnp.where(last, jnp.exp(jnp.where(last, gc[:, -1:] - gc, 0.0)), 0.0)  # [B, T, H]
    s_last = s_last + jnp.einsum("bsh,bshk,bshv->bhkv", w, k.astype(_F32), v.astype(_F32))
    return o, s_last


def _recurrent(q, k, v, g, c, s0):
    """One token per step: S = e^{g_t}·[no reset]·S + k_t v_tᵀ; o_t = q_tᵀ S."""
    keep = jnp.exp(g) * (jnp.diff(c, axis=1, prepend=0) == 0)[..., None]  # [B, T, H]

    def step(s, xs):  # s [B, H, K, V]
        q_t, k_t, v_t, a_t = xs  # [B, H, K], [B, H, K], [B, H, V], [B, H]
        s = a_t[..., None, None] * s + jnp.einsum("bhk,bhv->bhkv", k_t, v_t)
        return s, jnp.einsum("bhk,bhkv->bhv", q_t, s)

    xs = tuple(jnp.moveaxis(a.astype(_F32), 1, 0) for a in (q, k, v, keep))  # time-major
    s, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1), s  # o [B, T, H, V]


def _chunked(q, k, v, g, c, s0, chunk):
    """Lightning-2 tiling: parallel intra-chunk terms + a chunk-level scan of the state."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:  # zero k, v and g = 0: the state is unchanged by the padded tail
        padt = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        q, k, v, g = padt(q), padt(k), padt(v), padt(g)
        c = jnp.pad(c, [(0, 0), (0, pad)], mode="edge")
    chunks = lambda a: a.reshape((b, n, chunk) + a.shape[2:])  # [B, T, ...] -> [B, N, C, ...]
    q, k, v, g, c = map(chunks, (q, k, v, g, c))  # q [B, N, C, H, K], g [B, N, C, H], c [B, N, C]
    bc = jnp.cumsum(g, axis=2)  # [B, N, C, H] b_r within each chunk
    c_prev = jnp.concatenate([jnp.zeros((b, 1), c.dtype), c[:, :-1, -1]], axis=1)  # [B, N]

    # intra-chunk: A = (Q Kᵀ) ⊙ D, D_rc = e^{b_r - b_c} for r >= c in the same document
    diff = bc[:, :, :, None, :] - bc[:, :, None, :, :]  # [B, N, C(r), C(c), H]
    mask = (jnp.tril(jnp.ones((chunk, chunk), bool))[None, None, :, :, None]
            & (c[:, :, :, None] == c[:, :, None, :])[..., None])  # [B, N, C, C, 1]
    decay = jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)
    scores = jnp.einsum("bnrhk,bnchk->bnrch", q, k, preferred_element_type=_F32) * decay
    o = jnp.einsum("bnrch,bnchv->bnrhv", scores, v.astype(_F32))  # [B, N, C, H, V]

    # local chunk states M_n = Σ_c e^{b_C - b_c} k_c v_cᵀ (tokens after the chunk's last reset)
    same_end = (c == c[:, :, -1:])[..., None]  # [B, N, C, 1]
    w = jnp.where(same_end, jnp.exp(jnp.where(same_end, bc[:, :, -1:] - bc, 0.0)), 0.0)
    m = jnp.einsum("bnch,bnchk,bnchv->bnhkv", w, k.astype(_F32), v.astype(_F32))  # [B,N,H,K,V]
    a = jnp.exp(bc[:, :, -1]) * (c[:, :, -1] == c_prev)[..., None]  # [B, N, H] carry factor

    def step(s, xs):  # s [B, H, K, V] = state entering chunk n
        a_n, m_n = xs
        return a_n[..., None, None] * s + m_n, s

    s_last, s_in = jax.lax.scan(step, s0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(m, 1, 0)))
    s_in = jnp.moveaxis(s_in, 0, 1)  # [B, N, H, K, V] state entering each chunk

    # inter-chunk: diag(e^{b_r}) Q S_n, kept while no reset since the chunk start
    inter = jnp.exp(bc) * (c == c_prev[:, :, None])[..., None]  # [B, N, C, H]
    o = o + inter[..., None] * jnp.einsum("bnrhk,bnhkv->bnrhv", q.astype(_F32), s_in)
    return o.reshape(b, n * chunk, h, dv)[:, :t], s_last


def linear_attention_reset(q, k, v, log_decay=None, reset=None, *, form="chunked", chunk_size=64,
                           initial_state=None, return_state=False, impl="jax"):
    """:func:`linear_attention` with document resets: ``reset [B, T]`` bool, True at a token that
    starts a new document (the state before it is dropped, as for packed sequences).

    ``impl`` (form ``chunked`` only): ``jax`` = the pure-JAX tiling below; ``pallas`` = the same
    math as Pallas kernels (:mod:`jaxlm.ops.lightning_pallas`; TPU, interpret mode on CPU)."""
    if form not in FORMS:
        raise ValueError(f"form={form!r} is not one of {FORMS}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if impl == "pallas" and form == "chunked":
        from jaxlm.ops.lightning_pallas import lightning_attention

        return lightning_attention(q, k, v, log_decay, reset, chunk_size=chunk_size,
                                   initial_state=initial_state, return_state=return_state)
    g, c = _prepare(q, k, v, log_decay, reset)
    b, _, h, dk = q.shape
    s0 = (jnp.zeros((b, h, dk, v.shape[-1]), _F32) if initial_state is None
          else jnp.asarray(initial_state, _F32))  # [B, H, K, V]
    if form == "naive":
        o, s = _naive(q, k, v, g, c, s0)
    elif form == "recurrent":
        o, s = _recurrent(q, k, v, g, c, s0)
    else:
        o, s = _chunked(q, k, v, g, c, s0, min(chunk_size, q.shape[1]))
    o = o.astype(v.dtype)
    return (o, s) if return_state else o


def linear_attention(q, k, v, log_decay=None, *, form="chunked", chunk_size=64,
                     initial_state=None, return_state=False):
    """Causal linear attention ``S_t = e^{g_t} S_{t-1} + k_t v_tᵀ, o_t = q_tᵀ S_t``.

    q, k: [B, T, H, K]; v: [B, T, H, V]; log_decay: None (no decay) | [H] | [B, T, H], the natural
    log of the per-step decay (≤ 0); form: ``chunked`` | ``recurrent`` | ``naive``;
    initial_state: [B, H, K, V] (state before token 0). Returns o [B, T, H, V] (v's dtype) and,
    if ``return_state``, the float32 final state [B, H, K, V].
    """
    return linear_attention_reset(q, k, v, log_decay, None, form=form, chunk_size=chunk_size,
                                  initial_state=initial_state, return_state=return_state)
