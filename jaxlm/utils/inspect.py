"""Small read-only helpers for looking inside a run: metrics, shardings, memory, HLO, timing.

Used by the teaching notebooks in ``colabs/`` (and handy in any notebook or script). Nothing here
changes training; every function reads arrays, files or compiled programs and returns plain
Python / numpy values.

* :func:`read_metrics` — ``<out_dir>/metrics.jsonl`` as numpy columns (train and eval lines apart).
* :func:`sharding_table`, :func:`bytes_per_device`, :func:`tree_bytes` — where the arrays of a
  pytree live and how many bytes each device holds.
* :func:`compile_step`, :func:`compiled_text`, :func:`count_collectives` — the optimized HLO of
  a jitted step and the collectives (all-gather, reduce-scatter, all-reduce, …) XLA inserted for its shardings.
* :func:`time_call` — best-of-N wall time of a jitted call (compile excluded).
* :func:`linear_attention_matrix` — the T×T token-mixing matrix that
  :func:`jaxlm.ops.linear_attention` applies, recovered from the kernel itself.

Example::

    from jaxlm.utils.inspect import read_metrics, count_collectives
    m = read_metrics("out/shakespeare")
    m["train"]["step"], m["train"]["loss"], m["eval"]["eval_bpb"]      # numpy arrays
    count_collectives(hlo_text)   # {'all-gather': 12, 'reduce-scatter': 4, 'all-reduce': 3, ...}
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Callable

import numpy as np

from jaxlm.utils.trees import leaves_with_names, tree_bytes  # noqa: F401  (tree_bytes: re-export)

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def read_metrics(path: str) -> dict[str, dict[str, np.ndarray]]:
    """``metrics.jsonl`` (or the ``out_dir`` holding it) -> ``{"train": cols, "eval": cols}``.

    Lines with ``eval_loss`` go to ``"eval"``, the others to ``"train"``. Each kind is a dict of
    numpy arrays keyed by metric name (``step`` always present, sorted by step); when a step
    appears twice (a resumed run) the last line wins, as in :mod:`jaxlm.utils.metrics`. A key
    missing from some lines (and ``null`` values, i.e. non-finite floats) reads as NaN.
    """
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    rows: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            kind = "eval" if "eval_loss" in row else "train"
            rows[kind][int(row["step"])] = row
    out = {}
    for kind, by_step in rows.items():
        steps = sorted(by_step)
        keys = sorted({k for r in by_step.values() for k in r} - {"step"})
        cols = {"step": np.asarray(steps, np.int64)}
        for k in keys:
            vals = [by_step[s].get(k) for s in steps]
            cols[k] = np.asarray([np.nan if v is None else v for v in vals], np.float64)
        out[kind] = cols
    return out


def bytes_per_device(tree) -> dict[int, int]:
    """``{device id: bytes}`` that each device actually holds of a pytree of ``jax.Array``.

    Sums ``shard.data.nbytes`` over every leaf's ``addressable_shards``: a replicated leaf counts
    in full on every device, a leaf sharded n ways counts 1/n of its bytes on each.
    """
    out: dict[int, int] = {}
    for _, x in leaves_with_names(tree):
        for s in getattr(x, "addressable_shards", ()):
            out[s.device.id] = out.get(s.device.id, 0) + int(s.data.nbytes)
    return dict(sorted(out.items()))


def sharding_table(tree, max_rows: int = 0) -> str:
    """A printable table of a pytree of arrays: path, global shape, PartitionSpec, shard shape.

    Leaves may be ``jax.Array`` or ``ShapeDtypeStruct`` with a ``NamedSharding``; a leaf without
    a sharding shows ``-``. ``max_rows`` > 0 truncates the table.
    """
    rows = [("path", "shape", "spec", "per-device shard")]
    for name, x in leaves_with_names(tree):
        sh = getattr(x, "sharding", None)
        spec = getattr(sh, "spec", None)
        shard = sh.shard_shape(tuple(x.shape)) if sh is not None else None
        rows.append((name, str(tuple(x.shape)),
                     "-" if spec is None else str(tuple(spec)),
                     "-" if shard is None else str(tuple(shard))))
    body = rows[1:]
    if max_rows and len(body) > max_rows:
        body = body[:max_rows] + [("…", f"{len(rows) - 1 - max_rows} more", "", "")]
    rows = rows[:1] + body
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def compile_step(fn, *args, mesh=None):
    """``fn`` lowered and compiled for ``args`` (arrays or ShapeDtypeStructs): a ``jax.stages.
    Compiled`` you can call with matching arrays and read with ``.as_text()``.

    ``fn`` is a ``jax.jit`` function, or a step from :func:`jaxlm.train.step.make_train_step` /
    ``make_eval_step`` (its ``.jitted`` is used). ``mesh`` is made current while lowering, as the
    step wrappers do, so logical activation constraints resolve. Nothing is executed.
    """
    import jax

    jitted = getattr(fn, "jitted", fn)
    if mesh is None:
        return jitted.lower(*args).compile()
    with jax.set_mesh(mesh):
        return jitted.lower(*args).compile()


def compiled_text(fn, *args, mesh=None) -> str:
    """Optimized HLO text of ``fn`` compiled for ``args`` (see :func:`compile_step`)."""
    return compile_step(fn, *args, mesh=mesh).as_text()


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Number of each cross-device collective instruction in HLO text.

    Counts instructions whose opcode is one of :data:`COLLECTIVES`; an asynchronous pair
    (``all-gather-start`` / ``all-gather-done``) counts once. Every key is present (0 if absent).
    """
    counts = dict.fromkeys(COLLECTIVES, 0)
    ops = "|".join(re.escape(c) for c in COLLECTIVES)
    # opcode position: "= <shape> <opcode>(" ; shapes may be tuples, so match the opcode + "(".
    for m in re.finditer(rf"(?<![\w.%-])({ops})(-start)?\(", hlo_text):
        counts[m.group(1)] += 1
    return counts


def time_call(fn: Callable, *args, reps: int = 3) -> float:
    """Best wall-clock seconds of ``fn(*args)`` over ``reps`` calls, after one warm-up call
    (which compiles). Waits for the result (``jax.block_until_ready``) inside the timing."""
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def linear_attention_matrix(log_decay, length: int, **kwargs: Any) -> np.ndarray:
    """The mixing matrix M [H, T, T] of :func:`jaxlm.ops.linear_attention` for unit q·k.

    With q_t = k_s = 1 (one feature) and one-hot values v_s = e_s, the kernel's output row t is
    Σ_{s≤t} M_ts e_s, i.e. exactly row t of its decay matrix M_ts = exp(G_t − G_s) [s ≤ t]
    (Lightning Attention-2 eq. 3). ``log_decay``: [H] per-head log λ (≤ 0); ``kwargs`` go to the
    kernel (``form``, ``chunk_size``). Runs the library kernel, so it pictures what it computes.
    """
    import jax
    import jax.numpy as jnp

    from jaxlm.ops import linear_attention

    g = jnp.asarray(log_decay, jnp.float32)
    h, t = g.shape[0], int(length)

    @jax.jit
    def matrix(g):
        ones = jnp.ones((1, t, h, 1), jnp.float32)
        eye = jnp.broadcast_to(jnp.eye(t, dtype=jnp.float32)[None, :, None, :], (1, t, h, t))
        o = linear_attention(ones, ones, eye, g, **kwargs)  # [1, T, H, T]
        return jnp.transpose(o[0], (1, 0, 2))  # [H, T(t), T(s)]

    return np.asarray(matrix(g))
