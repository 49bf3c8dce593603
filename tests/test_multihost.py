"""Multi-process training for real: two JAX processes on localhost (4 fake CPU devices each, gloo
collectives) form one 8-device mesh, train through ``python -m jaxlm.cli train``, checkpoint,
and resume, and the loss curve equals the single-process 8-device run's.

The fast tests check the pieces (cluster arguments, the per-process data layout, the mesh/process
check); ``test_two_processes_match_one_process`` (slow: ~2 min on 2 cores) runs the real thing.
Children run in their own process group and are killed on any failure or timeout.

    python -m pytest -q tests/test_multihost.py              # all
    python -m pytest -q tests/test_multihost.py -m "not slow" # the pieces only (~15 s)
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from jaxlm.config import ConfigError, load_config
from jaxlm.data import make_data_source
from jaxlm.data.pipeline import train_dataset_from_rows
from jaxlm.distributed import cluster_args
from jaxlm.sharding import batch_shards_by_process, check_process_layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
RUN = ["train.steps=6", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
       "ckpt.every=0", "peak_flops=1e12"]

# A child: record which rows of which split (by length) this process reads, then run the CLI.
CHILD = """
import json, sys
from jaxlm.data import pipeline
reads, getitem = [], pipeline.Windows.__getitem__
def recording_getitem(self, i):
    reads.append((len(self), int(i)))
    return getitem(self, i)
pipeline.Windows.__getitem__ = recording_getitem
from jaxlm.cli import main
rc = main(["train", *sys.argv[2:]])
with open(sys.argv[1], "w") as f:
    json.dump(reads, f)
sys.exit(rc)
"""


class IdRows:
    """Rows that are their own index: shows which rows a pipeline puts where."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"id": np.int64(i)}


def ids(n, batches, batch_size=8, process_index=0, process_count=1, seed=0):
    """Row ids of the first ``batches`` local batches of one process, [batches, local]."""
    it = iter(train_dataset_from_rows(IdRows(n), batch_size=batch_size,
                                      process_index=process_index, process_count=process_count,
                                      seed=seed, shuffle=True))
    return np.stack([next(it)["id"] for _ in range(batches)])


def test_cluster_args_and_validation():
    base = ["distributed=true"]
    assert cluster_args(load_config(None, base)) == {}  # all auto-detected
    cfg = load_config(None, base + ["coordinator_address=10.0.0.1:1234", "num_processes=4",
                                    "process_id=0"])
    assert cluster_args(cfg) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                 "process_id": 0}
    with pytest.raises(ConfigError, match="add distributed=true"):
        load_config(None, ["process_id=1"])
    with pytest.raises(ConfigError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        load_config(None, base + ["num_processes=2", "process_id=2"])


def test_no_cluster_is_a_one_line_error():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "KUBERNETES_"))}
    p = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", TINY, "distributed=true"],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "error: distributed=true but coordinator_address should be defined: outside Cloud TPU, "
        "Slurm and Open MPI set coordinator_address=HOST:PORT num_processes=N process_id=I"]


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batch_is_the_same_for_any_process_count(process_count):
    n, steps = 37, 30  # several epochs, and batches that straddle epoch boundaries
    whole = ids(n, steps)  # one process: [steps, 8]
    parts = [ids(n, steps, process_index=p, process_count=process_count)
             for p in range(process_count)]
    # the local batches, concatenated in process order, are the one-process global batch
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)
    # so each process reads a disjoint part of every epoch (each epoch is a permutation of rows)
    assert sorted(whole.reshape(-1)[:n].tolist()) == list(range(n))
    assert not set(parts[0][:2].reshape(-1).tolist()) & set(parts[1][:2].reshape(-1).tolist())


