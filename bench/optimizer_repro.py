"""The seed paper's optimizer comparison (Glentis et al. 2025, arXiv 2505.22922, Table 2's
methods) under the papers' protocol, scaled to what a 2-core CPU can do.

    python bench/optimizer_repro.py                      # next runs of the grid, until done
    python bench/optimizer_repro.py --max-runs 3         # at most 3 runs this sitting
    python bench/optimizer_repro.py --report             # table + summary of what is done
    python bench/optimizer_repro.py --budget-scale 0.02 --results /tmp/x.jsonl   # smoke test

**Protocol** (GaLore §5.1 / Fira / SLTrain / the seed paper, all LLaMA pre-training on C4):
AdamW-style base with β = (0.9, 0.999), no weight decay, the same global-norm clip 1.0 for every
method, linear warmup over 10% of the steps then cosine to 0.1 × peak. Rank r = d/4 for every
low-rank method; GaLore/Fira refresh the projector every T = 200 updates with α = 0.25; the
restarts (momentum reset + 10-step LR re-warmup + weight refactorization, the seed paper's
MR + WR) every 200 updates; SLTrain support density δ = 0.03.

**Model and budget**: LLaMA d_model 64, 4 layers, 4 heads, d_ff 192 (~0.25M parameters), byte
tokens of the bundled tinyshakespeare (90% train, 10% held out), seq 128, 32 rows = 4,096 tokens
per step, 1,250 steps = 5.1M tokens ≈ 20 tokens per parameter (the papers' budgets are ~20 at
60M–1B). The **control** arm runs 1/10 of the budget (< 2 tokens per parameter, the regime of the
old 150/400-step tables); T and the restart interval shrink with it, so every method performs the
same number of refreshes/restarts per run in both arms and only tokens per parameter change.

**Grid** (every decision is a pure function of the results file, so any sitting resumes it):
an LR ladder 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1; each method starts at its middle LR
(:data:`MIDDLE`) and its two neighbours (seed 0), is extended by one rung while the best LR sits
at an edge, then runs seeds 1 and 2 at its best LR. Order: every method's middle LR first, then
the neighbours, extensions, seeds, then the control arm the same way. Every finished run is
appended to ``bench/results/optimizer_repro.jsonl``; a run cut off mid-way is redone next time.
One line per run::

    opt_repro arm=main method=adamw lr=0.003 seed=0 steps=1250 val_bpb=... train_loss=...

``--report`` prints the per-method table (mean ± half-range over seeds at the best LR, the
train–val gap in bpb), ``adamw_margin_over_seed_spread=`` ((best other method's mean bpb
− AdamW's) / the largest seed spread; > 1 means the ordering is outside seed noise) and
``restarts_minus_plain_lowrank=`` (mean bpb difference; negative = restarts help).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

LADDER = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
MIDDLE = {"adamw": 3e-3, "galore": 1e-2, "fira": 1e-2, "lowrank": 3e-3,
          "lowrank_restarts": 3e-3, "sltrain": 3e-3}
METHODS = tuple(MIDDLE)
SEEDS = (0, 1, 2)
STEPS, ROWS, SEQ = 1250, 32, 128
RANK, GAP, RESTART = 16, 200, 200  # d/4; intervals at the full budget
ARMS = {"main": 1.0, "control": 0.1}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "optimizer_repro.jsonl")
BASE = ["model.d_model=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=4",
        "model.d_ff=192", "model.dtype=float32", "data.tokenizer=byte", f"data.seq_len={SEQ}",
        f"train.batch_size={ROWS}", "train.schedule=cosine", "train.min_lr_ratio=0.1",
        "train.eval_every=0", "train.eval_batches=24", "train.sample_tokens=0",
        "optim.b1=0.9", "optim.b2=0.999", "optim.weight_decay=0", "optim.grad_clip=1.0",
        "ckpt.every=0", "ckpt.async_save=false"]


def method_overrides(method: str, steps: int, scale: float) -> list[str]:
    """Config overrides of one method; T and the restart interval scale with the budget."""
    gap, every = max(1, round(GAP * scale)), max(1, round(RESTART * scale))
    lowrank = ["model.weights=lowrank", "optim.name=lowrank", f"model.lowrank_rank={RANK}"]
    proj = [f"optim.rank={RANK}", f"optim.proj_gap={gap}", "optim.galore_scale=0.25"]
    return {
        "adamw": ["optim.name=adamw"],
        "galore": ["optim.name=galore", *proj],
        "fira": ["optim.name=fira", *proj],
        "lowrank": lowrank,
        "lowrank_restarts": lowrank + [f"optim.reset_every={every}",
                                       f"optim.refactor_every={every}",
                                       "optim.rewarmup_steps=10"],
        "sltrain": ["model.weights=sltrain", "optim.name=sltrain", f"model.lowrank_rank={RANK}",
                    "model.sparse_density=0.03"],
    }[method]


def load_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _done(rows, arm, steps):
    """{(method, lr, seed): row} of finished runs of this arm at this step count."""
    return {(r["method"], r["lr"], r["seed"]): r for r in rows
            if r["arm"] == arm and r["steps"] == steps}


def best_lr(done: dict, method: str) -> float | None:
    """The seed-0 LR with the lowest held-out bpb (a non-finite result counts as worst)."""
    tried = {lr: r["val_bpb"] for (m, lr, s), r in done.items() if m == method and s == 0}
    if not tried:
        return None
    return min(tried, key=lambda lr: tried[lr] if math.isfinite(tried[lr]) else math.inf)


def _grid_next(done: dict, method: str) -> float | None:
    """The next seed-0 LR this method needs, or None once its best LR is interior/at the end."""
    mid = LADDER.index(MIDDLE[method])
    for i in (mid, mid - 1, mid + 1):
        if 0 <= i < len(LADDER) and (method, LADDER[i], 0) not in done:
            return LADDER[i]
    b = LADDER.index(best_lr(done, method))
    tried = sorted(LADDER.index(lr) for (m, lr, s) in done if m == method and s == 0)
    for j in ((b - 1,) if b == tried[0] else ()) + ((b + 1,) if b == tried[-1] else ()):
        if 0 <= j < len(LADDER):
            return LADDER[j]
    return None


def plan_next(rows: list[dict], scale: float = 1.0) -> tuple[str, str, float, int] | None:
    """(arm, method, lr, seed) of the next run, in the order of the module docstring."""
    for arm, frac in ARMS.items():
        done = _done(rows, arm, arm_steps(frac, scale))
        for stage in ("middle", "grid"):
            for m in METHODS:
                lr = _grid_next(done, m)
                if lr is not None and (stage == "grid" or lr == MIDDLE[m]):
                    return arm, m, lr, 0
        for seed in SEEDS[1:]:
            for m in METHODS:
                lr = best_lr(done, m)
                if (m, lr, seed) not in done:
                    return arm, m, lr, seed
    return None


def arm_steps(frac: float, scale: float) -> int:
    return max(10, round(STEPS * frac * scale))


def run_one(arm: str, method: str, lr: float, seed: int, scale: float) -> dict:
    from jaxlm.config import load_config
    from jaxlm.train.loop import run
    import jax

    frac = ARMS[arm] * scale
    steps = arm_steps(ARMS[arm], scale)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config("tiny", [f"out_dir={out}", f"seed={seed}", *BASE,
                                   f"train.steps={steps}", f"train.lr={lr}",
                                   f"train.warmup_steps={max(1, steps // 10)}",
                                   f"train.log_every={max(1, steps // 25)}",
                                   *method_overrides(method, steps, frac)])
        res = run(cfg)
    n_params = sum(x.size for x in jax.tree.leaves(res["state"]["params"]))
    tokens = steps * ROWS * SEQ
    val_loss, train_loss = res["eval"]["loss"], res["loss"]
    return {"arm": arm, "method": method, "lr": lr, "seed": seed, "steps": steps,
            "tokens": tokens, "params": n_params, "tokens_per_param": tokens / n_params,
            "val_bpb": res["eval"]["bpb"], "val_loss": val_loss, "train_loss": train_loss,
            "gap_bpb": (val_loss - train_loss) / math.log(2), "wall_s": round(time.time() - t0)}


def summarize(rows: list[dict], arm: str, scale: float = 1.0) -> dict:
    """{method: dict(lr, n, mean, spread, gap)} at each method's best seed-0 LR."""
    done, out = _done(rows, arm, arm_steps(ARMS[arm], scale)), {}
    for m in METHODS:
        lr = best_lr(done, m)
        if lr is None:
            continue
        runs = [done[(m, lr, s)] for s in SEEDS if (m, lr, s) in done]
        b = [r["val_bpb"] for r in runs]
        out[m] = dict(lr=lr, n=len(b), mean=sum(b) / len(b), spread=max(b) - min(b),
                      gap=sum(r["gap_bpb"] for r in runs) / len(runs),
                      grid=sorted((k[1], done[k]["val_bpb"]) for k in done
                                  if k[0] == m and k[2] == 0))
    return out


