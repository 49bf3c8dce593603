"""``run(cfg)``: the whole training job — mesh, data, init or resume, jitted steps, metrics, eval,
checkpoints, preemption, and a sample at the end.

Data flow::

    Config ─► mesh (data, fsdp, tensor) ─► StateSpec (shapes, shardings) ─► init | restore
       └────► DataSource (grain) ─► per-process numpy batch ─► global jax.Array ─► train_step
    every log_every: fetch metrics (one host sync) ─► metrics.jsonl / TensorBoard / tqdm
    every eval_every: eval loss, perplexity, bits-per-byte on held-out batches
    every ckpt.every, at stop_at/steps, and on SIGTERM/SIGINT: async orbax checkpoint

A run whose ``out_dir`` already holds a checkpoint continues from it: same params, optimizer
state, step, RNG and data-iterator position, so "stop at N/2, rerun" equals "run to N".

Fault model (what the loop survives; checkpoint-level faults are in jaxlm/train/checkpoint.py):

* killed at any moment (SIGKILL, OOM, preemption without notice): the rerun resumes from the
  newest complete checkpoint and redoes the lost steps identically; ``metrics.jsonl`` is cut back
  to that step (a torn last line from the kill is dropped), so it stays one clean curve;
* SIGTERM/SIGINT: checkpoint at the next step boundary, exit 0; with several processes (even if
  only one got the signal) all stop at the same step, agreed through jax's preemption service;
* a damaged latest checkpoint: one log line, resume from the previous good one;
* NaN/inf loss or gradients: the update is not applied (jaxlm/train/step.py); ``train.nonfinite``
  = ``skip`` logs and counts it (``nonfinite_skips`` in metrics.jsonl), ``stop`` raises
  :class:`NonFiniteError` at the next metrics fetch or checkpoint, whichever comes first, so no
  checkpoint is written after the bad step;
* unwritable out_dir or a failed checkpoint write (disk full): one-line error, earlier
  checkpoints intact. Every error path waits for checkpoint writes already in flight.

Example::

    from jaxlm.config import load_config
    from jaxlm.train.loop import run
    result = run(load_config("configs/tiny.yaml", ["out_dir=/tmp/jaxlm_demo"]))
    result["eval"]["bpb"]
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time

import jax
from jax.experimental import multihost_utils

from jaxlm.config import Config, ConfigError, to_yaml
from jaxlm.data import make_data_source
from jaxlm.optim import build_optimizer, make_schedule
from jaxlm.sharding import host_to_global, make_mesh
from jaxlm.train.checkpoint import Checkpointer, check_compatible, is_primary, reason
from jaxlm.train.state import StateSpec, resolve_vocab
from jaxlm.train.step import make_eval_step, make_train_step
from jaxlm.utils.flops import estimate_state_bytes, flops_per_token, format_bytes
from jaxlm.utils.flops import measure_peak_flops, mfu
from jaxlm.utils.metrics import MetricWriter

log = logging.getLogger("jaxlm")


def setup_logging() -> None:
    level = logging.INFO if jax.process_index() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", force=True)
    logging.getLogger("jaxlm").setLevel(level)
    for noisy in ("absl", "orbax", "grain", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def check_batch(cfg: Config, mesh, shapes=None) -> None:
    """The global batch must split evenly over micro-batches, processes and batch shards.

    ``shapes``: the [rows, seq_len] batch shapes of a variable-length mode (dd: one per bucket,
    rows = batch_size * seq_len / L); each must split like the fixed batch does.
    """
    t = cfg.train
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = t.batch_size // t.grad_accum
    if micro % shards:
        raise ConfigError(
            f"micro-batch train.batch_size/train.grad_accum = {micro} is not divisible by "
            f"mesh.data*mesh.fsdp = {shards}; change train.batch_size or the mesh")
    for rows, length in shapes or ():
        if rows % t.grad_accum or (rows // t.grad_accum) % shards or rows % jax.process_count():
            raise ConfigError(
                f"the length-{length} bucket's batch of {rows} rows does not split over "
                f"train.grad_accum={t.grad_accum}, mesh.data*mesh.fsdp={shards} and "
                f"{jax.process_count()} processes; change train.batch_size or the buckets")
    if t.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the "
                          f"{jax.process_count()} processes")


class _StopFlag:
    """SIGTERM/SIGINT: checkpoint at the next step boundary every process agrees on, exit 0.

    One process: a Python handler sets a flag, checked after every step. Several processes: each
    receives its signal on its own (or only one does), so a local flag would let them stop at
    different steps and hang in the next collective. There jax's preemption service (started by
    ``jax.distributed.initialize``) owns SIGTERM: it tells the other processes through the
    coordination service and ``multihost_utils.reached_preemption_sync_point(step)`` turns True
    on all of them at the same step. SIGINT is forwarded to it as SIGTERM.
    """

    def __init__(self):
        self.signum = None
        self.previous = {}
        self.synced = False

    def __enter__(self):
        from jax._src import distributed  # the preemption service is not in jax's public API

        state = getattr(distributed, "global_state", None)  # if jax moves it: per-process flags
        self.synced = (jax.process_count() > 1
                       and getattr(state, "preemption_sync_manager", None) is not None)
        for sig in (signal.SIGINT,) if self.synced else (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread (e.g. some notebook kernels)
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        if self.synced:  # let jax's SIGTERM notifier start the cross-process agreement
            os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, step: int) -> bool:
        """Called after every step, on every process (the sync point protocol needs that)."""
        if self.synced:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = self.signum or signal.SIGTERM
                return True
            return False
        return self.signum is not None

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class NonFiniteError(ConfigError):
    """``train.nonfinite=stop`` met a NaN/inf loss or gradient (one line for the user)."""


def trim_metrics(out_dir: str, step: int) -> None:
    """On resume, drop logged lines past the restored step (they will be logged again), and a
    line torn by a kill mid-write; rewritten atomically, so a crash here loses nothing."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for ln in f:
            try:
                if ln.endswith("\n") and json.loads(ln).get("step", 0) <= step:
                    keep.append(ln)
            except ValueError:  # a torn or garbled line
                continue
    _write_atomic(path, "".join(keep))


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _first_nonfinite(pending) -> int | None:
    """The first step in ``pending`` [(step, metrics, seq_len)] whose update was not applied
    (fetches only those flags: one small host sync)."""
    flags = jax.device_get([m["nonfinite"] for _, m, _ in pending])
    return next((s for (s, _, _), bad in zip(pending, flags) if bad), None)


