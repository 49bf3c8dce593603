"""Faults survived, nothing lost (issue 6).

* kill -9 at seeded steps, once while an async checkpoint write is in flight: the resumed run's
  final state and loss curve equal an uninterrupted run's bit for bit (slow; subprocesses);
* a damaged latest checkpoint (truncated / garbage array file, deleted item dir, bad JSON, an
  orbax tmp dir left by a crash): one log line, fall back to the previous good step, the bad one
  kept aside, and the same step can be saved again; nothing usable -> one-line error;
* NaN/inf loss or gradients: the update is not applied; ``skip`` counts and logs, ``stop`` exits
  with an error and the last good checkpoint is the latest;
* checkpoint-related bad inputs: another model's checkpoint, unwritable out_dir, disk full.
"""

import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.cli import train_main
from jaxlm.config import ConfigError, load_config
from jaxlm.optim import build_optimizer
from jaxlm.sharding import make_mesh
from jaxlm.train import loop
from jaxlm.train.checkpoint import CRASH_AFTER_SAVE_ENV, Checkpointer, CheckpointError
from jaxlm.train.checkpoint import load_trained
from jaxlm.train.state import StateSpec

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")
QUICK = ["train.eval_every=0", "train.eval_batches=1", "peak_flops=1"]
BASE = ["train.steps=20", "ckpt.every=10", "ckpt.keep=3", "train.log_every=5", *QUICK]


def tiny(out_dir, *overrides):
    return load_config(TINY, [f"out_dir={out_dir}", *overrides])


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y, strict=True), host(a), host(b))


def listing(out):
    return sorted(os.listdir(os.path.join(out, "checkpoints")))


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f]


