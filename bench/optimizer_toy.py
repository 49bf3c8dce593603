"""Toy reproduction of the low-rank optimizer comparison (Glentis et al. 2025, arXiv 2505.22922,
Table 2's methods) on tinyshakespeare: equal steps, same seed and data order for every method.

    python bench/optimizer_toy.py                        # 400 steps, every method
    python bench/optimizer_toy.py --steps 150 --methods adamw,galore

Each method is ``jaxlm.train.loop.run`` on ``configs/shakespeare.yaml`` (0.9M-parameter LLaMA,
byte tokens) with the overrides in :data:`METHODS`; rank 32 (= d_model/4) for every low-rank
method. GaLore/Fira use the papers' lr 0.01 with α = 0.25 (their subspace steps are α-scaled),
the others the preset's 3e-3 — and GaLore also at 3e-3 to show why, AdamW also at 1e-2 so that
the low-rank methods are not compared only with a lower-lr baseline. Restarts: momentum reset +
10-step LR re-warmup + weight refactorization every 100 steps (the seed paper restarts every 200
of many thousand steps; at this budget 100 gives three restarts).
One line per method::

    opt_toy method=adamw val_loss=2.0000 val_bpb=2.8854 params_mib=3.51 opt_state_mib=7.01

Indicative only: one seed, a 0.9M model, a few hundred steps; the papers' claims are at 60M-1B.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile

from jaxlm.config import load_config
from jaxlm.train.loop import run
from jaxlm.utils.flops import estimate_state_bytes

PRESET = os.path.join(os.path.dirname(__file__), "..", "configs", "shakespeare.yaml")
LOWRANK = ["model.weights=lowrank", "optim.name=lowrank", "model.lowrank_rank=32"]
RESTARTS = ["optim.reset_every=100", "optim.refactor_every=100", "optim.rewarmup_steps=10"]
METHODS = {
    "adamw": ["optim.name=adamw"],
    "adamw_lr1e-2": ["optim.name=adamw", "train.lr=1e-2"],
    "galore_lr3e-3": ["optim.name=galore", "optim.rank=32", "optim.proj_gap=100"],
    "galore": ["optim.name=galore", "optim.rank=32", "optim.proj_gap=100", "train.lr=1e-2"],
    "fira": ["optim.name=fira", "optim.rank=32", "optim.proj_gap=100", "train.lr=1e-2"],
    "lowrank": LOWRANK,
    "lowrank_restarts": LOWRANK + RESTARTS,
    "sltrain": ["model.weights=sltrain", "optim.name=sltrain", "model.lowrank_rank=32",
                "model.sparse_density=0.03"],
}


def run_method(name: str, steps: int, out_root: str) -> dict:
    cfg = load_config(PRESET, [f"out_dir={os.path.join(out_root, name)}", f"train.steps={steps}",
                               "train.sample_tokens=0", "train.eval_every=0", "ckpt.every=0",
                               f"train.warmup_steps={max(steps // 10, 1)}", *METHODS[name]])
    r = run(cfg)
    nbytes = estimate_state_bytes(r["state"]["params"], r["state"]["opt_state"])
    return {"val_loss": r["eval"]["loss"], "val_bpb": r["eval"]["bpb"],
            "params_mib": nbytes.params / 2**20, "opt_state_mib": nbytes.opt_state / 2**20}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        for name in args.methods.split(","):
            r = run_method(name, args.steps, root)
            assert math.isfinite(r["val_loss"]), name
            print(f"opt_toy method={name} val_loss={r['val_loss']:.4f} "
                  f"val_bpb={r['val_bpb']:.4f} params_mib={r['params_mib']:.2f} "
                  f"opt_state_mib={r['opt_state_mib']:.2f}", flush=True)


if __name__ == "__main__":
    main()
