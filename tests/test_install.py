"""Installs that work anywhere: the notebooks' install cell decides which jax to install without
downgrading an accelerator runtime (its decision table, nothing installed here), the extras it
relies on exist, and bundled data is found by name from any working directory."""

import importlib.util
import os
import re
import tomllib

import pytest

from jaxlm.config import ASSETS, CORPORA, DEFAULT_CORPUS, ConfigError, resolve_data_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _install_cell():
    path = os.path.join(REPO, "colabs", "install_jaxlm.py")
    spec = importlib.util.spec_from_file_location("install_jaxlm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines functions only: nothing is installed at import
    return mod


def _pyproject():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


GIT = "git+https://github.com/jaxlm/jaxlm"
# runtime, preinstalled jax, its accelerator plugin -> extras installed (and so the jax kept).
TABLE = [
    ("cpu", "0.10.2", None, "notebooks"),        # compatible: kept
    ("cpu", "0.12.0.1", None, "notebooks"),
    ("cpu", "0.4.35", None, "notebooks"),        # too old: pip upgrades it (CPU either way)
    ("cpu", None, None, "notebooks"),
    ("gpu", "0.10.2", "0.10.2", "notebooks"),    # a compatible CUDA jax: kept
    ("gpu", "0.12.0.1", "0.12.0.1", "notebooks"),
    ("gpu", "0.7.2", "0.7.2", "cuda12,notebooks"),  # too old: the CUDA build in range
    ("gpu", "0.13.0", "0.13.0", "cuda12,notebooks"),  # too new
    ("gpu", "0.10.2", None, "cuda12,notebooks"),  # CPU-only jax on a GPU runtime
    ("gpu", None, None, "cuda12,notebooks"),
    ("tpu", "0.10.2", "0.0.42", "notebooks"),    # libtpu present and jax fits: kept
    ("tpu", "0.6.2", "0.0.17", "tpu,notebooks"),
    ("tpu", "0.11.0", None, "tpu,notebooks"),
    ("tpu", None, None, "tpu,notebooks"),
]


@pytest.mark.parametrize("runtime,jax,plugin,extras", TABLE)
def test_install_plan_never_downgrades_an_accelerator(runtime, jax, plugin, extras):
    req, why = _install_cell().plan(GIT, runtime, jax, plugin)
    assert req == f"jaxlm[{extras}] @ {GIT}"
    if extras == "notebooks" and runtime != "cpu":
        assert "kept" in why
    if extras != "notebooks":
        assert f"jax[{extras.split(',')[0]}] >=0.10.2,<0.13" in why


def test_install_plan_local_sources():
    cell = _install_cell()
    assert cell.plan("/src/jaxlm", "cpu", "0.10.2", None)[0] == "/src/jaxlm[notebooks]"
    wheel = "/tmp/jaxlm-0.1.0-py3-none-any.whl"
    assert cell.plan(wheel, "gpu", None, None)[0] == f"{wheel}[cuda12,notebooks]"
    assert cell.plan("https://x/jaxlm.zip", "cpu", None, None)[0].startswith("jaxlm[notebooks] @ ")


def test_detect_runtime(monkeypatch):
    cell = _install_cell()
    assert cell.detect_runtime({"JAX_PLATFORMS": "cpu"}) == "cpu"  # what CI sets
    monkeypatch.setattr(cell.glob, "glob", lambda p: ["/dev/nvidia0"] if "nvidia" in p else [])
    assert cell.detect_runtime({}) == "gpu"
    assert cell.detect_runtime({"JAX_PLATFORMS": "cpu"}) == "cpu"
    monkeypatch.setattr(cell.glob, "glob", lambda pattern: [])
    assert cell.detect_runtime({}) == "cpu"
    assert cell.detect_runtime({"TPU_ACCELERATOR_TYPE": "v5litepod-1"}) == "tpu"
    monkeypatch.setattr(cell.glob, "glob", lambda p: ["/dev/accel0"] if "accel" in p else [])
    assert cell.detect_runtime({}) == "tpu"


def test_install_skips_when_installed_and_no_source_given(monkeypatch, capsys):
    cell = _install_cell()
    monkeypatch.delenv("JAXLM_SOURCE", raising=False)
    calls = []
    monkeypatch.setattr(cell.subprocess, "check_call", calls.append)
    cell.install_jaxlm()  # this environment has jaxlm installed
    assert calls == [] and "nothing to do" in capsys.readouterr().out
    monkeypatch.setenv("JAXLM_SOURCE", "/src/jaxlm")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    cell.install_jaxlm("/src/jaxlm")
    assert calls and calls[0][-1] == "/src/jaxlm[notebooks]" and calls[0][1:4] == ["-m", "pip",
                                                                                  "install"]


def test_install_cell_matches_pyproject():
    """The cell's jax range and extras are the package's (it cannot import jaxlm to ask)."""
    cell = _install_cell()
    project = _pyproject()
    pin = next(d for d in project["dependencies"] if re.match(r"jax[><=]", d))
    lo, hi = cell.JAX_RANGE
    assert pin == f"jax>={lo},<{hi}"
    extras = project["optional-dependencies"]
    assert extras["tpu"] == [f"jax[tpu]>={lo},<{hi}"]
    assert extras["cuda12"] == [f"jax[cuda12]>={lo},<{hi}"]
    assert set(cell.EXTRA.values()) | {"notebooks"} <= set(extras)
    assert "jupytext>=1.16" in extras["test"]


def test_package_data_holds_presets_and_corpora():
    data = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))
    globs = data["tool"]["setuptools"]["package-data"]["jaxlm"]
    assert "configs/*.yaml" in globs and "assets/*/*" in globs
    for path in CORPORA.values():
        assert os.path.isfile(path) and path.startswith(ASSETS)


def test_resolve_data_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout
    assert resolve_data_path("shakespeare") == DEFAULT_CORPUS
    assert resolve_data_path("wikitext2") == os.path.join(ASSETS, "wikitext-2", "valid.txt")
    assert resolve_data_path("missing.txt") == "missing.txt"  # a path: the reader reports it
    assert resolve_data_path("") == ""
    (tmp_path / "shakespeare").write_text("my own file")
    assert resolve_data_path("shakespeare") == "shakespeare"  # an existing file wins
    with pytest.raises(ConfigError, match=r"^data.val_path: 'shakespear' is neither a file nor a "
                       r"bundled corpus; did you mean 'shakespeare'\?"):
        resolve_data_path("shakespear", "data.val_path")


def test_data_alias_in_training_and_eval(tmp_path, monkeypatch):
    from jaxlm.config import DataConfig
    from jaxlm.data.corpus import load_splits
    from jaxlm.data.pipeline import read_text
    from jaxlm.data.tokenizer import get_tokenizer

    monkeypatch.chdir(tmp_path)
    assert read_text("shakespeare").startswith("First Citizen:")
    with pytest.raises(ConfigError, match="data.path: 'nope' is neither a file"):
        read_text("nope")
    tok = get_tokenizer("byte")
    cfg = DataConfig(path="shakespeare", val_path="wikitext2", cache_dir=str(tmp_path / "c"))
    train, val = load_splits(cfg, tok)
    assert train.stats["source"] == DEFAULT_CORPUS
    assert val.stats["source"] == CORPORA["wikitext2"]  # not a split of tinyshakespeare
    with pytest.raises(ConfigError, match="data.val_path: 'wiki' is neither"):
        load_splits(DataConfig(val_path="wiki", cache_dir=str(tmp_path / "c")), tok)
