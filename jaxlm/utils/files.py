"""Is this path a regular file? One place that says what a data or config path really is.

Users point ``data.path``, ``data.val_path``, ``jaxlm-eval --data`` or the config argument at
things that exist but are not files: a directory, a FIFO (``<(zcat corpus.gz)``), ``/dev/null``,
``/dev/zero``, a socket. "file not found" would be wrong for those, and reading them is unsafe
(``/dev/zero`` never ends; a pipe reads once, but data is read again for the token cache and on
every resume). :func:`check_data_file` refuses them up front, naming what the path is, before
anything opens it. :func:`write_fix` names the fix for a failed write by its errno (a full disk
is only one of the causes; "free disk space" for a file in the way would mislead).

Where a run *writes* (``out_dir``, ``data.cache_dir``) must be a local or mounted directory:
:func:`check_local_dir` refuses a URL (``gs://``, ``s3://``, ``https://``, any ``scheme://``)
with one line naming the fix -- mount the bucket (gcsfuse, mountpoint-s3) and pass the mount
path. Without it ``os.makedirs("gs://b/run")`` would quietly create a local directory named
``gs:`` and the run would "succeed" into it. jaxlm does not write object stores natively: its
one-writer lock (flock), ``os.replace`` atomic renames and append-mode ``metrics.jsonl`` need a
filesystem, which gcsfuse provides.

Example::

    not_regular_file("/dev/zero")         # 'a character device'
    check_data_file("/dev/zero")          # ConfigError: data.path: /dev/zero is a character ...
    check_local_dir("gs://b/run")         # ConfigError: out_dir=gs://b/run is a URL; ... gcsfuse
"""

from __future__ import annotations

import errno
import os
import re
import stat

from jaxlm.errors import ConfigError


def not_regular_file(path: str) -> str:
    """'' for a regular file or a missing path, else what it is: 'a directory', 'a named pipe
    (FIFO)', 'a character device', 'a block device', 'a socket' (symlinks are followed)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket")]
    return next((kind for test, kind in kinds if test(mode)),
                "" if stat.S_ISREG(mode) else "not a regular file")


def check_data_file(path: str, what: str = "data.path", kind: str = "a UTF-8 text file") -> None:
    """``path`` must be an existing regular file, else a one-line ConfigError saying what it is
    and what to do. Nothing is opened."""
    if os.path.isdir(path):
        raise ConfigError(f"{what}: {path} is a directory (point {what} at {kind})")
    special = not_regular_file(path)
    if special:
        raise ConfigError(f"{what}: {path} is {special}, not a regular file; jaxlm reads its data "
                          f"more than once, so copy it into a regular file and point {what} there")
    if not os.path.isfile(path):
        hint = " (a broken symlink)" if os.path.islink(path) else ""
        raise ConfigError(f"{what}: file not found: {path}{hint} (point {what} at {kind})")


def write_fix(e: BaseException) -> str:
    """What to do about a failed write, by its errno (a full disk is only one cause)."""
    seen = e
    while seen is not None and not (isinstance(seen, OSError) and seen.errno):
        seen = seen.__cause__ or seen.__context__
    code = getattr(seen, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free disk space or fix the directory"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the directory writable"
    if code in (errno.ENOTDIR, errno.EEXIST, errno.ENOENT, errno.EISDIR):
        return "check that nothing else (a file, another run) is changing the directory"
    return "fix the directory (free disk space, permissions)"


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_MOUNT = {
    "gs": "mount the bucket with gcsfuse (gcsfuse BUCKET /mnt/BUCKET) and pass "
          "{key}=/mnt/BUCKET/PATH",
    "s3": "mount the bucket with mountpoint-s3 or s3fs (mount-s3 BUCKET /mnt/BUCKET) and pass "
          "{key}=/mnt/BUCKET/PATH",
    "http": "a web URL cannot be written to; pass a local directory",
    "https": "a web URL cannot be written to; pass a local directory",
    "file": "pass the plain path without file://",
}


def url_scheme(path: str) -> str:
    """'gs' for ``gs://b/x``, 's3', 'https', ...; '' for a local path (``C:/x`` is not a URL)."""
    m = _URL.match(path or "")
    return m.group(1).lower() if m else ""


def check_local_dir(path: str, key: str = "out_dir") -> None:
    """ConfigError if ``path`` (the value of config key ``key``) is a URL, not a local or mounted
    directory; nothing is created or opened."""
    scheme = url_scheme(path)
    if scheme:
        fix = _MOUNT.get(scheme, "mount it with a FUSE filesystem and pass {key}=MOUNT_PATH")
        raise ConfigError(f"{key}={path} is a URL; jaxlm writes to local or mounted directories "
                          f"only, not to {scheme}:// directly: {fix.format(key=key)}")
