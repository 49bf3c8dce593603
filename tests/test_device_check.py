"""bench/device_check.sh --dry-run: the whole device check runs on CPU with tiny shapes and prints
every ``name=value`` line with a number (issue #18 §5: the script must never rot in CI)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import device_check  # noqa: E402

NUMBER = re.compile(r"^-?\d+(\.\d+)?([eE][-+]?\d+)?$")


def parse(stdout: str) -> dict:
    """name=value lines -> {name: value}; `#` note lines and anything else are skipped."""
    return dict(line.split("=", 1) for line in stdout.splitlines()
                if "=" in line and not line.startswith("#"))


def test_parse_and_expected_names_are_consistent():
    names = device_check.expected_names()
    assert len(names) == len(set(names))
    for required in ("peak_tflops", "mfu_1b_remat_none", "mfu_1b_remat_save_dots",
                     "mfu_1b_remat_full", "cudnn_over_xla_2k", "cudnn_over_xla_8k",
                     "lightning_over_cudnn_8k", "lightning_over_cudnn_32k", "peak_hbm_gib"):
        assert required in names
    assert parse("# a note x=1\nmfu=0.5\nnot a line\n") == {"mfu": "0.5"}


def test_guarded_isolates_failures_and_budget(capsys):
    budget = device_check.Budget(1e6)

    def boom():
        raise RuntimeError("kernel\ncrashed")

    assert device_check.guarded(["a", "b"], budget, 0, boom) == {}
    assert device_check.guarded(["c"], budget, 0, lambda: {"c": "1.5"}) == {"c": "1.5"}
    device_check.guarded(["d"], device_check.Budget(10), 60, lambda: {"d": "2"})
    out = parse(capsys.readouterr().out)
    assert out["a"] == out["b"] == "error:RuntimeError: kernel crashed"
    assert out["c"] == "1.5" and out["d"].startswith("skipped:time budget")
    device_check.signal.alarm(0)


def test_ratio_needs_both_sides():
    got = {"x": "2.0", "y": "4.0"}
    assert device_check.ratio(got, "r", "y", "x") == {"r": "2.000"}
    with pytest.raises(device_check.Unavailable):
        device_check.ratio(got, "r", "y", "missing")


@pytest.mark.slow  # 2-4 minutes on 2 loaded cores: a few dozen tiny compiles
def test_dry_run_prints_every_line_with_a_number():
    # the interpreter running the tests (CI's fresh venv), not the checkout's .venv, if any
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable)
    # one CPU device (tests/conftest.py sets 8 fake ones): the check sizes batches per device
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                              env.get("XLA_FLAGS", ""))
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "device_check.sh"), "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = parse(proc.stdout)
    bad = {n: got.get(n, "<missing>") for n in device_check.expected_names()
           if not NUMBER.match(got.get(n, ""))}
    assert not bad, f"lines without a number: {bad}\n{proc.stdout}\n{proc.stderr[-2000:]}"
    assert "# dry-run: attn_impl=cudnn needs a GPU" in proc.stdout  # substitutions are said
    assert float(got["peak_tflops"]) > 0 and 0 < float(got["mfu_1b_remat_none"]) < 1
