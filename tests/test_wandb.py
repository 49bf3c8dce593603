"""Weights & Biases logging (log.wandb=true) with the real wandb package in offline mode: the
offline run's history (read back from its .wandb transaction log) holds the same loss values as
metrics.jsonl, a resume continues the same W&B run id; a missing package or a failing wandb.init
is one error line at setup; a W&B failure mid-run is one warning and training goes on."""

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from jaxlm.cli import train_main
from jaxlm.config import load_config
from jaxlm.errors import ConfigError
from jaxlm.utils.metrics import MetricWriter
from jaxlm.utils.wandb_writer import ID_FILE, WandbWriter, stable_run_id

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")
FAST = ["train.steps=20", "train.log_every=5", "train.eval_every=0", "train.eval_batches=0",
        "ckpt.every=10", "peak_flops=1e12", "log.wandb=true", "log.wandb_project=jaxlm-test"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))


def read_wandb_log(path):
    """The records of a .wandb file: a 7-byte header (':W&B', magic, version), then 32 KiB blocks
    of chunks, each [crc32 u32][length u16][type u8] + data; type 1 = a whole record, 2/3/4 =
    first/middle/last piece of one; a block tail shorter than a chunk header is zero padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, pieces, records = 7, 32768, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pieces.append(data[pos + 7:pos + 7 + n])
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(b"".join(pieces))
            records.append(rec)
            pieces = []
    return records


def offline_runs(out_dir):
    """[(run record, {step: {key: value}})] per offline-run directory, oldest first."""
    base = os.path.join(out_dir, "wandb")
    found = []
    for d in sorted(x for x in os.listdir(base) if x.startswith("offline-run-")):
        (name,) = [f for f in os.listdir(os.path.join(base, d)) if f.endswith(".wandb")]
        run, history = None, {}
        for rec in read_wandb_log(os.path.join(base, d, name)):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run = rec.run
            elif kind == "history":
                row = {it.key or "/".join(it.nested_key): json.loads(it.value_json)
                       for it in rec.history.item}
                history.setdefault(row["_step"], {}).update(row)
        found.append((run, history))
    return found


def jsonl(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_offline_wandb_run_logs_what_metrics_jsonl_has_and_resumes_the_same_run(tmp_path):
    pytest.importorskip("wandb")
    out = str(tmp_path / "my-run")
    assert train_main([TINY, f"out_dir={out}", *FAST, "train.stop_at=10"]) == 0
    assert train_main([TINY, f"out_dir={out}", *FAST]) == 0  # resumes at step 10
    rows = jsonl(out)
    runs = offline_runs(out)
    assert len(runs) == 2  # one offline directory per process run, one W&B run id
    run_id = open(os.path.join(out, ID_FILE)).read().strip()
    assert [r.run_id for r, _ in runs] == [run_id, run_id]
    assert runs[0][0].display_name == "my-run" and runs[0][0].project == "jaxlm-test"
    config = {u.key: json.loads(u.value_json) for u in runs[0][0].config.update}
    assert config["train"]["steps"] == 20 and config["log"]["wandb"] is True
    logged = {}
    for _, history in runs:
        logged.update(history)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    for r in rows:  # every value of every metrics.jsonl row, at the same step
        for key, value in r.items():
            if key != "step" and isinstance(value, (int, float)):
                assert logged[r["step"]][key] == pytest.approx(value, rel=1e-6), (r["step"], key)
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(logged[20])


def test_missing_wandb_package_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "run"
    assert train_main([TINY, f"out_dir={out}", *FAST]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "step 1" not in err  # (the lines before: setup's log)
    assert [ln for ln in err.splitlines() if ln.startswith("error")] == \
        ["error: log.wandb=true needs the wandb package: pip install wandb"]
    assert err.strip().splitlines()[-1].startswith("error: log.wandb=true")
    assert not (out / "metrics.jsonl").exists()  # not a single step ran or was logged
    assert not (out / "checkpoints").exists() or not os.listdir(out / "checkpoints")


def test_other_processes_never_touch_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not even the package check runs there
    cfg = load_config(TINY, [f"out_dir={tmp_path / 'run'}", "log.wandb=true"])
    w = MetricWriter(cfg.out_dir, enabled=False, cfg=cfg)  # process != 0
    w.write(1, {"loss": 1.0})
    w.close()
    assert not (tmp_path / "run").exists()


def test_failing_wandb_init_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def init(**_):
        raise wandb.errors.UsageError("api_key not configured (no-tty).\ncall wandb.login")

    monkeypatch.setattr(wandb, "init", init)
    cfg = load_config(TINY, [f"out_dir={tmp_path}", "log.wandb=true", "log.wandb_mode=online"])
    with pytest.raises(ConfigError) as e:
        MetricWriter(str(tmp_path), cfg=cfg)
    msg = str(e.value)
    assert "\n" not in msg and "api_key not configured" in msg
    assert "wandb login" in msg and "log.wandb_mode=offline" in msg


class _FlakyRun:
    def __init__(self, fail_at):
        self.fail_at, self.logged, self.finished = fail_at, [], []

    def log(self, data, step):
        if step >= self.fail_at:
            raise OSError("wandb service went away")
        self.logged.append((step, dict(data)))

    def finish(self, exit_code=0):
        self.finished.append(exit_code)


def test_wandb_failure_mid_run_warns_once_and_logging_goes_on(tmp_path, caplog):
    run = _FlakyRun(fail_at=3)
    with caplog.at_level(logging.WARNING, logger="jaxlm"):
        with MetricWriter(str(tmp_path), tensorboard=False, writers=[WandbWriter(run)]) as w:
            for step in range(1, 7):
                w.write(step, {"loss": 5.0 - step, "note": "text", "skipped": True})
    warnings = [r for r in caplog.records if "W&B logging failed" in r.getMessage()]
    assert len(warnings) == 1 and "at step 3" in warnings[0].getMessage()
    assert run.logged == [(1, {"loss": 4.0, "skipped": True}), (2, {"loss": 3.0, "skipped": True})]
    assert run.finished == []  # dropped, not finished (that could block on a broken service)
    assert [r["step"] for r in jsonl(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_run_id_is_stable_per_out_dir_and_checked(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    first = stable_run_id(str(a))
    assert stable_run_id(str(a)) == first != stable_run_id(str(b))
    (a / ID_FILE).write_text("my/id\n")
    with pytest.raises(ConfigError, match="not a W&B run id"):
        stable_run_id(str(a))


def test_wandb_run_is_finished_on_close_failed_when_closed_by_an_error(tmp_path):
    ok, bad = _FlakyRun(fail_at=99), _FlakyRun(fail_at=99)
    with MetricWriter(str(tmp_path / "ok"), tensorboard=False, writers=[WandbWriter(ok)]) as w:
        w.write(1, {"loss": 1.0})
    with pytest.raises(KeyError):
        with MetricWriter(str(tmp_path / "bad"), tensorboard=False,
                          writers=[WandbWriter(bad)]) as w:
            raise KeyError("boom")
    w.close()  # twice: no second finish
    assert ok.finished == [0] and bad.finished == [1]


def test_online_resume_skips_the_steps_wandb_already_holds(tmp_path):
    run = _FlakyRun(fail_at=99)
    run.starting_step = 16  # W&B's resumed run: steps 0-15 were logged before the kill
    with MetricWriter(str(tmp_path), tensorboard=False, writers=[WandbWriter(run)]) as w:
        for step in (11, 15, 16, 20):  # resumed from the step-10 checkpoint
            w.write(step, {"loss": float(step)})
    assert [s for s, _ in run.logged] == [16, 20]
    assert [r["step"] for r in jsonl(tmp_path)] == [11, 15, 16, 20]


def _train_proc(out, tmp_path, *extra):
    cmd = [sys.executable, "-m", "jaxlm.cli", "train", TINY, f"out_dir={out}", "train.log_every=5",
           "train.eval_every=0", "ckpt.every=0", "peak_flops=1e12", "log.wandb=true", *extra]
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..")}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=tmp_path, start_new_session=True)


def _wait_rows(proc, out, n):
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        path = out / "metrics.jsonl"
        if path.exists() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.2)
    raise AssertionError(proc.communicate()[0][-3000:])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the wandb service through /proc")
def test_killed_wandb_service_mid_run_is_one_warning_and_training_finishes(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    proc = _train_proc(out, tmp_path, "train.steps=200")
    _wait_rows(proc, out, 2)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                              text=True).stdout.split()
    service = [int(c) for c in children if "wandb" in open(f"/proc/{c}/comm").read()]
    assert service, children
    for pid in service:
        os.kill(pid, signal.SIGKILL)
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, log[-3000:]
    assert log.count("W&B logging failed") == 1 and "continuing without W&B" in log
    assert "Traceback" not in log and "Exception ignored" not in log
    assert jsonl(out)[-1]["step"] == 200 and os.listdir(out / "checkpoints") == ["200"]


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_checkpoints_and_wandb_keeps_every_row(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    proc = _train_proc(out, tmp_path, "train.steps=5000")
    _wait_rows(proc, out, 2)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the wandb service too
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0 and "Traceback" not in log, log[-3000:]
    assert len(os.listdir(out / "checkpoints")) == 1
    rows = jsonl(out)
    (_, history), = offline_runs(out)
    assert sorted(history) == [r["step"] for r in rows]
    assert [history[r["step"]]["loss"] for r in rows] == pytest.approx([r["loss"] for r in rows])
