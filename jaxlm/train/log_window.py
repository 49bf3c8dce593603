"""The steps between two log lines: their metrics (still on device) and the time they took.

Metrics stay on device until the window is flushed every ``train.log_every`` steps, so there is one
host sync per log line, not per step. Throughput (``tokens_per_s``, ``mfu``, ``step_time_s``)
counts only steps that did not compile: a step that compiles (the first one, and in ``dd`` mode
the first of every new batch shape) is timed separately and left out of both the tokens and the
seconds. Time spent outside the steps (evaluation) is left out with :meth:`LogWindow.restart_clock`.

    tokens_per_s = Σ tokens of timed steps / wall time of timed steps
    mfu          = tokens_per_s · FLOPs/token / (peak FLOP/s per device · devices)   (PaLM, App. B)

Example::

    window = LogWindow(cfg, peak_flops=1e12, n_devices=8)
    window.before_step(state, compiling=steps.is_new(batch))  # jaxlm.train.compiled
    state, metrics = steps.get(state, batch)(state, batch)
    window.after_step(step, metrics, seq_len)
    if window.due(step):
        step, row = window.flush()                  # row: {"loss": ..., "lr": ..., ...}
"""

from __future__ import annotations

import time

import jax

from jaxlm.config import Config
from jaxlm.utils.flops import flops_per_token, mfu


class LogWindow:
    def __init__(self, cfg: Config, *, peak_flops: float, n_devices: int, end: int):
        self.cfg, self.peak, self.n_devices, self.end = cfg, peak_flops, n_devices, end
        self.pending: list[tuple[int, dict, int]] = []  # (step, device metrics, seq_len)
        self.untimed: set[int] = set()
        self.t_start: float | None = None  # wall clock where the timed part of the window began
        self._t_compile: float | None = None
        self._fpt: dict[int, float] = {}  # sequence length -> FLOPs per token
        self.steps: tuple[int, int] = (0, 0)  # first and last step of the last flushed window
        self.nonfinite: list[int] = []  # its steps whose update was not applied

    def before_step(self, state, *, compiling: bool) -> None:
        """Call before a step; ``compiling``: this step compiles (keep it out of the timing)."""
        if compiling and self.t_start is not None:
            jax.block_until_ready(state)  # finish the queued steps before the clock stops
            self._t_compile = time.perf_counter()

    def after_step(self, step: int, metrics: dict, seq_len: int) -> None:
        self.pending.append((step, metrics, seq_len))
        if self.t_start is None:  # the run's first step compiled: the clock starts after it
            jax.block_until_ready(metrics)
            self.t_start, self.untimed = time.perf_counter(), {step}
        elif self._t_compile is not None:  # a new shape compiled: leave the step out
            jax.block_until_ready(metrics)
            self.t_start += time.perf_counter() - self._t_compile
            self.untimed.add(step)
            self._t_compile = None

    def due(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.end

    def restart_clock(self) -> None:
        """Leave the time since the last step (e.g. an evaluation) out of the throughput."""
        self.t_start = time.perf_counter()

    def first_nonfinite(self) -> int | None:
        """The first pending step whose update was not applied (one small host sync)."""
        flags = jax.device_get([m["nonfinite"] for _, m, _ in self.pending])
        return next((s for (s, _, _), bad in zip(self.pending, flags) if bad), None)

    def flush(self) -> tuple[int, dict]:
        """Fetch the window's metrics (the only host sync between log lines) -> (last step, row):
        its loss / lr / grad_norm, the window's throughput and non-finite count. The window's
        first step and its non-finite steps are kept in ``self.steps`` / ``self.nonfinite``."""
        fetched = jax.device_get(self.pending)
        now = time.perf_counter()
        timed = [(m["tokens"], n) for s, m, n in fetched if s not in self.untimed]
        tok = sum(t for t, _ in timed)
        seconds = now - self.t_start
        tps = tok / max(seconds, 1e-9) if timed else 0.0
        for _, n in timed:
            if n not in self._fpt:
                self._fpt[n] = flops_per_token(self.cfg.model, self.cfg.model.vocab_size, n)
        avg_fpt = sum(t * self._fpt[n] for t, n in timed) / tok if tok else 0.0
        bad = [s for s, m, _ in fetched if m["nonfinite"]]
        step, m, n = fetched[-1]
        row = {"loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
               "tokens": int(m["tokens"]), "seq_len": n, "tokens_per_s": tps,
               "mfu": mfu(avg_fpt, tps, self.peak, self.n_devices),
               "step_time_s": seconds / len(timed) if timed else 0.0,
               "nonfinite_skips": len(bad)}
        self.steps, self.nonfinite = (fetched[0][0], step), bad
        self.pending, self.t_start, self.untimed = [], now, set()
        return step, row
