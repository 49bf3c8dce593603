"""Pure train and eval steps, compiled with ``jax.jit`` + explicit shardings + buffer donation.

One optimizer step on a global batch of B sequences split into A = ``train.grad_accum``
micro-batches (a ``lax.scan``, so memory is that of one micro-batch):

    L(θ) = ( Σ_t m_t · nll_t(θ) + α Σ_t m_t · lse_t(θ)² ) / Σ_t m_t        (over all B sequences)
    g    = Σ_a ∇L_a(θ),  L_a = the numerator restricted to micro-batch a, over the same denominator

so accumulating A micro-batches gives exactly the gradient of the full batch. Micro-batch a takes
rows a, a+A, a+2A, … so every device contributes equally to every micro-batch (no resharding).
Metrics stay on device; the loop fetches them every ``log_every`` steps (no per-step host sync).

Dropout (``model.dropout`` > 0) draws its masks from ``fold_in(state["rng"], step)`` (and the
micro-batch index): the rng itself never changes, so a resumed run draws exactly the masks of an
uninterrupted one, and ``model.dropout=0`` never touches it (the step is the one without dropout).
The logged ``lr`` is the one the update applied (:func:`jaxlm.optim.applied_lr`).

Non-finite guard (``train.nonfinite``): a device-side flag ``finite = isfinite(loss) and
isfinite(‖g‖₂)`` selects between the updated and the old params and optimizer state
(``jnp.where``; on CPU a ``lax.cond``, see :func:`_guarded_update`), so a step with a NaN/inf
loss or gradient leaves both unchanged — whatever the mode. The global norm (which clipping and
the ``grad_norm`` metric need anyway) is finite exactly when every gradient entry is, except
that a float32 sum of squares above ~3.4e38 (entries beyond ~1e19) also counts as non-finite —
such a gradient could not be clipped either; reading the norm instead of testing every entry
saves a pass over the gradients. The loop counts such a step (``skip``) or stops the run
(``stop``). The step counter still advances (the batch was consumed and the LR schedule moves
on), so step N always means N batches read and resume stays exact.
``metrics["nonfinite"]`` is 1 for such a step.

Example (see jaxlm/train/loop.py for the full wiring)::

    step_fn = make_train_step(spec)                 # jitted, donates the old state
    state, metrics = step_fn(state, batch)          # batch: dict of [B, T] global arrays
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from jaxlm import ops
from jaxlm.ops.head_loss import auto_chunk
from jaxlm.optim import applied_lr
from jaxlm.sharding import batch_sharding, host_to_global, replicated, shard
from jaxlm.train.state import StateSpec, merge_buffers, split_buffers


def loss_fn(spec: StateSpec, params, batch, denom, z_loss: float = 0.0, dropout_key=None):
    """Summed masked NLL (+ z-loss) of one (micro-)batch divided by ``denom`` tokens."""
    model = spec.model(params)
    x, _ = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"],
                        dropout_key=dropout_key)
    mask = batch["loss_mask"].astype(jnp.float32)
    xn, w = model.head_inputs(x)  # [B, T, D], [D, V]
    chunk = _chunk(spec, xn, w)
    if chunk:  # the head + loss with per-token weights a = m/denom, b = α·m/denom: gradients
        # formed chunk by chunk in the forward pass, the logits never held whole (ops/head_loss.py)
        loss, nll = ops.head_loss(xn, w, batch["targets"], mask / denom,
                                  (z_loss / denom) * mask, chunk)
        return loss, (nll * mask).sum()
    # model.head_chunk=0: the reading form -- whole [B, T, V] logits, autodiff through the loss
    nll, lse = ops.head_nll(xn, w, batch["targets"])  # [B, T] each, float32
    nll_sum = (nll * mask).sum()
    total = nll_sum + (z_loss * (jnp.square(lse) * mask).sum() if z_loss else 0.0)
    return total / denom, nll_sum


def head_nll(spec: StateSpec, model, x, targets):
    """x_L [B, T, D] -> (nll, lse) [B, T] without gradients (eval): over the same sequence chunks
    as training (``model.head_chunk``; jaxlm/ops/head_loss.py)."""
    xn, w = model.head_inputs(x)  # [B, T, D], [D, V]
    return ops.head_nll(xn, w, targets, _chunk(spec, xn, w))


def _chunk(spec: StateSpec, xn, w) -> int:
    """Sequence positions per head chunk (``model.head_chunk``; 0 = no fusion: whole logits)."""
    b, t, _ = xn.shape
    per_device = b // (spec.mesh.shape["data"] * spec.mesh.shape["fsdp"])  # rows per batch shard
    return auto_chunk(spec.cfg.model.head_chunk, max(per_device, 1), t, w.shape[-1])


def _microbatches(batch, accum: int):
    """[B, T] -> [A, B/A, T] taking rows a, a+A, … for micro-batch a (device-balanced)."""

    def split(x):
        b = x.shape[0]
        x = x.reshape((b // accum, accum) + x.shape[1:])  # [B/A, A, T]
        x = jnp.swapaxes(x, 0, 1)  # [A, B/A, T]
        return shard(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def train_step(spec: StateSpec, state, batch):
    cfg = spec.cfg
    accum, z_loss = cfg.train.grad_accum, cfg.train.z_loss
    params, buffers = split_buffers(state["params"])  # buffers: no gradient, no optimizer
    denom = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
    grad_fn = jax.value_and_grad(
        lambda p, b, key: loss_fn(spec, merge_buffers(p, buffers), b, denom, z_loss, key),
        has_aux=True)
    # dropout: a key per step (and micro-batch) from the state's fixed rng, so resume is exact
    key = jax.random.fold_in(state["rng"], state["step"]) if cfg.model.dropout else None
    if accum == 1:
        (loss, nll_sum), grads = grad_fn(params, batch, key)
    else:
        def micro(carry, xs):
            (g_acc, l_acc, n_acc), (mb, a) = carry, xs
            (l, n), g = grad_fn(params, mb, None if key is None else jax.random.fold_in(key, a))
            return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, n_acc + n), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, loss, nll_sum), _ = jax.lax.scan(
            micro, (zeros, jnp.zeros(()), jnp.zeros(())),
            (_microbatches(batch, accum), jnp.arange(accum)))
    grad_norm = optax.tree.norm(grads)  # the clip's norm too (XLA computes it once)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # every entry finite, or ‖g‖² overflows
    params, opt_state = _guarded_update(spec.tx, finite, params, grads, state["opt_state"])
    new_state = {"step": state["step"] + 1, "params": merge_buffers(params, buffers),
                 "opt_state": opt_state, "rng": state["rng"]}
    metrics = {"loss": loss, "nll": nll_sum / denom, "grad_norm": grad_norm,
               "lr": applied_lr(cfg, state["opt_state"]), "tokens": denom,
               "nonfinite": (~finite).astype(jnp.int32)}
    return new_state, metrics


def _guarded_update(tx, finite, params, grads, opt_state):
    """(params, opt_state) after the update when ``finite``, else both unchanged.

    On accelerators a ``jnp.where`` per leaf between the new and the old values
    (:func:`_update_select`). On CPU a ``lax.cond`` (:func:`_update_cond`): with the old state
    donated, XLA:CPU fused the select-guarded update so that the parameter update recomputed the
    moments from the *old* moments, which the moments' own in-place update then had to keep alive
    as copies -- the AdamW update took 43 ms a step on the bench config under the select, 28 ms
    under the cond (bench/update_cost.py). A cond on GPU syncs its predicate to the host each step,
    so the other platforms keep the select."""
    return jax.lax.platform_dependent(finite, params, grads, opt_state,
                                      cpu=lambda *a: _update_cond(tx, *a),
                                      default=lambda *a: _update_select(tx, *a))


def _apply(tx, params, grads, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _update_select(tx, finite, params, grads, opt_state):
    return jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                        _apply(tx, params, grads, opt_state), (params, opt_state))


def _update_cond(tx, finite, params, grads, opt_state):
    return jax.lax.cond(finite, lambda p, g, s: _apply(tx, p, g, s), lambda p, g, s: (p, s),
                        params, grads, opt_state)


def eval_step(spec: StateSpec, params, batch):
    """Summed NLL, target-token count and target bytes of one batch (for loss / ppl / bpb)."""
    model = spec.model(params)
    x, _ = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    nll, _ = head_nll(spec, model, x, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return {"nll_sum": (nll * mask).sum(), "tokens": mask.sum(),
            "bytes": (batch["target_bytes"] * mask).sum()}


def evaluate(eval_fn, params, batches, mesh) -> dict | None:
    """Sum NLL, tokens and bytes over held-out batches -> loss, perplexity, bits-per-byte
    (``eval_fn`` from :func:`make_eval_step`). None when they hold no target token: a metric
    over zero tokens is never reported.

        loss = Σ nll / Σ tokens,   ppl = exp(loss),   bpb = Σ nll / (ln 2 · Σ target bytes)
    """
    return eval_metrics(eval_totals(eval_fn, params, batches, mesh))


def eval_totals(eval_fn, params, batches, mesh) -> dict:
    """{"nll_sum", "tokens", "bytes"} summed over ``batches`` (sums of several sets add up)."""
    totals = {"nll_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
    outs = [eval_fn(params, host_to_global(b, mesh)) for b in batches]
    for out in jax.device_get(outs):
        for k in totals:
            totals[k] += float(out[k])
    return totals


def evaluate_groups(eval_fn, params, groups: dict, mesh) -> dict | None:
    """:func:`evaluate` of several held-out sets ``{name: batches}`` pooled (Σ over all sets),
    with each set's own metrics under ``"sources"`` (a set with no target token is left out)."""
    per = {name: eval_totals(eval_fn, params, b, mesh) for name, b in groups.items()}
    pooled = {k: sum(t[k] for t in per.values()) for k in ("nll_sum", "tokens", "bytes")}
    ev = eval_metrics(pooled)
    if ev is not None:
        ev["sources"] = {n: m for n, t in per.items() if (m := eval_metrics(t)) is not None}
    return ev


