"""Weights & Biases as a metrics sink (``log.wandb=true``), behind jaxlm.utils.metrics' ``Writer``.

What is sent: the numeric metrics of every ``metrics.jsonl`` row, as
``run.log({"loss": 3.2, "lr": 0.001, ...}, step=step)`` -- the same step numbers and values
(NaN/inf as W&B floats where the JSON row has ``null``; strings are not sent). The run's whole
resolved config (``jaxlm.config.to_dict``) is the W&B run config. Only process 0 logs
(``MetricWriter(enabled=False)`` elsewhere).

Which run: ``wandb.init(project=log.wandb_project, name=log.wandb_run or <out_dir's last
component>, dir=out_dir, mode=log.wandb_mode or wandb's default, id=<stable>,
resume="allow")``. The id is drawn once per ``out_dir`` and kept in ``<out_dir>/wandb_run_id``,
so a rerun that resumes the checkpoint continues the same W&B run (offline: a new
``<out_dir>/wandb/offline-run-*`` directory with the same id, which ``wandb sync`` merges). A
resume redoes the steps after the last checkpoint identically; W&B keeps the values it already
has for those steps (online, the writer skips steps below the resumed run's
``starting_step``). To attach to another W&B run, write its id into that file.

Failures: without the ``wandb`` package, or when ``wandb.init`` fails (not logged in, no network
in online mode), the run stops at setup with one ConfigError line naming the fix. A failure after
that (``run.log`` raising: a dead wandb service, a full disk) logs one warning and W&B is
dropped for the rest of the run (not finished: wandb's exit hook does that), so training never
dies or blocks for a mirror of data that ``metrics.jsonl`` already holds. Online-mode network
trouble does not raise at all: wandb retries uploads in its background service.

Example::

    # WANDB_MODE=offline works without an account; `wandb sync out/run/wandb/offline-run-*` later
    jaxlm-train tiny out_dir=out/run log.wandb=true log.wandb_mode=offline
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import sys
from typing import Any, Mapping

from jaxlm.errors import ConfigError
from jaxlm.utils.metrics import numeric, write_error

log = logging.getLogger("jaxlm")
ID_FILE = "wandb_run_id"
_ID_OK = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # W&B ids: no '/', ':', spaces


def require_wandb():
    """The ``wandb`` module, or a one-line ConfigError saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("log.wandb=true needs the wandb package: pip install wandb") from None
    return wandb


def stable_run_id(out_dir: str) -> str:
    """The W&B run id of ``out_dir``: read from ``<out_dir>/wandb_run_id``, or drawn (16 hex
    digits) and written there atomically on the first run."""
    path = os.path.join(out_dir, ID_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            run_id = f.read().strip()
    except FileNotFoundError:
        run_id = ""
    except OSError as e:
        raise write_error(out_dir, e, "the W&B run id") from None
    if run_id:
        if not _ID_OK.match(run_id):
            raise ConfigError(f"{path} holds {run_id[:80]!r}, not a W&B run id (letters, digits, "
                              "'-', '_'); fix it, or delete it to start a new W&B run")
        return run_id
    run_id = secrets.token_hex(8)
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(run_id + "\n")
        os.replace(path + ".tmp", path)
    except OSError as e:
        raise write_error(out_dir, e, "the W&B run id") from None
    return run_id


def run_name(cfg, out_dir: str) -> str:
    return cfg.log.wandb_run or os.path.basename(os.path.normpath(os.path.abspath(out_dir)))


class WandbWriter:
    """``run.log`` of the numeric metrics; warns once and stops if W&B fails mid-run."""

    def __init__(self, run):
        self.run = run
        # an online resume: W&B already holds the steps before this (logged before the kill);
        # jaxlm redoes them identically, and W&B would refuse them noisily: skip them here
        self.first_step = int(getattr(run, "starting_step", 0) or 0)
        if self.first_step:
            log.info("W&B run %s resumed: it already holds steps < %d; logging from there",
                     getattr(run, "id", "?"), self.first_step)

    @classmethod
    def start(cls, cfg, out_dir: str | None = None) -> "WandbWriter":
        """``wandb.init`` for the run ``cfg`` (out_dir must exist); ConfigError if it fails."""
        from jaxlm.config import to_dict

        wandb = require_wandb()
        out_dir = out_dir or cfg.out_dir
        try:
            run = wandb.init(project=cfg.log.wandb_project, name=run_name(cfg, out_dir),
                             dir=out_dir, mode=cfg.log.wandb_mode or None, config=to_dict(cfg),
                             id=stable_run_id(out_dir), resume="allow", allow_val_change=True,
                             reinit="create_new")
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - wandb raises many types (UsageError, CommError…)
            why = " ".join(str(e).split())[:300] or type(e).__name__
            raise ConfigError(f"log.wandb=true: wandb.init failed ({why}); run `wandb login` or "
                              "set WANDB_API_KEY, or log without a connection with "
                              "log.wandb_mode=offline (then `wandb sync`), or set "
                              "log.wandb=false") from None
        return cls(run)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.run is None:
            return
        values = numeric(metrics)
        if not values or step < self.first_step:
            return
        try:
            self.run.log(values, step=int(step))
        except Exception as e:  # noqa: BLE001 - a mirror must never end training
            self._drop(f"at step {step}", e)

    def _drop(self, when: str, e: BaseException) -> None:
        log.warning("W&B logging failed %s (%s: %s); continuing without W&B (metrics.jsonl still "
                    "records every step)", when, type(e).__name__,
                    " ".join(str(e).split())[:200])
        self.run = None  # no finish(): on a live but stuck service it could block training
        if isinstance(e, (ConnectionError, EOFError)):  # the wandb service died: tear down its
            try:  # connection now (fails fast), so no exit hook prints its traceback later
                import wandb

                wandb.teardown()
            except BaseException:  # noqa: BLE001 - incl. its SystemExit: never end training
                pass

    def flush(self) -> None:
        pass  # wandb streams in the background; finish() on close waits for it

    def close(self) -> None:
        """``run.finish`` (exit code 1 when closed while an exception propagates)."""
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=1 if sys.exc_info()[1] is not None else 0)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B: finishing the run failed (%s: %s); metrics.jsonl is complete",
                        type(e).__name__, " ".join(str(e).split())[:200])