def restore_latest(out, spec, quarantine=False):
    """What a resuming run does: newest usable checkpoint, state and data-iterator position."""
    from jaxlm.data import make_data_source

    it = make_data_source(spec.cfg.data).train_iterator(
        batch_size=spec.cfg.train.batch_size, process_index=0, process_count=1, seed=0)
    ckpt = Checkpointer(str(out), spec.cfg.ckpt)
    try:
        return ckpt.restore_latest(lambda saved: spec.abstract_with_shardings(), it,
                                   quarantine=quarantine)
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 20-step run with checkpoints 10 and 20, and their states read back."""
    out = str(tmp_path_factory.mktemp("base"))
    loop.run(tiny(out, *BASE))
    cfg = load_config(os.path.join(out, "config.yaml"))
    spec = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
    ckpt = Checkpointer(out, cfg.ckpt)
    states = {s: host(ckpt.restore(s, spec.abstract_with_shardings())) for s in (10, 20)}
    ckpt.close()
    return out, spec, states


def copy_of(base, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(base[0], dst)
    return dst


def biggest_array_file(step_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state"))
             for f in fs if os.sep + "d" + os.sep in os.path.join(r, f) + os.sep]
    return max(files, key=os.path.getsize)


def truncate(step_dir):
    path = biggest_array_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def garbage(step_dir):  # flip 64 bytes in the middle: orbax alone restores this silently
    path = biggest_array_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(64)
        f.seek(-len(chunk), 1)
        f.write(bytes(255 - b for b in chunk))


DAMAGE = {
    "truncated array file": (truncate, "error while reading"),
    "garbage in an array file": (garbage, "checksum mismatch in "),
    "deleted item dir": (lambda d: shutil.rmtree(os.path.join(d, "state")), "state"),
    "garbage data json": (lambda d: open(os.path.join(d, "data", "process_0-of-1.json"), "w")
                          .write("{not json"), "JSONDecodeError"),
}


# -- damaged checkpoints ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_latest_falls_back_to_previous(base, tmp_path, caplog, kind):
    out = copy_of(base, tmp_path)
    damage, why = DAMAGE[kind]
    damage(os.path.join(out, "checkpoints", "20"))
    found = restore_latest(out, base[1], quarantine=True)
    assert found.step == 10
    assert_same(found.state, base[2][10])
    bad = [r.getMessage() for r in caplog.records if "is unusable" in r.getMessage()]
    assert len(bad) == 1, bad  # one line: the step, the reason, what was done
    assert bad[0].startswith(f"checkpoint step 20 in {out}/checkpoints is unusable (") and \
        why in bad[0] and bad[0].endswith(f"moved it to {out}/checkpoints/20.corrupt, using "
                                          "step 10"), bad
    assert listing(out) == ["10", "20.corrupt"]  # kept for the user, out of the way


def test_unfinished_save_dir_is_skipped_and_logged(base, tmp_path, caplog):
    out = copy_of(base, tmp_path)
    ck = os.path.join(out, "checkpoints")
    os.rename(os.path.join(ck, "20"), os.path.join(ck, "20.orbax-checkpoint-tmp"))
    found = restore_latest(out, base[1], quarantine=True)
    assert found.step == 10
    assert any("ignoring unfinished checkpoint 20.orbax-checkpoint-tmp" in r.getMessage()
               for r in caplog.records)


def test_no_usable_checkpoint_is_one_line_error_and_renames_nothing(base, tmp_path):
    out = copy_of(base, tmp_path)
    garbage(os.path.join(out, "checkpoints", "20"))
    truncate(os.path.join(out, "checkpoints", "10"))
    with pytest.raises(CheckpointError) as e:
        restore_latest(out, base[1], quarantine=True)
    msg = str(e.value)
    assert "\n" not in msg and os.path.join(out, "checkpoints") in msg
    assert "step 20 (checksum mismatch" in msg and "move that directory away" in msg
    assert listing(out) == ["10", "20"]


def test_load_trained_falls_back_without_touching_files(base, tmp_path, caplog):
    out = copy_of(base, tmp_path)
    garbage(os.path.join(out, "checkpoints", "20"))
    cfg, _, params = load_trained(out)  # jaxlm-sample / jaxlm-eval
    assert cfg.train.steps == 20
    assert_same(params, base[2][10]["params"])
    assert listing(out) == ["10", "20"]  # read-only use: nothing renamed
    assert any(r.getMessage().startswith("checkpoint step 20 in ") and
               r.getMessage().endswith("skipped it, using step 10") for r in caplog.records)


@pytest.mark.slow
def test_resume_past_a_damaged_step_saves_it_again(base, tmp_path):
    out = copy_of(base, tmp_path)
    garbage(os.path.join(out, "checkpoints", "20"))
    result = loop.run(tiny(out, *BASE))
    assert result["start_step"] == 10 and result["step"] == 20
    assert listing(out) == ["10", "20", "20.corrupt"]
    found = restore_latest(out, base[1])
    assert found.step == 20
    assert_same(found.state, base[2][20])  # the redone steps equal the original run
    steps = [ln["step"] for ln in read_metrics(out) if "loss" in ln]
    assert steps == [5, 10, 15, 20]


# -- non-finite loss / gradients --------------------------------------------------------------

def poisoned(batch):
    """A batch whose loss is NaN (a NaN in the float32 loss mask): NaN loss and gradients."""
    batch = dict(batch)
    batch["loss_mask"] = batch["loss_mask"].copy()
    batch["loss_mask"][0, 0] = np.nan
    return batch


def test_nonfinite_step_leaves_params_and_optimizer_unchanged(tmp_path):
    from jaxlm.data import make_data_source
    from jaxlm.sharding import host_to_global
    from jaxlm.train.state import resolve_vocab
    from jaxlm.train.step import make_train_step

    cfg = tiny(tmp_path, *QUICK)
    data = make_data_source(cfg.data)
    cfg = resolve_vocab(cfg, data.tokenizer.vocab_size)
    spec = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
    it = data.train_iterator(batch_size=8, process_index=0, process_count=1, seed=0)
    step = make_train_step(spec)
    state = spec.init()
    before = host(state)
    state, m = step(state, host_to_global(poisoned(next(it)), spec.mesh))
    assert int(m["nonfinite"]) == 1 and not np.isfinite(float(m["loss"]))
    assert int(state["step"]) == 1  # the counter advances: step N = N batches consumed
    assert_same(state["params"], before["params"])
    assert_same(state["opt_state"], before["opt_state"])
    state, m = step(state, host_to_global(next(it), spec.mesh))
    assert int(m["nonfinite"]) == 0
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), host(state["params"]),
                           before["params"])
    assert all(jax.tree.leaves(changed))


def poison_at(monkeypatch, step):
    """Make the loop's ``step``-th training batch NaN-poisoned."""
    calls = {"n": 0}
    real = loop.host_to_global

    def fake(local, mesh):
        calls["n"] += 1
        return real(poisoned(local) if calls["n"] == step else local, mesh)

    monkeypatch.setattr(loop, "host_to_global", fake)


@pytest.mark.slow
def test_nonfinite_skip_counts_and_logs(tmp_path, monkeypatch, capsys):
    poison_at(monkeypatch, 3)
    out = str(tmp_path / "run")
    result = loop.run(tiny(out, "train.steps=10", "train.log_every=5", "ckpt.every=0", *QUICK))
    lines = {ln["step"]: ln for ln in read_metrics(out) if "loss" in ln}
    assert lines[5]["nonfinite_skips"] == 1 and lines[10]["nonfinite_skips"] == 0
    assert result["nonfinite_skips"] == 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(host(result["state"]["params"])))
    # run() sets up logging to stderr (replacing pytest's log capture)
    assert "steps 1-5: 1 update(s) skipped, non-finite loss or gradients (first at step 3; " \
           "train.nonfinite=skip)" in capsys.readouterr().err


