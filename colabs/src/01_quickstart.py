# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # jaxlm quickstart: train, plot, sample, evaluate — and a Hugging Face model in and out
#
# Train the default jaxlm model — a ~0.9M-parameter byte-level LLaMA on the bundled
# tinyshakespeare (the `shakespeare` preset) — then plot its loss curve from `metrics.jsonl`,
# sample text from it and measure bits-per-byte. Every step is one call of jaxlm's public API
# (`jaxlm.config.load_config`, `jaxlm.train.loop.run`, `jaxlm.sample.sample_text`,
# `jaxlm.eval.evaluate_file`), the same functions behind the `jaxlm-train`, `jaxlm-sample` and
# `jaxlm-eval` commands. How data flows through `run()` is drawn in
# [`docs/architecture.md`](../docs/architecture.md).

# %% shared="install"

# %% shared="params"

# %%
import shutil

import jax
import matplotlib.pyplot as plt
import numpy as np

from jaxlm.config import DEFAULT_CORPUS, load_config
from jaxlm.eval import evaluate_file
from jaxlm.sample import sample_text
from jaxlm.train.loop import run
from jaxlm.utils.inspect import read_metrics

# %% [markdown] shared="runtime"
#

# %% shared="devices"

# %% [markdown]
# ## 1. The configuration
#
# A run is one frozen `Config`: a YAML preset plus `section.key=value` overrides, parsed and
# validated by `load_config` (a typo or an impossible combination is a one-line
# `ConfigError`, never a silently different model). `tiny` shrinks the model, the context
# and the number of steps; `real` is the preset as shipped (400 steps of 16 × 128 bytes).

# %%
overrides = [f"out_dir={OUT}/01_quickstart", "train.sample_tokens=0"]
if TINY:
    overrides += ["model.d_model=64", "model.d_ff=192", "model.n_layers=2",
                  "data.seq_len=64", "train.steps=60", "train.warmup_steps=6",
                  "train.log_every=5", "train.eval_every=30", "train.eval_batches=2",
                  "ckpt.every=0"]
cfg = load_config("shakespeare", overrides)
shutil.rmtree(cfg.out_dir, ignore_errors=True)  # a run resumes from a checkpoint: start fresh
print(cfg.model)
print(cfg.train)

# %% [markdown]
# ## 2. Train
#
# `run(cfg)` is the whole job: it builds the device mesh, the data pipeline (grain, bytes of
# tinyshakespeare; the last 10% held out), a sharded train state (a plain pytree of
# parameters and AdamW moments), and a `jax.jit`-compiled train step with explicit shardings
# and buffer donation. Metrics are fetched from the device only every `train.log_every`
# steps and appended to `<out_dir>/metrics.jsonl`; a checkpoint is written at the end, so
# re-running `run` on the same `out_dir` would *resume* rather than start over. It returns
# the final state and the held-out evaluation.

# %%
result = run(cfg)
print({k: round(v, 4) for k, v in result["eval"].items()})

# %% [markdown]
# ## 3. The loss curve
#
# Each line of `metrics.jsonl` is one JSON object: train lines carry `loss`, `lr`,
# `grad_norm`, `tokens_per_s`, …; eval lines carry `eval_loss`, `eval_ppl`, `eval_bpb`.
# `jaxlm.utils.inspect.read_metrics` turns them into numpy columns. The loss is in nats per
# byte: it starts near ln 257 ≈ 5.55 (a uniform guess over the byte vocabulary), drops below
# ln 65 ≈ 4.17 (uniform over the 65 characters Shakespeare uses) within a few steps, and
# keeps falling as the model learns spelling and then words.

# %%
m = read_metrics(cfg.out_dir)
train, ev = m["train"], m["eval"]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
ax1.plot(train["step"], train["loss"], label="train loss")
ax1.plot(ev["step"], ev["eval_loss"], "o-", label="held-out loss")
ax1.axhline(np.log(65), ls=":", c="gray", label="uniform over 65 chars")
ax1.set(xlabel="step", ylabel="nats / byte", title="loss"); ax1.legend()
ax2.plot(train["step"], train["lr"])
ax2.set(xlabel="step", ylabel="learning rate", title="warmup + cosine schedule")
plt.tight_layout(); plt.show()
print(f"last train loss {train['loss'][-1]:.3f}; {np.nanmedian(train['tokens_per_s']):,.0f} tokens/s")

# %% [markdown]
# ## 4. Sample
#
# `sample_text` prefills the prompt once and then decodes one token per step with a
# KV cache inside one compiled `lax.fori_loop`; `temperature`, `top_k` and `top_p` reshape
# the next-token distribution (temperature 0 = greedy). `context=seq_len` keeps every
# position inside the trained range by re-prompting with the last half-window when it
# fills. A tiny model after a minute writes Shakespeare-*shaped* text (names, line breaks,
# short words); the `real` preset gets recognisable words.

# %%
spec, params, tok = result["spec"], result["state"]["params"], result["tokenizer"]
print(sample_text(spec.graphdef, params, tok, "ROMEO:", max_new_tokens=200,
                  temperature=0.8, top_k=40, seed=0, context=cfg.data.seq_len))