def test_batch_shards_must_not_span_processes():
    def grid(shape, process_of):
        devs = [types.SimpleNamespace(process_index=process_of(i))
                for i in range(int(np.prod(shape)))]
        return np.array(devs, dtype=object).reshape(shape)

    blocks = lambda i: i // 4  # noqa: E731  (process p owns devices 4p..4p+3, as on a host)
    assert batch_shards_by_process(grid((2, 4, 1), blocks)) == {0: {0, 1, 2, 3}, 1: {4, 5, 6, 7}}
    check_process_layout(grid((2, 4, 1), blocks))  # data across processes
    check_process_layout(grid((1, 8, 1), blocks))  # fsdp across processes
    check_process_layout(grid((1, 4, 2), blocks))  # tensor within a process
    for shape, process_of in [((1, 1, 8), blocks),  # tensor across processes: no batch split
                              ((1, 4, 2), lambda i: i % 2)]:  # every shard on both processes
        with pytest.raises(ConfigError, match="batch shard on several of the 2 processes"):
            check_process_layout(grid(shape, process_of))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp, name, overrides, n=2, timeout=420, during=None, want_rc=0):
    """Run ``jaxlm.cli train`` as ``n`` processes of one job, each to exit with ``want_rc``;
    return each one's row reads.

    ``during(procs)`` is polled while they run until it returns True (e.g. to signal one).
    Every child runs in its own session; all are killed if one fails or time runs out.
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4".strip()
    port, procs, logs = free_port(), [], []
    try:
        for i in range(n):
            logs.append(open(tmp / f"{name}.{i}.log", "w"))
            cmd = [sys.executable, "-c", CHILD, str(tmp / f"{name}.{i}.reads.json"), TINY,
                   *overrides, "distributed=true", f"coordinator_address=127.0.0.1:{port}",
                   f"num_processes={n}", f"process_id={i}"]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logs[-1],
                                          stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            assert all(p.poll() in (None, want_rc) for p in procs), "a child failed"
            assert time.monotonic() < deadline, f"timed out after {timeout} s"
            if during is not None and during(procs):
                during = None
            time.sleep(0.2)
        assert all(p.returncode == want_rc for p in procs)
    except AssertionError as e:
        tails = [(tmp / f"{name}.{i}.log").read_text()[-3000:] for i in range(len(procs))]
        raise AssertionError(f"{e}; rc={[p.poll() for p in procs]}\n" + "\n----\n".join(tails))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for f in logs:
            f.close()
    return [json.loads((tmp / f"{name}.{i}.reads.json").read_text()) for i in range(n)]


def last_line(log):
    """The last line a child wrote, not counting gloo's "[Gloo] Rank … connected" lines: the C++
    library prints them to stdout, whose buffer can reach the shared log after stderr's last line."""
    return [ln for ln in log.read_text().strip().splitlines() if not ln.startswith("[Gloo]")][-1]


