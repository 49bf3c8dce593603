"""bench/memory.py's rss_vs_maxtext plumbing: a child's peak RSS from os.wait4, and the
``unavailable:`` line (never a traceback) when MaxText's venv is absent. The real measurement
needs that venv (bench/maxtext_env.sh) and minutes, so it is not run here."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import memory  # noqa: E402


def test_child_peak_rss_sees_what_the_child_touched(tmp_path):
    log = str(tmp_path / "child.log")
    small = memory.child_peak_rss([sys.executable, "-c", "pass"], dict(os.environ), log)
    big = memory.child_peak_rss(
        [sys.executable, "-c", "b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096])"],
        dict(os.environ), log)
    assert small < 200 << 20  # a bare interpreter
    assert big - small > 250 << 20  # the 300 MiB the child wrote


def test_child_failure_is_one_line(tmp_path):
    with pytest.raises(RuntimeError, match=r"exited 3 \(log: "):
        memory.child_peak_rss([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ),
                              str(tmp_path / "x.log"))


def test_no_maxtext_venv_prints_unavailable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VS_MAXTEXT_DIR", str(tmp_path / "no_venv_here"))
    memory.print_rss(10)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("rss_vs_maxtext=unavailable:")
    assert "bench/maxtext_env.sh" in out[0]  # says how to create it
