"""Input-pipeline throughput of each data mode (concat, pack, dd) vs what a train step consumes.

For each mode: build the data source on the bundled WikiText-2 validation articles (tokenized once
into the cache first, so this times the grain pipeline, not the tokenizer), pull ``--warmup``
batches, then time ``--batches`` batches: ``tokens/s = batches × tokens per batch / seconds``
(tokens = rows × seq_len, padding included). Then time the train step of a small model
(``--model`` overrides; default the tiny test model, vocab 50304, 4 rows of ``--seq-len``) on
one batch, so the printed ``headroom = pipeline tokens/s ÷ train-step tokens/s`` says how far
the pipeline is from being the bottleneck on this machine. A larger model only consumes fewer tokens/s.

The pipeline runs in this process with grain's thread prefetch (2 threads), as in training.

Example (from the repository root)::

    python bench/data_throughput.py                              # gpt2, seq_len 1024, batch 16
    python bench/data_throughput.py --tokenizer byte --seq-len 4096 --batch 4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SEP = "re:\\n(?= = [^=].* = \\n)"  # WikiText: a new article at every " = Title = " line


def pipeline_tps(src, batch_size: int, n: int, warmup: int) -> tuple[float, int]:
    it = src.train_iterator(batch_size=batch_size, seed=0)
    for _ in range(warmup):
        next(it)
    t0, tokens = time.perf_counter(), 0
    for _ in range(n):
        b = next(it)
        tokens += b["inputs"].size
    return tokens / (time.perf_counter() - t0), tokens // n


def train_step_tps(batch: dict, overrides: list[str], steps: int = 2) -> float:
    import jax

    from jaxlm.config import load_config
    from jaxlm.optim import build_optimizer
    from jaxlm.sharding import host_to_global, make_mesh
    from jaxlm.train.state import StateSpec
    from jaxlm.train.step import make_train_step

    rows, seq = batch["inputs"].shape
    cfg = load_config("configs/tiny.yaml", [f"train.batch_size={rows}", f"data.seq_len={seq}",
                                            "model.vocab_size=50304", "mesh.fsdp=-1", *overrides])
    spec = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
    state, step = spec.init(), make_train_step(spec)
    g = host_to_global(batch, spec.mesh)
    state, m = step(state, g)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, g)
    jax.block_until_ready(m)
    return rows * seq * steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/data_throughput.py")
    ap.add_argument("--tokenizer", default="gpt2")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--model", nargs="*", default=[], help="overrides of the consuming model")
    ns = ap.parse_args(argv)

    from jaxlm.config import ASSETS, DataConfig
    from jaxlm.data import make_data_source

    path = os.path.join(ASSETS, "wikitext-2", "valid.txt")
    cache = os.path.join(tempfile.gettempdir(), "jaxlm_bench_cache")
    common = dict(path=path, doc_separator=SEP, tokenizer=ns.tokenizer, seq_len=ns.seq_len,
                  cache_dir=cache)
    results, batch = {}, None
    for mode, extra in (("concat", {}), ("pack", {}), ("dd", {"min_bucket": 64})):
        src = make_data_source(DataConfig(mode=mode, **common, **extra))
        tps, per_batch = pipeline_tps(src, ns.batch, ns.batches, ns.warmup)
        results[mode] = tps
        print(f"{mode:7s} pipeline {tps:14,.0f} tokens/s  ({per_batch:,} tokens/batch, "
              f"{ns.batches} batches)", flush=True)
        if mode == "concat":
            b = next(src.train_iterator(batch_size=ns.batch, seed=0))
            batch = {k: v[:min(ns.batch, 4)] for k, v in b.items()}  # tokens/s: 4 rows suffice
    step = train_step_tps(batch, ns.model)
    print(f"train step (tiny model, vocab 50304, [{len(batch['inputs'])}, {ns.seq_len}]) "
          f"{step:,.0f} tokens/s")
    for mode, tps in results.items():
        print(f"headroom_{mode}={tps / step:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