def curve(out_dir):
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        lines = []
    train = {ln["step"]: ln for ln in lines if "loss" in ln}
    evals = {ln["step"]: ln["eval_loss"] for ln in lines if "eval_loss" in ln}
    return train, evals


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    from jaxlm.train.loop import run

    mesh = ["mesh.data=2", "mesh.fsdp=4"]
    single = str(tmp_path / "single")
    run(load_config(TINY, RUN + mesh + [f"out_dir={single}"]))  # 1 process x 8 devices

    out = str(tmp_path / "multi")
    # 2 processes x 4 devices: steps 1-3 with data across the processes, checkpoint at 3 ...
    first = launch(tmp_path, "first", RUN + mesh + [f"out_dir={out}", "train.stop_at=3"])
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["3"]
    data_dir = os.path.join(out, "checkpoints", "3", "data")  # one iterator state per process
    for i in range(2):
        with open(os.path.join(data_dir, f"process_{i}-of-2.json")) as f:
            assert json.load(f) == {"next_index": 3}
    # ... then resume steps 4-6 with fsdp across the processes (a cross-process reshard on restore)
    second = launch(tmp_path, "second", RUN + [f"out_dir={out}", "mesh.data=1", "mesh.fsdp=8"])
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["3", "6"]

    (want, want_eval), (got, got_eval) = curve(single), curve(out)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]  # one clean curve after resume
    for key in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose([got[s][key] for s in range(1, 7)],
                                   [want[s][key] for s in range(1, 7)], rtol=1e-5, err_msg=key)
    assert got[6]["tokens"] == 8 * 64
    np.testing.assert_allclose(got_eval[6], want_eval[6], rtol=1e-5)

    # Each process read only its own rows: process p's part of each global batch, as laid out by
    # the pipeline, never the other process's, and the resumed run went on where it stopped.
    cfg = load_config(TINY)
    n_train = len(make_data_source(cfg.data).train_rows)
    share = [ids(n_train, 40, process_index=p, process_count=2) for p in (0, 1)]  # [40, 4] each
    for launch_reads, done in ((first, range(0, 3)), (second, range(3, 6))):
        read = [{i for n, i in reads if n == n_train} for reads in launch_reads]
        assert not read[0] & read[1]
        for p in (0, 1):
            assert read[p] <= set(share[p].reshape(-1).tolist())  # prefetch reads ahead: ⊆ share
            assert set(share[p][done].reshape(-1).tolist()) <= read[p]  # the batches it trained
            if done[0]:  # the resumed run starts where the checkpoint left off: no re-reads
                assert not read[p] & set(share[p][:done[0]].reshape(-1).tolist())


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_one_step(tmp_path):
    """A preemption notice that reaches only process 1 still stops both processes at the same
    step with one complete checkpoint (jax's preemption service agrees on the step); a rerun
    resumes from it. A per-process flag would stop process 1 alone and hang process 0."""
    out = str(tmp_path / "pre")
    run = RUN[1:] + ["train.steps=5000", "mesh.data=2", "mesh.fsdp=4", f"out_dir={out}"]

    def sigterm_process_1(procs):
        if max(curve(out)[0], default=0) < 2:  # wait until training is under way
            return False
        procs[1].send_signal(signal.SIGTERM)
        return True

    launch(tmp_path, "pre", run, during=sigterm_process_1)  # both must exit 0
    steps = sorted(int(d) for d in os.listdir(os.path.join(out, "checkpoints")))
    assert len(steps) == 1 and 2 <= steps[0] < 5000, steps
    stopped = steps[0]
    assert f"checkpointing at step {stopped} and exiting" in (tmp_path / "pre.0.log").read_text()
    assert max(curve(out)[0]) <= stopped
    for i in range(2):  # both processes saved their iterator at the same step
        with open(os.path.join(out, "checkpoints", str(stopped), "data",
                               f"process_{i}-of-2.json")) as f:
            assert json.load(f) == {"next_index": stopped}
    launch(tmp_path, "resume", run + [f"train.stop_at={stopped + 2}"])
    assert max(curve(out)[0]) == stopped + 2


@pytest.mark.slow
def test_a_held_out_dir_stops_every_process_with_the_one_line_error(tmp_path):
    """Another run holds out_dir's lock: the job's primary is refused, and its other process
    stops with the same one-line error at once -- not ~30 s later with a coordination-service
    timeout traceback from the first collective the primary never joined."""
    from jaxlm.train.lock import acquire_run_lock

    out = tmp_path / "held"
    holder = acquire_run_lock(str(out), primary=True)
    try:
        launch(tmp_path, "held", RUN + ["mesh.data=2", "mesh.fsdp=4", f"out_dir={out}"],
               timeout=60, want_rc=2)  # the old non-primary: rc 1 after ~30 s
    finally:
        holder.release()
    for i in range(2):
        last = last_line(tmp_path / f"held.{i}.log")
        assert last.startswith(f"error: out_dir {out} is in use by another jaxlm-train"), last


@pytest.mark.slow
def test_a_primary_write_error_stops_every_process_with_the_one_line_error(tmp_path):
    """Only process 0 writes config.yaml; when it cannot (here a directory is in the way) the
    other process stops with the same one-line error instead of waiting in the first collective."""
    out = tmp_path / "unwritable"
    (out / "config.yaml").mkdir(parents=True)
    launch(tmp_path, "unwritable", RUN + ["mesh.data=2", "mesh.fsdp=4", f"out_dir={out}"],
           timeout=120, want_rc=2)
    for i in range(2):
        last = last_line(tmp_path / f"unwritable.{i}.log")
        assert last.startswith(f"error: cannot write to out_dir {out}: "), last
