"""Build the notebooks in ``colabs/`` from their jupytext sources plus the shared setup cells.

Each notebook is written as a jupytext percent-format script, ``colabs/src/NN_name.py`` (markdown
cells are ``# %% [markdown]`` comment blocks; readable, diffable and lintable as Python). The
setup every notebook shares is defined once, here and in ``colabs/install_jaxlm.py``, and a source
asks for it with a marker cell:

    # %% shared="install"   the install cell (tagged ``install``): install_jaxlm.py + its call
    # %% shared="params"    JAXLM_NOTEBOOK_SIZE / JAXLM_NOTEBOOK_OUT (+ the cell's own lines)
    # %% shared="devices"   print jax.devices() and the backend
    # %% [markdown] shared="runtime"   the CPU / T4 GPU / TPU runtime advice

and the title cell (``# Title`` first) gets the "Open in Colab" badge after its heading line.
The ``.ipynb`` files are generated, committed without outputs, and executed in CI by
``tests/test_notebooks.py``::

    python colabs/sync.py            # write colabs/NN_name.ipynb from colabs/src/NN_name.py
    python colabs/sync.py --check    # exit 1 if a committed notebook is out of date
"""

from __future__ import annotations

import argparse
import os
import sys

import jupytext
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = "jaxlm/jaxlm"  # GitHub org/name of the Colab links (also in install_jaxlm.py's URL)
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "src")


def colab_url(name: str) -> str:
    return f"https://colab.research.google.com/github/{REPO}/blob/main/colabs/{name}.ipynb"


def badge(name: str) -> str:
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"({colab_url(name)})")


def install_source() -> str:
    with open(os.path.join(HERE, "install_jaxlm.py"), encoding="utf-8") as f:
        return f.read().strip() + "\n\ninstall_jaxlm()"


PARAMS = """\
import os
import tempfile

# "tiny" (default): small settings, about a minute on a 2-core CPU; CI runs this.
# "real": the full settings of the presets (minutes on a CPU, seconds on a GPU/TPU).
SIZE = os.environ.get("JAXLM_NOTEBOOK_SIZE", "tiny")
assert SIZE in ("tiny", "real"), f"JAXLM_NOTEBOOK_SIZE={SIZE!r}: use tiny or real"
TINY = SIZE == "tiny"
# Runs write under OUT; presets and data come from the installed package, so any working
# directory works (the repository root, colabs/, or none at all on Colab).
OUT = os.environ.get("JAXLM_NOTEBOOK_OUT") or os.path.join(tempfile.gettempdir(), "jaxlm-notebooks")
print(f"size={SIZE}  outputs under {OUT}/")"""

RUNTIME = """\
**Runtime.** Everything here runs on a CPU (`tiny` takes about a minute). On Colab,
*Runtime → Change runtime type* offers a free **T4 GPU** (set `JAXLM_NOTEBOOK_SIZE=real` and
the runs take seconds) or a **TPU v5e-1**; the install cell keeps (or installs) the `jax` that
targets them. jaxlm runs the same code on all three — only `jax.devices()` below changes."""

DEVICES = """\
print(jax.devices())
print("backend:", jax.default_backend(), "| devices:", jax.device_count())"""


def shared_cells() -> dict:
    """name -> (cell type, source, tags) of the cells every notebook shares."""
    return {"install": ("code", install_source(), ["install"]), "params": ("code", PARAMS, []),
            "devices": ("code", DEVICES, []), "runtime": ("markdown", RUNTIME, [])}


def names() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(SRC) if f.endswith(".py"))


def source_path(name: str) -> str:
    return os.path.join(SRC, f"{name}.py")


def notebook_path(name: str) -> str:
    return os.path.join(HERE, f"{name}.ipynb")


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` from its source (no outputs, no execution counts, stable ids)."""
    src = jupytext.read(source_path(name), fmt="py:percent")
    shared = shared_cells()
    cells = []
    for i, cell in enumerate(src.cells):
        kind, text, tags = cell.cell_type, cell.source, list(cell.metadata.get("tags", []))
        key = cell.metadata.get("shared")
        if key is not None:
            if key not in shared or shared[key][0] != kind:
                raise ValueError(f"{source_path(name)}: cell {i}: unknown shared cell "
                                 f"{kind} {key!r} (shared: {', '.join(shared)})")
            kind, base, tags = shared[key]
            text = base + ("\n\n" + text if text else "")  # a marker cell's lines follow
        if i == 0:
            title, _, rest = text.partition("\n")
            if kind != "markdown" or not title.startswith("# "):
                raise ValueError(f"{source_path(name)}: the first cell must be the markdown title "
                                 "(# Title, then the purpose)")
            text = f"{title}\n\n{badge(name)}\n\n{rest.strip()}"
        meta = {"tags": tags} if tags else {}
        new = new_markdown_cell if kind == "markdown" else new_code_cell
        cell = new(text, metadata=meta)
        cell["id"] = f"{name[:2]}-{i:02d}"
        cells.append(cell)
    return new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    })


def sync(check: bool = False) -> list[str]:
    """Write every notebook that differs from its source (or only list them, with check)."""
    stale = []
    for name in names():
        text = nbformat.writes(build(name)) + "\n"
        path = notebook_path(name)
        old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if old == text:
            continue
        stale.append(name)
        if not check:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            print("wrote", os.path.relpath(path))
    orphans = sorted(set(f[:-6] for f in os.listdir(HERE) if f.endswith(".ipynb")) - set(names()))
    if orphans:  # a notebook without a source would silently stop being maintained
        stale += orphans
        print("no source in colabs/src/ for:", ", ".join(f"{n}.ipynb" for n in orphans))
    return stale


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if a notebook is out of date")
    args = ap.parse_args(argv)
    stale = sync(check=args.check)
    if stale and args.check:
        print("out of date (run python colabs/sync.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
