"""Hand-made mutants: does the test suite notice a plausible, deliberate bug?

    python bench/mutants.py                 # every mutant
    python bench/mutants.py --only dd_       # those whose name starts with dd_

Each mutant is one textual edit to one source file (a bug someone could plausibly write) and the
tests that should catch it. The repository's ``jaxlm``, ``tests`` and ``configs`` are copied to a
temporary directory, the edit is applied *there*, and pytest runs on the copy (the working tree
is never modified). A mutant is **killed** when its tests fail, **survives** when they pass. One
line per mutant, then ``mutants_killed=K/N survived=[...]``. Two of these mutants survived the
suite before issue 14 (``dd_repo_is_pure_odds``-style curriculum changes and
``restarts_no_rewarmup``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DD = "tests/test_dd_faithful.py"
TRAIN_PATH = "tests/test_optim_train_path.py"
# name: (file, old text, new text, tests)
MUTANTS = {
    "dd_paper_weighted_by_tokens": (
        "jaxlm/data/bucketing.py", 'w = odds * part if weights == "repo" else',
        'w = odds * part if weights != "none" else', [DD]),
    "dd_repo_is_pure_odds": (
        "jaxlm/data/bucketing.py", 'w = odds * part if weights == "repo" else',
        'w = odds * 1.0 if weights == "repo" else', [DD]),
    "dd_overflow_always_greedy": (
        "jaxlm/data/bucketing.py", "    while len(live):", "    while False:", [DD]),
    "dd_overflow_uniform_sizes": (
        "jaxlm/data/bucketing.py", "return inv / inv.sum()",
        "return np.full(len(inv), 1 / len(inv))", [DD]),
    "dd_cycles_per_pass": (
        "jaxlm/data/bucketing.py", "if total_steps <= 0:", "if True:", [DD]),
    "dd_loop_drops_run_length": (
        "jaxlm/train/loop.py", 'getattr(data, "wants_total_steps", False)', "False",
        [DD + "::test_training_run_cycles_follow_train_steps"]),
    "restarts_no_rewarmup": (
        "jaxlm/optim/restarts.py",
        "tx = optax.chain(with_momentum_reset(tx, o.reset_every),\n"
        "                         optax.scale_by_schedule(rewarmup(o.reset_every, "
        "o.rewarmup_steps)))",
        "tx = with_momentum_reset(tx, o.reset_every)",
        ["tests/test_loop.py::test_rewarmup_is_applied_by_the_optimizer"]),
    "galore_build_ignores_proj_side": (
        "jaxlm/optim/galore.py", "proj_side=o.proj_side, residual=residual",
        'proj_side="std", residual=residual', [TRAIN_PATH]),
    "fira_build_drops_residual": (
        "jaxlm/optim/galore.py", "proj_side=o.proj_side, residual=residual",
        'proj_side=o.proj_side, residual="none"', [TRAIN_PATH]),
    "galore_build_optax_eps": (
        "jaxlm/optim/galore.py", "layout_fn=lambda names, x: layouts[tuple(names)]),",
        'layout_fn=lambda names, x: layouts[tuple(names)], eps_mode="optax"),', [TRAIN_PATH]),
    "galore_build_no_alpha": (
        "jaxlm/optim/galore.py", "scale_by_galore(o.rank, o.proj_gap, o.galore_scale,",
        "scale_by_galore(o.rank, o.proj_gap, 1.0,", [TRAIN_PATH]),
}


def run_mutant(root: str, name: str) -> bool:
    """Apply one mutant in the copy at ``root``, run its tests, restore; True if killed."""
    path, old, new, tests = MUTANTS[name]
    full = os.path.join(root, path)
    with open(full) as f:
        src = f.read()
    if src.count(old) != 1:
        raise SystemExit(f"mutant {name}: the text to replace occurs {src.count(old)} times in "
                         f"{path}; update bench/mutants.py")
    try:
        with open(full, "w") as f:
            f.write(src.replace(old, new))
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                            *tests], cwd=root, capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=root))
    finally:
        with open(full, "w") as f:
            f.write(src)
    return r.returncode != 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run the mutants whose name starts with this")
    args = ap.parse_args(argv)
    names = [n for n in MUTANTS if n.startswith(args.only)]
    survived = []
    with tempfile.TemporaryDirectory(prefix="jaxlm_mut_") as root:
        for d in ("jaxlm", "tests", "configs"):
            shutil.copytree(os.path.join(ROOT, d), os.path.join(root, d),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy(os.path.join(ROOT, "pyproject.toml"), root)
        where = subprocess.run([sys.executable, "-c", "import jaxlm; print(jaxlm.__file__)"],
                               cwd=root, capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=root)).stdout.strip()
        assert where.startswith(root), f"the copy is not the jaxlm imported: {where}"
        for name in names:
            killed = run_mutant(root, name)
            print(f"mutant {name}: {'killed' if killed else 'SURVIVED'}", flush=True)
            if not killed:
                survived.append(name)
    print(f"mutants_killed={len(names) - len(survived)}/{len(names)} survived={survived}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