def report(rows: list[dict], scale: float = 1.0) -> None:
    for arm in ARMS:
        s = summarize(rows, arm, scale)
        print(f"\n{arm} arm ({arm_steps(ARMS[arm], scale)} steps)\n"
              "| method | best lr | seeds | val bpb (mean ± half-range) | train–val gap (bpb) "
              "| seed-0 grid (lr: bpb) |\n|---|---|---|---|---|---|")
        for m, v in sorted(s.items(), key=lambda kv: kv[1]["mean"]):
            grid = ", ".join(f"{lr:g}: {b:.4f}" for lr, b in v["grid"])
            print(f"| {m} | {v['lr']:g} | {v['n']} | {v['mean']:.4f} ± {v['spread'] / 2:.4f} "
                  f"| {v['gap']:+.4f} | {grid} |")
        if "adamw" in s and len(s) > 1:
            other = min(v["mean"] for m, v in s.items() if m != "adamw")
            spread = max(v["spread"] for v in s.values())
            margin = (other - s["adamw"]["mean"]) / spread if spread > 0 else math.nan
            print(f"{arm}: adamw_margin_over_seed_spread={margin:.3f} "
                  f"(best other - adamw = {other - s['adamw']['mean']:+.4f} bpb, "
                  f"largest seed spread {spread:.4f})")
        if "lowrank" in s and "lowrank_restarts" in s:
            d = s["lowrank_restarts"]["mean"] - s["lowrank"]["mean"]
            print(f"{arm}: restarts_minus_plain_lowrank={d:+.4f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help="multiply every budget (smoke tests; rows record their steps)")
    ap.add_argument("--max-runs", type=int, default=0, help="stop after N runs (0 = all)")
    ap.add_argument("--report", action="store_true", help="only print the table")
    ap.add_argument("--plan", action="store_true", help="only print the next run")
    args = ap.parse_args(argv)
    if args.report:
        return report(load_rows(args.results), args.budget_scale)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    n = 0
    while (nxt := plan_next(load_rows(args.results), args.budget_scale)) is not None:
        if args.plan:
            return print("next:", *nxt)
        row = run_one(*nxt, args.budget_scale)
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print("opt_repro " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        n += 1
        if args.max_runs and n >= args.max_runs:
            break
    report(load_rows(args.results), args.budget_scale)


if __name__ == "__main__":
    main()
