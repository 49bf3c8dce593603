"""jaxlm/utils/hugepages.py: the console commands re-execute themselves once with glibc's huge
pages tunable, and the kernel then really backs large allocations with 2 MiB pages."""

import os
import subprocess
import sys

import pytest

from jaxlm.utils import hugepages

# allocate and touch 256 MiB through malloc, then report this process's huge pages
PROBE = """
import os, sys
from jaxlm.utils.hugepages import reexec_with_hugepages
print("start", os.getpid(), flush=True)
reexec_with_hugepages()
import ctypes
libc = ctypes.CDLL(None)  # plain malloc (numpy madvises its own large arrays)
libc.malloc.restype = ctypes.c_void_p
p = libc.malloc(256 << 20)
libc.memset(ctypes.c_void_p(p), 1, 256 << 20)
kb = [int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages:")]
print("done", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), kb[0] if kb else -1)
"""


def _probe(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXLM_HUGEPAGES")}
    proc = subprocess.run([sys.executable, "-c", PROBE], env={**env, **extra},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    starts = [line.split() for line in proc.stdout.split("\n") if line.startswith("start")]
    done = [line.split() for line in proc.stdout.split("\n") if line.startswith("done")]
    return starts, done


def test_skip_reasons():
    assert hugepages.wanted({"JAXLM_HUGEPAGES": "0"}) == "JAXLM_HUGEPAGES=0"
    assert "already" in hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    got = hugepages.wanted({})
    assert got == "" or any(w in got for w in ("glibc", "Linux", "transparent", "/sys"))


@pytest.mark.skipif(bool(hugepages.wanted({})), reason=f"no huge pages here: {hugepages.wanted({})}")
def test_reexec_once_same_pid_and_the_kernel_gives_huge_pages():
    starts, done = _probe()
    assert len(starts) == 2 and len(done) == 1, (starts, done)  # ran twice from the top, once to the end
    assert starts[0][1] == starts[1][1] == done[0][1]  # os.execv: the same process
    assert done[0][2] == hugepages.TUNABLE
    assert int(done[0][3]) >= 64 << 10, done  # >= 64 MiB of the 256 MiB array in 2 MiB pages

    starts, done = _probe(JAXLM_HUGEPAGES="0")  # the opt-out: one run, no tunable, 4 KiB pages
    assert len(starts) == 1 and len(done[0]) == 3, (starts, done)
    assert int(done[0][2]) < 64 << 10, done


def test_train_console_command_reexecs_but_main_with_argv_does_not(monkeypatch):
    from jaxlm import cli

    calls = []
    monkeypatch.setattr(cli, "reexec_with_hugepages", lambda: calls.append(1))
    monkeypatch.setattr(cli, "_guard", lambda fn, argv: 0)
    cli.train_main(["tiny"])  # a notebook / test: never re-executed
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["jaxlm-train", "tiny"])
    cli.train_main()  # the console script
    assert calls == [1]
