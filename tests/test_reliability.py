"""Issue #13, reliability round two: one writer per out_dir, finalized steps only, nothing that
fails in the background may hang or pass silently, resumes that say what changed.

The one-line CLI messages of these are rows of tests/test_bad_inputs.py (and docs/bad_inputs.md);
this file checks the behaviour behind them: the lock against a real second process and its
release by kill -9, that a ``*-tmp`` step is never read, that a ``checkpoints`` file ends a real
``jaxlm-train`` process with one error line instead of a hang, and the metrics writer's failures.
"""

import errno
import io
import logging
import os
import shutil
import subprocess
import sys
import threading

import pytest

from jaxlm.cli import _print_text, sample_main, split_train_args, train_main
from jaxlm.config import ConfigError, load_config, replace
from jaxlm.train.checkpoint import (Checkpointer, CheckpointError, _fix_for, check_checkpoint_dir,
                                    load_trained)
from jaxlm.train.compat import check_compatible, describe_changes
from jaxlm.train.lock import acquire_run_lock
from jaxlm.utils.metrics import MetricWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
QUICK = ["train.eval_batches=1", "train.sample_tokens=0", "peak_flops=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step tiny run with checkpoints at steps 1 and 2."""
    out = str(tmp_path_factory.mktemp("run"))
    assert train_main([TINY, f"out_dir={out}", "train.steps=2", "ckpt.every=1", *QUICK]) == 0
    return out


# -- 1. one writer per out_dir ---------------------------------------------------------------

def test_second_writer_in_this_process_is_refused_until_release(tmp_path):
    out = str(tmp_path / "run")
    first = acquire_run_lock(out, primary=True)
    with pytest.raises(ConfigError, match=rf"out_dir {out} is in use by another jaxlm-train "
                       rf"\(pid {os.getpid()} on .*, started at .* UTC\); wait for it to finish, "
                       "or use another out_dir"):
        acquire_run_lock(out, primary=True)
    first.release()
    first.release()  # twice is fine
    with acquire_run_lock(out, primary=True) as again:
        assert again.held
    assert acquire_run_lock(out, primary=False).held is False  # other hosts never lock
    os.mkdir(tmp_path / "odd")
    os.mkdir(tmp_path / "odd" / ".lock")
    with pytest.raises(ConfigError, match=r"cannot open the run lock .*odd/.lock: Is a directory"):
        acquire_run_lock(str(tmp_path / "odd"), primary=True)


HOLDER = """
import sys, time
from jaxlm.train.lock import acquire_run_lock
lock = acquire_run_lock(sys.argv[1], primary=True)
print("locked", flush=True)
time.sleep(600)
"""


def test_lock_of_another_process_is_refused_and_freed_by_kill9(tmp_path):
    out = str(tmp_path / "run")
    child = subprocess.Popen([sys.executable, "-c", HOLDER, out], stdout=subprocess.PIPE,
                             text=True, cwd=REPO)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"in use by another jaxlm-train \(pid {child.pid} "):
            acquire_run_lock(out, primary=True)
    finally:
        child.kill()  # SIGKILL: no cleanup code runs in the holder
        child.wait(timeout=60)
    lock = acquire_run_lock(out, primary=True)  # the kernel dropped the lock with the process
    assert lock.held and os.path.exists(os.path.join(out, ".lock"))
    lock.release()


# -- 1. sample / eval read finalized steps only ------------------------------------------------

def test_tmp_steps_are_never_listed_or_read(trained, tmp_path, caplog):
    out = str(tmp_path / "run")
    shutil.copytree(trained, out)
    ckpt_dir = os.path.join(out, "checkpoints")
    for name in ("5.orbax-checkpoint-tmp", "7.orbax-checkpoint-tmp-1234"):  # complete contents
        shutil.copytree(os.path.join(ckpt_dir, "2"), os.path.join(ckpt_dir, name))
    ckpt = Checkpointer(out, load_config(TINY).ckpt, writable=False)
    assert ckpt.finalized_steps() == [1, 2] and ckpt.latest_step() == 2
    ckpt.close()
    with caplog.at_level(logging.WARNING, logger="jaxlm"):
        cfg, _, params = load_trained(out)
    assert "ignoring unfinished checkpoint 5.orbax-checkpoint-tmp" in caplog.text
    assert "unusable" not in caplog.text and params


# -- 2. something in the checkpoint path; failures in background work ------------------------

