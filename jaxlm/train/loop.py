"""``run(cfg)``: the whole training job, read top to bottom as the architecture diagram
(docs/architecture.md) draws it::

    Config ─► data source ─► mesh ─► StateSpec ─► restore_or_init ─► loop over steps:
        batch ─► host_to_global ─► compiled train step ─► LogWindow (metrics, throughput)
        every log_every: LogWindow.flush ─► metrics.jsonl / TensorBoard / tqdm
        every eval_every and at the end: eval_and_log (loss, perplexity, bits-per-byte)
        every ckpt.every, at the end and on SIGTERM/SIGINT: save (async orbax checkpoint)
    ─► result {state, spec, tokenizer, cfg, eval, ...}  (jaxlm-train then prints a sample)

A run whose ``out_dir`` already holds a checkpoint continues from it: same params, optimizer
state, step, RNG and data-iterator position, so "stop at N/2, rerun" equals "run to N".

Fault model (what the loop survives; checkpoint-level faults are in jaxlm/train/checkpoint.py):

* killed at any moment (SIGKILL, OOM, preemption without notice): the rerun resumes from the
  newest complete checkpoint and redoes the lost steps identically; ``metrics.jsonl`` is cut back
  to that step (a torn last line from the kill is dropped), so it stays one clean curve;
* SIGTERM/SIGINT: checkpoint at the next step boundary, exit 0; a second signal, or one before
  the first step is done, ends the process at once (jaxlm/train/signals.py); with several
  processes (even if only one got the signal) all stop at the same step;
* a damaged latest checkpoint: one log line, resume from the previous good one;
* NaN/inf loss or gradients: the update is not applied (jaxlm/train/step.py); ``train.nonfinite``
  = ``skip`` logs and counts it (``nonfinite_skips`` in metrics.jsonl), ``stop`` raises
  :class:`NonFiniteError` at the next metrics fetch or checkpoint, whichever comes first, so no
  checkpoint is written after the bad step;
* a configuration that cannot fit in device memory: one line with XLA's estimate, before the
  first step (jaxlm/train/compiled.py);
* unwritable out_dir or a failed checkpoint write (disk full): one-line error, earlier
  checkpoints intact. Every error path waits for checkpoint writes already in flight.

Example::

    from jaxlm.config import load_config
    from jaxlm.train.loop import run
    result = run(load_config("tiny", ["out_dir=/tmp/jaxlm_demo"]))
    result["eval"]["bpb"]
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from functools import partial

import jax

from jaxlm.config import Config, ConfigError, to_yaml
from jaxlm.data import make_data_source
from jaxlm.optim import build_optimizer
from jaxlm.sharding import host_to_global, make_mesh
from jaxlm.distributed import is_primary, primary_outcome
from jaxlm.ops import attention_kernels
from jaxlm.train.checkpoint import Checkpointer, reason
from jaxlm.train.compat import check_compatible, describe_changes
from jaxlm.train.compiled import CompiledSteps
from jaxlm.train.lock import acquire_run_lock
from jaxlm.train.profile import StepProfiler, dump_hlo
from jaxlm.train.log_window import LogWindow
from jaxlm.train.signals import StopFlag
from jaxlm.train.state import StateSpec, resolve_vocab
from jaxlm.train.step import evaluate, evaluate_groups, make_eval_step, make_train_step
from jaxlm.utils.flops import estimate_state_bytes, format_bytes, measure_peak_flops
from jaxlm.utils.metrics import MetricWriter

log = logging.getLogger("jaxlm")


def setup_logging() -> None:
    level = logging.INFO if is_primary() else logging.WARNING
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


def describe(cfg: Config, mesh, spec: StateSpec) -> None:
    """Log devices, mesh, model size, batch and the bytes of params + optimizer state."""
    t = cfg.train
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    abstract = spec.abstract_with_shardings()
    mem = estimate_state_bytes(abstract["params"], abstract["opt_state"])
    log.info("devices: %d x %s (%d process%s)", len(jax.devices()), jax.devices()[0].device_kind,
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
    if (cfg.model.weights, cfg.optim.name) != ("dense", "adamw"):  # a low-rank run: compare
        from jaxlm.optim.lowrank import method_memory  # (builds every method's shapes)

        log.info("params+optimizer state by method (from shapes): %s", method_memory(cfg))


@contextlib.contextmanager
def own_out_dir(cfg: Config):
    """Create ``out_dir``, hold its one-writer lock (jaxlm/train/lock.py: a second jaxlm-train on
    it is a one-line error, on every process of a multi-host job) and open its checkpoint manager
    for the duration of the run."""
    lock, error = None, ""
    try:
        lock = acquire_run_lock(cfg.out_dir, primary=is_primary())
    except ConfigError as e:
        error = str(e)
    error = primary_outcome(error)  # multi-host: every process stops on the primary's refusal
    if error:  # nothing to release: the primary holds no lock, the others an inert handle
        raise ConfigError(error)
    try:
        yield Checkpointer(cfg.out_dir, cfg.ckpt)
    finally:
        lock.release()


def restore_or_init(cfg: Config, spec: StateSpec, ckpt: Checkpointer, train_iter):
    """-> (state, restored step or None): the newest usable checkpoint (with the data iterator's
    position) or a fresh state -- random, or with ``init_from``'s parameters
    (jaxlm/train/init_from.py); ``metrics.jsonl`` is cut back to that step and the resolved
    config written next to it. A checkpoint in out_dir always wins over ``init_from``."""
    def target(saved: Config) -> dict:
        check_compatible(saved, cfg)  # a one-line error naming what differs and what to do
        return spec.abstract_with_shardings()

    found = ckpt.restore_latest(target, train_iter, quarantine=True)
    if found:
        log.info("resumed from %s at step %d", ckpt.dir, found.step)
        if cfg.init_from:
            log.info("out_dir holds a checkpoint: resuming it; init_from is ignored (%s)",
                     cfg.init_from)
        for change in describe_changes(found.config, cfg):  # differs, but resumes fine
            log.info("resuming with a changed setting: %s", change)
    if found:
        state = found.state
    elif cfg.init_from:
        from jaxlm.train.init_from import init_state
        state = init_state(cfg, spec)
    else:
        state = spec.init()
    latest, error = (found.step if found else None), ""
    if is_primary():
        try:
            trim_metrics(cfg.out_dir, latest or 0)  # fresh start: drop a crashed run's lines
            _write_atomic(os.path.join(cfg.out_dir, "config.yaml"), to_yaml(cfg))
        except OSError as e:
            error = f"cannot write to out_dir {cfg.out_dir}: {reason(e)}; choose a writable out_dir"
    error = primary_outcome(error)  # multi-host: the other processes stop with the primary
    if error:
        ckpt.abort()
        raise ConfigError(error)
    return state, latest


def _nonfinite_error(step: int, ckpt: Checkpointer) -> NonFiniteError:
    ckpt.wait()
    last = ckpt.latest_step()
    kept = f"the latest checkpoint is the last good one (step {last})" if last is not None \
        else "no checkpoint was written"
    return NonFiniteError(
        f"step {step}: non-finite loss or gradients (train.nonfinite=stop); stopped without "
        f"saving, {kept} in {ckpt.dir} — lower train.lr, check the data, or set "
        "train.nonfinite=skip")


def log_window(window: LogWindow, writer: MetricWriter, cfg: Config, ckpt: Checkpointer) -> dict:
    """Flush the window into one metrics line; handle its non-finite steps per train.nonfinite."""
    step, row = window.flush()
    writer.write(step, row)
    writer.progress(step, {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:,.0f}"})
    if window.nonfinite:
        if cfg.train.nonfinite == "stop":
            raise _nonfinite_error(window.nonfinite[0], ckpt)
        log.warning("steps %d-%d: %d update(s) skipped, non-finite loss or gradients (first at "
                    "step %d; train.nonfinite=skip)", window.steps[0], step,
                    len(window.nonfinite), window.nonfinite[0])
    return row


def eval_and_log(evaluator, params, writer: MetricWriter, step: int, *, final: bool):
    """Held-out loss / perplexity / bits-per-byte -> metrics (None when eval is off or empty)."""
    if evaluator is None:
        return None
    ev = evaluator(params)
    if ev is None:
        log.warning("step %d: the held-out batches hold no target tokens; no eval metrics "
                    "written", step)
        return None
    metrics = {"eval_loss": ev["loss"], "eval_ppl": ev["ppl"], "eval_bpb": ev["bpb"]}
    for name, m in ev.get("sources", {}).items():  # a mixture: eval_bpb/<name> per source
        metrics.update({f"eval_loss/{name}": m["loss"], f"eval_bpb/{name}": m["bpb"]})
    writer.write(step, metrics)
    if final:
        log.info("step %d: eval loss %.4f  ppl %.2f  bpb %.4f", step, ev["loss"], ev["ppl"],
                 ev["bpb"])
        for name, m in ev.get("sources", {}).items():
            log.info("step %d: eval %s: loss %.4f  bpb %.4f", step, name, m["loss"], m["bpb"])
    return ev


def save(ckpt: Checkpointer, step: int, state, train_iter, cfg: Config, window: LogWindow):
    """Checkpoint, unless ``train.nonfinite=stop`` and a not-yet-logged step was non-finite."""
    if cfg.train.nonfinite == "stop" and window.pending:
        bad = window.first_nonfinite()
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


def make_evaluator(cfg: Config, spec: StateSpec, data, mesh):
    """``params -> eval metrics`` over the same held-out batches every time; None (and one log
    line) when ``train.eval_batches=0`` turns evaluation off."""
    if cfg.train.eval_batches == 0:
        log.info("eval is off (train.eval_batches=0): no eval metrics will be reported")
        return None
    kw = dict(batch_size=cfg.train.batch_size // cfg.train.grad_accum,
              num_batches=cfg.train.eval_batches, process_index=jax.process_index(),
              process_count=jax.process_count())
    if hasattr(data, "eval_groups"):  # a mixture: each source's held-out set, then pooled
        return partial(evaluate_groups, make_eval_step(spec), groups=data.eval_groups(**kw),
                       mesh=mesh)
    return partial(evaluate, make_eval_step(spec), batches=data.eval_batches(**kw), mesh=mesh)


def run(cfg: Config) -> dict:
    """Train per ``cfg``; returns final metrics. Raises ConfigError for user errors."""
    from jaxlm import distributed  # join a multi-process job (cfg.distributed) before any JAX op
    distributed.initialize(cfg)
    setup_logging()
    if cfg.log.wandb and is_primary():  # a missing package fails before any data or compile
        from jaxlm.utils.wandb_writer import require_wandb
        require_wandb()
    data = make_data_source(cfg.data)
    cfg = resolve_vocab(cfg, data.tokenizer.vocab_size)
    mesh = make_mesh(cfg.mesh)
    shapes = data.batch_shapes(cfg.train.batch_size) if hasattr(data, "batch_shapes") else None
    check_batch(cfg, mesh, shapes)
    attention_kernels.check_model(cfg.model, mesh.devices.flat,
                                  [length for _, length in shapes or [(0, cfg.data.seq_len)]])
    if shapes:
        log.info("variable sequence length: %d batch shapes %s (same tokens per step); the train "
                 "step compiles once per shape", len(shapes), shapes)
    spec = StateSpec.build(cfg, mesh, build_optimizer(cfg))
    describe(cfg, mesh, spec)
    with own_out_dir(cfg) as ckpt:
        return train(cfg, spec, data, ckpt)


def _already_complete(cfg: Config, start: int, end: int, ckpt: Checkpointer, result: dict):
    log.info("the run in %s is already complete at step %d (train.steps=%d%s): nothing to do; "
             "raise train.steps to train further, or use a new out_dir", cfg.out_dir, start,
             cfg.train.steps, f", train.stop_at={end}" if cfg.train.stop_at else "")
    ckpt.close()
    return result


def train(cfg: Config, spec: StateSpec, data, ckpt: Checkpointer) -> dict:
    """Restore or init, then step until ``train.stop_at`` / ``train.steps`` or a signal."""
    mesh = spec.mesh
    train_iter = data.train_iterator(batch_size=cfg.train.batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count(), seed=cfg.seed,
                                     **({"total_steps": cfg.train.steps}  # dd: cycles span the run
                                        if getattr(data, "wants_total_steps", False) else {}))
    state, latest = restore_or_init(cfg, spec, ckpt, train_iter)
    start = int(jax.device_get(state["step"]))
    end = cfg.train.stop_at or cfg.train.steps
    result = {"out_dir": cfg.out_dir, "start_step": start, "step": start, "preempted": False,
              "eval": None, "loss": None, "nonfinite_skips": 0,
              "state": state, "spec": spec, "tokenizer": data.tokenizer, "cfg": cfg}
    if latest is not None and start >= end:
        return _already_complete(cfg, start, end, ckpt, result)
    steps = CompiledSteps(make_train_step(spec), mesh, partial(dump_hlo, cfg))
    evaluator = make_evaluator(cfg, spec, data, mesh)
    peak = cfg.peak_flops or measure_peak_flops("float32" if cfg.model.dtype == "float32"
                                                else "bfloat16", n=1024)
    window = LogWindow(cfg, peak_flops=peak, n_devices=len(jax.devices()), end=end)
    writer = MetricWriter(cfg.out_dir, enabled=is_primary(), total_steps=end, initial_step=start,
                          cfg=cfg)  # cfg.log: W&B (jaxlm/utils/wandb_writer.py)
    prof = StepProfiler(cfg, start)  # train.profile: a jax.profiler trace of chosen steps
    with StopFlag() as stop, _finish_writes_on_error(ckpt, writer), contextlib.closing(prof):
        step = start
        while step < end:
            batch = host_to_global(next(train_iter), mesh)
            compiling = steps.is_new(batch)
            if compiling:  # one compile per batch shape (dd mode: one per bucket)
                log.info("step %d: compiling the train step for batch shape %s (shape %d)",
                         step + 1, list(batch["inputs"].shape), len(steps.cache) + 1)
            window.before_step(state, compiling=compiling)
            state, metrics = steps.get(state, batch)(state, batch)
            step += 1
            prof.after(step, state)
            window.after_step(step, metrics, batch["inputs"].shape[1])
            stop.step_done()
            if window.due(step):
                result["loss"] = float(log_window(window, writer, cfg, ckpt)["loss"])
                result["nonfinite_skips"] += len(window.nonfinite)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != end:
                eval_and_log(evaluator, state["params"], writer, step, final=False)
                window.restart_clock()
            if stop.should_stop(step):
                log.info("signal %d: checkpointing at step %d and exiting", stop.signum, step)
                result["preempted"] = True
                break
            if ckpt.should_save(step) and step != end:
                save(ckpt, step, state, train_iter, cfg, window)
        if not result["preempted"]:
            result["eval"] = eval_and_log(evaluator, state["params"], writer, step, final=True)
        save(ckpt, step, state, train_iter, cfg, window)  # always one at the end
        ckpt.close()
    writer.close()
    result.update(step=step, state=state)
    return result