def _save_checked(ckpt: Checkpointer, step: int, state, train_iter, cfg: Config, pending) -> None:
    """Checkpoint, unless ``train.nonfinite=stop`` and a not-yet-logged step was non-finite."""
    if cfg.train.nonfinite == "stop" and pending:
        bad = _first_nonfinite(pending)
        if bad is not None:
            raise _nonfinite_error(bad, ckpt)
    ckpt.save(step, state, train_iter, cfg)


@contextlib.contextmanager
def _finish_writes_on_error(ckpt: Checkpointer, writer: MetricWriter):
    """On any error, let checkpoint writes in flight complete and close the metrics (and the
    progress bar, so the CLI's error line comes last) before the error propagates."""
    try:
        yield
    except BaseException:
        ckpt.abort()
        writer.close()
        raise


def _nonfinite_error(step: int, ckpt: Checkpointer) -> NonFiniteError:
    ckpt.wait()
    last = ckpt.latest_step()
    kept = f"the latest checkpoint is the last good one (step {last})" if last is not None \
        else "no checkpoint was written"
    return NonFiniteError(
        f"step {step}: non-finite loss or gradients (train.nonfinite=stop); stopped without "
        f"saving, {kept} in {ckpt.dir} — lower train.lr, check the data, or set "
        "train.nonfinite=skip")


def evaluate(eval_fn, params, batches, mesh) -> dict:
    """Sum NLL, tokens and bytes over the held-out batches -> loss, perplexity, bits-per-byte."""
    totals = {"nll_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
    outs = [eval_fn(params, host_to_global(b, mesh)) for b in batches]
    for out in jax.device_get(outs):
        for k in totals:
            totals[k] += float(out[k])
    loss = totals["nll_sum"] / max(totals["tokens"], 1.0)
    bpb = totals["nll_sum"] / (math.log(2) * max(totals["bytes"], 1.0))
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": bpb,
            "tokens": int(totals["tokens"])}


