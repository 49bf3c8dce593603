"""Transparent huge pages for the host memory XLA:CPU allocates each step (a process-start setting).

What it does: XLA:CPU allocates a step's temporaries afresh every step (large ``malloc`` blocks,
which glibc serves with fresh ``mmap`` s), and the kernel faults them in 4 KiB page by 4 KiB
page. On the 2-core CPU boxes jaxlm is measured on that was 0.7–0.9 s of system time per step at
remat none (bench/RESULTS.md, "Issue 6"). glibc ≥ 2.35 has a tunable, ``glibc.malloc.hugetlb=1``,
that makes ``malloc`` ask for transparent huge pages (``madvise(MADV_HUGEPAGE)``) on the memory it
maps, so the kernel backs it with 2 MiB pages when THP is in its common ``madvise`` mode: 512×
fewer faults and fewer TLB misses in the matmuls. Measured on the MaxText-comparison config:
+10–14% train-step tokens/s (bench/RESULTS.md, "Issue #18").

glibc reads tunables only when a process starts, so the console commands (``jaxlm-train``,
``python bench/throughput.py``) call :func:`reexec_with_hugepages` first thing: if the tunable can
help and is not set yet, the process replaces itself (``os.execv``: the same PID, argv, stdin and
stdout) with ``GLIBC_TUNABLES`` extended by ``glibc.malloc.hugetlb=1``. jax is not imported yet,
so nothing is lost. It does nothing when: ``JAXLM_HUGEPAGES=0`` (the opt-out), not Linux, glibc
older than 2.35 or not glibc, THP set to ``never``, or the tunable is already in
``GLIBC_TUNABLES`` (set by the user, or by the first exec). Notebooks and tests call
``run(cfg)`` / ``main(argv)`` in their own process, which is never re-executed.

Example (a script of your own that should get the same)::

    from jaxlm.utils.hugepages import reexec_with_hugepages
    if __name__ == "__main__":
        reexec_with_hugepages()        # before importing jax
        ...
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def wanted(environ=None) -> str:
    """Why the re-exec would be skipped ("" = it is wanted)."""
    env = os.environ if environ is None else environ
    if env.get("JAXLM_HUGEPAGES", "1") == "0":
        return "JAXLM_HUGEPAGES=0"
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES already sets glibc.malloc.hugetlb"
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        if name != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 35):
            return f"{name} {version} has no malloc.hugetlb tunable (glibc >= 2.35)"
    except (ValueError, OSError, AttributeError):
        return "not glibc"
    try:
        with open(THP_MODE) as f:
            if "[never]" in f.read():
                return "transparent huge pages are off ([never])"
    except OSError:
        return f"no {THP_MODE}"
    return ""


def reexec_with_hugepages() -> None:
    """Re-execute this process with ``glibc.malloc.hugetlb=1`` when :func:`wanted` (else return)."""
    if wanted():
        return
    old = os.environ.get("GLIBC_TUNABLES", "")
    os.environ["GLIBC_TUNABLES"] = f"{old}:{TUNABLE}" if old else TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, sys.orig_argv)  # never returns on success
    except OSError:  # the interpreter cannot be re-run: carry on without huge pages
        if old:
            os.environ["GLIBC_TUNABLES"] = old
        else:
            del os.environ["GLIBC_TUNABLES"]