def test_checkpoint_path_through_a_file_is_refused_before_any_save(tmp_path):
    (tmp_path / "checkpoints").write_text("x")
    with pytest.raises(CheckpointError, match="checkpoints is a regular file, but jaxlm keeps "
                       "checkpoints in a directory there; move that file away"):
        Checkpointer(str(tmp_path), load_config(TINY).ckpt)
    with pytest.raises(CheckpointError, match=r"\(on the path to .*\)"):
        check_checkpoint_dir(str(tmp_path / "checkpoints" / "deeper"))


def test_checkpoints_file_ends_a_real_run_with_one_line(tmp_path):
    (tmp_path / "checkpoints").write_text("x")
    r = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", TINY,
                        f"out_dir={tmp_path}", "train.steps=3", *QUICK],
                       capture_output=True, text=True, timeout=240, cwd=REPO)  # never a hang
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert _error_line(r.stderr) == (
        f"error: {tmp_path}/checkpoints is a regular file, but jaxlm keeps checkpoints in a "
        "directory there; move that file away, or use another out_dir")


def test_write_failures_name_the_right_fix():
    assert _fix_for(OSError(errno.ENOSPC, "No space left on device")).startswith("free disk space")
    assert "writable" in _fix_for(OSError(errno.EACCES, "Permission denied"))
    assert "another run" in _fix_for(OSError(errno.ENOTDIR, "Not a directory"))
    wrapped = RuntimeError("orbax")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert _fix_for(wrapped).startswith("free disk space")


def test_metrics_write_failure_is_one_line(tmp_path):
    w = MetricWriter(str(tmp_path), tensorboard=False)

    class Full(io.StringIO):
        def write(self, _):
            raise OSError(errno.ENOSPC, "No space left on device")

    w._file.close()
    w._file = Full()
    with pytest.raises(ConfigError, match=r"cannot write metrics in .*: No space left on device; "
                       "free disk space or fix the directory, then rerun"):
        w.write(1, {"loss": 1.0})
    w.close()
    (tmp_path / "tb").write_text("in the way")
    with pytest.raises(ConfigError, match=r"cannot write TensorBoard events in .*: Not a "
                       r"directory; check that nothing else \(a file, another run\)"):
        MetricWriter(str(tmp_path))


def test_dead_tensorboard_thread_is_an_error_not_a_hang(tmp_path):
    w = MetricWriter(str(tmp_path))
    events = w._tb.file_writer.event_writer

    def broken(_):
        raise OSError(errno.ENOSPC, "No space left on device")

    events._ev_writer.write_event = broken
    previous, threading.excepthook = threading.excepthook, lambda args: None  # expected death
    try:
        w.write(1, {"loss": 1.0})
        events._worker.join(timeout=30)
    finally:
        threading.excepthook = previous
    assert not events._worker.is_alive()
    with pytest.raises(ConfigError, match="cannot write TensorBoard events in"):
        for step in range(2, 40):  # more than the queue holds: this used to block forever
            w.write(step, {"loss": 1.0})
    w.close()  # returns (does not wait on the dead thread's queue)
    assert len(open(os.path.join(tmp_path, "metrics.jsonl")).readlines()) == 2


# -- 13. no stray "NaN or Inf" lines ------------------------------------------------------------

def test_nonfinite_metric_prints_no_tensorboard_warning(tmp_path, capfd, caplog):
    with MetricWriter(str(tmp_path)) as w:
        w.write(1, {"loss": float("nan"), "grad_norm": float("inf")})
    assert "NaN or Inf" not in capfd.readouterr().err and "NaN or Inf" not in caplog.text
    assert open(os.path.join(tmp_path, "metrics.jsonl")).read().strip() == \
        '{"step": 1, "loss": null, "grad_norm": null}'


# -- 5. what changed on resume ---------------------------------------------------------------

def test_incompatible_resume_says_what_differs_and_that_the_checkpoint_is_fine():
    saved = load_config(TINY, ["out_dir=/o"])
    with pytest.raises(ConfigError) as e:
        check_compatible(saved, replace(saved, optim={"name": "galore"}, data={"mode": "pack"}))
    msg = str(e.value)
    assert "optim.name: checkpoint 'adamw' vs now 'galore'" in msg
    assert "data.mode: checkpoint 'concat' vs now 'pack'" in msg
    assert "intact" in msg and "optimizer state and data position" in msg
    assert "unusable" not in msg and "backup" not in msg and "move" not in msg
    with pytest.raises(ConfigError, match=r"optim.grad_clip: checkpoint 1.0 vs now 0.0"):
        check_compatible(saved, replace(saved, optim={"grad_clip": 0.0}))
    check_compatible(saved, replace(saved, optim={"grad_clip": 0.5}, train={"lr": 1e-4}))


