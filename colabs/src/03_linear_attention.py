# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Linear attention: Lightning Attention-2 and TransNormerLLM
#
# Causal linear attention with a per-head decay replaces softmax's T × T attention with a
# fixed-size recurrent state, so training cost grows linearly with length and generation needs
# O(1) memory per token. We check that the three forms of `jaxlm.ops.linear_attention` (naive,
# recurrent, chunked Lightning-2) agree, picture the decay matrix, time it against softmax,
# train TransNormerLLM (TNL), softmax and a hybrid on tinyshakespeare, and watch the decode
# state stay constant. Papers: TransNormerLLM (Qin et al. 2023, arXiv 2307.14995) and
# Lightning Attention-2 (Qin et al. 2024, arXiv 2401.04658); modules `jaxlm/ops/linear_attention.py`
# and `jaxlm/model/linear.py`.

# %% shared="install"

# %% shared="params"

# %%
import shutil

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from jaxlm.config import load_config
from jaxlm.model.linear import tnl_log_decay
from jaxlm.ops import attention, linear_attention
from jaxlm.sample import sample_text
from jaxlm.train.loop import run
from jaxlm.utils.flops import measure_peak_flops
from jaxlm.utils.inspect import linear_attention_matrix, read_metrics, time_call, tree_bytes

# %% [markdown] shared="runtime"
#

# %% shared="devices"

# %% [markdown]
# ## 1. One operator, three forms
#
# Per head, with decay λ = e^g ≤ 1 (Lightning Attention-2 §3.1, eqs. 2–4; TNL eq. 10):
#
# $$S_t = \lambda S_{t-1} + k_t v_t^\top,\qquad o_t = q_t^\top S_t
# \quad\Longleftrightarrow\quad O = \big[(QK^\top)\odot M\big]V,\; M_{ts} = \lambda^{t-s}\,[s\le t].$$
#
# The **naive** form builds the T × T matrix (O(T²), a reference); the **recurrent** form
# scans tokens with the d × d state S (O(1) memory per step: decoding); the **chunked**
# form (Lightning-2, Alg. 1) does the masked product inside chunks of C tokens and carries
# S between chunks, O(T·C·d + T·d²). No softmax and no 1/√d: TNL normalises the output
# instead. The three must agree to float32 rounding.

# %%
B, T, H, K = 2, 200, 4, 16
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q, k, v = (0.3 * jax.random.normal(key, (B, T, H, K)) for key in (kq, kk, kv))
g = tnl_log_decay(H, layer=0, n_layers=4)  # log λ per head (ALiBi slopes, layer 0)
la = jax.jit(linear_attention, static_argnames=("form", "chunk_size", "return_state"))
outs = {form: la(q, k, v, g, form=form, chunk_size=64, return_state=True)
        for form in ("naive", "recurrent", "chunked")}
for form in ("recurrent", "chunked"):
    do = float(jnp.max(jnp.abs(outs[form][0] - outs["naive"][0])))
    ds = float(jnp.max(jnp.abs(outs[form][1] - outs["naive"][1])))
    print(f"{form:9s} vs naive: max |Δo| = {do:.2e}, max |Δ final state| = {ds:.2e}")
print("λ per head:", np.round(np.exp(np.asarray(g)), 4))

# %% [markdown]
# ## 2. The decay matrix
#
# `linear_attention_matrix` recovers M from the kernel itself (unit q·k and one-hot values
# make output row t equal to row t of M). TNL's decay (official code schedule, notes §1.3):
# head h has slope s_h = 2^{−8(h+1)/H} (ALiBi), scaled by the layer factor 1 − l/(L−1), and
# λ = e^{−s}. Early heads forget within a few tokens (local, like n-gram features), late
# heads keep a long memory; the last layer has almost no decay at all.

# %%
n_layers, Tm = 4, 48
fig, axes = plt.subplots(2, H, figsize=(12, 6))
for row, layer in enumerate((0, n_layers - 1)):
    M = linear_attention_matrix(tnl_log_decay(H, layer, n_layers), Tm)  # [H, T, T]
    for h in range(H):
        axes[row, h].imshow(M[h], vmin=0, vmax=1, cmap="viridis")
        axes[row, h].set_title(f"layer {layer}, head {h}", fontsize=9)
        axes[row, h].axis("off")
fig.suptitle("M_ts = λ^(t−s) for s ≤ t (rows: query t, columns: key s)")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 3. Speed versus length
#
# With the tokens per call fixed (B·T constant), softmax attention costs O(T) per token —
# every token attends to all earlier ones — while chunked linear attention costs a constant
# 2·C·d + 2·d² per token. We time forward + backward of the attention op alone (compile
# excluded, best of a few calls; `bench/attention_scaling.py` is the full benchmark, with
# numbers in `bench/RESULTS.md`). On a CPU the crossover is early; on a GPU, fused flash
# attention moves it to a few thousand tokens.

