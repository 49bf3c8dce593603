"""CLI argument handling. The bad-input rows (one ``error: …`` line, exit 2, no traceback) live in
the table of tests/test_bad_inputs.py."""

import os

import pytest

from jaxlm.cli import sample_main, train_main
from jaxlm.config import ConfigError, load_config

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")


def test_overrides_typed():
    cfg = load_config(TINY, ["train.lr=1e-3", "model.tie_embeddings=true", "train.steps=7.0"])
    assert cfg.train.lr == 1e-3 and cfg.model.tie_embeddings is True and cfg.train.steps == 7
    with pytest.raises(ConfigError):
        load_config(TINY, ["model.tie_embeddings=maybe"])


def test_help_exits_zero(capsys):
    assert train_main(["--help"]) == 0
    assert "jaxlm-train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        sample_main(["--help"])
    assert e.value.code == 0 and "--top-p" in capsys.readouterr().out