def _error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("error:")] == lines[-1:], stderr
    return lines[-1]


@pytest.mark.parametrize("change, differs, part", [
    ("optim.name=galore", "optim.name: checkpoint 'adamw' vs now 'galore'", "optimizer state"),
    ("data.mode=pack", "data.mode: checkpoint 'concat' vs now 'pack'", "data position")])
def test_cli_resume_with_other_settings_touches_nothing(trained, tmp_path, capsys, change,
                                                        differs, part):
    out = str(tmp_path / "run")
    shutil.copytree(trained, out)
    before = {p: open(p, "rb").read() for p in _files(out)}
    assert train_main([TINY, f"out_dir={out}", "train.steps=3", change, *QUICK]) == 2
    assert _error_line(capsys.readouterr().err) == (
        f"error: out_dir {out} holds an intact checkpoint of a run with other training settings "
        f"({differs}): its {part} cannot continue under the new ones; rerun with the "
        f"checkpoint's settings (saved in {out}/config.yaml), or use a new out_dir to start fresh")
    assert {p: open(p, "rb").read() for p in _files(out)} == before


def _files(out):
    """Every file under ``out`` except the run lock (each run writes its pid there)."""
    return [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f != ".lock"]


def test_describe_changes_lists_what_resumes_fine():
    saved = load_config(TINY, ["out_dir=/o"])
    now = replace(saved, out_dir="/elsewhere", train={"batch_size": 16, "lr": 1e-4},
                  data={"seq_len": 32})
    lines = describe_changes(saved, now)
    assert lines == [
        "data.seq_len: checkpoint 64 -> now 32 (the data position is counted in batches, so "
        "resumed rows shift)",
        "train.batch_size: checkpoint 8 -> now 16 (the data position is counted in batches, so "
        "resumed rows shift)",
        "train.lr: checkpoint 0.003 -> now 0.0001"]
    assert describe_changes(saved, saved) == []
    assert describe_changes(saved, replace(saved, optim={"name": "galore"})) == []


# -- 9. bytes that are not UTF-8 ---------------------------------------------------------------

