"""Dataset Decomposition vs concat-and-chunk: training throughput at a long target context, and a
short equal-token quality comparison (concat / pack / dd) on WikiText-2 articles.

**Part A — tokens/s at target context T (4096, and 8192 with ``--contexts 4096 8192``).** Same
model (a small softmax transformer, byte vocabulary so attention, not the output head, is what
context length changes), same tokens per step b = ``--tokens`` (concat: [b/T, T]; dd: [b/2^i, 2^i]
for every bucket 2^i in [256, T]). Each batch shape is compiled, then timed over ``--steps``
steps (median); concat's tokens/s is b / t_T. DD's tokens/s over a whole epoch is

    tokens_per_s_dd = Σ_i n_i · b / Σ_i n_i · t_i     (n_i = batches of bucket i in the epoch)

so it depends on the corpus's document lengths and on how documents longer than twice the
largest bucket are cut: ``random`` (the default, the official repo's ``randomize=True``: piece
lengths drawn with P ∝ 1/length, so the overflow tokens spread evenly over the buckets) or
``greedy`` (largest-bucket pieces). Both are reported for the bundled WikiText-2 articles (GPT-2
and byte tokens: long documents) and for a synthetic web-like length distribution (log-normal,
median 300 tokens, σ = 1.2; most tokens in the 512–1024 buckets, like RefinedWeb in Pouransari et
al. 2024 §2.1). The paper's claim: an 8k-context model trained with DD at the cost of a
2k-context baseline.

**Part B — equal tokens, validation bits-per-byte.** WikiText-2 validation's 60 articles, split
into 54 train / 6 held-out (every 10th), byte tokens, seq_len 512, the same model, steps and
tokens per step for ``concat``, ``pack``, ``dd`` (Grow-P2 × 8 cycles over the run, Algorithm 1,
randomized overflow, buckets 64…512) and ``dd_greedy`` (the same with greedy overflow pieces, the
decomposition jaxlm used before issue 14), trained with ``jaxlm.train.loop.run``. Every model is
evaluated on the same two held-out sets: ``docs`` (articles from their start, packed with document
masks) and ``stream`` (concat windows of the held-out text).

Resumable: each finished part-A context and part-B mode is appended to
``bench/results/dd_vs_concat.jsonl`` and skipped next time (``--fresh`` ignores the file); the
ratios of part A always come from one process.

Example (from the repository root; about 3 + 3×2.5 minutes on 2 busy CPU cores)::

    python bench/dd_vs_concat.py                        # part A at 4096, then part B
    python bench/dd_vs_concat.py --contexts 4096 8192 --skip-quality
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

SEP = "re:\\n(?= = [^=].* = \\n)"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "dd_vs_concat.jsonl")
MODEL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=0",
         "model.d_ff=256", "mesh.fsdp=-1", "peak_flops=1e12"]


def shape_times(T: int, tokens: int, steps: int, model: list[str]) -> dict[int, float]:
    """Median seconds per train step of the batch shape [tokens/L, L] for L = 256 … T."""
    import jax

    from jaxlm.config import load_config
    from jaxlm.optim import build_optimizer
    from jaxlm.sharding import host_to_global, make_mesh
    from jaxlm.train.state import StateSpec
    from jaxlm.train.step import make_train_step

    cfg = load_config("configs/tiny.yaml", [f"data.seq_len={T}", f"train.batch_size={tokens // T}",
                                            "model.vocab_size=257", *model])
    spec = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
    state, step = spec.init(), make_train_step(spec)
    rng = np.random.default_rng(0)
    out = {}
    for k in range(8, T.bit_length()):
        L = 1 << k
        rows = tokens // L
        tok = rng.integers(0, 256, (rows, L + 1), dtype=np.int32)
        ones = np.ones((rows, L), np.int32)
        batch = host_to_global({"inputs": tok[:, :-1], "targets": tok[:, 1:],
                                "positions": np.broadcast_to(np.arange(L, dtype=np.int32),
                                                             (rows, L)).copy(),
                                "segment_ids": ones, "loss_mask": ones.astype(np.float32),
                                "target_bytes": ones}, spec.mesh)
        state, m = step(state, batch)  # compile
        jax.block_until_ready(m)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, m = step(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        out[L] = statistics.median(times)
        print(f"  T={T}: shape [{rows:4d}, {L:5d}]  {out[L] * 1e3:9.1f} ms/step  "
              f"{tokens / out[L]:10,.0f} tokens/s", flush=True)
    return out


def load_rows(path: str = RESULTS) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_row(row: dict, path: str = RESULTS) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def bucket_tokens(doc_lengths, T: int, overflow: str = "random") -> dict[int, int]:
    """Tokens per bucket 256..T after decomposing documents of these lengths (EOT included)."""
    from jaxlm.data.bucketing import piece_table

    class Docs:  # what piece_table reads of a corpus
        offsets = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)

    buckets = [1 << k for k in range(8, T.bit_length())]
    pieces, _ = piece_table(Docs, buckets, overflow)
    return {L: len(pieces[L]) * L for L in buckets}


def part_a(contexts, tokens: int, steps: int, rows: list[dict]) -> None:
    from jaxlm.config import ASSETS
    from jaxlm.data import get_tokenizer
    from jaxlm.data.corpus import load_corpus

    path = os.path.join(ASSETS, "wikitext-2", "valid.txt")
    cache = os.path.join(tempfile.gettempdir(), "jaxlm_bench_cache")
    corpora = {f"wikitext-2 articles ({t})": load_corpus(path, get_tokenizer(t), separator=SEP,
                                                         cache_dir=cache).doc_lengths()
               for t in ("gpt2", "byte")}
    rng = np.random.default_rng(0)
    corpora["web-like lognormal(median 300, sigma 1.2)"] = np.maximum(
        1, rng.lognormal(np.log(300), 1.2, 50_000)).astype(int) + 1
    print(f"Part A: train-step throughput, {tokens} tokens/step, model {' '.join(MODEL[:5])}, "
          f"byte vocab", flush=True)
    for T in contexts:
        if any(r.get("part") == "A" and r["T"] == T and r["tokens"] == tokens for r in rows):
            print(f"skip part A at T={T} (in {RESULTS})")
            continue
        t = shape_times(T, tokens, steps, MODEL)
        concat = tokens / t[T]
        print(f"concat T={T}: {concat:,.0f} tokens/s")
        row = {"part": "A", "T": T, "tokens": tokens, "ms_per_step": {L: t[L] * 1e3 for L in t},
               "concat_tokens_per_s": concat, "dd": []}
        for name, lengths in corpora.items():
            for overflow in ("random", "greedy"):
                bt = bucket_tokens(lengths, T, overflow)
                total = sum(bt.values())
                time_per_epoch = sum(bt[L] / tokens * t[L] for L in bt)  # n_i = tokens_i / b
                dd = total / time_per_epoch
                share = {L: bt[L] / total for L in bt}
                print(f"dd     T={T} on {name}, {overflow} overflow: {dd:,.0f} tokens/s  "
                      f"ratio_dd_over_concat={dd / concat:.2f}  (token share per bucket "
                      + " ".join(f"{L}:{v:.2f}" for L, v in share.items()) + ")", flush=True)
                row["dd"].append({"corpus": name, "overflow": overflow, "tokens_per_s": dd,
                                  "ratio": dd / concat, "share": share})
        append_row(row)


MODES = {"concat": ["data.mode=concat"], "pack": ["data.mode=pack"],
         "dd": ["data.mode=dd", "data.min_bucket=64", "data.curriculum=grow_p2", "data.cycles=8"],
         "dd_greedy": ["data.mode=dd", "data.min_bucket=64", "data.curriculum=grow_p2",
                       "data.cycles=8", "data.dd_overflow=greedy"]}


def part_b(steps: int, batch: int, seq_len: int, rows: list[dict]) -> None:
    from jaxlm.config import ASSETS, load_config
    from jaxlm.data import make_data_source
    from jaxlm.train.loop import run
    from jaxlm.train.step import evaluate
    from jaxlm.train.step import make_eval_step

    text = open(os.path.join(ASSETS, "wikitext-2", "valid.txt"), encoding="utf-8").read()
    arts = [a for a in re.split(SEP[3:], text) if a.strip()]
    tmp = tempfile.mkdtemp(prefix="jaxlm_ddq_")
    train, held = os.path.join(tmp, "train.txt"), os.path.join(tmp, "heldout.txt")
    with open(train, "w") as f:
        f.write("\n".join(a for i, a in enumerate(arts) if i % 10 != 9))
    with open(held, "w") as f:
        f.write("\n".join(a for i, a in enumerate(arts) if i % 10 == 9))
    print(f"\nPart B: {len(arts)} articles -> {sum(i % 10 != 9 for i in range(len(arts)))} train "
          f"/ {sum(i % 10 == 9 for i in range(len(arts)))} held-out; {steps} steps x {batch} x "
          f"{seq_len} = {steps * batch * seq_len:,} tokens per mode", flush=True)
    common = MODEL + [f"data.path={train}",
              f"data.val_path={held}", f"data.doc_separator={SEP}", f"data.seq_len={seq_len}",
              f"data.cache_dir={os.path.join(tmp, 'cache')}", f"train.batch_size={batch}",
              f"train.steps={steps}", "train.warmup_steps=20", "train.lr=3e-3",
              "train.log_every=50", "train.eval_every=0", "train.eval_batches=16",
              "ckpt.every=0", "train.sample_tokens=0"]
    dcfg = load_config("configs/tiny.yaml", common + ["data.mode=pack"]).data
    sets = {"docs": make_data_source(dcfg), "stream": make_data_source(
        load_config("configs/tiny.yaml", common + ["data.mode=concat"]).data)}
    sets = {k: s.eval_batches(batch_size=batch, num_batches=16) for k, s in sets.items()}
    for mode, extra in MODES.items():
        key = dict(part="B", mode=mode, steps=steps, batch=batch, seq_len=seq_len)
        old = [r for r in rows if all(r.get(k) == v for k, v in key.items())]
        if old:
            print(f"skip {mode} (in {RESULTS}): held-out bpb docs {old[0]['bpb_docs']:.4f}")
            continue
        t0 = time.perf_counter()
        cfg = load_config("configs/tiny.yaml", common + [f"out_dir={os.path.join(tmp, mode)}",
                                                         *extra])
        res = run(cfg)
        ev = make_eval_step(res["spec"])
        bpb = {k: evaluate(ev, res["state"]["params"], b, res["spec"].mesh)["bpb"]
               for k, b in sets.items()}
        share = make_data_source(cfg.data).stats.get("token_share") if "dd" in mode else None
        wall = time.perf_counter() - t0
        print(f"{mode:9s} train loss {res['loss']:.3f}  held-out bpb: docs {bpb['docs']:.4f}  "
              f"stream {bpb['stream']:.4f}  ({wall:.0f} s)"
              + (f"  token share {share}" if share else ""), flush=True)
        append_row(dict(key, train_loss=res["loss"], bpb_docs=bpb["docs"],
                        bpb_stream=bpb["stream"], wall_s=round(wall), token_share=share))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/dd_vs_concat.py")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per step (part A)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per shape (part A)")
    ap.add_argument("--train-steps", type=int, default=120, help="steps per mode (part B)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--fresh", action="store_true", help=f"ignore (do not skip) {RESULTS}")
    ns = ap.parse_args(argv)
    rows = [] if ns.fresh else load_rows()
    if not ns.skip_throughput:
        part_a(ns.contexts, ns.tokens, ns.steps, rows)
    if not ns.skip_quality:
        part_b(ns.train_steps, batch=8, seq_len=512, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
