"""User errors give one ``error: …`` line and a non-zero exit, never a traceback."""

import os
import subprocess
import sys

import pytest

from jaxlm.cli import eval_main, sample_main, train_main
from jaxlm.config import ConfigError, load_config

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")


@pytest.mark.parametrize("argv, needle", [
    (["train.nope=1"], "unknown config key 'train.nope'"),
    (["train.steps=abc"], "train.steps: expected int"),
    (["model.dtype=fp8"], "model.dtype='fp8' is not one of"),
    (["data.path=/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
    (["mesh.data=3"], "mesh"),
    (["model.n_heads=5"], "not divisible by model.n_heads"),
    (["train.stop_at=1000"], "train.stop_at=1000"),
    (["model.vocab_size=100"], "model.vocab_size=100 is smaller"),
    (["train.batch_size=6", "mesh.fsdp=-1"], "not divisible by mesh.data*mesh.fsdp"),
    (["notakeyvalue"], "bad override 'notakeyvalue'"),
    (["model.layer_pattern=LXS"], "model.layer_pattern='LXS'"),
    (["model.layer_pattern=LS"], "has L layers but model.attention=softmax"),
])
def test_train_user_errors(argv, needle, capsys, tmp_path):
    code = train_main([TINY, f"out_dir={tmp_path}", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_bad_yaml_missing_config_and_empty_data(tmp_path, capsys):
    assert train_main([str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {d_model: 64\n")
    assert train_main([str(bad)]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert train_main([TINY, f"data.path={empty}", f"out_dir={tmp_path}"]) == 2
    assert "empty" in capsys.readouterr().err


def test_sample_and_eval_without_checkpoint(tmp_path, capsys):
    assert sample_main(["--ckpt", str(tmp_path), "--prompt", "x"]) == 2
    assert "no checkpoints" in capsys.readouterr().err
    assert eval_main(["--ckpt", str(tmp_path), "--data", TINY]) == 2
    assert "no checkpoints" in capsys.readouterr().err


def test_overrides_typed():
    cfg = load_config(TINY, ["train.lr=1e-3", "model.tie_embeddings=true", "train.steps=7.0"])
    assert cfg.train.lr == 1e-3 and cfg.model.tie_embeddings is True and cfg.train.steps == 7
    with pytest.raises(ConfigError):
        load_config(TINY, ["model.tie_embeddings=maybe"])


def test_console_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", TINY, "train.bogus=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip().splitlines()[0]] and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: unknown config key 'train.bogus'")
