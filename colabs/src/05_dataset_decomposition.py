# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Dataset Decomposition: variable sequence length batches
#
# Concat-and-chunk glues documents together and cuts fixed windows, so most windows mix
# unrelated documents and every token pays attention over the full context. **Dataset
# Decomposition** (Pouransari et al., NeurIPS 2024, arXiv 2405.13226) cuts each document into
# power-of-two pieces, groups pieces of equal length into buckets, and trains on one bucket per
# step with the *same number of tokens* in every step, following a short-to-long curriculum. We
# picture the decomposition, histogram the buckets of two bundled corpora (WikiText-2 articles
# in `jaxlm/assets/wikitext-2`, tinyshakespeare speeches), check the tokens per step, time each
# bucket, and compare DD with concat. Module: `jaxlm/data/bucketing.py` (`data.mode=dd`).
# Last, a corpus prepared once with `jaxlm-prepare` and a weighted mixture of two corpora with
# one eval curve per source (`jaxlm/data/prepare.py`, `jaxlm/data/mixture.py`).

# %% shared="install"

# %% shared="params"

# %%
import shutil

import jax
import matplotlib.pyplot as plt
import numpy as np

from jaxlm.config import ASSETS, load_config
from jaxlm.data import decompose, make_data_source
from jaxlm.train.loop import run
from jaxlm.train.step import evaluate, make_eval_step
from jaxlm.utils.flops import measure_peak_flops
from jaxlm.utils.inspect import read_metrics

# %% [markdown] shared="runtime"
#

# %% shared="devices"

# %% [markdown]
# ## 1. The binary decomposition of a document
#
# A document of n tokens (its end-of-text included) is cut into adjacent pieces by the
# binary expansion of n, largest first (DD §2.1): n = 2^{i₁} + 2^{i₂} + …, and the piece of
# length 2^i goes to bucket D_i. While at least twice the largest bucket is left, the next
# piece's length is *drawn* with P(2^k) ∝ 2^(max−k) (`data.dd_overflow=random`, the default of
# the authors' `get_binary(..., randomize=True)`), so long documents feed every bucket equally
# instead of only the largest (`greedy`, the repo's `randomize=False`); the draw is seeded, so
# every process and every restart cuts the same pieces. A remainder shorter than the smallest
# bucket is dropped. Every piece is one training row from a single document, so no attention
# mask is needed and no token attends across documents. The 1500- and 2600-token documents
# below are cut both ways.

# %%
buckets = [32, 64, 128, 256, 512]
docs = [1000, 700, 300, 90, 1500, 1500, 2600, 2600]
rule = ["greedy"] * 4 + ["greedy", "random"] * 2
colors = {L: plt.cm.viridis(i / (len(buckets) - 1)) for i, L in enumerate(buckets)}
fig, ax = plt.subplots(figsize=(11, 3.6))
for row, (n, how) in enumerate(zip(docs, rule)):
    start = 0
    pieces = decompose(n, buckets, np.random.default_rng(row) if how == "random" else None)
    for L in pieces:
        ax.barh(row, L, left=start, color=colors[L], edgecolor="white")
        ax.text(start + L / 2, row, str(L), ha="center", va="center", fontsize=8, color="w")
        start += L
    ax.barh(row, n - start, left=start, color="lightgray")  # dropped remainder
    print(f"{n:5d} tokens ({how}) -> pieces {pieces}, {n - start} dropped")
ax.set_yticks(range(len(docs)), [f"{n} ({how})" for n, how in zip(docs, rule)])
ax.invert_yaxis()
ax.set_xlabel("token position (gray: shorter than the smallest bucket, dropped)")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 2. Buckets of real corpora
#
# Two bundled corpora with very different document lengths. **WikiText-2** (validation
# file, `jaxlm/assets/wikitext-2`): 60 long Wikipedia articles, split at each
# ` = Title = ` line by the regular expression below (`data.doc_separator`, see its
# `SOURCE.md`). **tinyshakespeare** split at blank lines (the default separator `"\n\n"`):
# thousands of short speeches. `make_data_source` with `data.mode=dd` tokenizes a corpus once
# (bytes here; cached and memory-mapped), decomposes every document (`piece_table`) and
# counts pieces per bucket. The long articles are mostly overflow: the randomized rule spreads
# their tokens about evenly over the buckets (with `greedy` pieces, ~99% would sit in the
# largest bucket); short speeches fill the small buckets by their own lengths — the speed-up DD
# can give depends on this histogram (DD reports 512 as RefinedWeb's heaviest bucket).