# %%
lengths = [128, 256, 512, 1024] if TINY else [512, 1024, 2048, 4096, 8192]
tokens, Hs, Dh = lengths[-1], 4, 32
log_g = tnl_log_decay(Hs, 0, 4)

def fwd_bwd(kind):
    def loss(q, k, v):
        o = attention(q, k, v) if kind == "softmax" else linear_attention(q, k, v, log_g)
        return jnp.sum(o * o)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

us = {"softmax": [], "lightning (chunked linear)": []}
for T_ in lengths:
    x = jax.random.normal(jax.random.key(1), (tokens // T_, T_, Hs, Dh)) * 0.3
    for kind in us:
        us[kind].append(1e6 * time_call(fwd_bwd(kind), x, x, x, reps=2) / tokens)
for kind, ys in us.items():
    plt.plot(lengths, ys, "o-", label=kind)
plt.xscale("log", base=2); plt.xlabel("sequence length T (B·T fixed)")
plt.ylabel("µs per token (fwd + bwd)"); plt.legend(); plt.title("attention cost per token")
plt.show()
print({k: [round(y, 2) for y in v] for k, v in us.items()})

# %% [markdown]
# ## 4. Training TNL vs softmax vs a hybrid
#
# Three presets share shape, data and schedule: `configs/shakespeare.yaml` (LLaMA, softmax +
# RoPE), `configs/tnl_shakespeare.yaml` (every layer a TNL block: SiLU q/k, Lightning
# attention with decay, SRMSNorm, output gate, LRPE on layer 0, SGLU channel mixer; TNL
# §3) and `configs/hybrid_shakespeare.yaml` (`model.layer_pattern=LLLS`: three TNL layers
# then one softmax layer, the MiniMax-01 / Qwen3-Next recipe). In `tiny` mode the models
# have 2 layers (the hybrid is `LS`) and train for a few dozen steps: enough to see all
# three learn, not to rank them (see `bench/RESULTS.md` for 300-step numbers).

# %%
tiny = ["model.d_model=64", "model.n_layers=2", "model.d_ff=160", "data.seq_len=64",
        "train.steps=40", "train.warmup_steps=5", "train.log_every=5",
        "train.eval_every=0", "train.eval_batches=2", "ckpt.every=0"]
PEAK = measure_peak_flops("float32", n=1024)  # once, for the MFU column (else once per run)
presets = {"softmax": ("shakespeare", []),
           "TNL": ("tnl_shakespeare", []),
           "hybrid": ("hybrid_shakespeare", ["model.layer_pattern=LS"] if TINY else [])}
runs = {}
for name, (preset, extra) in presets.items():
    cfg = load_config(preset, [f"out_dir={OUT}/03_{name}", "train.sample_tokens=0",
                               f"peak_flops={PEAK}"] + (tiny + extra if TINY else extra))
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    runs[name] = run(cfg)
for name, r in runs.items():
    m = read_metrics(r["out_dir"])["train"]
    plt.plot(m["step"], m["loss"], label=f"{name} (held-out {r['eval']['loss']:.3f})")
plt.xlabel("step"); plt.ylabel("train loss (nats/byte)"); plt.legend(); plt.show()

# %% [markdown]
# ## 5. Generation with an O(1) state
#
# A softmax layer must keep every past key and value: its KV cache is
# 2 · L · B · T · KV · K numbers and grows with the generated length T. A linear-attention
# layer keeps only its state S (H × K × V numbers per layer and sequence):
# `Transformer.init_cache(batch, max_len)` for TNL ignores `max_len`. We measure the cache
# pytrees with `jax.eval_shape` (no memory is allocated) and then sample from the TNL model;
# each decode step is the recurrent form, o_t = q_tᵀ(λS + k_t v_tᵀ).

# %%
max_lens = [128, 512, 2048, 8192, 32768]
cache = {}
for name in ("softmax", "TNL", "hybrid"):
    model = runs[name]["spec"].model(runs[name]["state"]["params"])
    cache[name] = [tree_bytes(jax.eval_shape(lambda n=n: model.init_cache(1, n)))
                   for n in max_lens]
    plt.plot(max_lens, np.array(cache[name]) / 2**10, "o-", label=name)
plt.xscale("log", base=2); plt.yscale("log"); plt.xlabel("max generated length")
plt.ylabel("decode cache (KiB, batch 1)"); plt.legend(); plt.show()
for name, b in cache.items():
    print(f"{name:8s}", [f"{x / 2**10:.0f} KiB" for x in b])

r = runs["TNL"]
print(sample_text(r["spec"].graphdef, r["state"]["params"], r["tokenizer"], "ROMEO:",
                  max_new_tokens=120, temperature=0.8, top_k=40, seed=0))