def test_sample_takes_a_non_utf8_prompt_as_bytes(trained, capsys):
    prompt = b"\xff\xfe abc".decode("utf-8", "surrogateescape")  # what Python makes of argv
    assert sample_main(["--ckpt", trained, "--prompt", prompt, "--max-new-tokens", "4",
                        "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("\ufffd\ufffd abc")


def test_printing_never_raises_on_an_unencodable_sample(monkeypatch):
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    _print_text("caf\u00e9 \ufffd")
    sys.stdout.flush()
    assert raw.getvalue() == b"caf? ?\n"


# -- 11. where the config file goes --------------------------------------------------------------

def test_config_path_with_equals_sign(tmp_path):
    path = tmp_path / "lr=3e-3" / "run.yaml"
    path.parent.mkdir()
    shutil.copy(TINY, path)
    assert split_train_args([str(path), "train.steps=3"]) == (str(path), ["train.steps=3"])
    assert split_train_args(["out_dir=/tmp/x.yaml"]) == (None, ["out_dir=/tmp/x.yaml"])
    assert split_train_args(["tiny", "seed=1"]) == ("tiny", ["seed=1"])
    assert load_config(*split_train_args([str(path), "train.steps=3"])).train.steps == 3


# -- config values that used to be misread ----------------------------------------------------

def test_override_values_are_not_dropped_or_misread():
    from jaxlm.config import parse_overrides

    # a later section override merges into the earlier keys instead of replacing them
    assert parse_overrides(["train.steps=3", "train={lr: 1}"]) == {"train": {"steps": 3, "lr": 1}}
    # a file name with bytes that are not UTF-8 (surrogate-escaped argv) is taken verbatim
    name = b"/data/\xff.txt".decode("utf-8", "surrogateescape")
    assert parse_overrides([f"data.path={name}"]) == {"data": {"path": name}}
    # the shell expands ~ in out_dir=~/x but not in data.path=~/x
    cfg = load_config(TINY, ["data.path=~/corpus.txt", "out_dir=~/run"])
    home = os.path.expanduser("~")
    assert (cfg.data.path, cfg.out_dir) == (f"{home}/corpus.txt", f"{home}/run")


def test_output_into_a_closed_pipe_is_not_a_traceback():
    """`jaxlm-train --help | head -1`: the reader is gone before the command writes."""
    p = subprocess.Popen([sys.executable, "-m", "jaxlm.cli", "train", "--help"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # long before the interpreter has started and printed
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == "", err


# -- 12. jaxlm-eval on short files --------------------------------------------------------------

def test_eval_scores_a_short_file_with_a_shorter_window_and_a_huge_batch(trained, tmp_path):
    from jaxlm.eval import evaluate_file

    path = tmp_path / "short.txt"
    path.write_text("To be.\n")  # 7 byte tokens: no window of the trained 64
    with pytest.raises(ConfigError, match="score shorter windows with --seq-len 6"):
        evaluate_file(trained, str(path))
    r = evaluate_file(trained, str(path), seq_len=6, batch_size=10**9)  # batch clamped to the file
    assert r["tokens"] == 6 and r["loss"] > 0


# -- 3. duplicate YAML keys ----------------------------------------------------------------------

def test_yaml_duplicates_are_refused_anywhere_but_merges_are_fine():
    from jaxlm.utils.strict_yaml import yaml_load

    with pytest.raises(ConfigError, match=r"^x.yaml: duplicate key 'steps' at line 1 \(first at "
                       r"line 1\)"):
        yaml_load("train: {steps: 5, steps: 6}\n", "x.yaml")
    with pytest.raises(ConfigError, match="duplicate key 'b' at line 4 .first at line 3."):
        yaml_load("a:\n  x:\n    b: 1\n    b: 2\n", "x.yaml")
    assert yaml_load("base: &b {steps: 5}\ntrain:\n  <<: *b\n  lr: 1.0\n") == \
        {"base": {"steps": 5}, "train": {"steps": 5, "lr": 1.0}}


def test_no_finished_checkpoint_says_what_is_there(trained, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(trained, out)
    ckpt_dir = os.path.join(out, "checkpoints")
    os.rename(os.path.join(ckpt_dir, "1"), os.path.join(ckpt_dir, "1.orbax-checkpoint-tmp"))
    os.rename(os.path.join(ckpt_dir, "2"), os.path.join(ckpt_dir, "2.corrupt"))
    with pytest.raises(ConfigError, match=r"no finished checkpoint in .* \(only damaged steps "
                       r"moved aside by training \(2.corrupt\)\); train first"):
        load_trained(out)
    os.rename(os.path.join(ckpt_dir, "2.corrupt"), os.path.join(ckpt_dir, "2.orbax-checkpoint-tmp"))
    with pytest.raises(ConfigError, match=r"\(only unfinished saves \(1.orbax-checkpoint-tmp, "
                       r"2.orbax-checkpoint-tmp\)\)"):
        load_trained(out)


def test_missing_tokenizer_of_a_checkpoint_is_described_as_such(tmp_path):
    from jaxlm.train.checkpoint import trained_tokenizer

    gone = str(tmp_path / "gone.model")
    cfg = load_config(TINY, ["data.tokenizer=sentencepiece", f"data.tokenizer_path={gone}"])
    with pytest.raises(ConfigError) as e:
        trained_tokenizer(cfg, "/runs/a")
    assert str(e.value) == (
        f"the tokenizer this checkpoint was trained with cannot be loaded (sentencepiece "
        f"tokenizer: model file not found: {gone}); it is data.tokenizer_path='{gone}' in "
        "/runs/a/config.yaml: put that file back (a relative path is relative to where training "
        "ran)")


def test_a_document_separator_that_never_occurs_is_not_silent(tmp_path, caplog):
    from jaxlm.data.corpus import load_corpus
    from jaxlm.data.tokenizer import get_tokenizer

    path = tmp_path / "docs.txt"
    path.write_text("first document\n\nsecond document\n")
    kw = dict(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"data.doc_separator='\\\\n\\\\n' never occurs in .*: "
                       "it holds a literal backslash, not a newline; for a blank line write"):
        load_corpus(str(path), get_tokenizer("byte"), separator="\\n\\n", **kw)  # shell-typed
    with caplog.at_level(logging.WARNING, logger="jaxlm"):
        assert load_corpus(str(path), get_tokenizer("byte"), separator="###", **kw).n_docs == 1
    assert "data.doc_separator='###' never occurs: the whole file is one document" in caplog.text
    assert load_corpus(str(path), get_tokenizer("byte"), separator="\n\n", **kw).n_docs == 2