# %% [markdown]
# ## 5. Evaluate bits-per-byte
#
# `evaluate_file` restores the latest checkpoint of a run and scores a text file window by
# window: loss = Σ nll / Σ tokens, perplexity = e^loss and
# **bits-per-byte = Σ nll / (ln 2 · Σ UTF-8 bytes of the targets)**, which compares models
# with different tokenizers (for bytes it is simply loss / ln 2). Here we score the start of
# the corpus — text the model trained on — and compare with the held-out number from `run`:
# the gap is the generalisation gap. From a shell the same is
# `jaxlm-eval --ckpt <out_dir> --data shakespeare` (a bundled corpus name, or any text file),
# and `jaxlm-sample --ckpt <out_dir> --prompt …` samples.

# %%
seen = evaluate_file(cfg.out_dir, DEFAULT_CORPUS, max_batches=4 if TINY else 32)
held = result["eval"]
print(f"train-text bpb {seen['bpb']:.3f}  |  held-out bpb {held['bpb']:.3f}  "
      f"(loss {held['loss']:.3f} nats/byte, perplexity {held['ppl']:.2f})")

# %% [markdown]
# ## 6. A Hugging Face model in, continued pretraining, and back out
#
# `jaxlm-convert` (`jaxlm.convert.hf`) reads and writes Hugging Face safetensors checkpoints.
# We build a tiny *random* LLaMA in HF format — with transformers when it is installed (as on
# Colab), else by writing its `config.json` and safetensors directly (what the test machine
# does) — with a 257-token vocabulary so that jaxlm's byte tokenizer fits it. Then: import it,
# continue pretraining on tinyshakespeare with 10% replay of WikiText-2 standing in for the
# model's old data (`init_from` + `data.sources`, the recipe of Ibrahim et al. 2024: re-warm,
# re-decay, replay), export the result, and — with transformers — check that its logits in
# transformers equal jaxlm's.

# %%
import json
import os

from jaxlm.convert.hf import hf_to_jaxlm, jaxlm_to_hf

hf_in, hf_out = f"{OUT}/01_hf_in", f"{OUT}/01_hf_out"
shape = {"vocab_size": 257, "hidden_size": 64, "intermediate_size": 192,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 256, "tie_word_embeddings": False}
try:
    import torch
    import transformers
except ImportError:
    transformers = None
shutil.rmtree(hf_in, ignore_errors=True)
if transformers is not None:
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).save_pretrained(hf_in)
else:  # the same files by hand: config.json + model.safetensors (torch's [out, in] layout)
    from safetensors.numpy import save_file

    os.makedirs(hf_in)
    d, f, v, kv = 64, 192, 257, 2 * 16
    rng = np.random.default_rng(0)
    w = lambda *s: (rng.standard_normal(s) * 0.02).astype(np.float32)  # noqa: E731
    tensors = {"model.embed_tokens.weight": w(v, d), "lm_head.weight": w(v, d),
               "model.norm.weight": np.ones(d, np.float32)}
    for i in range(2):
        p = f"model.layers.{i}."
        tensors.update({p + "self_attn.q_proj.weight": w(d, d), p + "self_attn.k_proj.weight":
                        w(kv, d), p + "self_attn.v_proj.weight": w(kv, d),
                        p + "self_attn.o_proj.weight": w(d, d), p + "mlp.gate_proj.weight":
                        w(f, d), p + "mlp.up_proj.weight": w(f, d), p + "mlp.down_proj.weight":
                        w(d, f), p + "input_layernorm.weight": np.ones(d, np.float32),
                        p + "post_attention_layernorm.weight": np.ones(d, np.float32)})
    save_file(tensors, f"{hf_in}/model.safetensors")
    with open(f"{hf_in}/config.json", "w") as fh:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "rms_norm_eps": 1e-6, "rope_theta": 10000.0, **shape}, fh)

shutil.rmtree(f"{OUT}/01_hf_jaxlm", ignore_errors=True)
imported = hf_to_jaxlm(hf_in, f"{OUT}/01_hf_jaxlm")
print(imported.model)

# %%
replay = ("data.sources=[{name: shakespeare, path: shakespeare, weight: 0.9}, "
          "{name: replay, path: wikitext2, weight: 0.1}]")
cont = load_config(f"{OUT}/01_hf_jaxlm/config.yaml", [
    f"out_dir={OUT}/01_hf_continued", f"init_from=ckpt:{OUT}/01_hf_jaxlm", replay,
    "data.seq_len=64", f"train.steps={40 if TINY else 300}", "train.warmup_steps=5",
    "train.eval_every=20", "train.eval_batches=2", "train.sample_tokens=0", "ckpt.every=0"])
shutil.rmtree(cont.out_dir, ignore_errors=True)
done = run(cont)
print({name: f"{m['bpb']:.3f} bpb" for name, m in done["eval"]["sources"].items()})

shutil.rmtree(hf_out, ignore_errors=True)
jaxlm_to_hf(cont.out_dir, hf_out)
print(sorted(os.listdir(hf_out)))
if transformers is not None:  # the exported model in transformers = the model in jaxlm
    ids = np.array([[ord(c) for c in "ROMEO: to be"]])
    hf_logits = transformers.AutoModelForCausalLM.from_pretrained(hf_out)(
        torch.tensor(ids)).logits.detach().numpy()
    ours, _ = done["spec"].model(done["state"]["params"])(jax.numpy.asarray(ids))
    print("max |logits transformers - jaxlm| =", float(np.abs(hf_logits - np.asarray(ours)).max()))

# %% [markdown]
# **Next.** `02_sharding` runs this model on 8 devices four ways; `03_linear_attention`
# swaps softmax for Lightning attention; `04_lowrank_optimizers` trains it with GaLore, Fira
# and low-rank weights; `05_dataset_decomposition` feeds it variable-length batches.