def eval_metrics(totals: dict) -> dict | None:
    """Totals -> loss, ppl, bpb, tokens (the formulas of :func:`evaluate`); None if empty."""
    if totals["tokens"] <= 0 or totals["bytes"] <= 0:
        return None
    loss = totals["nll_sum"] / totals["tokens"]
    bpb = totals["nll_sum"] / (math.log(2) * totals["bytes"])
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": bpb,
            "tokens": int(totals["tokens"])}


def make_train_step(spec: StateSpec):
    """jit(train_step) with the state's shardings in and out, the batch split over (data, fsdp)
    and the old state's buffers donated (updated in place)."""
    mesh = spec.mesh
    fn = jax.jit(lambda s, b: train_step(spec, s, b),
                 in_shardings=(spec.shardings, batch_sharding(mesh)),
                 out_shardings=(spec.shardings, replicated(mesh)), donate_argnums=0)
    return _with_mesh(fn, mesh)


def make_eval_step(spec: StateSpec):
    mesh = spec.mesh
    fn = jax.jit(lambda p, b: eval_step(spec, p, b),
                 in_shardings=(spec.shardings["params"], batch_sharding(mesh)),
                 out_shardings=replicated(mesh))
    return _with_mesh(fn, mesh)


def _with_mesh(fn, mesh):
    """Call ``fn`` with ``mesh`` active so logical activation constraints resolve."""

    def call(*args):
        with jax.set_mesh(mesh):
            return fn(*args)

    call.jitted = fn
    return call
