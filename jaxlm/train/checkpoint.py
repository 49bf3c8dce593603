"""Checkpoints with orbax: train state + data-iterator state + resolved config, saved together.

Each checkpoint ``<out_dir>/checkpoints/<step>/`` holds three items:

* ``state``  — the whole train state pytree (params, optimizer state, step, RNG), sharded arrays
  written by every process (``StandardSave``);
* ``data``   — the grain iterator position of every process (grain's orbax handler), so a resumed
  run reads exactly the batches the uninterrupted run would have read;
* ``config`` — the resolved config as JSON (also written as ``<out_dir>/config.yaml``);

plus, in the step's orbax metadata, a checksum of every state array (:func:`fingerprint`).

Saves are asynchronous (the device->host copy happens before ``save`` returns, the file writes
continue in the background while training goes on). Restore takes abstract arrays that carry
*target* shardings, so a checkpoint written on one mesh restores onto another (each device reads
only its shard).

Fault model — what can go wrong on disk, and what happens:

* **Killed mid-save** (SIGKILL, OOM, lost host): orbax writes into ``<step>.orbax-checkpoint-tmp``
  and renames it only when every item is complete, so an unfinished save is never listed as a
  checkpoint. :meth:`Checkpointer.restore_latest` logs it and resumes from the newest complete
  step; if that step is saved again, orbax replaces the stale tmp dir.
* **A complete checkpoint damaged later** (truncated or garbage file, deleted item directory,
  bad JSON): every state array is checked against its checksum (orbax alone would silently
  restore garbage bytes). ``restore_latest`` tries steps newest-first, logs one line per bad step
  and falls back to the previous one; a state is returned only if it restored completely. When
  training (``quarantine=True``) the bad step is renamed ``<step>.corrupt`` — kept for the user,
  never deleted — so the same step number can be saved again. If steps exist but none is usable,
  :class:`CheckpointError` says so (and nothing is renamed).
* **A concurrent writer or a stray ``*-tmp`` dir**: only finalized steps are ever listed or
  restored (:meth:`Checkpointer.finalized_steps`: ``<dir>/<step>`` must be a directory), so
  ``jaxlm-sample``/``jaxlm-eval`` never read a ``<step>.orbax-checkpoint-tmp``. One writer per
  out_dir is enforced by :mod:`jaxlm.train.lock`.
* **Something in the way**: a regular file named ``checkpoints`` (or any non-directory on the
  path) or an unwritable directory is a one-line CheckpointError when the Checkpointer is built,
  before training. Step directories are created synchronously inside ``save``
  (``create_directories_asynchronously=False``): orbax creating them in a background thread
  hangs the save forever when that fails, so such a failure is a one-line error instead.
* **Disk full / unwritable during a save**: the error surfaces at ``save`` or, for an async
  write, at the next ``save``/``wait``/``close``; it becomes one :class:`CheckpointError` line
  naming the step and directory. Earlier checkpoints are untouched (orbax removes old steps only
  after a newer one is finalized).

Test hook (inert unless set): ``JAXLM_TEST_CRASH_AFTER_SAVE=<step>`` makes the process SIGKILL
itself right after ``save(<step>)`` returns, i.e. while that async write is still in flight
(tests/test_faults.py).

Example::

    ckpt = Checkpointer("out/run", CkptConfig(every=100, keep=3))
    ckpt.save(100, state, data_iter, cfg)                       # async
    found = ckpt.restore_latest(lambda saved_cfg: spec.abstract_with_shardings(), data_iter)
    step, state = (found.step, found.state) if found else (None, None)
    ckpt.close()                                                # waits for pending writes
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import tempfile
from typing import Callable, NamedTuple

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxlm.config import CkptConfig, Config, ConfigError, from_dict, to_dict
from jaxlm.distributed import is_primary
from jaxlm.utils.files import write_fix as _fix_for
from jaxlm.utils.trees import leaves_with_names

log = logging.getLogger("jaxlm")

CRASH_AFTER_SAVE_ENV = "JAXLM_TEST_CRASH_AFTER_SAVE"
TMP_MARKER = ".orbax-checkpoint-tmp"
CORRUPT_SUFFIX = ".corrupt"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read or written; one line for the user (CLI exit 2)."""


