"""SIGTERM mid-run: checkpoint at the next step boundary, exit 0, and the next run resumes there."""

import json
import os
import signal
import subprocess
import sys
import time

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxlm.cli", "train", TINY, f"out_dir={out}", "train.steps=5000",
           "train.log_every=5", "train.eval_every=0", "ckpt.every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, log
    steps = [int(s) for s in os.listdir(out / "checkpoints")]
    assert len(steps) == 1 and 10 <= steps[0] < 5000, steps
    assert f"checkpointing at step {steps[0]}" in log

    resumed = subprocess.run(cmd + [f"train.stop_at={steps[0] + 5}"], capture_output=True,
                             text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'checkpoints'} at step {steps[0]}" in resumed.stdout + \
        resumed.stderr
    lines = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    assert lines[-1]["step"] == steps[0] + 5
    logged = [ln["step"] for ln in lines if "loss" in ln]
    assert logged == sorted(set(logged))  # one clean curve: no duplicated steps after resume