# %%
SEP = "re:\\n(?= = [^=].* = \\n)"  # a WikiText article starts at a " = Title = " line
CTX = 256 if TINY else 1024  # the largest bucket = the model's context
dd = [f"data.seq_len={CTX}", "data.min_bucket=32", f"data.cache_dir={OUT}/05_cache",
      "data.cycles=4" if TINY else "data.cycles=8", "data.curriculum=grow_p2"]
corpora = {"WikiText-2 articles": [f"data.path={ASSETS}/wikitext-2/valid.txt",
                                   f"data.doc_separator={SEP}"],
           "tinyshakespeare speeches": []}
sources = {name: make_data_source(load_config("tiny", extra + dd + ["data.mode=dd"]).data)
           for name, extra in corpora.items()}
fig, axes = plt.subplots(2, 2, figsize=(11, 6))
for (name, src), (ax1, ax2) in zip(sources.items(), axes):
    lengths, pieces = src.train.doc_lengths(), src.stats["pieces"]
    ax1.hist(lengths, bins=np.logspace(0.5, np.log10(lengths.max() + 1), 25))
    ax1.set(xscale="log", xlabel="document length (bytes)", ylabel="documents",
            title=f"{name}: {len(lengths)} documents")
    ax2.bar([str(L) for L in sorted(pieces)], [L * pieces[L] for L in sorted(pieces)])
    ax2.set(xlabel="bucket (sequence length)", ylabel="tokens", title="tokens per bucket")
    print(f"{name}: pieces per bucket {pieces}, dropped tokens {src.stats['dropped_tokens']}")
plt.tight_layout(); plt.show()
src = sources["tinyshakespeare speeches"]  # used from here on

# %% [markdown]
# ## 3. Same tokens in every step, a curriculum over lengths
#
# Variable sequence length batching (DD §2.2): with b = batch_size × seq_len tokens per step,
# bucket i supplies b / 2^i rows of length 2^i, so the loss always averages over b tokens
# while short steps cost less attention. The curriculum (DD §3.3, Algorithm 1; Grow-P2 with
# c cycles) splits the *training run* (`train.steps`, which the training loop passes to the
# data source as `total_steps`) into c cycles, each holding the buckets in proportion to their
# size, and draws bucket i with odds o_i ∝ 2^{K−1−i} among the buckets that still have batches
# in the cycle: each cycle starts short and ends long. (`data.curriculum_weights=repo` weights
# the odds by each bucket's tokens, as the authors' `get_dd_params.py` does; the two agree when
# the buckets are equal, as in the paper's ablation.)

# %%
RUN = 40 if TINY else 300  # the training run of section 4
it = src.train_iterator(batch_size=8, seed=0, total_steps=RUN)
for step in range(6):
    x = next(it)["inputs"]
    print(f"step {step}: batch {x.shape[0]:3d} x {x.shape[1]:4d} = {x.size} tokens")
sched, _ = src.schedule.epoch(0)
plt.figure(figsize=(11, 2.5))
plt.plot(np.asarray(src.buckets)[sched], ".", ms=3)
for j in range(1, src.schedule.cycles):
    plt.axvline(j * RUN / src.schedule.cycles, c="gray", lw=0.5)
plt.yscale("log", base=2); plt.xlabel(f"step of the {RUN}-step run"); plt.ylabel("sequence length")
plt.title("Grow-P2 curriculum: every cycle goes short -> long"); plt.show()

# %% [markdown]
# ## 4. Step time per bucket, and DD vs concat
#
# We train the same small model on tinyshakespeare twice with equal tokens per step:
# `data.mode=concat` (fixed windows of CTX bytes) and `data.mode=dd`. With `train.log_every=1` every line of
# `metrics.jsonl` carries that step's `seq_len` and `step_time_s` (steps that compile a
# new shape are left out, time 0). The per-step cost is ∝ b·(c_mlp + 2^i·c_attn): it falls
# with shorter buckets, a lot at long contexts (see `bench/RESULTS.md`: 1.8–4.8× the
# tokens/s of concat at 8192 context), a little at this toy size where the MLP and output
# layer dominate (and on a shared CPU, expect ±30% noise between runs). Both models are then scored on the *same* held-out documents
# (`jaxlm.train.loop.evaluate` on DD's validation batches).

# %%
steps = RUN
train = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.d_ff=256",
         "train.batch_size=8", f"train.steps={steps}", "train.log_every=1",
         "train.eval_every=0", "train.eval_batches=4", "train.warmup_steps=5",
         "ckpt.every=0", "train.sample_tokens=0",
         f"peak_flops={measure_peak_flops('float32', n=1024)}"]  # measured once for MFU
runs = {}
for mode in ("concat", "dd"):
    cfg = load_config("tiny", dd + train + [f"data.mode={mode}",
                                                        f"out_dir={OUT}/05_{mode}"])
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    runs[mode] = run(cfg)

