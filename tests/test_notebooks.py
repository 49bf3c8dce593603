"""The teaching notebooks in colabs/: committed clean and in sync with build_notebooks.py (fast),
and executed top to bottom on CPU in tiny mode (slow: ``pytest -m slow tests/test_notebooks.py``).

Execution: nbclient runs each notebook in a fresh ipykernel with the repository root as working
directory, cells tagged ``install`` removed, and ``JAXLM_NOTEBOOK_SIZE=tiny``, ``MPLBACKEND=Agg``,
``JAX_PLATFORMS=cpu``; runs write under a temporary ``JAXLM_NOTEBOOK_OUT``. The kernel gets
tests/conftest.py's cheap-compilation XLA flags but not its 8 fake devices, so each notebook sees
what a user on a 1-device CPU runtime sees (02_sharding asks for its own 8 devices).
"""

import importlib.util
import os
import re
import time

import pytest

nbformat = pytest.importorskip("nbformat")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, "colabs")
NAMES = ["01_quickstart", "02_sharding", "03_linear_attention", "04_lowrank_optimizers",
         "05_dataset_decomposition"]


def _read(name):
    return nbformat.read(os.path.join(COLABS, f"{name}.ipynb"), as_version=4)


def _builder():
    spec = importlib.util.spec_from_file_location(
        "build_notebooks", os.path.join(COLABS, "build_notebooks.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tags(cell):
    return list(cell.get("metadata", {}).get("tags", []))


def test_the_five_notebooks_are_committed():
    found = sorted(f[:-6] for f in os.listdir(COLABS) if f.endswith(".ipynb"))
    assert found == NAMES
    assert list(_builder().NOTEBOOKS) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: a code cell has outputs (clear them)"
            assert cell.execution_count is None, f"{name}: a code cell has an execution count"


@pytest.mark.parametrize("name", NAMES)
def test_structure_badge_install_devices(name):
    nb = _read(name)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    url = f"https://colab.research.google.com/github/jaxlm/jaxlm/blob/main/colabs/{name}.ipynb"
    assert url in first.source and "colab-badge.svg" in first.source
    install = nb.cells[1]
    assert install.cell_type == "code" and _tags(install) == ["install"]
    assert "!pip install" in install.source  # Colab
    assert 'pip install -e ".[notebooks]"' in install.source  # the comment for local use
    assert sum("install" in _tags(c) for c in nb.cells) == 1
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert any("JAXLM_NOTEBOOK_SIZE" in s for s in code[:3]), "parameter cell near the top"
    assert any("jax.devices()" in s for s in code[:4]), "jax.devices() cell near the top"
    assert not any(re.search(r"^\s*(from|import)\s+(bench|tests)\b", s, re.M) for s in code), \
        "notebooks use jaxlm's public API, not bench/ or tests/"


@pytest.mark.parametrize("name", NAMES)
def test_in_sync_with_build_script(name):
    built = _builder().build(name)
    nb = _read(name)
    got = [(c.cell_type, c.source, _tags(c)) for c in nb.cells]
    want = [(c.cell_type, c.source, _tags(c)) for c in built.cells]
    assert got == want, f"{name}.ipynb is stale: run python colabs/build_notebooks.py"


def test_readme_indexes_every_notebook():
    text = open(os.path.join(COLABS, "README.md"), encoding="utf-8").read()
    for name in NAMES:
        assert f"{name}.ipynb" in text
        assert f"colab.research.google.com/github/jaxlm/jaxlm/blob/main/colabs/{name}.ipynb" in text


def _kernel_env(monkeypatch, tmp_path):
    flags = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags).strip()
    monkeypatch.setenv("XLA_FLAGS", flags)
    monkeypatch.setenv("JAXLM_NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("JAXLM_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", REPO + (os.pathsep + path if path else ""))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    from nbclient import NotebookClient

    _kernel_env(monkeypatch, tmp_path)
    nb = _read(name)
    nb.cells = [c for c in nb.cells if "install" not in _tags(c)]
    client = NotebookClient(nb, timeout=900, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": REPO}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the traceback) on the first failing cell
    elapsed = time.perf_counter() - t0
    print(f"{name}: executed in {elapsed:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.get("output_type") == "error"]
    assert not errors
