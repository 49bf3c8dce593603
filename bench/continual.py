"""Toy continual pretraining (Ibrahim et al. 2024, arXiv 2403.08763): pretrain on corpus A, continue
on corpus B with equal token budgets, and measure forgetting of A and adaptation to B.

    python bench/continual.py                 # the whole grid (resumable), then the table
    python bench/continual.py --report        # only the table from bench/results/continual.jsonl

A = tinyshakespeare (jaxlm/assets/tinyshakespeare/input.txt), B = wikitext-2's validation file
(jaxlm/assets/wikitext-2/valid.txt): Elizabethan verse -> Wikipedia prose, byte tokens, a strong
shift. Each corpus's last 10% (cut at a line break) is held out; bits-per-byte on both held-out
sets is measured at the end of every run (``jaxlm.eval.evaluate_file``, every window).

Runs per seed (``N`` = ``--steps`` updates of ``batch x seq_len`` tokens each):

* ``pre_cos``  A from scratch, cosine (warmup ``--warmup``) -> the base model of a-d;
* ``pre_inf``  A from scratch, ``infinite_cosine`` ending in its constant phase -> base of f;
* ``a``  init_from pre_cos, B, constant lr = the base's final lr (no re-warm);
* ``b``  init_from pre_cos, B, cosine re-warmed to the peak and re-decayed over N;
* ``c``  (b) on ``data.sources`` B 0.95 + A 0.05 (5% replay, same N);
* ``d``  (b) with 25% replay;
* ``e``  from scratch on A and B (weights 1:1) for 2N (the combined budget), cosine;
* ``f``  init_from pre_inf, B, the same infinite schedule continued at its constant lr
  (``train.schedule_offset=N``, no re-warm) with a final annealing over the last 20%.

The table gives each run's bpb on A and B (mean over seeds, each seed too), the increase of A's
bpb over the run's base model (forgetting), and ``forgetting_reduction_replay5=`` =
(A-increase of b - that of c) / A-increase of b, from the seed means. Results append to
bench/results/continual.jsonl, one line per finished run; runs already there are skipped (the
pretrained bases are re-trained only if their checkpoints under ``--work`` are gone).
Indicative only: a 0.1M-parameter model and a few hundred steps; the paper is at 405M and 10B.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time

from jaxlm.config import ASSETS, load_config

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "continual.jsonl")
TINY = os.path.join(HERE, "..", "configs", "tiny.yaml")
CORPORA = {"A": os.path.join(ASSETS, "tinyshakespeare", "input.txt"),
           "B": os.path.join(ASSETS, "wikitext-2", "valid.txt")}
ORDER = ("pre_cos", "pre_inf", "b", "c", "a", "d", "f", "e")


def split_corpora(work: str) -> dict:
    """{A_train, A_val, B_train, B_val} files under ``work`` (the last 10% held out)."""
    paths = {}
    os.makedirs(os.path.join(work, "data"), exist_ok=True)
    for name, src in CORPORA.items():
        text = open(src, encoding="utf-8").read()
        cut = text.index("\n", int(len(text) * 0.9)) + 1
        for part, piece in (("train", text[:cut]), ("val", text[cut:])):
            path = os.path.join(work, "data", f"{name}_{part}.txt")
            if not os.path.exists(path):
                with open(path, "w", encoding="utf-8") as f:
                    f.write(piece)
            paths[f"{name}_{part}"] = path
    return paths


def sources(d: dict, replay: float) -> str:
    return (f"data.sources=[{{name: B, path: {d['B_train']}, val_path: {d['B_val']}, weight: "
            f"{1 - replay}}}, {{name: A, path: {d['A_train']}, val_path: {d['A_val']}, "
            f"weight: {replay}}}]")


def overrides(name: str, seed: int, a: argparse.Namespace, d: dict, work: str) -> list[str]:
    """The config of run ``name`` (see the module docstring)."""
    n, lr = a.steps, a.lr
    common = [f"out_dir={os.path.join(work, f'{name}_s{seed}')}", f"seed={seed}",
              f"data.seq_len={a.seq_len}", f"train.batch_size={a.batch}", f"train.lr={lr}",
              f"train.steps={n}", f"train.warmup_steps={a.warmup}", "train.min_lr_ratio=0.1",
              "train.eval_every=0", "train.eval_batches=4", "train.log_every=50",
              "ckpt.every=0", "ckpt.keep=1", "train.sample_tokens=0"]
    on = lambda c: [f"data.path={d[c + '_train']}", f"data.val_path={d[c + '_val']}"]  # noqa
    inf = ["train.schedule=infinite_cosine", f"train.cooldown_steps={n // 2}",
           f"train.const_lr_ratio={a.const_ratio}"]
    base = lambda src: [f"init_from=ckpt:{os.path.join(work, f'{src}_s{seed}')}"]  # noqa
    return common + {
        "pre_cos": on("A"),
        "pre_inf": on("A") + inf,
        "a": on("B") + base("pre_cos") + ["train.schedule=constant", "train.warmup_steps=0",
                                           f"train.lr={lr * 0.1}"],
        "b": on("B") + base("pre_cos"),
        "c": base("pre_cos") + [sources(d, 0.05)],
        "d": base("pre_cos") + [sources(d, 0.25)],
        "e": [sources(d, 0.5), f"train.steps={2 * n}"],
        "f": on("B") + base("pre_inf") + inf + [f"train.schedule_offset={n}",
                                                 f"train.anneal_steps={n // 5}"],
    }[name]


def done_rows() -> dict:
    rows = {}
    if os.path.exists(RESULTS):
        for line in open(RESULTS):
            if line.strip():
                r = json.loads(line)
                rows[(r["run"], r["seed"], r["steps"])] = r
    return rows


def run_one(name: str, seed: int, a, d: dict, work: str) -> dict:
    from jaxlm.eval import evaluate_file
    from jaxlm.train.loop import run

    cfg = load_config(TINY, overrides(name, seed, a, d, work))
    t0 = time.time()
    run(cfg)
    row = {"run": name, "seed": seed, "steps": a.steps, "wall_s": round(time.time() - t0, 1)}
    for c in ("A", "B"):
        row[f"bpb_{c}"] = evaluate_file(cfg.out_dir, d[f"{c}_val"])["bpb"]
    row["config"] = overrides(name, seed, a, d, work)[1:]
    return row


def grid(a) -> None:
    work = os.path.abspath(a.work)
    d = split_corpora(work)
    for seed in range(a.seeds):
        for name in ORDER:
            rows = done_rows()
            ckpt = os.path.join(work, f"{name}_s{seed}", "checkpoints")
            if (name, seed, a.steps) in rows and (not name.startswith("pre")
                                                  or os.path.isdir(ckpt)):
                continue
            print(f"continual: run {name} seed {seed}", flush=True)
            row = run_one(name, seed, a, d, work)
            if (name, seed, a.steps) not in rows:
                with open(RESULTS, "a") as f:
                    f.write(json.dumps(row) + "\n")
            print(f"continual: done {name} seed {seed} bpb_A={row['bpb_A']:.4f} "
                  f"bpb_B={row['bpb_B']:.4f} ({row['wall_s']:.0f} s)", flush=True)


BASE = {"a": "pre_cos", "b": "pre_cos", "c": "pre_cos", "d": "pre_cos", "f": "pre_inf"}
LABEL = {"pre_cos": "A only, cosine (base of a-d)", "pre_inf": "A only, infinite (base of f)",
         "a": "B, constant lr, no re-warm", "b": "B, re-warm + re-decay",
         "c": "(b) + 5% replay of A", "d": "(b) + 25% replay of A",
         "e": "scratch on A+B, 2N steps", "f": "B, infinite continued + anneal"}


def report(steps: int) -> None:
    rows = [r for r in done_rows().values() if r["steps"] == steps]
    by = {}
    for r in rows:
        by.setdefault(r["run"], {})[r["seed"]] = r
    mean = {k: {c: statistics.mean(r[f"bpb_{c}"] for r in v.values()) for c in "AB"}
            for k, v in by.items()}
    print(f"continual pretraining, N={steps} steps per phase (bpb on held-out A / B; "
          "dA = A's bpb minus the base model's)")
    print(f"{'run':8} {'what':32} {'bpb_A':>7} {'bpb_B':>7} {'dA':>7}  per seed (A/B)")
    for k in ORDER:
        if k not in by:
            continue
        da = mean[k]["A"] - mean[BASE[k]]["A"] if k in BASE and BASE[k] in mean else None
        seeds = "  ".join(f"s{s}: {r['bpb_A']:.3f}/{r['bpb_B']:.3f}"
                          for s, r in sorted(by[k].items()))
        print(f"{k:8} {LABEL[k]:32} {mean[k]['A']:7.4f} {mean[k]['B']:7.4f} "
              f"{'' if da is None else f'{da:+7.4f}':>7}  {seeds}")
    if all(k in mean for k in ("pre_cos", "b", "c")):
        inc_b, inc_c = (mean[k]["A"] - mean["pre_cos"]["A"] for k in ("b", "c"))
        print(f"forgetting_reduction_replay5={(inc_b - inc_c) / inc_b:.3f}")
    if all(k in mean for k in ("pre_cos", "b", "d")):
        inc_b, inc_d = (mean[k]["A"] - mean["pre_cos"]["A"] for k in ("b", "d"))
        print(f"forgetting_reduction_replay25={(inc_b - inc_d) / inc_b:.3f}")


def main(argv=None) -> None:
    global RESULTS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="store_true", help="only print the table")
    ap.add_argument("--steps", type=int, default=800, help="N: updates per phase")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=16, help="(re-)warmup updates (2%% of N)")
    ap.add_argument("--const-ratio", type=float, default=0.3,
                    help="infinite schedule: constant lr / peak lr")
    ap.add_argument("--work", default="out/continual", help="run directories and split corpora")
    ap.add_argument("--results", default=RESULTS, help="the jsonl of finished runs")
    a = ap.parse_args(argv)
    RESULTS = a.results
    if not a.report:
        logging.getLogger("jaxlm").setLevel(logging.WARNING)
        grid(a)
    report(a.steps)


if __name__ == "__main__":
    main()
