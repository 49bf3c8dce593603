"""End to end on 8 fake CPU devices: training lowers the loss, eval and sample run from the
checkpoint, resume continues exactly, and a checkpoint restores onto a different mesh."""

import json
import math
import os

import jax
import numpy as np
import pytest

from jaxlm.cli import eval_main, sample_main
from jaxlm.config import load_config
from jaxlm.train.loop import run

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")


def tiny(out_dir, *overrides):
    return load_config(TINY, [f"out_dir={out_dir}", *overrides])


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full"))
    result = run(tiny(out))
    return out, result


def test_training_lowers_loss_and_logs_contract(full_run):
    out, result = full_run
    lines = read_metrics(out)
    train = [ln for ln in lines if "loss" in ln]
    evals = [ln for ln in lines if "eval_loss" in ln]
    for ln in train:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "seq_len", "tokens_per_s"} <= set(ln)
        assert ln["tokens"] == 8 * 64 and ln["seq_len"] == 64
    # uniform over 257 byte tokens is ln(257) = 5.55 nats; the model must get well below
    assert train[0]["loss"] > 4.0
    assert train[-1]["loss"] < 3.1 and train[-1]["loss"] < train[0]["loss"] - 1.0
    assert [e["step"] for e in evals] == [30, 60]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    ev = result["eval"]
    assert math.isclose(ev["ppl"], math.exp(ev["loss"]), rel_tol=1e-6)
    # byte tokenizer: one byte per target token, so bpb = loss / ln 2
    assert math.isclose(ev["bpb"], ev["loss"] / math.log(2), rel_tol=1e-5)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["30", "60"]
    assert os.path.exists(os.path.join(out, "config.yaml"))


def test_eval_and_sample_cli_from_checkpoint(full_run, capsys, tmp_path):
    out, result = full_run
    text = tmp_path / "held_out.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 20)
    assert eval_main(["--ckpt", out, "--data", str(text)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    vals = dict(kv.split("=") for kv in last.split())
    assert set(vals) == {"loss", "ppl", "bpb"}
    assert 0 < float(vals["loss"]) < math.log(257)
    assert sample_main(["--ckpt", out, "--prompt", "ROMEO:", "--max-new-tokens", "20",
                        "--greedy"]) == 0
    sampled = capsys.readouterr().out
    assert sampled.startswith("ROMEO:") and len(sampled) > len("ROMEO:")


def test_stop_at_then_resume_equals_uninterrupted(full_run, tmp_path):
    out_full, full = full_run
    out = str(tmp_path / "resumed")
    first = run(tiny(out, "train.stop_at=30"))
    assert first["step"] == 30 and os.listdir(os.path.join(out, "checkpoints")) == ["30"]
    second = run(tiny(out))
    assert second["start_step"] == 30 and second["step"] == 60
    a = [ln for ln in read_metrics(out_full) if "loss" in ln]
    b = [ln for ln in read_metrics(out) if "loss" in ln]
    assert [x["step"] for x in a] == [x["step"] for x in b]
    np.testing.assert_array_equal([x["loss"] for x in a], [x["loss"] for x in b])
    pa, pb = host(full["state"]["params"]), host(second["state"]["params"])
    jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_restore_onto_a_different_mesh(full_run):
    from jaxlm.optim import build_optimizer
    from jaxlm.sharding import make_mesh
    from jaxlm.train.checkpoint import Checkpointer
    from jaxlm.train.state import StateSpec

    out, full = full_run
    cfg = load_config(os.path.join(out, "config.yaml"),
                      ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    spec = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
    ckpt = Checkpointer(out, cfg.ckpt)
    state = ckpt.restore(60, spec.abstract_with_shardings())
    ckpt.close()
    wq = state["params"]["blocks"]["attn"]["wq"]["kernel"]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    jax.tree.map(np.testing.assert_array_equal, host(state["params"]),
                 host(full["state"]["params"]))