class Damaged(ValueError):
    """A checkpoint that read back but does not match what was saved (its message is the reason)."""


class Restored(NamedTuple):
    step: int
    config: Config  # the config saved with that checkpoint
    state: dict


@jax.jit
def fingerprint(tree) -> dict:
    """{'params/…/kernel': uint32} — the wrapping sum of each array's raw bit words.

    Any changed word changes it (a random change collides with odds 2^-32 per array). Integer
    addition is exact and order-free, so the value does not depend on sharding: a checkpoint
    restored onto another mesh verifies too. Computed on device; only the scalars reach the host.
    """
    def words(x):
        if x.dtype == jnp.bool_:
            return x.astype(jnp.uint32)
        if x.dtype.itemsize >= 4:  # 8-byte dtypes gain a trailing axis of two words
            return jax.lax.bitcast_convert_type(x, jnp.uint32)
        uint = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
        return jax.lax.bitcast_convert_type(x, uint).astype(jnp.uint32)

    return {name: jnp.sum(words(x), dtype=jnp.uint32) for name, x in leaves_with_names(tree)}


def _checksums(state) -> dict:
    return {k: int(v) for k, v in jax.device_get(fingerprint(state)).items()}


def reason(e: BaseException) -> str:
    """A short one-line reason: an OSError's strerror if one is in the chain, else the message."""
    if isinstance(e, Damaged):
        return str(e)
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = (str(e).strip().splitlines() or [""])[0]
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def check_checkpoint_dir(path: str, *, writable: bool = True) -> None:
    """Before any save: ``path`` and every existing parent must be directories (a regular file
    named ``checkpoints`` would otherwise make the first save fail in orbax's background thread),
    and, if ``writable``, creatable and writable. Raises a one-line CheckpointError."""
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        kind = "a regular file" if os.path.isfile(probe) else "not a directory"
        where = "" if probe == path else f" (on the path to {path})"
        raise CheckpointError(f"{probe} is {kind}{where}, but jaxlm keeps checkpoints in a "
                              "directory there; move that file away, or use another out_dir")
    if not writable:
        return
    try:
        os.makedirs(path, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=path, prefix=".write-probe-"))
    except OSError as e:
        raise CheckpointError(f"cannot create checkpoint directory {path}: {e.strerror}; "
                              "choose a writable out_dir") from None


