"""Metric logging: JSONL (always), tensorboardX scalars (optional) and a tqdm progress bar.

``MetricWriter.write(step, metrics)`` appends one JSON object per line to
``<out_dir>/metrics.jsonl`` -- ``{"step": 10, "loss": 3.2, "lr": 0.001, ...}`` -- in append mode,
so a resumed run continues the same file (rows after a resume may repeat steps; the last row for a
step wins). Values are converted to plain Python ``int``/``float``/``bool``/``str``; non-finite
floats are written as ``null`` so every line is strict JSON (TensorBoard still gets the NaN).
Numeric values are mirrored to ``tensorboardX.SummaryWriter(<out_dir>/tb)``.

Failures never hang or pass silently: a failed ``metrics.jsonl`` write (disk full, directory
removed) is one ``ConfigError`` line; tensorboardX writes events in a background thread that dies
on an I/O error, after which its bounded queue would block the training loop forever once full —
``write`` checks that thread first and raises the same one-line error instead. tensorboardX's
``NaN or Inf found in input tensor.`` warning (logged for every non-finite scalar, e.g. a skipped
step's loss) is dropped: the JSON row already records it as ``null``.

Callers pass host values that were already fetched (one ``jax.device_get`` every ``log_every``
steps, never ``float(loss)`` per step); this module does not import jax. On non-zero processes
construct it with ``enabled=False`` and every method is a no-op (no files, no bar).

Example::

    from jaxlm.utils.metrics import MetricWriter
    with MetricWriter("/tmp/run", total_steps=100) as w:
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
from typing import Any, Mapping

from jaxlm.errors import ConfigError
from jaxlm.utils.files import write_fix


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


def _tb_alive(tb) -> bool:
    """False if tensorboardX's event-writer thread has died (then stop using it: its queue would
    block every later write once full)."""
    worker = getattr(getattr(getattr(tb, "file_writer", None), "event_writer", None), "_worker",
                     None)
    return worker is None or worker.is_alive()


class MetricWriter:
    """JSONL + tensorboardX + tqdm, active only when ``enabled`` (process 0)."""

    def __init__(self, out_dir: str, *, enabled: bool = True, tensorboard: bool = True,
                 total_steps: int | None = None, initial_step: int = 0):
        self.out_dir = out_dir
        self.enabled = enabled
        self.total_steps = total_steps
        self.initial_step = initial_step
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        try:
            os.makedirs(out_dir, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise self._error(e) from None
        if tensorboard:
            from tensorboardX import SummaryWriter  # lazy: only process 0 pays the import

            logging.getLogger("tensorboardX.x2num").addFilter(_NAN_FILTER)  # (idempotent)
            try:
                self._tb = SummaryWriter(os.path.join(out_dir, "tb"))
            except OSError as e:  # e.g. a file named tb in out_dir
                self.close()
                raise self._error(e, "TensorBoard events") from None

    def _error(self, e: OSError, what: str = "metrics") -> ConfigError:
        why = e.strerror or type(e).__name__
        return ConfigError(f"cannot write {what} in {self.out_dir}: {why}; {write_fix(e)}, then "
                           "rerun (training resumes from the last checkpoint)")


    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append ``{"step": step, **metrics}`` as one JSON line and mirror numbers to TB."""
        if not self.enabled:
            return
        step = int(step)
        raw = {k: (v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v)
               for k, v in metrics.items()}
        row = {"step": step, **{k: to_python(v) for k, v in raw.items() if k != "step"}}
        try:
            self._file.write(json.dumps(row, allow_nan=False) + "\n")
            self._file.flush()
        except OSError as e:
            raise self._error(e) from None
        if self._tb is not None and not _tb_alive(self._tb):
            self._tb = None  # never close() it: that too would wait on the dead thread's queue
            raise self._error(OSError(0, "the TensorBoard writer thread failed"),
                              "TensorBoard events")
        if self._tb is not None:
            for key, value in raw.items():
                if isinstance(value, numbers.Real) and key != "step":
                    self._tb.add_scalar(key, float(value), step)

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
        try:
            if self._file is not None:
                self._file.flush()
            if self._tb is not None:
                self._tb.flush()
        except OSError as e:
            raise self._error(e) from None

    def close(self) -> None:
        """Flush and close everything; safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            tb, self._tb = self._tb, None
            if _tb_alive(tb):
                tb.close()
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()
            except OSError:  # close() runs on error paths too: keep the first error
                pass

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