@pytest.mark.slow
def test_nonfinite_stop_exits_before_saving(tmp_path, monkeypatch, capsys):
    poison_at(monkeypatch, 12)
    out = str(tmp_path / "run")
    code = train_main([TINY, f"out_dir={out}", "train.steps=20", "train.log_every=10",
                       "ckpt.every=5", "ckpt.keep=5", "train.nonfinite=stop", *QUICK])
    err = error_line(capsys.readouterr().err)
    assert code == 2, err
    assert err.startswith("error: step 12: non-finite loss or gradients (train.nonfinite=stop)")
    assert "last good one (step 10)" in err
    assert listing(out) == ["10", "5"]  # nothing saved at 15 (the check runs before the save)
    cfg = load_config(os.path.join(out, "config.yaml"))
    spec = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
    assert restore_latest(out, spec).step == 10


def test_nonfinite_choice_is_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"train.nonfinite='ignore' is not one of: skip, stop"):
        tiny(tmp_path, "train.nonfinite=ignore")


# -- checkpoint-related bad inputs ------------------------------------------------------------

def test_checkpoint_of_another_model_is_refused_by_the_cli(base, tmp_path):
    out = copy_of(base, tmp_path)
    before = {p: os.path.getmtime(p) for p in _files(out)}
    r = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", TINY, f"out_dir={out}",
                        "model.d_model=32", *QUICK], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and error_line(r.stderr) == ("error: out_dir holds a checkpoint of a different model (model.d_model: "
                      "checkpoint 64 vs now 32); use a new out_dir or the checkpoint's settings")
    assert {p: os.path.getmtime(p) for p in _files(out)} == before  # nothing touched


def error_line(stderr):
    """The CLI's one ``error:`` line, which must be the last thing on stderr (after log lines)."""
    lines = stderr.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("error:")] == lines[-1:], stderr
    return lines[-1]


def _files(out):
    # (the one-writer lock file is rewritten by every run that takes it: not run data)
    return [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f != ".lock"]


def test_out_dir_under_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert train_main([TINY, f"out_dir={blocker}/run", *QUICK]) == 2
    err = error_line(capsys.readouterr().err)
    assert err == f"error: cannot create out_dir {blocker}/run: Not a directory; choose a " \
                  "writable out_dir"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores directory permissions")
def test_read_only_out_dir(base, tmp_path, capsys):
    out = copy_of(base, tmp_path)
    os.chmod(out, 0o555)
    try:
        assert train_main([TINY, f"out_dir={out}", *BASE]) == 2
    finally:
        os.chmod(out, 0o755)
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"error: cannot write to out_dir {out}: Permission denied"), err


