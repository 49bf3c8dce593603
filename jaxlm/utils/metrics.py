"""Metric logging: JSONL (always), tensorboardX scalars (optional) and a tqdm progress bar.

``MetricWriter.write(step, metrics)`` appends one JSON object per line to
``<out_dir>/metrics.jsonl`` -- ``{"step": 10, "loss": 3.2, "lr": 0.001, ...}`` -- in append mode,
so a resumed run continues the same file (rows after a resume may repeat steps; the last row for a
step wins). Values are converted to plain Python ``int``/``float``/``bool``/``str``; non-finite
floats are written as ``null`` so every line is strict JSON (TensorBoard still gets the NaN).
Numeric values are mirrored to ``tensorboardX.SummaryWriter(<out_dir>/tb)``.

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
import math
import numbers
import os
from typing import Any, Mapping


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
        os.makedirs(out_dir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # lazy: only process 0 pays the import
            self._tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append ``{"step": step, **metrics}`` as one JSON line and mirror numbers to TB."""
        if not self.enabled:
            return
        step = int(step)
        raw = {k: (v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v)
               for k, v in metrics.items()}
        row = {"step": step, **{k: to_python(v) for k, v in raw.items() if k != "step"}}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
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
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close everything; safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
