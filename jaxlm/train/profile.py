"""Profiling a run: a ``jax.profiler`` trace of chosen steps, and the compiled programs' HLO.

``train.profile=START:STOP`` traces train steps START through STOP (1-based, inclusive) into
``<out_dir>/profile/plugins/profile/<timestamp>/`` (``*.xplane.pb`` and ``*.trace.json.gz``).
View it with TensorBoard's profile plugin (``pip install tensorboard tensorboard-plugin-profile``;
``tensorboard --logdir <out_dir>/profile``), with XProf, or open the ``.trace.json.gz`` in
Perfetto (ui.perfetto.dev). Skip the first step (it compiles): e.g. ``train.profile=5:7``.
The trace stops after STOP's results are ready, so the last traced step is complete.

``train.dump_hlo=true`` writes every compiled train step's optimized HLO (one per batch shape) to
``<out_dir>/hlo/train_step_<B>x<T>.txt`` — what XLA actually runs, fusions and collectives
included (the same text jaxlm-plan reads).

Only the primary process writes (jaxlm.distributed.is_primary).

Example::

    jaxlm-train tiny out_dir=/tmp/prof train.steps=10 train.profile=5:7 train.dump_hlo=true
"""

from __future__ import annotations

import logging
import os

import jax

from jaxlm.distributed import is_primary

log = logging.getLogger("jaxlm")


def parse_profile(spec: str) -> tuple[int, int] | None:
    """"START:STOP" -> (START, STOP); "" -> None. ValueError if malformed."""
    if not spec:
        return None
    a, sep, b = spec.partition(":")
    if not sep or not a.strip().isdigit() or not b.strip().isdigit():
        raise ValueError(spec)
    start, stop = int(a), int(b)
    if not 1 <= start <= stop:
        raise ValueError(spec)
    return start, stop


class StepProfiler:
    """Starts the trace before step START and stops it after step STOP (see the module doc)."""

    def __init__(self, cfg, first_step: int):
        self.window = parse_profile(cfg.train.profile) if is_primary() else None
        self.dir = os.path.join(cfg.out_dir, "profile")
        self.active = False
        if self.window and first_step + 1 >= self.window[0] and first_step < self.window[1]:
            self._start(first_step + 1)  # the window begins at (or before) the first step

    def _start(self, step: int) -> None:
        jax.profiler.start_trace(self.dir)
        self.active = True
        log.info("step %d: profiling until step %d into %s", step, self.window[1], self.dir)

    def after(self, done: int, state) -> None:
        """Call after step ``done`` finished dispatching."""
        if not self.window:
            return
        if self.active and done >= self.window[1]:
            jax.block_until_ready(state)
            self.close()
        elif not self.active and done + 1 == self.window[0]:
            self._start(done + 1)

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile written to %s (tensorboard --logdir %s)", self.dir, self.dir)


def dump_hlo(cfg, compiled, shape) -> None:
    """Write a compiled train step's optimized HLO text (``train.dump_hlo``)."""
    if not (cfg.train.dump_hlo and is_primary()):
        return
    folder = os.path.join(cfg.out_dir, "hlo")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"train_step_{'x'.join(map(str, shape))}.txt")
    with open(path, "w") as f:
        f.write(compiled.as_text())
    log.info("HLO of the train step for batch shape %s written to %s", list(shape), path)
