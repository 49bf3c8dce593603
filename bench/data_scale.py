"""Data at scale (issue #15): prepare throughput, and a loader whose memory and startup do not grow
with the corpus.

    python bench/data_scale.py                        # 2 GB corpus, GPT-2 BPE, 2 processes
    python bench/data_scale.py --gb 0.05 --work /tmp/ds_small     # a quick smoke run

Steps (each is skipped when its result is already in ``WORK/results.json``, so a killed run
resumes; the generated corpora live in ``WORK`` and are never committed):

1. generate ``--gb`` GB of JSONL text (documents of words drawn from the bundled corpora's
   vocabulary, log-normal lengths around 2.5 KB) and a 20 MB corpus made the same way;
2. ``jaxlm-prepare`` both with ``--num-proc`` processes: tokens/s, and the ratio to one
   ``tokenizers`` ``encode_batch`` call (all cores, Rust threads) over the first 64 MB of the same
   text, the ceiling for any Python-driven tokenizer pipeline;
3. for each corpus, in a fresh process: time from "build the data source" to the first batch,
   and the process's peak RSS after 200 batches (median / max of 3 fresh processes) (``data.mode=concat``, seq 1024, 32 rows);
   ``rss_ratio_2gb_vs_20mb=`` and ``startup_ratio_2gb_vs_20mb=`` (target: both <= 1.2);
4. the loader's tokens/s over 200 batches against the train step's consumption (the tokens/s of
   ``configs/bench_tiny_llama.yaml``'s step, measured here): ``loader_over_train_step=``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOADER = r"""
import json, sys, time
t0 = time.perf_counter()
from jaxlm.config import DataConfig
from jaxlm.data.modes import make_data_source
t_import = time.perf_counter()
src = make_data_source(DataConfig(path=sys.argv[1], tokenizer="gpt2", seq_len=1024,
                                  mode=sys.argv[2]))
it = src.train_iterator(batch_size=32, seed=0, **({"total_steps": 1000}
                        if getattr(src, "wants_total_steps", False) else {}))
b = next(it)
t_first = time.perf_counter()
for _ in range(int(sys.argv[3])):
    b = next(it)
t_end = time.perf_counter()
tokens = int(sys.argv[3]) * b["inputs"].size
print(json.dumps({"startup_s": t_first - t_import, "import_s": t_import - t0,
                  "loader_tokens_per_s": tokens / (t_end - t_first),
                  "peak_rss_bytes": int(open("/proc/self/status").read().split("VmHWM:")[1]
                                        .split()[0]) * 1024}))
"""


def words() -> list[str]:
    """The vocabulary of the bundled corpora (so BPE sees realistic English-ish words)."""
    text = ""
    for rel in ("tinyshakespeare/input.txt", "wikitext-2/valid.txt"):
        with open(os.path.join(ROOT, "jaxlm", "assets", rel), encoding="utf-8") as f:
            text += f.read()
    return sorted(set(text.split()))


def generate(out: str, total_bytes: int, seed: int, file_bytes: int = 64 << 20) -> None:
    """JSONL files of ~file_bytes each until total_bytes; idempotent (a finished file is kept)."""
    os.makedirs(out, exist_ok=True)
    vocab = np.array(words())
    rng = np.random.default_rng(seed)
    n_files = max(1, -(-total_bytes // file_bytes))
    for k in range(n_files):
        path = os.path.join(out, f"part-{k:05d}.jsonl")
        if os.path.exists(path):
            continue
        budget, lines = min(file_bytes, total_bytes - k * file_bytes), []
        while budget > 0:
            n_words = int(rng.lognormal(np.log(400), 0.8)) + 1  # ~2.5 KB documents
            doc = " ".join(vocab[rng.integers(0, len(vocab), n_words)])
            lines.append(json.dumps({"text": doc}))
            budget -= len(lines[-1]) + 1
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(path + ".tmp", path)


def prepare(raw: str, out: str, num_proc: int) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "jaxlm.cli", "prepare", raw, "--out", out, "--tokenizer",
           "gpt2", "--num-proc", str(num_proc), "--val-fraction", "0.01", "--no-progress"]
    subprocess.run(cmd, check=True)
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
    return {"prepare_s": time.perf_counter() - t0, "tokens": tokens,
            "text_bytes": m["splits"]["train"]["text_bytes"] + m["splits"]["val"]["text_bytes"],
            "prepare_tokens_per_s": tokens / (time.perf_counter() - t0)}


def encode_batch_ceiling(raw: str, sample_bytes: int = 64 << 20) -> dict:
    """tokens/s of one tokenizers.encode_batch call over the first sample_bytes of the corpus."""
    from jaxlm.data.tokenizer import get_tokenizer

    docs, size = [], 0
    for name in sorted(os.listdir(raw)):
        with open(os.path.join(raw, name)) as f:
            for line in f:
                docs.append(json.loads(line)["text"])
                size += len(docs[-1])
                if size >= sample_bytes:
                    break
        if size >= sample_bytes:
            break
    tok = get_tokenizer("gpt2")
    t0 = time.perf_counter()
    n = sum(len(e.ids) for e in tok._tok.encode_batch(docs))  # the bare Rust call
    return {"encode_batch_tokens_per_s": n / (time.perf_counter() - t0)}


def load(prepared: str, mode: str, batches: int, repeats: int = 3) -> dict:
    """The LOADER script in ``repeats`` fresh processes: median startup and tokens/s, max RSS
    (one run on a shared machine is noisy; the median is what a host would usually see)."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", LOADER, prepared, mode, str(batches)],
                             check=True, capture_output=True, text=True, cwd=ROOT)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = lambda k: float(np.median([r[k] for r in runs]))  # noqa: E731
    return {"startup_s": med("startup_s"), "import_s": med("import_s"),
            "loader_tokens_per_s": med("loader_tokens_per_s"),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs), "runs": runs}


