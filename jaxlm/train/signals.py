"""Stopping a run on SIGTERM / SIGINT (Ctrl-C): checkpoint at a step boundary, or abort at once.

What a signal does, in the order a user meets it:

* **before the first step of this run has finished** (data setup, the first compile — 60–80 s on
  a big model): nothing new exists to save, so the default action is restored and the signal
  ends the process at once (exit status 128 + signal). The last checkpoint is untouched.
* **the first signal after that**: a flag; the loop checkpoints at the end of the current step
  and exits 0 (``result["preempted"]``). One log line says so and how to abort instead.
* **a second signal**: abort at once, without a new checkpoint. The default action is restored
  after the first signal, so this works even while XLA is compiling (a Python handler would only
  run after the compile returns). Checkpoint writes are atomic (orbax renames a finished
  ``<step>.orbax-checkpoint-tmp``), so the latest complete checkpoint is never damaged.

In a Jupyter kernel SIGINT means "interrupt the cell", not "kill the kernel": there the default
action is never restored; the first interrupt stops at a step boundary and a second raises
``KeyboardInterrupt`` (Python's own handler).

Several processes (``jax.distributed``): each receives its signal on its own (or only one does),
so a local flag would let them stop at different steps and hang in the next collective. There
jax's preemption service owns SIGTERM: it tells the other processes through the coordination
service and ``multihost_utils.reached_preemption_sync_point(step)`` turns True on all of them at
the same step. SIGINT is forwarded to it as SIGTERM.

Example::

    with StopFlag() as stop:
        for step in range(1, n + 1):
            ...                       # one train step
            stop.step_done()
            if stop.should_stop(step):
                break                 # checkpoint and exit
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import jax
from jax.experimental import multihost_utils

log = logging.getLogger("jaxlm")
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """Context manager owning SIGTERM/SIGINT for the duration of a training loop."""

    def __init__(self):
        self.signum = None
        self.previous = {}
        self.synced = False
        self.interactive = "ipykernel" in sys.modules  # SIGINT = interrupt the cell, not the kernel

    def __enter__(self):
        from jax._src import distributed  # the preemption service is not in jax's public API

        state = getattr(distributed, "global_state", None)  # if jax moves it: per-process flags
        self.synced = (jax.process_count() > 1
                       and getattr(state, "preemption_sync_manager", None) is not None)
        for sig in (signal.SIGINT,) if self.synced else _SIGNALS:
            try:
                self.previous[sig] = signal.getsignal(sig)
                # until a step is done there is nothing to save: a signal ends the run at once
                signal.signal(sig, self._handle if self.synced or self.interactive
                              else signal.SIG_DFL)
            except ValueError:  # not in the main thread (e.g. some notebook kernels)
                self.previous.pop(sig, None)
        return self

    def step_done(self) -> None:
        """Called after each step: from now on a first signal means "checkpoint, then exit"."""
        if self.signum is None:
            for sig in self.previous:
                if signal.getsignal(sig) is not self._handle:
                    signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        first = self.signum is None
        self.signum = self.signum or signum
        if self.synced:  # let jax's SIGTERM notifier start the cross-process agreement
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if not first:
            raise KeyboardInterrupt  # only reached in a notebook kernel (see below)
        log.warning("signal %d: will checkpoint at the end of this step and exit; send it again "
                    "to abort at once without saving", signum)
        for sig in self.previous:  # a second signal ends the process at once, even mid-compile
            if not self.interactive:
                signal.signal(sig, signal.SIG_DFL)

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
