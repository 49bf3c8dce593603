"""Metric logging: one ``Writer`` interface, three sinks (JSONL always, TensorBoard by default,
Weights & Biases with ``log.wandb=true``), fanned out by ``MetricWriter``, plus a tqdm bar.

A :class:`Writer` is anything with ``write(step, metrics)``, ``flush()`` and ``close()``;
``metrics`` maps names to host scalars (Python numbers, NaN kept). The sinks:

* :class:`JsonlWriter` appends one JSON object per line to ``<out_dir>/metrics.jsonl`` --
  ``{"step": 10, "loss": 3.2, "lr": 0.001, ...}`` -- in append mode, so a resumed run continues
  the same file (rows after a resume may repeat steps; the last row for a step wins). Values are
  converted to plain ``int``/``float``/``bool``/``str``; non-finite floats are written as
  ``null`` so every line is strict JSON (TensorBoard and W&B still get the NaN).
* :class:`TensorBoardWriter`: numeric values -> ``tensorboardX.SummaryWriter(<out_dir>/tb)``.
* :class:`jaxlm.utils.wandb_writer.WandbWriter`: numeric values -> ``run.log(..., step=step)``
  of a W&B run resumed across restarts of the same ``out_dir`` (that module's docstring).

Failures never hang or pass silently: a failed ``metrics.jsonl`` write (disk full, directory
removed) is one ``ConfigError`` line; tensorboardX writes events in a background thread that dies
on an I/O error, after which its bounded queue would block the training loop forever once full —
``write`` checks that thread first and raises the same one-line error instead. W&B is a mirror
of data that ``metrics.jsonl`` already holds, so a W&B failure mid-run logs one warning and W&B
is dropped; training goes on. tensorboardX's ``NaN or Inf found in input tensor.`` warning
(logged for every non-finite scalar, e.g. a skipped step's loss) is dropped: the JSON row already
records it as ``null``.

Callers pass host values that were already fetched (one ``jax.device_get`` every ``log_every``
steps, never ``float(loss)`` per step); this module does not import jax. On non-zero processes
construct it with ``enabled=False`` and every method is a no-op (no files, no bar, no W&B run).

Example::

    from jaxlm.utils.metrics import MetricWriter
    with MetricWriter("/tmp/run", total_steps=100) as w:   # cfg=<Config> adds W&B if cfg.log.wandb
        w.write(10, {"loss": 3.2, "lr": 1e-3})
        w.progress(10, {"loss": 3.2})
    # /tmp/run/metrics.jsonl now ends with {"step": 10, "loss": 3.2, "lr": 0.001}
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from typing import Any, Mapping, Protocol, Sequence

from jaxlm.errors import ConfigError
from jaxlm.utils.files import check_local_dir, write_fix


class Writer(Protocol):
    """One metrics sink. ``write`` gets host scalars (numbers with NaN kept, bools, strings)."""

    def write(self, step: int, metrics: Mapping[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class _DropNanWarning(logging.Filter):
    """tensorboardX.x2num warns 'NaN or Inf found in input tensor.' per non-finite scalar."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "NaN or Inf found in input tensor" not in record.getMessage()


_NAN_FILTER = _DropNanWarning()


def to_python(value: Any):
    """numpy / 0-d array / Python scalar -> int, float, bool or str (non-finite float -> None)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()  # numpy scalars, 0-d numpy (or already-fetched) arrays
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    raise TypeError(f"metric value {value!r} of type {type(value).__name__} is not a scalar")


def numeric(metrics: Mapping[str, Any]) -> dict:
    """The numeric entries (bools count; strings and None do not), without ``step``."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, numbers.Real) and k != "step"}


def write_error(out_dir: str, e: OSError, what: str = "metrics") -> ConfigError:
    why = e.strerror or type(e).__name__
    return ConfigError(f"cannot write {what} in {out_dir}: {why}; {write_fix(e)}, then "
                       "rerun (training resumes from the last checkpoint)")


