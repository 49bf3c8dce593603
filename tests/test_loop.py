"""The training loop's pieces: the logged LR is the one the update applied (re-warmup included),
eval off is reported as off (never a fake score), a finished run says so, and a configuration
that cannot fit in memory fails in one line before the first step."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import load_config
from jaxlm.optim import applied_lr, build_optimizer, lr_at
from jaxlm.train.loop import run

ADAM_ONLY = ["optim.weight_decay=0", "optim.grad_clip=0", "optim.eps=1e-12",
             "train.schedule=constant", "train.warmup_steps=0", "train.lr=1e-2"]


def test_rewarmup_is_applied_by_the_optimizer():
    """Adam's first update after (re)initialising its moments is lr * sign(g) per entry, so the
    update's size *is* the applied LR: after a reset it must be lr * 0.001 (the re-warmup)."""
    cfg = load_config(None, ADAM_ONLY + ["optim.reset_every=4", "optim.rewarmup_steps=10"])
    tx = build_optimizer(cfg)
    params = {"w": jnp.ones(16)}
    state = tx.init(params)
    grads = jax.random.normal(jax.random.key(0), (6, 16))
    for k in range(6):
        lr = float(applied_lr(cfg, state))
        assert lr == pytest.approx(lr_at(cfg, k), rel=1e-6)
        updates, state = tx.update({"w": grads[k]}, state, params)
        if k in (0, 4):  # fresh moments: the first update, and the first after the reset
            np.testing.assert_allclose(np.abs(np.asarray(updates["w"])), lr, rtol=1e-4)
    assert lr_at(cfg, 4) == pytest.approx(1e-2 * 0.001, rel=1e-5)
    assert lr_at(cfg, 3) == pytest.approx(1e-2, rel=1e-6)


TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def restart_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("restarts"))
    cfg = load_config(TINY, [f"out_dir={out}", "train.steps=12", "train.log_every=1",
                             "optim.reset_every=8", "optim.rewarmup_steps=3",
                             "train.eval_batches=0", "ckpt.every=0"])
    return out, cfg, run(cfg)


def test_logged_lr_is_the_applied_lr(restart_run):
    out, cfg, _ = restart_run
    logged = {ln["step"]: ln["lr"] for ln in read_metrics(out) if "lr" in ln}
    assert sorted(logged) == list(range(1, 13))
    for step, lr in logged.items():  # step s applies the update with count s - 1
        assert lr == pytest.approx(lr_at(cfg, step - 1), rel=1e-6)
    assert logged[9] == pytest.approx(lr_at(load_config(TINY), 8) * 0.001, rel=1e-5)


def test_eval_off_writes_no_eval_metrics(restart_run):
    out, _, result = restart_run
    assert result["eval"] is None
    assert not [ln for ln in read_metrics(out) if "eval_loss" in ln or "eval_bpb" in ln]


def test_finished_run_says_it_is_complete(restart_run, capfd):
    out, cfg, _ = restart_run
    before = read_metrics(out)
    result = run(cfg)
    assert "already complete at step 12" in capfd.readouterr().err
    assert result["step"] == 12 and result["eval"] is None
    assert read_metrics(out) == before  # nothing trained, logged or saved again


def test_first_signal_checkpoints_second_aborts():
    import signal

    from jaxlm.train.signals import StopFlag

    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN under nohup / `&`
    with StopFlag() as stop:
        # before a step is done there is nothing to save: the default action (end at once)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        stop.step_done()
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert not stop.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode
        assert stop.should_stop(1) and stop.signum == signal.SIGTERM
        # armed: a second signal would end the process at once, even inside a compile
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is before  # restored


@pytest.mark.slow
def test_ctrl_c_during_the_first_compile_ends_at_once(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "jaxlm.cli", "train", TINY, f"out_dir={tmp_path}",
           "model.n_layers=8", "model.scan_layers=false", "model.remat=full"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        if "compiling the train step" in line:
            break
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGINT and time.time() - t0 < 5
    assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")


def test_step_that_cannot_fit_is_one_last_line_before_training(tmp_path, capsys):
    from jaxlm.cli import train_main

    rc = train_main([TINY, f"out_dir={tmp_path}", "data.seq_len=100000", "train.batch_size=8",
                     "data.val_fraction=0.5"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) > 1  # the run's log lines, then the error
    assert lines[-1].startswith("error: the train step for batch shape [8, 100000] needs")
    assert "lower train.batch_size" in lines[-1]
    assert not [ln for ln in lines[:-1] if ln.startswith("error:") or "Traceback" in ln]
    assert not os.listdir(tmp_path / "checkpoints")  # nothing trained, nothing saved


@pytest.mark.slow
def test_two_runs_on_one_out_dir_one_writer(tmp_path):
    """Two real jaxlm-train processes started together on one out_dir (different seeds): one
    trains, the other stops with one error line; metrics.jsonl is one run's clean curve."""
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxlm.cli", "train", TINY, f"out_dir={out}",
           "train.steps=100", "train.log_every=5", "ckpt.every=25", "train.eval_every=0"]
    procs = [subprocess.Popen(cmd + [f"seed={s}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for s in (1, 2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], errs
    loser = errs[[p.returncode for p in procs].index(2)].strip().splitlines()
    assert loser[-1].startswith(f"error: out_dir {out} is in use by another jaxlm-train (pid ")
    assert "Traceback" not in "".join(errs)
    steps = [ln["step"] for ln in read_metrics(out) if "loss" in ln]
    assert steps == list(range(5, 101, 5))
    assert not [d for d in os.listdir(out / "checkpoints") if "tmp" in d]