class Checkpointer:
    """One run's ``<out_dir>/checkpoints``: async saves, verified restores, newest-good fallback."""

    def __init__(self, out_dir: str, cfg: CkptConfig, *, writable: bool = True):
        self.dir = os.path.join(os.path.abspath(out_dir), "checkpoints")
        self.cfg = cfg
        check_checkpoint_dir(self.dir, writable=writable)
        self._writing = None  # step of the save whose files may still be in flight
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        try:
            self.manager = ocp.CheckpointManager(
                self.dir, options=options, item_names=("state", "data", "config"),
                item_handlers={"data": grain.checkpoint.CheckpointHandler()})
        except OSError as e:
            raise CheckpointError(f"cannot create checkpoint directory {self.dir}: "
                                  f"{e.strerror}; choose a writable out_dir") from None

    def latest_step(self) -> int | None:
        return max(self.finalized_steps(), default=None)

    def should_save(self, step: int) -> bool:
        return bool(self.cfg.every) and step % self.cfg.every == 0

    # -- writing ----------------------------------------------------------------------------

    def save(self, step: int, state, data_iter, cfg: Config) -> None:
        """Start an async save of ``step`` (no-op if it exists). Raises CheckpointError if this or
        the previous async save failed (e.g. disk full)."""
        if step in self.manager.all_steps():
            return
        self.wait()  # (orbax's save waits too) a failed previous write is reported as its step
        sums = _checksums(state)
        try:
            self.manager.save(step, force=True, custom_metadata={"checksums": sums},
                              args=ocp.args.Composite(
                                  state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iter),
                                  config=ocp.args.JsonSave(to_dict(cfg))))
        except Exception as e:
            raise self._write_error(step, e) from e
        self._writing = step
        if os.environ.get(CRASH_AFTER_SAVE_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die with this write in flight

    def wait(self) -> None:
        """Block until pending writes finish; CheckpointError if one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(self._writing, e) from e
        self._writing = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    def abort(self) -> None:
        """On an error path: let writes in flight finish (a good checkpoint stays complete),
        ignoring their errors — the error being raised is the one to report."""
        try:
            self.close()
        except Exception as e:  # noqa: BLE001 - already failing; keep the first error
            log.debug("ignored while closing checkpoints after an error: %s", reason(e))

    def _write_error(self, step, e: BaseException) -> CheckpointError:
        try:
            self.manager.reload()  # forget the failed step: list what is complete on disk
            good = [s for s in self.manager.all_steps() if s != step]
        except Exception:  # noqa: BLE001 - the directory itself may be the problem
            good = []
        fallback = f"step {max(good)}" if good else "none"
        return CheckpointError(
            f"checkpoint save at step {step} to {self.dir} failed ({reason(e)}); the last "
            f"complete checkpoint is {fallback} — {_fix_for(e)}, then rerun to resume from it")

    # -- reading ----------------------------------------------------------------------------

    def saved_config(self, step: int) -> Config:
        raw = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return from_dict(raw["config"])

    def restore(self, step: int, abstract_state, data_iter=None):
        """Restore the state onto ``abstract_state``'s shardings (and ``data_iter`` in place),
        verifying every array against the checksum saved with it. Raises on any damage."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = restored["state"]
        expected = (self.manager.metadata(step).custom_metadata or {}).get("checksums")
        if not expected:
            raise Damaged("no checksums in its metadata: damaged, or saved by a jaxlm older than "
                          "checksums")
        got = _checksums(state)
        bad = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        if bad:
            raise Damaged(f"checksum mismatch in {bad[0]}"
                             + (f" and {len(bad) - 1} more arrays" if len(bad) > 1 else ""))
        return state

    def restore_latest(self, target: Callable[[Config], dict], data_iter=None, *,
                       quarantine: bool = False) -> Restored | None:
        """The newest checkpoint that restores completely, or None if there is none at all.

        ``target(saved_config)`` gives the abstract state to restore onto; a ConfigError it raises
        (a different model) propagates — that is not damage. Damaged steps are skipped, newest
        first, and each is logged in one line (step, reason, what was done); with ``quarantine``
        those newer than the step restored are renamed ``<step>.corrupt`` (by the primary
        process) so their numbers can be saved again. Raises CheckpointError if steps exist but
        none restores (then nothing is renamed).
        """
        self._log_unfinished()
        bad = []  # (step, reason), newest first
        for step in sorted(self.finalized_steps(), reverse=True):
            try:
                saved = self.saved_config(step)
            except Exception as e:  # noqa: BLE001 - any read failure means this step is bad
                bad.append((step, reason(e)))
                continue
            abstract = target(saved)
            try:
                state = self.restore(step, abstract, data_iter)
            except Exception as e:  # noqa: BLE001
                if _is_layout_mismatch(e):  # other settings, not damage: stop, rename nothing
                    raise ConfigError(
                        f"checkpoint step {step} in {self.dir} is intact but its training state "
                        "has another layout than this run's (different optimizer settings, e.g. "
                        "optim.grad_clip or restarts switched on/off); rerun with the settings "
                        "saved in the out_dir's config.yaml, or use a new out_dir") from None
                bad.append((step, reason(e)))
                continue
            for b, why in bad:
                done = (f"moved it to {self._quarantine(b)}" if quarantine else "skipped it")
                log.warning("checkpoint step %d in %s is unusable (%s); %s, using step %d",
                            b, self.dir, why, done, step)
            if quarantine and bad:
                ocp.multihost.sync_global_processes("jaxlm_checkpoint_quarantine")
                self.manager.reload()
            return Restored(step, saved, state)
        for b, why in bad:
            log.warning("checkpoint step %d in %s is unusable (%s)", b, self.dir, why)
        if bad:
            step, why = bad[0]
            raise CheckpointError(
                f"no usable checkpoint in {self.dir}: step {step} ({why})"
                + (f" and {len(bad) - 1} older" if len(bad) > 1 else "")
                + "; move that directory away to train from scratch, or restore it from a backup")
        return None

    def finalized_steps(self) -> list[int]:
        """Steps whose save completed: orbax lists them, and ``<dir>/<step>`` is a directory
        (never a ``<step>.orbax-checkpoint-tmp…`` left by a crash or a concurrent writer)."""
        return [s for s in self.manager.all_steps()
                if os.path.isdir(os.path.join(self.dir, str(s)))]

    def _quarantine(self, step: int) -> str:
        """Rename a damaged step dir to ``<step>.corrupt`` (primary only); returns the new path."""
        src = os.path.join(self.dir, str(step))
        dst, n = src + CORRUPT_SUFFIX, 1
        while os.path.exists(dst):
            dst, n = f"{src}{CORRUPT_SUFFIX}-{n}", n + 1
        if is_primary():
            os.rename(src, dst)
        return dst

    def _log_unfinished(self) -> None:
        if not os.path.isdir(self.dir):
            return
        for name in sorted(os.listdir(self.dir)):
            if TMP_MARKER in name:
                log.warning("ignoring unfinished checkpoint %s in %s (a save cut short by a "
                            "crash; replaced if that step is saved again)", name, self.dir)


def _is_layout_mismatch(e: BaseException) -> bool:
    """A restore that failed because the target's tree differs from the saved one (other
    settings), as opposed to damage."""
    return "tree structures do not match" in str(e)


def load_trained(out_dir: str):
    """(cfg, spec, params) of the newest usable checkpoint in ``out_dir``, on all devices.

    Used by ``jaxlm-sample`` and ``jaxlm-eval``. The state is restored onto the current devices
    with fsdp filling the mesh, whatever mesh it was trained on. Damaged checkpoints are skipped
    as in training (logged), but nothing on disk is renamed: this is a read-only use.
    """
    from jaxlm.config import MeshConfig
    from jaxlm.optim import build_optimizer
    from jaxlm.sharding import make_mesh
    from jaxlm.train.state import StateSpec
    from jaxlm.utils.files import check_local_dir

    check_local_dir(out_dir, "--ckpt")
    ckpt_dir = os.path.join(os.path.abspath(out_dir), "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ConfigError(f"no checkpoints in {out_dir} (expected {ckpt_dir}); "
                          "train first with `jaxlm-train out_dir=...`")
    ckpt = Checkpointer(out_dir, CkptConfig(), writable=False)
    built = {}  # (model, optim) -> spec; "last": (cfg, spec) of the step last tried

    def target(saved: Config) -> dict:
        cfg = dataclasses.replace(saved, mesh=MeshConfig(data=1, fsdp=-1, tensor=1))
        key = repr((cfg.model, cfg.optim))
        if key not in built:
            built[key] = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
        built["last"] = (cfg, built[key])
        return built[key].abstract_with_shardings()

    try:
        found = ckpt.restore_latest(target)
    finally:
        ckpt.close()
    if found is None:
        names = sorted(os.listdir(ckpt_dir))
        aside = [n for n in names if CORRUPT_SUFFIX in n]
        unfinished = [n for n in names if TMP_MARKER in n]
        what = (f"only damaged steps moved aside by training ({', '.join(aside)})" if aside else
                f"only unfinished saves ({', '.join(unfinished)})" if unfinished else "none")
        raise ConfigError(f"no finished checkpoint in {ckpt_dir} ({what}); train first "
                          "(a rerun of jaxlm-train resumes or restarts there)")
    cfg, spec = built["last"]
    return cfg, spec, found.state["params"]


def trained_tokenizer(cfg: Config, out_dir: str):
    """The tokenizer ``cfg`` (a checkpoint's config) was trained with. If its file is gone, say so
    in terms of the checkpoint: ``jaxlm-sample``/``jaxlm-eval`` have no data.tokenizer_path to set."""
    from jaxlm.data.tokenizer import get_tokenizer

    try:
        return get_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    except ConfigError as e:
        why = re.sub(r"\s*\([^()]*data\.tokenizer_path[^()]*\)$", "", str(e))
        raise ConfigError(
            f"the tokenizer this checkpoint was trained with cannot be loaded ({why}); it is "
            f"data.tokenizer_path={cfg.data.tokenizer_path!r} in "
            f"{os.path.join(out_dir, 'config.yaml')}: put that file back (a relative path is "
            "relative to where training ran)") from None