class JsonlWriter:
    """``<out_dir>/metrics.jsonl``, one strict-JSON row per ``write`` (append mode)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, "metrics.jsonl")
        try:
            self.file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise write_error(out_dir, e) from None

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        row = {"step": int(step), **{k: to_python(v) for k, v in metrics.items() if k != "step"}}
        try:
            self.file.write(json.dumps(row, allow_nan=False) + "\n")
            self.file.flush()
        except OSError as e:
            raise write_error(self.out_dir, e) from None

    def flush(self) -> None:
        if self.file is not None:
            try:
                self.file.flush()
            except OSError as e:
                raise write_error(self.out_dir, e) from None

    def close(self) -> None:
        f, self.file = self.file, None
        if f is not None:
            try:
                f.close()
            except OSError:  # close() runs on error paths too: keep the first error
                pass


def _tb_alive(tb) -> bool:
    """False if tensorboardX's event-writer thread has died (then stop using it: its queue would
    block every later write once full)."""
    worker = getattr(getattr(getattr(tb, "file_writer", None), "event_writer", None), "_worker",
                     None)
    return worker is None or worker.is_alive()


class TensorBoardWriter:
    """Numeric metrics -> ``tensorboardX.SummaryWriter(<out_dir>/tb)`` scalars."""

    def __init__(self, out_dir: str):
        from tensorboardX import SummaryWriter  # lazy: only process 0 pays the import

        logging.getLogger("tensorboardX.x2num").addFilter(_NAN_FILTER)  # (idempotent)
        self.out_dir = out_dir
        try:
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except OSError as e:  # e.g. a file named tb in out_dir
            raise write_error(out_dir, e, "TensorBoard events") from None

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.tb is None:
            return
        if not _tb_alive(self.tb):
            self.tb = None  # never close() it: that too would wait on the dead thread's queue
            raise write_error(self.out_dir, OSError(0, "the TensorBoard writer thread failed"),
                              "TensorBoard events")
        for key, value in numeric(metrics).items():
            self.tb.add_scalar(key, float(value), int(step))

    def flush(self) -> None:
        if self.tb is not None:
            try:
                self.tb.flush()
            except OSError as e:
                raise write_error(self.out_dir, e, "TensorBoard events") from None

    def close(self) -> None:
        tb, self.tb = self.tb, None
        if tb is not None and _tb_alive(tb):
            tb.close()


class MetricWriter:
    """Fans ``write`` out to its sinks (JSONL, TensorBoard, W&B, extra ``writers``) and drives the
    tqdm bar; active only when ``enabled`` (process 0).

    ``cfg``: the run's :class:`jaxlm.config.Config`; with ``cfg.log.wandb`` a W&B run is started
    (a missing ``wandb`` package is a ConfigError here, before any file is made or step run).
    """

    def __init__(self, out_dir: str, *, enabled: bool = True, tensorboard: bool = True,
                 total_steps: int | None = None, initial_step: int = 0, cfg=None,
                 writers: Sequence[Writer] = ()):
        self.out_dir = out_dir
        self.enabled = enabled
        self.total_steps = total_steps
        self.initial_step = initial_step
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.writers: list = []
        self._jsonl: JsonlWriter | None = None
        self._tbw: TensorBoardWriter | None = None
        self._bar = None
        if not enabled:
            return
        check_local_dir(out_dir)
        use_wandb = cfg is not None and cfg.log.wandb
        if use_wandb:
            from jaxlm.utils.wandb_writer import WandbWriter, require_wandb

            require_wandb()  # before anything is created
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise write_error(out_dir, e) from None
        self._jsonl = JsonlWriter(out_dir)
        self.writers.append(self._jsonl)
        try:
            if tensorboard:
                self._tbw = TensorBoardWriter(out_dir)
                self.writers.append(self._tbw)
            if use_wandb:
                self.writers.append(WandbWriter.start(cfg, out_dir))
        except BaseException:
            self.close()
            raise
        self.writers.extend(writers)

    # the JSONL file and the SummaryWriter, as attributes (tests swap in failing ones)
    @property
    def _file(self):
        return self._jsonl.file if self._jsonl is not None else None

    @_file.setter
    def _file(self, f) -> None:
        self._jsonl.file = f

    @property
    def _tb(self):
        return self._tbw.tb if self._tbw is not None else None

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Send ``{"step": step, **metrics}`` to every sink: a JSON line, TB and W&B scalars."""
        if not self.enabled:
            return
        raw = {k: (v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v)
               for k, v in metrics.items() if k != "step"}
        for value in raw.values():
            to_python(value)  # TypeError for a non-scalar, before any sink writes a partial row
        for w in self.writers:
            w.write(int(step), raw)

    def progress(self, step: int, postfix: Mapping[str, Any] | None = None) -> None:
        """Move the tqdm bar to ``step`` and show ``postfix`` (floats to 4 significant digits)."""
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=self.total_steps, initial=self.initial_step,
                             dynamic_ncols=True, smoothing=0.1)
        if postfix:
            self._bar.set_postfix(
                {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                refresh=False)
        self._bar.update(max(int(step) - self._bar.n, 0))

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        """Flush and close everything (W&B: ``finish``); safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        writers, self.writers = self.writers, []
        for w in reversed(writers):  # JSONL last: the record that must survive
            w.close()

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