def describe(cfg: Config, mesh, spec: StateSpec) -> None:
    t, n_dev = cfg.train, len(jax.devices())
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    mem = estimate_state_bytes(
        spec.abstract_with_shardings()["params"], spec.abstract_with_shardings()["opt_state"])
    log.info("devices: %d x %s (%d process%s)", n_dev, jax.devices()[0].device_kind,
             jax.process_count(), "" if jax.process_count() == 1 else "es")
    log.info("mesh: %s", dict(mesh.shape))
    log.info("model: %s params (%d layers, d_model %d, %d heads / %d kv, vocab %d, %s)",
             f"{spec.param_count():,}", cfg.model.n_layers, cfg.model.d_model,
             cfg.model.n_heads, cfg.model.kv_heads, cfg.model.vocab_size, cfg.model.dtype)
    log.info("batch: %d global sequences x %d tokens = %d tokens/step; %d per batch shard; "
             "grad_accum %d", t.batch_size, cfg.data.seq_len, t.batch_size * cfg.data.seq_len,
             t.batch_size // shards, t.grad_accum)
    log.info("params+optimizer state: %s total, %s per device (%s, %s)",
             format_bytes(mem.total), format_bytes(mem.per_device),
             cfg.optim.name, f"params {format_bytes(mem.params)}")
    log.info("params+optimizer state by method (from shapes): %s", method_memory(cfg))


def method_memory(cfg: Config) -> str:
    """``adamw 1.22 MiB (1.00x) | galore* 1.07 MiB (0.87x) | ...``: float32 parameters + optimizer
    state of this model under each low-rank method (``jax.eval_shape``: nothing is allocated);
    ``*`` marks this run's method. Restarts are left out (they add two counters)."""
    from jaxlm.config import replace
    from jaxlm.optim.lowrank import METHODS, method_config, state_bytes

    base = replace(cfg, optim={"reset_every": 0, "refactor_every": 0})
    sizes = {m: state_bytes(method_config(base, m)) for m in METHODS}
    this = (cfg.model.weights, cfg.optim.name)
    if this not in METHODS.values():  # e.g. a plug-in optimizer: show this run's too
        sizes[f"{cfg.optim.name}/{cfg.model.weights}"] = state_bytes(base)
    return " | ".join(
        f"{m}{'*' if METHODS.get(m, this) == this else ''} {format_bytes(b)} "
        f"({b / sizes['adamw']:.2f}x)" for m, b in sizes.items())


def run(cfg: Config) -> dict:
    """Train per ``cfg``; returns final metrics. Raises ConfigError for user errors."""
    from jaxlm import distributed  # join a multi-process job (cfg.distributed) before any JAX op
    distributed.initialize(cfg)
    setup_logging()
    data = make_data_source(cfg.data)
    cfg = resolve_vocab(cfg, data.tokenizer.vocab_size)
    mesh = make_mesh(cfg.mesh)
    shapes = data.batch_shapes(cfg.train.batch_size) if hasattr(data, "batch_shapes") else None
    check_batch(cfg, mesh, shapes)
    if shapes:
        log.info("variable sequence length: %d batch shapes %s (same tokens per step); the train "
                 "step compiles once per shape", len(shapes), shapes)
    schedule = make_schedule(cfg.train)
    spec = StateSpec.build(cfg, mesh, build_optimizer(cfg))
    describe(cfg, mesh, spec)

    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create out_dir {cfg.out_dir}: {reason(e)}; choose a writable "
                          "out_dir") from None
    ckpt = Checkpointer(cfg.out_dir, cfg.ckpt)
    pidx, pcount = jax.process_index(), jax.process_count()
    train_iter = data.train_iterator(batch_size=cfg.train.batch_size, process_index=pidx,
                                     process_count=pcount, seed=cfg.seed)

    def target(saved: Config) -> dict:
        check_compatible(saved, cfg)
        return spec.abstract_with_shardings()

    found = ckpt.restore_latest(target, train_iter, quarantine=True)
    latest = found.step if found else None
    if found:
        state = found.state
        log.info("resumed from %s at step %d", ckpt.dir, latest)
    else:
        state = spec.init()
    if is_primary():
        try:
            trim_metrics(cfg.out_dir, latest or 0)  # fresh start: drop a crashed run's lines
            _write_atomic(os.path.join(cfg.out_dir, "config.yaml"), to_yaml(cfg))
        except OSError as e:
            ckpt.abort()
            raise ConfigError(f"cannot write to out_dir {cfg.out_dir}: {reason(e)}; choose a "
                              "writable out_dir") from None

    start = int(jax.device_get(state["step"]))
    end = cfg.train.stop_at or cfg.train.steps
    train_step, eval_step = make_train_step(spec, schedule), make_eval_step(spec)
    eval_batches = data.eval_batches(
        batch_size=cfg.train.batch_size // cfg.train.grad_accum,
        num_batches=cfg.train.eval_batches, process_index=pidx, process_count=pcount)
    peak = cfg.peak_flops or measure_peak_flops("float32" if cfg.model.dtype == "float32"
                                                else "bfloat16", n=1024)
    fpt = {}  # sequence length -> FLOPs per token (variable-length batches in dd mode)
    writer = MetricWriter(cfg.out_dir, enabled=is_primary(), total_steps=end, initial_step=start)
    result = {"out_dir": cfg.out_dir, "start_step": start, "step": start, "preempted": False,
              "eval": None, "loss": None, "nonfinite_skips": 0}

    pending, t_last, untimed, seen = [], None, set(), set()
    with _StopFlag() as stop, _finish_writes_on_error(ckpt, writer):
        step = start
        while step < end:
            local = next(train_iter)
            rows, seq_len = local["inputs"].shape  # this batch's shape (varies in dd mode)
            new_shape = (rows, seq_len) not in seen
            if new_shape:  # jit compiles once per shape: a bounded number (one per bucket)
                seen.add((rows, seq_len))
                log.info("step %d: compiling the train step for batch shape [%d, %d] (shape %d)",
                         step + 1, rows * pcount, seq_len, len(seen))
                if t_last is not None:
                    jax.block_until_ready(state)
                    t_compile = time.perf_counter()
            state, metrics = train_step(state, host_to_global(local, mesh))
            step += 1
            pending.append((step, metrics, seq_len))
            if t_last is None:  # the first step compiles: keep it out of the throughput figures
                jax.block_until_ready(metrics)
                t_last, untimed = time.perf_counter(), {step}
            elif new_shape:  # so does a new shape: keep that step out too
                jax.block_until_ready(metrics)
                t_last += time.perf_counter() - t_compile
                untimed.add(step)
            if step % cfg.train.log_every == 0 or step == end:
                fetched = jax.device_get(pending)  # the only host sync between log lines
                now = time.perf_counter()
                timed = [(m["tokens"], n) for s, m, n in fetched if s not in untimed]
                tok = sum(t for t, _ in timed)
                tps = tok / max(now - t_last, 1e-9) if timed else 0.0
                for _, n in timed:
                    fpt.setdefault(n, flops_per_token(cfg.model, cfg.model.vocab_size, n))
                avg_fpt = sum(t * fpt[n] for t, n in timed) / tok if tok else 0.0
                s, m, n = fetched[-1]
                line = {"loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
                        "tokens": int(m["tokens"]), "seq_len": n,
                        "tokens_per_s": tps, "mfu": mfu(avg_fpt, tps, peak, len(jax.devices())),
                        "step_time_s": (now - t_last) / len(timed) if timed else 0.0,
                        "nonfinite_skips": sum(int(f["nonfinite"]) for _, f, _ in fetched)}
                writer.write(s, line)
                writer.progress(s, {"loss": f"{m['loss']:.3f}", "tok/s": f"{tps:,.0f}"})
                result["loss"] = float(m["loss"])
                if line["nonfinite_skips"]:
                    bad = next(b for b, f, _ in fetched if f["nonfinite"])
                    if cfg.train.nonfinite == "stop":
                        raise _nonfinite_error(bad, ckpt)
                    result["nonfinite_skips"] += line["nonfinite_skips"]
                    log.warning("steps %d-%d: %d update(s) skipped, non-finite loss or gradients "
                                "(first at step %d; train.nonfinite=skip)", fetched[0][0], s,
                                line["nonfinite_skips"], bad)
                pending, t_last, untimed = [], now, set()
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != end:
                ev = evaluate(eval_step, state["params"], eval_batches, mesh)
                writer.write(step, {"eval_loss": ev["loss"], "eval_ppl": ev["ppl"],
                                    "eval_bpb": ev["bpb"]})
                t_last = time.perf_counter()
            if stop.should_stop(step):
                log.info("signal %d: checkpointing at step %d and exiting", stop.signum, step)
                result["preempted"] = True
                break
            if ckpt.should_save(step) and step != end:
                _save_checked(ckpt, step, state, train_iter, cfg, pending)
        result["step"] = step
        if not result["preempted"] and (step > start or latest is None):
            ev = evaluate(eval_step, state["params"], eval_batches, mesh)
            writer.write(step, {"eval_loss": ev["loss"], "eval_ppl": ev["ppl"],
                                "eval_bpb": ev["bpb"]})
            log.info("step %d: eval loss %.4f  ppl %.2f  bpb %.4f", step, ev["loss"], ev["ppl"],
                     ev["bpb"])
            result["eval"] = ev
        _save_checked(ckpt, step, state, train_iter, cfg, pending)  # always one at the end
        ckpt.close()
    writer.close()
    result.update(state=state, spec=spec, tokenizer=data.tokenizer, cfg=cfg)
    return result

