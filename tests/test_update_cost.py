"""bench/update_cost.py runs its four update forms on a small config and prints its ratio line
(a guard against the benchmark rotting: it calls jaxlm.train.step's two guard forms directly)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from update_cost import main  # noqa: E402


def test_update_cost_runs_all_forms(capsys):
    med = main(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--iters", "2",
                "model.vocab_size=300"])
    assert set(med) == {"select_optax", "cond_optax", "cond_jaxlm", "one_pass"}
    assert all(v > 0 for v in med.values())
    assert "update_vs_one_pass=" in capsys.readouterr().out
