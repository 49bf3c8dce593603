"""One writer per ``out_dir``: an OS-level lock on ``<out_dir>/.lock`` held for the run's lifetime.

Two ``jaxlm-train`` processes on one ``out_dir`` would interleave ``metrics.jsonl``, overwrite
each other's checkpoints and leave half-written steps behind. :func:`acquire_run_lock` takes
an exclusive ``fcntl.flock`` on ``<out_dir>/.lock`` and keeps the file open until
:meth:`RunLock.release` (or the process ends); a second process gets one ConfigError line naming
the holder::

    out_dir out/run is in use by another jaxlm-train (pid 4242 on host-a, started at
    2026-11-30 04:40:12 UTC); wait for it to finish, or use another out_dir

Why flock and not a pid file: the kernel drops the lock when the holder's file descriptor closes,
which happens however the process ends (exit, exception, SIGKILL, OOM kill), so there is never a
stale lock to delete by hand. The pid/host/time written into the file are for the message only;
the lock itself is the flock. The descriptor is close-on-exec, so child processes do not inherit
the lock.

Shared filesystems (what is and is not guaranteed):

* local disk (ext4, xfs, tmpfs…): exclusive between all processes of this machine; released at
  once when the holder dies.
* NFS (v4, or v3 with a working lock daemon): Linux implements flock there as a whole-file POSIX
  lock on the server, so it excludes processes on other clients too. If the holder's *machine*
  dies (not just the process), the server frees the lock only when the client's lease expires
  (NFSv4: typically 90 s), so the next run may be refused for that long. With ``nolock`` /
  ``local_lock`` mounts the lock only covers one machine.
* gcsfuse and other object-store FUSE mounts, and Lustre mounted with ``localflock``: the lock is
  local to the machine that mounts it. Two runs on different machines pointing at one bucket path
  are NOT excluded; give each run its own out_dir there.
* a filesystem without flock support at all: the run proceeds with a warning, unlocked.
* an object-store URL (``gs://``, ``s3://``): refused with one line (mount it, e.g. with
  gcsfuse); flock has no meaning there (jaxlm/utils/files.py :func:`check_local_dir`).

Multi-host runs: every process of one job shares the out_dir, so only the primary process
(``jax.process_index() == 0``) takes the lock (``primary=True``); the other processes get an
inert handle. A second *job* is refused by its primary, and the training loop hands that refusal
to its other processes (:func:`jaxlm.distributed.primary_outcome`), so every process of the job
ends with the same one-line error at once.

Example::

    lock = acquire_run_lock("out/run")          # ConfigError if another run holds it
    try:
        ...                                      # train, checkpoint, log
    finally:
        lock.release()
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time

from jaxlm.config import ConfigError
from jaxlm.utils.files import check_local_dir

log = logging.getLogger("jaxlm")
LOCK_NAME = ".lock"


class RunLock:
    """An exclusive flock on ``<out_dir>/.lock``; inert when ``fd`` is None (not primary)."""

    def __init__(self, path: str, fd: int | None):
        self.path, self.fd = path, fd

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases it); safe to call twice. The file
        stays: deleting it would let a waiting process lock a file that is about to vanish."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a forgotten handle (e.g. a notebook cell that raised) still unlocks
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown; the kernel unlocks anyway
            pass


def _holder(fd: int) -> str:
    """'pid 4242 on host-a, started at …' from the lock file's text (best effort)."""
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"


def acquire_run_lock(out_dir: str, *, primary: bool | None = None) -> RunLock:
    """Lock ``out_dir`` for this process (creating the directory) or raise a one-line ConfigError.

    ``primary``: whether this process takes the lock; default: the primary process
    (:func:`jaxlm.distributed.is_primary`).
    """
    check_local_dir(out_dir)  # gs://…: one line (mount it), never a local "gs:" directory
    if primary is None:
        from jaxlm.distributed import is_primary

        primary = is_primary()
    path = os.path.join(out_dir, LOCK_NAME)
    if not primary:
        return RunLock(path, None)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create out_dir {out_dir}: {e.strerror}; choose a writable "
                          "out_dir") from None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ConfigError(f"cannot open the run lock {path}: {e.strerror}; make out_dir writable "
                          f"(and {LOCK_NAME} a plain file), or choose another out_dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(f"out_dir {out_dir} is in use by another jaxlm-train ({holder}); "
                              "wait for it to finish, or use another out_dir") from None
        log.warning("out_dir %s: file locking is not supported here (%s); running without the "
                    "one-writer lock", out_dir, e.strerror)
        os.close(fd)
        return RunLock(path, None)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started at {started}\n".encode(),
              0)
    return RunLock(path, fd)
