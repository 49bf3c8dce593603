"""Low-rank optimizer state through checkpoints: GaLore/Fira projectors, moments and counters, and
the restart counters of momentum reset / refactorization resume exactly and restore across meshes;
``jaxlm-train`` reports the memory of every method at start."""

import os

import jax
import numpy as np
import pytest

from jaxlm.config import load_config
from jaxlm.optim import build_optimizer
from jaxlm.optim.galore import GaLoreState
from jaxlm.sharding import make_mesh
from jaxlm.train.checkpoint import Checkpointer
from jaxlm.train.loop import run
from jaxlm.train.state import StateSpec

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")
STEPS = 14  # projector refreshes (proj_gap 4) at updates 0, 4, 8, 12: two before and two after 6
METHODS = {
    "fira": ["optim.name=fira", "optim.rank=8", "optim.proj_gap=4"],
    "lowrank_restarts": ["model.weights=lowrank", "optim.name=lowrank", "model.lowrank_rank=8",
                         "optim.reset_every=5", "optim.refactor_every=5",
                         "optim.rewarmup_steps=2"],
}


def cfg_for(method, out_dir, *extra):
    return load_config(TINY, [f"out_dir={out_dir}", f"train.steps={STEPS}", "train.log_every=1",
                              "train.eval_every=0", "ckpt.every=0", "train.eval_batches=1",
                              *METHODS[method], *extra])


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def losses(out_dir):
    import json

    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


@pytest.mark.parametrize("method", ["fira", pytest.param("lowrank_restarts",
                                                         marks=pytest.mark.slow)])
def test_resume_is_exact_and_restores_across_meshes(method, tmp_path, capsys):
    full = run(cfg_for(method, tmp_path / "full"))
    err = capsys.readouterr().err
    assert "params+optimizer state by method (from shapes): adamw" in err
    assert f"{method.split('_')[0]}* " in err  # this run's method is marked

    out = tmp_path / "resumed"
    assert run(cfg_for(method, out, "train.stop_at=6"))["step"] == 6
    second = run(cfg_for(method, out))
    assert second["start_step"] == 6 and second["step"] == STEPS
    assert losses(out) == losses(tmp_path / "full")  # the same curve, bit for bit
    a, b = host(full["state"]), host(second["state"])
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)  # params, moments, projectors, counters
    counts = [int(x) for p, x in jax.tree_util.tree_leaves_with_path(a["opt_state"])
              if "count" in jax.tree_util.keystr(p)]
    assert counts and max(counts) == STEPS  # the step counters came back too

    # restore the final checkpoint onto another mesh: same values, new layout
    cfg = load_config(os.path.join(tmp_path, "full", "config.yaml"),
                      ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    spec = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
    ckpt = Checkpointer(str(tmp_path / "full"), cfg.ckpt)
    state = ckpt.restore(STEPS, spec.abstract_with_shardings())
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, host(state), a)
    if method == "fira":
        galore = [s for s in jax.tree.leaves(state["opt_state"],
                                             is_leaf=lambda x: isinstance(x, GaLoreState))
                  if isinstance(s, GaLoreState)]
        projs = jax.tree.leaves(galore[0].proj)
        assert projs and any(
            set(ax for d in p.sharding.spec if d for ax in (d if isinstance(d, tuple) else (d,)))
            >= {"fsdp"} for p in projs)  # projectors are sharded on the new mesh, not replicated