m = {mode: read_metrics(r["out_dir"])["train"] for mode, r in runs.items()}
mdd = m["dd"]
timed = mdd["step_time_s"] > 0
print("loss tokens per step (dd):", sorted(set(mdd["tokens"].astype(int))))
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
for L in src.buckets:
    t = mdd["step_time_s"][timed & (mdd["seq_len"] == L)]
    if t.size:
        ax1.plot([L] * t.size, 1e3 * t, "o", alpha=0.5)
        print(f"bucket {L:4d}: median {1e3 * np.median(t):6.1f} ms/step over {t.size} steps")
c = m["concat"]["step_time_s"][m["concat"]["step_time_s"] > 0]
ax1.axhline(1e3 * np.median(c), c="k", ls=":", label=f"concat, length {CTX}")
ax1.set_xscale("log", base=2)
ax1.set(xlabel="bucket length", ylabel="ms / step", title="step time per bucket")
ax1.legend()
for mode, mm in m.items():
    ax2.plot(np.cumsum(mm["tokens"]), mm["loss"], label=mode)
ax2.set(xlabel="training tokens", ylabel="train loss", title="loss vs tokens"); ax2.legend()
plt.tight_layout(); plt.show()

held = src.eval_batches(batch_size=8, num_batches=4)
for mode, r in runs.items():
    ev = evaluate(make_eval_step(r["spec"]), r["state"]["params"], held, r["spec"].mesh)
    tps = np.median(m[mode]["tokens_per_s"][m[mode]["tokens_per_s"] > 0])
    print(f"{mode:6s} held-out documents: {ev['bpb']:.3f} bits/byte | median {tps:,.0f} tokens/s")

# %% [markdown]
# ## 5. Corpora at scale: prepared shards and a weighted mixture
#
# A real corpus is tokenized once with `jaxlm-prepare` (`jaxlm.data.prepare.prepare` here):
# sharded token files + a `manifest.json`, with documents held out by content hash. Any
# `data.mode` reads it through `data.path`, memory-mapping only the shards a process needs.
# `data.sources` then mixes several corpora by weight (grain's `IterDataset.mix` over whole
# batches), and every eval line carries `eval_bpb/<name>` per source next to the pooled
# `eval_bpb` — the curves people watch for domain balance and forgetting. Here: tinyshakespeare
# and WikiText-2 at 3 : 1.

# %%
import json
import os
import re

from jaxlm.data.prepare import prepare

# WikiText's articles as JSONL, one {"text": ...} per article (a .txt is cut at blank lines,
# which WikiText does not have: its "blank" lines hold a space)
wiki = open(f"{ASSETS}/wikitext-2/valid.txt", encoding="utf-8").read()
os.makedirs(OUT, exist_ok=True)
with open(f"{OUT}/05_wiki.jsonl", "w", encoding="utf-8") as f:
    for article in re.split(r"\n(?= = [^=].* = \n)", wiki):
        f.write(json.dumps({"text": article}) + "\n")

prepared = {}
for name, text in (("shakespeare", f"{ASSETS}/tinyshakespeare/input.txt"),
                   ("wiki", f"{OUT}/05_wiki.jsonl")):
    prepared[name] = f"{OUT}/05_prepared_{name}"
    m = prepare([text], prepared[name], tokenizer="byte", val_fraction=0.05,
                docs_per_shard=1024, progress=False)
    print(f"{name:11s} train {m['splits']['train']['docs']:,} documents, "
          f"{m['splits']['train']['tokens']:,} tokens in {len(m['splits']['train']['shards'])} "
          f"shards; held out {m['splits']['val']['docs']} documents")

mix = ("data.sources=[{name: shakespeare, path: " + prepared["shakespeare"] + ", weight: 3}, "
       "{name: wiki, path: " + prepared["wiki"] + ", weight: 1}]")
cfg = load_config("tiny", [mix, f"out_dir={OUT}/05_mixture", f"train.steps={RUN}",
                           "train.eval_every=20", "train.eval_batches=4", "ckpt.every=0"])
shutil.rmtree(cfg.out_dir, ignore_errors=True)
run(cfg)
ev = read_metrics(cfg.out_dir)["eval"]
plt.figure(figsize=(6, 3.5))
plt.plot(ev["step"], ev["eval_bpb"], "k-", label="pooled eval_bpb")
for name in prepared:
    plt.plot(ev["step"], ev[f"eval_bpb/{name}"], "o-", label=f"eval_bpb/{name}")
plt.xlabel("step"); plt.ylabel("bits per byte"); plt.legend()
plt.title("one mixture, one curve per source"); plt.show()