def train_step_tokens_per_s() -> dict:
    sys.path.insert(0, HERE)
    from throughput import run as measure  # bench/throughput.py

    from jaxlm.config import load_config

    r = measure(load_config(os.path.join(ROOT, "configs", "bench_tiny_llama.yaml")), steps=5)
    return {"train_step_tokens_per_s": r["tokens_per_s_median"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gb", type=float, default=2.0)
    p.add_argument("--work", default="/tmp/jaxlm_data_scale")
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--mode", default="concat", help="data.mode of the loader measurements")
    a = p.parse_args(argv)
    res_path = os.path.join(a.work, "results.json")
    res = json.load(open(res_path)) if os.path.exists(res_path) else {}

    def step(key, fn):
        if key not in res:
            res[key] = fn()
            os.makedirs(a.work, exist_ok=True)
            with open(res_path, "w") as f:
                json.dump(res, f, indent=1)
        print(key, json.dumps(res[key]), flush=True)
        return res[key]

    sizes = {"big": int(a.gb * 1e9), "small": 20_000_000}
    for name, size in sizes.items():
        raw, out = os.path.join(a.work, f"raw_{name}"), os.path.join(a.work, f"prep_{name}")
        step(f"generate_{name}", lambda: (generate(raw, size, seed=len(name)), {"bytes": size})[1])
        step(f"prepare_{name}", lambda: prepare(raw, out, a.num_proc))
    ceil = step("ceiling", lambda: encode_batch_ceiling(os.path.join(a.work, "raw_big")))
    for name in sizes:
        step(f"load_{name}_{a.mode}",
             lambda: load(os.path.join(a.work, f"prep_{name}"), a.mode, 200))
    train = step("train_step", train_step_tokens_per_s)
    big, small = res[f"load_big_{a.mode}"], res[f"load_small_{a.mode}"]
    prep = res["prepare_big"]
    print(f"corpus_text_bytes={prep['text_bytes']} corpus_tokens={prep['tokens']}")
    print(f"prepare_tokens_per_s={prep['prepare_tokens_per_s']:.0f} (num_proc={a.num_proc})")
    print(f"prepare_over_encode_batch={prep['prepare_tokens_per_s'] / ceil['encode_batch_tokens_per_s']:.2f}")
    print(f"rss_ratio_2gb_vs_20mb={big['peak_rss_bytes'] / small['peak_rss_bytes']:.3f}")
    print(f"startup_ratio_2gb_vs_20mb={big['startup_s'] / small['startup_s']:.3f}")
    print(f"loader_tokens_per_s={big['loader_tokens_per_s']:.0f}")
    print(f"loader_over_train_step={big['loader_tokens_per_s'] / train['train_step_tokens_per_s']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
