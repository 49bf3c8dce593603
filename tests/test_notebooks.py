"""The teaching notebooks in colabs/: committed clean and in sync with their jupytext sources
(``colabs/src/*.py`` + the shared cells of ``colabs/sync.py``; fast), and executed top to bottom
on CPU in tiny mode (slow: ``pytest -m slow tests/test_notebooks.py``).

Execution: nbclient runs each notebook in a fresh ipykernel started in ``colabs/`` (where
Jupyter starts a notebook's kernel) with this checkout first on ``PYTHONPATH``,
``JAXLM_NOTEBOOK_SIZE=tiny``, ``MPLBACKEND=Agg``, ``JAX_PLATFORMS=cpu`` and runs under a
temporary ``JAXLM_NOTEBOOK_OUT``. The install cell runs
too: jaxlm is installed, so it must do nothing. One more slow test runs notebook 01 the way a
Colab user does: a kernel in a fresh venv with only ipykernel, whose install cell pip-installs
jaxlm from ``JAXLM_SOURCE`` (this checkout). The kernel gets tests/conftest.py's cheap-compilation
XLA flags but not its 8 fake devices, so each notebook sees what a user on a 1-device CPU runtime
sees (02_sharding asks for its own 8 devices).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("jupytext")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, "colabs")
NAMES = ["01_quickstart", "02_sharding", "03_linear_attention", "04_lowrank_optimizers",
         "05_dataset_decomposition"]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(COLABS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _read(name):
    return nbformat.read(os.path.join(COLABS, f"{name}.ipynb"), as_version=4)


def _tags(cell):
    return list(cell.get("metadata", {}).get("tags", []))


def _code(nb):
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_every_notebook_has_a_source_and_is_committed():
    found = sorted(f[:-6] for f in os.listdir(COLABS) if f.endswith(".ipynb"))
    assert found == NAMES
    assert _load("sync").names() == NAMES
    assert not os.path.exists(os.path.join(COLABS, "build_notebooks.py"))


def test_notebooks_in_sync_with_sources(capsys):
    assert _load("sync").sync(check=True) == [], "stale notebooks: run python colabs/sync.py"
    rc = subprocess.run([sys.executable, os.path.join(COLABS, "sync.py"), "--check"],
                        capture_output=True, text=True)
    assert rc.returncode == 0, rc.stdout + rc.stderr


def test_check_reports_a_stale_notebook(tmp_path, monkeypatch):
    sync = _load("sync")
    (tmp_path / "install_jaxlm.py").write_text(open(os.path.join(COLABS, "install_jaxlm.py")).read())
    for name in NAMES[:2]:
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / f"{name}.py").write_text(open(sync.source_path(name)).read())
    monkeypatch.setattr(sync, "HERE", str(tmp_path))
    monkeypatch.setattr(sync, "SRC", str(tmp_path / "src"))
    assert sync.sync(check=True) == NAMES[:2]  # no .ipynb yet: both stale, nothing written
    assert not list(tmp_path.glob("*.ipynb"))
    assert sync.sync() == NAMES[:2] and sync.sync(check=True) == []
    src = tmp_path / "src" / f"{NAMES[0]}.py"
    src.write_text(src.read_text().replace("## 1. The configuration", "## 1. Config"))
    assert sync.main(["--check"]) == 1
    cells = nbformat.read(tmp_path / f"{NAMES[0]}.ipynb", as_version=4).cells
    assert not any("## 1. Config\n" in c.source for c in cells)  # --check wrote nothing
    (tmp_path / "99_orphan.ipynb").write_text("{}")
    assert "99_orphan" in sync.sync(check=True)


def test_shared_cells_are_written_once():
    """The sources ask for the shared cells by marker; they never copy them."""
    shared = _load("sync").shared_cells()
    for name in NAMES:
        text = open(os.path.join(COLABS, "src", f"{name}.py"), encoding="utf-8").read()
        for marker in ('# %% shared="install"', '# %% shared="params"', '# %% shared="devices"'):
            assert text.count(marker) == 1, (name, marker)
        assert "os.environ.get(\"JAXLM_NOTEBOOK_SIZE\"" not in text
        assert "def install_jaxlm" not in text
        nb = _read(name)
        for key, (_, source, _) in shared.items():
            if key != "runtime":  # 02 has its own runtime note
                assert sum(c.source.startswith(source) for c in nb.cells) == 1, (name, key)


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
    assert install.source.rstrip().endswith("install_jaxlm()")
    assert 'JAXLM_SOURCE = os.environ.get("JAXLM_SOURCE"' in install.source
    assert sum("install" in _tags(c) for c in nb.cells) == 1
    code = _code(nb)
    assert "JAXLM_NOTEBOOK_SIZE" in code[1], "parameter cell right after the install cell"
    assert any("jax.devices()" in s for s in code[:4]), "jax.devices() cell near the top"
    assert not any(re.search(r"^\s*(from|import)\s+(bench|tests)\b", s, re.M) for s in code), \
        "notebooks use jaxlm's public API, not bench/ or tests/"


@pytest.mark.parametrize("name", NAMES)
def test_no_paths_relative_to_the_repository(name):
    """Configs are preset names, data comes from the package: any working directory works."""
    for src in _code(_read(name)):
        assert not re.search(r"""["'](\.\./)*(configs|jaxlm/assets|out)/""", src), src


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
    monkeypatch.delenv("JAXLM_SOURCE", raising=False)
    path = os.environ.get("PYTHONPATH", "")  # run this checkout's jaxlm, whatever is installed
    monkeypatch.setenv("PYTHONPATH", REPO + (os.pathsep + path if path else ""))


def _execute(nb, kernel_name="python3"):
    """Run ``nb`` in place from colabs/ (as Jupyter would); the seconds it took."""
    pytest.importorskip("nbclient")
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=900, kernel_name=kernel_name, allow_errors=False,
                            resources={"metadata": {"path": COLABS}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the traceback) on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.get("output_type") == "error"]
    assert not errors
    return time.perf_counter() - t0


def _stdout(cell):
    return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, tmp_path, monkeypatch):
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    _kernel_env(monkeypatch, tmp_path)
    nb = _read(name)
    elapsed = _execute(nb)
    print(f"{name}: executed in {elapsed:.1f} s")
    assert "is installed: nothing to do" in _stdout(nb.cells[1])  # the install cell left it alone
    assert not os.path.exists(os.path.join(COLABS, "out")), "runs write under JAXLM_NOTEBOOK_OUT"


@pytest.mark.slow
def test_install_cell_in_a_fresh_venv(tmp_path, monkeypatch):
    """A Colab user's path: a bare kernel whose install cell installs jaxlm (from this checkout,
    not editable) and then runs notebook 01. Needs the package index (or pip's cache)."""
    pytest.importorskip("ipykernel")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "ipykernel"], check=True)
    kernels = tmp_path / "jupyter" / "kernels" / "fresh"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fresh venv", "language": "python"}))
    _kernel_env(monkeypatch, tmp_path)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.delenv("PYTHONPATH")  # jaxlm as the install cell installs it
    monkeypatch.setenv("JAXLM_SOURCE", REPO)
    nb = _read("01_quickstart")
    elapsed = _execute(nb, kernel_name="fresh")
    print(f"01_quickstart in a fresh venv, install included: {elapsed:.1f} s")
    log = _stdout(nb.cells[1])
    assert "cpu runtime" in log and f"pip install '{REPO}[notebooks]'" in log, log
    where = subprocess.run([python, "-c", "import jaxlm; print(jaxlm.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), f"jaxlm not installed into the venv: {where}"