@pytest.mark.slow
def test_disk_full_during_save_fails_cleanly(base, tmp_path, monkeypatch):
    """ENOSPC in the background write of step 20 (keep=1, so GC would remove step 10 if the
    failed step were treated as finished): one-line error, step 10 still restores."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch

    real = jch.JsonCheckpointHandler._save_fn

    async def full_disk(self, x, directory):
        if re.search(r"[/\\]20\.orbax-checkpoint-tmp", str(directory)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await real(self, x, directory)

    monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", full_disk)
    out = str(tmp_path / "run")
    with pytest.raises(CheckpointError) as e:
        loop.run(tiny(out, *BASE, "ckpt.keep=1"))
    assert str(e.value) == (
        f"checkpoint save at step 20 to {out}/checkpoints failed (No space left on device); the "
        "last complete checkpoint is step 10 — free disk space or fix the directory, then rerun "
        "to resume from it")
    monkeypatch.undo()
    found = restore_latest(out, base[1])
    assert found.step == 10
    assert_same(found.state, base[2][10])


# -- kill -9 ----------------------------------------------------------------------------------

def _cmd(out, steps, every):
    return [sys.executable, "-m", "jaxlm.cli", "train", TINY, f"out_dir={out}",
            f"train.steps={steps}", f"ckpt.every={every}", "ckpt.keep=2", "train.log_every=1",
            *QUICK]


def _last_logged(out):
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            lines = [ln for ln in f if ln.endswith("\n")]
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):
        return 0


def _kill_at(out, steps, every, at, saved):
    """Start a run and SIGKILL it from outside once it has logged step ``at`` and checkpoint
    ``saved`` is complete (on a busy machine an async write can take several steps)."""
    proc = subprocess.Popen(_cmd(out, steps, every), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and (
            _last_logged(out) < at or max(_complete_steps(out), default=0) < saved):
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended before the kill at step {at}: {proc.stderr.read()}"
    proc.kill()
    proc.communicate()


def _complete_steps(out):
    ckpts = os.path.join(out, "checkpoints")
    return sorted(int(n) for n in os.listdir(ckpts) if n.isdigit()) if os.path.isdir(ckpts) else []


@pytest.mark.slow
def test_kill9_anywhere_then_resume_equals_uninterrupted(tmp_path):
    steps, every = 30, 4
    rng = random.Random(6)
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "faulty")
    ref = subprocess.Popen(_cmd(ref_out, steps, every), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)  # runs alongside the faulty runs

    # 1. kill -9 from outside at a seeded step
    _kill_at(out, steps, every, rng.randint(6, 9), saved=every)
    resumed = max(_complete_steps(out))

    # 2. die while the async write of a checkpoint is in flight
    crash = (resumed // every + 1) * every
    env = {**os.environ, CRASH_AFTER_SAVE_ENV: str(crash)}
    r = subprocess.run(_cmd(out, steps, every), env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -9, r.stderr
    assert _last_logged(out) == crash
    assert crash not in _complete_steps(out)  # the write was cut short ...
    assert f"{crash}.orbax-checkpoint-tmp" in listing(out)  # ... leaving orbax's tmp dir

    # 3. kill -9 from outside again, once that step has been saved again
    _kill_at(out, steps, every, rng.randint(crash + 1, crash + 4), saved=crash)
    resumed = max(_complete_steps(out))

    # 4. run to the end
    r = subprocess.run(_cmd(out, steps, every), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resumed from {out}/checkpoints at step {resumed}" in r.stderr
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    assert not [n for n in listing(out) if "tmp" in n]  # the stale tmp dir was replaced
    a, b = read_metrics(ref_out), read_metrics(out)
    assert [x["step"] for x in b if "loss" in x] == list(range(1, steps + 1))  # one clean curve
    for key in ("loss", "grad_norm", "lr", "nonfinite_skips"):
        assert [x[key] for x in a if "loss" in x] == [x[key] for x in b if "loss" in x], key
    assert [x for x in a if "eval_loss" in x] == [x for x in b if "eval_loss" in x]
    cfg = load_config(os.path.join(out, "config.yaml"))
    spec = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
    fa, fb = restore_latest(ref_out, spec), restore_latest(out, spec)
    assert fa.step == fb.step == steps
    assert_same(fa.state, fb.state)  # params, optimizer state, step, RNG: bit-identical


@pytest.mark.parametrize("finite", [True, False])
def test_cond_and_select_guards_agree(finite):
    """The CPU guard (lax.cond) and the accelerators' (a select per leaf) give the same params and
    AdamW state: the update when finite, the old values bit for bit when not."""
    import optax

    from jaxlm.train.step import _update_cond, _update_select

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    params = {"w": jnp.arange(12.0).reshape(3, 4) / 7, "b": jnp.ones(4)}
    grads = jax.tree.map(lambda p: jnp.sin(p) + 0.5, params)
    state = tx.init(params)
    flag = jnp.asarray(finite)
    p1, s1 = jax.jit(_update_cond, static_argnums=0)(tx, flag, params, grads, state)
    p2, s2 = jax.jit(_update_select, static_argnums=0)(tx, flag, params, grads, state)
    if finite:  # the same update (XLA may fuse the two forms differently: float32 rounding)
        upd, s_ref = tx.update(grads, state, params)
        for got in ((p1, s1), (p2, s2)):
            jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
                         host(got), host((optax.apply_updates(params, upd), s_ref)))
    else:
        assert_same((p1, s1), (params, state))
        assert_same((p2, s2), (params, state))


def test_cpu_step_guards_with_a_conditional(tmp_path):
    from jaxlm.train.step import make_train_step

    from jaxlm.data import make_data_source
    from jaxlm.train.state import resolve_vocab

    cfg = tiny(tmp_path, *QUICK)
    cfg = resolve_vocab(cfg, make_data_source(cfg.data).tokenizer.vocab_size)
    spec = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
    state = spec.init()
    b = np.zeros((8, cfg.data.seq_len), np.int32)
    batch = {"inputs": b, "targets": b, "positions": b, "segment_ids": b + 1,
             "loss_mask": np.ones(b.shape, np.float32), "target_bytes": b + 1}
    hlo = make_train_step(spec).jitted.lower(state, batch).compile().as_text()
    assert hlo.count(" conditional(") == 1  # the update under lax.cond (the select form has none)
