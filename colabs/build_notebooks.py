"""Build the teaching notebooks in ``colabs/`` from the Python source below (no outputs).

Every notebook's cells (markdown and code) are written here, so they are reviewable as code and
regenerable; the ``.ipynb`` files are committed *without outputs* and executed top to bottom in
CI by ``tests/test_notebooks.py`` (with ``JAXLM_NOTEBOOK_SIZE=tiny``; cells tagged ``install``
are skipped). After editing a cell here, regenerate and commit both::

    python colabs/build_notebooks.py            # writes colabs/0*.ipynb
    python colabs/build_notebooks.py --check    # exit 1 if a committed notebook is out of date

Conventions shared by all notebooks: a title, an "Open in Colab" badge and a one-paragraph
purpose; an ``install`` cell (clone + ``pip install -e``, Colab only); a parameter cell reading
``JAXLM_NOTEBOOK_SIZE`` (``tiny``, the default: about a minute on a CPU; ``real``: the full
settings) and ``JAXLM_NOTEBOOK_OUT`` (where runs write); imports; ``jax.devices()`` with runtime
advice. Notebooks call jaxlm's public API only (helpers live in :mod:`jaxlm.utils.inspect`).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = "jaxlm/jaxlm"  # GitHub org/name (pyproject.toml names no repository URL)
HERE = os.path.dirname(os.path.abspath(__file__))


def colab_url(name: str) -> str:
    return f"https://colab.research.google.com/github/{REPO}/blob/main/colabs/{name}.ipynb"


def badge(name: str) -> str:
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"({colab_url(name)})")


def _src(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def md(text: str):
    return ("markdown", _src(text), ())


def code(text: str, *tags: str):
    return ("code", _src(text), tags)


INSTALL = code(f"""
    # Colab: clone the repository (the notebooks read configs/ from it) and install jaxlm.
    # Locally: skip this cell; run `pip install -e ".[notebooks]"` in the repository root and
    # start Jupyter from there (the notebooks expect the repository root as working directory).
    !git clone -q --depth 1 https://github.com/{REPO}.git /content/jaxlm
    !pip install -q -e "/content/jaxlm[notebooks]"
    %cd /content/jaxlm
    """, "install")

PARAMS = """
    import os

    # "tiny" (default): small settings, about a minute on a 2-core CPU; CI runs this.
    # "real": the full settings of the presets (minutes on a CPU, seconds on a GPU/TPU).
    SIZE = os.environ.get("JAXLM_NOTEBOOK_SIZE", "tiny")
    assert SIZE in ("tiny", "real"), f"JAXLM_NOTEBOOK_SIZE={SIZE!r}: use tiny or real"
    TINY = SIZE == "tiny"
    OUT = os.environ.get("JAXLM_NOTEBOOK_OUT", "out/notebooks")  # runs write under here
    print(f"size={SIZE}  outputs under {OUT}/")
    """

RUNTIME = md("""
    **Runtime.** Everything here runs on a CPU (`tiny` takes about a minute). On Colab,
    *Runtime → Change runtime type* offers a free **T4 GPU** (set `JAXLM_NOTEBOOK_SIZE=real` and
    the runs take seconds) or a **TPU v5e-1**; Colab's preinstalled `jax` already targets them.
    jaxlm runs the same code on all three — only `jax.devices()` below changes.
    """)

DEVICES = code("""
    print(jax.devices())
    print("backend:", jax.default_backend(), "| devices:", jax.device_count())
    """)


def header(name: str, title: str, purpose: str) -> list:
    return [md(f"# {title}\n\n{badge(name)}\n\n{_src(purpose)}"), INSTALL]


# ---------------------------------------------------------------------------------------------
# 01 quickstart
# ---------------------------------------------------------------------------------------------
QUICKSTART = header("01_quickstart", "jaxlm quickstart: train, plot, sample, evaluate", """
    Train the default jaxlm model — a ~0.9M-parameter byte-level LLaMA on the bundled
    tinyshakespeare (`configs/shakespeare.yaml`) — then plot its loss curve from `metrics.jsonl`,
    sample text from it and measure bits-per-byte. Every step is one call of jaxlm's public API
    (`jaxlm.config.load_config`, `jaxlm.train.loop.run`, `jaxlm.sample.sample_text`,
    `jaxlm.eval.evaluate_file`), the same functions behind the `jaxlm-train`, `jaxlm-sample` and
    `jaxlm-eval` commands. How data flows through `run()` is drawn in
    [`docs/architecture.md`](../docs/architecture.md).
    """) + [
    code(PARAMS),
    code("""
        import shutil

        import jax
        import matplotlib.pyplot as plt
        import numpy as np

        from jaxlm.config import DEFAULT_CORPUS, load_config
        from jaxlm.eval import evaluate_file
        from jaxlm.sample import sample_text
        from jaxlm.train.loop import run
        from jaxlm.utils.inspect import read_metrics
        """),
    RUNTIME,
    DEVICES,
    md("""
        ## 1. The configuration

        A run is one frozen `Config`: a YAML preset plus `section.key=value` overrides, parsed and
        validated by `load_config` (a typo or an impossible combination is a one-line
        `ConfigError`, never a silently different model). `tiny` shrinks the model, the context
        and the number of steps; `real` is the preset as shipped (400 steps of 16 × 128 bytes).
        """),
    code("""
        overrides = [f"out_dir={OUT}/01_quickstart", "train.sample_tokens=0"]
        if TINY:
            overrides += ["model.d_model=64", "model.d_ff=192", "model.n_layers=2",
                          "data.seq_len=64", "train.steps=60", "train.warmup_steps=6",
                          "train.log_every=5", "train.eval_every=30", "train.eval_batches=2",
                          "ckpt.every=0"]
        cfg = load_config("configs/shakespeare.yaml", overrides)
        shutil.rmtree(cfg.out_dir, ignore_errors=True)  # a run resumes from a checkpoint: start fresh
        print(cfg.model)
        print(cfg.train)
        """),
    md("""
        ## 2. Train

        `run(cfg)` is the whole job: it builds the device mesh, the data pipeline (grain, bytes of
        tinyshakespeare; the last 10% held out), a sharded train state (a plain pytree of
        parameters and AdamW moments), and a `jax.jit`-compiled train step with explicit shardings
        and buffer donation. Metrics are fetched from the device only every `train.log_every`
        steps and appended to `<out_dir>/metrics.jsonl`; a checkpoint is written at the end, so
        re-running `run` on the same `out_dir` would *resume* rather than start over. It returns
        the final state and the held-out evaluation.
        """),
    code("""
        result = run(cfg)
        print({k: round(v, 4) for k, v in result["eval"].items()})
        """),
    md("""
        ## 3. The loss curve

        Each line of `metrics.jsonl` is one JSON object: train lines carry `loss`, `lr`,
        `grad_norm`, `tokens_per_s`, …; eval lines carry `eval_loss`, `eval_ppl`, `eval_bpb`.
        `jaxlm.utils.inspect.read_metrics` turns them into numpy columns. The loss is in nats per
        byte: it starts near ln 257 ≈ 5.55 (a uniform guess over the byte vocabulary), drops below
        ln 65 ≈ 4.17 (uniform over the 65 characters Shakespeare uses) within a few steps, and
        keeps falling as the model learns spelling and then words.
        """),
    code("""
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
        """),
    md("""
        ## 4. Sample

        `sample_text` prefills the prompt once and then decodes one token per step with a
        KV cache inside one compiled `lax.fori_loop`; `temperature`, `top_k` and `top_p` reshape
        the next-token distribution (temperature 0 = greedy). `context=seq_len` keeps every
        position inside the trained range by re-prompting with the last half-window when it
        fills. A tiny model after a minute writes Shakespeare-*shaped* text (names, line breaks,
        short words); the `real` preset gets recognisable words.
        """),
    code("""
        spec, params, tok = result["spec"], result["state"]["params"], result["tokenizer"]
        print(sample_text(spec.graphdef, params, tok, "ROMEO:", max_new_tokens=200,
                          temperature=0.8, top_k=40, seed=0, context=cfg.data.seq_len))
        """),
    md("""
        ## 5. Evaluate bits-per-byte

        `evaluate_file` restores the latest checkpoint of a run and scores a text file window by
        window: loss = Σ nll / Σ tokens, perplexity = e^loss and
        **bits-per-byte = Σ nll / (ln 2 · Σ UTF-8 bytes of the targets)**, which compares models
        with different tokenizers (for bytes it is simply loss / ln 2). Here we score the start of
        the corpus — text the model trained on — and compare with the held-out number from `run`:
        the gap is the generalisation gap. From a shell the same is
        `jaxlm-eval --ckpt <out_dir> --data <file>`, and `jaxlm-sample --ckpt <out_dir> --prompt …`
        samples.
        """),
    code("""
        seen = evaluate_file(cfg.out_dir, DEFAULT_CORPUS, max_batches=4 if TINY else 32)
        held = result["eval"]
        print(f"train-text bpb {seen['bpb']:.3f}  |  held-out bpb {held['bpb']:.3f}  "
              f"(loss {held['loss']:.3f} nats/byte, perplexity {held['ppl']:.2f})")
        """),
    md("""
        **Next.** `02_sharding` runs this model on 8 devices four ways; `03_linear_attention`
        swaps softmax for Lightning attention; `04_lowrank_optimizers` trains it with GaLore, Fira
        and low-rank weights; `05_dataset_decomposition` feeds it variable-length batches.
        """),
]

# ---------------------------------------------------------------------------------------------
# 02 sharding
# ---------------------------------------------------------------------------------------------
SHARDING = header("02_sharding", "Sharding one model four ways: DP, FSDP, TP, FSDP + TP", """
    The same model and the same batch on 8 (fake CPU) devices, sharded four ways — data
    parallel, fully sharded data parallel (FSDP), tensor parallel (Megatron) and FSDP + TP. For
    each we print where every parameter lives, how many bytes each device holds, and which
    collectives XLA inserted into the compiled train step, and we check that the loss is the same.
    jaxlm never names mesh axes in model code: parameters carry *logical* axis names and one
    rules table, `jaxlm.sharding.RULES`, maps them onto the mesh `(data, fsdp, tensor)`.
    """) + [
    code(PARAMS + """
    # 8 fake CPU devices: must be set before jax is imported (on Colab: Runtime → Restart first
    # if jax was already imported). CPU only, so the notebook is identical on any runtime.
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_force_host_platform_device_count=8").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    """),
    code("""
        import jax
        import matplotlib.pyplot as plt
        import numpy as np

        from jaxlm.config import load_config
        from jaxlm.data import make_data_source
        from jaxlm.optim import build_optimizer, make_schedule
        from jaxlm.sharding import RULES, host_to_global, logical_to_spec, make_mesh
        from jaxlm.train.state import StateSpec
        from jaxlm.train.step import make_train_step
        from jaxlm.utils.flops import format_bytes
        from jaxlm.utils.inspect import bytes_per_device, compile_step, count_collectives, sharding_table
        """),
    md("""
        **Runtime.** This notebook always runs on 8 *fake* CPU devices
        (`--xla_force_host_platform_device_count=8`): XLA partitions the program exactly as it
        would for 8 chips, so shardings, per-device bytes and collectives are real; only the
        speed is not. On a TPU v5e-8 or a multi-GPU machine the same code runs unchanged.
        """),
    DEVICES,
    md("""
        ## 1. Notation: `W[D_fsdp, F_tensor]`

        Following the [JAX scaling book](https://jax-ml.github.io/scaling-book/sharding/),
        `A[I_X, J]` means dimension *I* of array *A* is split over mesh axis *X* and *J* is
        whole on every device. jaxlm's SwiGLU weights are `W_gate, W_up[D_fsdp, F_tensor]` (FSDP
        splits the model dimension D, Megatron splits the hidden F column-wise) and
        `W_down[F_tensor, D_fsdp]` (row-split), and activations are `x[B_(data,fsdp), T, D]`: the
        batch is split over `data` and `fsdp` together. A mesh axis of size 1 means "not split",
        so the four layouts below are just four mesh shapes with the *same* rules table.
        """),
    code("""
        for name, axis in RULES.items():
            print(f"{name:>10} -> {axis}")
        print("W_gate logical ('embed', 'mlp') ->", logical_to_spec(("embed", "mlp")))
        print("W_down logical ('mlp', 'embed') ->", logical_to_spec(("mlp", "embed")))
        """),
    md("""
        ## 2. One model, one batch, four meshes

        The model has 8 heads so tensor parallelism can split them 8 ways, and a vocabulary
        padded to 264 (the byte tokenizer's 257 rounded up to a multiple of 8) so embeddings and
        logits shard evenly (a dimension the mesh does not divide is replicated, with a warning).
        For each mesh `(data, fsdp, tensor)` we build the sharded state with
        `StateSpec.build(...).init()` (a jitted init: each device only materialises its shards),
        compile the train step with `jaxlm.utils.inspect.compile_step`, count the collectives in
        its optimized HLO, and run it once on the same tinyshakespeare batch.
        """),
    code("""
        D = 64 if TINY else 256
        model = [f"model.d_model={D}", f"model.d_ff={4 * D}", "model.n_layers=2", "model.n_heads=8",
                 "model.n_kv_heads=8", "model.vocab_size=264", "data.seq_len=64",
                 "train.batch_size=16", "train.warmup_steps=0"]
        LAYOUTS = {"DP": (8, 1, 1), "FSDP": (1, 8, 1), "TP": (1, 1, 8), "FSDP+TP": (1, 2, 4)}

        cfg0 = load_config("configs/tiny.yaml", model)
        local = next(iter(make_data_source(cfg0.data).train_iterator(batch_size=16, seed=0)))
        print({k: v.shape for k, v in local.items()})

        results = {}
        for name, (dp, fsdp, tp) in LAYOUTS.items():
            cfg = load_config("configs/tiny.yaml", model + [f"mesh.data={dp}", f"mesh.fsdp={fsdp}",
                                                            f"mesh.tensor={tp}"])
            mesh = make_mesh(cfg.mesh)
            spec = StateSpec.build(cfg, mesh, build_optimizer(cfg))
            state = spec.init()
            batch = host_to_global(local, mesh)
            exe = compile_step(make_train_step(spec, make_schedule(cfg.train)), state, batch, mesh=mesh)
            results[name] = {
                "mesh": dict(mesh.shape),
                "params/dev": max(bytes_per_device(state["params"]).values()),
                "state/dev": max(bytes_per_device(state).values()),
                "collectives": count_collectives(exe.as_text()),
                "table": sharding_table(state["params"]),
            }
            state, metrics = exe(state, batch)  # the compiled step, run once (donates the old state)
            results[name]["loss"] = float(metrics["loss"])
            results[name]["embedding"] = state["params"]["embed"]["embedding"]
            print(f"{name:8s} mesh {results[name]['mesh']}  loss {results[name]['loss']:.6f}")
        """),
    md("""
        The loss is identical (to float rounding) in all four layouts: sharding changes *where*
        the arithmetic happens and which messages are exchanged, never the math.

        ## 3. Where the parameters live

        The table lists each parameter's global shape, its `PartitionSpec` (one entry per
        dimension: the mesh axis it is split over, or `None`) and the shard each device holds.
        The leading `2` is the stacked layer axis (`lax.scan` over layers), never split. Under DP
        every spec is replicated; under FSDP the `embed` dimension is split 8 ways; under TP the
        heads / MLP hidden / vocabulary are.
        """),
    code("""
        for name in ("DP", "FSDP+TP"):
            print(f"--- {name} ---")
            print(results[name]["table"])
        """),
    md("""
        `jax.debug.visualize_array_sharding` draws a 2-D array's layout: which device holds which
        block. The embedding `E[V_tensor, D_fsdp]` under FSDP + TP is cut into 4 row blocks
        (tensor) × 2 column blocks (fsdp); under pure FSDP into 8 column blocks.
        """),
    code("""
        for name in ("FSDP", "FSDP+TP"):
            print(name)
            jax.debug.visualize_array_sharding(results[name]["embedding"])
        """),
    md("""
        ## 4. Per-device memory

        `bytes_per_device` sums the bytes of every addressable shard on each device (a replicated
        array counts in full on every device). Data parallelism keeps a full copy of the
        parameters *and* both AdamW moments on each device (≈ 3 × 4 bytes × N); FSDP and TP split
        all three 8 ways; only the small norm gains stay replicated.
        """),
    code("""
        names = list(results)
        print(f"{'layout':8s} {'params / device':>16s} {'params+AdamW / device':>22s}")
        for n in names:
            r = results[n]
            print(f"{n:8s} {format_bytes(r['params/dev']):>16s} {format_bytes(r['state/dev']):>22s}")
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(names, [results[n]["state/dev"] / 2**20 for n in names])
        ax.set(ylabel="MiB per device", title="parameters + optimizer state per device")
        plt.tight_layout(); plt.show()
        """),
    md("""
        ## 5. The collectives in the compiled step

        We count the communication instructions in the optimized HLO text of each train step
        (`count_collectives(exe.as_text())`). What to expect, for N parameter bytes, n devices,
        and activations of B·T·D per layer (ring algorithms; the scaling book, "Sharded Matrices"):

        | layout | what moves | bytes per device per step |
        |---|---|---|
        | DP `W[D, F]`, `x[B_data]` | all-reduce of every gradient | ≈ 2N (n−1)/n |
        | FSDP `W[D_fsdp, F]`, `x[B_fsdp]` | all-gather weights (forward, again in backward) + reduce-scatter gradients | ≈ 3N (n−1)/n |
        | TP `W[D, F_tensor]` | all-reduce of the B·T·D activations after every row-parallel matmul (attention out, MLP down): 2 per layer forward, 2 backward | ≈ 8·L·B·T·D·(n−1)/n elements, independent of N |
        | FSDP + TP | both, each over its own (smaller) group | |

        So DP and FSDP move parameter-sized messages (FSDP ≈ 1.5× DP but n× less memory) and
        overlap them with compute layer by layer, while TP moves activation-sized messages on the
        critical path — it pays off when the weights are big relative to B·T·D and the `tensor`
        axis sits on a fast interconnect (inside a host/pod slice). XLA may fuse or rewrite: on
        CPU a reduce-scatter often appears as an all-reduce followed by a slice, small all-reduces
        are combined into one, and all-to-all / collective-permute show up where the batch is
        resharded. The counts below are *instructions* in the program that this compiler
        produced: the layers run in a `lax.scan`, so an instruction inside the scanned block
        executes once per layer.
        """),
    code("""
        kinds = ["all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute"]
        print(f"{'layout':8s} " + " ".join(f"{k:>18s}" for k in kinds))
        for n in names:
            c = results[n]["collectives"]
            print(f"{n:8s} " + " ".join(f"{c[k]:>18d}" for k in kinds))
        """),
    md("""
        **Try it.** Change the model width `D` (e.g. `JAXLM_NOTEBOOK_SIZE=real` uses 256): the
        per-device bytes of DP grow with D², of FSDP/TP with D²/8, while TP's activation
        all-reduces grow only with D. In training, the same layouts are `mesh.data`, `mesh.fsdp`,
        `mesh.tensor` in the config (`jaxlm-train ... mesh.fsdp=2 mesh.tensor=4`).
        """),
]

# ---------------------------------------------------------------------------------------------
# 03 linear attention
# ---------------------------------------------------------------------------------------------
LINEAR = header("03_linear_attention", "Linear attention: Lightning Attention-2 and TransNormerLLM", """
    Causal linear attention with a per-head decay replaces softmax's T × T attention with a
    fixed-size recurrent state, so training cost grows linearly with length and generation needs
    O(1) memory per token. We check that the three forms of `jaxlm.ops.linear_attention` (naive,
    recurrent, chunked Lightning-2) agree, picture the decay matrix, time it against softmax,
    train TransNormerLLM (TNL), softmax and a hybrid on tinyshakespeare, and watch the decode
    state stay constant. Papers: TransNormerLLM (Qin et al. 2023, arXiv 2307.14995) and
    Lightning Attention-2 (Qin et al. 2024, arXiv 2401.04658); modules `jaxlm/ops/linear_attention.py`
    and `jaxlm/model/linear.py`.
    """) + [
    code(PARAMS),
    code("""
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
        """),
    RUNTIME,
    DEVICES,
    md("""
        ## 1. One operator, three forms

        Per head, with decay λ = e^g ≤ 1 (Lightning Attention-2 §3.1, eqs. 2–4; TNL eq. 10):

        $$S_t = \\lambda S_{t-1} + k_t v_t^\\top,\\qquad o_t = q_t^\\top S_t
        \\quad\\Longleftrightarrow\\quad O = \\big[(QK^\\top)\\odot M\\big]V,\\; M_{ts} = \\lambda^{t-s}\\,[s\\le t].$$

        The **naive** form builds the T × T matrix (O(T²), a reference); the **recurrent** form
        scans tokens with the d × d state S (O(1) memory per step: decoding); the **chunked**
        form (Lightning-2, Alg. 1) does the masked product inside chunks of C tokens and carries
        S between chunks, O(T·C·d + T·d²). No softmax and no 1/√d: TNL normalises the output
        instead. The three must agree to float32 rounding.
        """),
    code("""
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
        """),
    md("""
        ## 2. The decay matrix

        `linear_attention_matrix` recovers M from the kernel itself (unit q·k and one-hot values
        make output row t equal to row t of M). TNL's decay (official code schedule, notes §1.3):
        head h has slope s_h = 2^{−8(h+1)/H} (ALiBi), scaled by the layer factor 1 − l/(L−1), and
        λ = e^{−s}. Early heads forget within a few tokens (local, like n-gram features), late
        heads keep a long memory; the last layer has almost no decay at all.
        """),
    code("""
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
        """),
    md("""
        ## 3. Speed versus length

        With the tokens per call fixed (B·T constant), softmax attention costs O(T) per token —
        every token attends to all earlier ones — while chunked linear attention costs a constant
        2·C·d + 2·d² per token. We time forward + backward of the attention op alone (compile
        excluded, best of a few calls; `bench/attention_scaling.py` is the full benchmark, with
        numbers in `bench/RESULTS.md`). On a CPU the crossover is early; on a GPU, fused flash
        attention moves it to a few thousand tokens.
        """),
    code("""
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
        """),
    md("""
        ## 4. Training TNL vs softmax vs a hybrid

        Three presets share shape, data and schedule: `configs/shakespeare.yaml` (LLaMA, softmax +
        RoPE), `configs/tnl_shakespeare.yaml` (every layer a TNL block: SiLU q/k, Lightning
        attention with decay, SRMSNorm, output gate, LRPE on layer 0, SGLU channel mixer; TNL
        §3) and `configs/hybrid_shakespeare.yaml` (`model.layer_pattern=LLLS`: three TNL layers
        then one softmax layer, the MiniMax-01 / Qwen3-Next recipe). In `tiny` mode the models
        have 2 layers (the hybrid is `LS`) and train for a few dozen steps: enough to see all
        three learn, not to rank them (see `bench/RESULTS.md` for 300-step numbers).
        """),
    code("""
        tiny = ["model.d_model=64", "model.n_layers=2", "model.d_ff=160", "data.seq_len=64",
                "train.steps=40", "train.warmup_steps=5", "train.log_every=5",
                "train.eval_every=0", "train.eval_batches=2", "ckpt.every=0"]
        PEAK = measure_peak_flops("float32", n=1024)  # once, for the MFU column (else once per run)
        presets = {"softmax": ("configs/shakespeare.yaml", []),
                   "TNL": ("configs/tnl_shakespeare.yaml", []),
                   "hybrid": ("configs/hybrid_shakespeare.yaml", ["model.layer_pattern=LS"] if TINY else [])}
        runs = {}
        for name, (path, extra) in presets.items():
            cfg = load_config(path, [f"out_dir={OUT}/03_{name}", "train.sample_tokens=0",
                                     f"peak_flops={PEAK}"] + (tiny + extra if TINY else extra))
            shutil.rmtree(cfg.out_dir, ignore_errors=True)
            runs[name] = run(cfg)
        for name, r in runs.items():
            m = read_metrics(r["out_dir"])["train"]
            plt.plot(m["step"], m["loss"], label=f"{name} (held-out {r['eval']['loss']:.3f})")
        plt.xlabel("step"); plt.ylabel("train loss (nats/byte)"); plt.legend(); plt.show()
        """),
    md("""
        ## 5. Generation with an O(1) state

        A softmax layer must keep every past key and value: its KV cache is
        2 · L · B · T · KV · K numbers and grows with the generated length T. A linear-attention
        layer keeps only its state S (H × K × V numbers per layer and sequence):
        `Transformer.init_cache(batch, max_len)` for TNL ignores `max_len`. We measure the cache
        pytrees with `jax.eval_shape` (no memory is allocated) and then sample from the TNL model;
        each decode step is the recurrent form, o_t = q_tᵀ(λS + k_t v_tᵀ).
        """),
    code("""
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
        """),
]

# ---------------------------------------------------------------------------------------------
# 04 low-rank optimizers
# ---------------------------------------------------------------------------------------------
LOWRANK = header("04_lowrank_optimizers", "Memory-efficient pretraining: GaLore, Fira, low-rank weights and restarts", """
    Adam keeps two moments per parameter, so the optimizer state is twice the model. **GaLore**
    (Zhao et al., ICML 2024, arXiv 2403.03507) runs Adam in a rank-r subspace of each weight's
    gradient; **Fira** (Chen et al. 2024, arXiv 2410.01623) adds back the gradient outside that
    subspace; **low-rank weights** W = B·A and **SLTrain** (W = B·A + S) shrink the weights too;
    and Glentis et al. 2025 (arXiv 2505.22922) restart them with **momentum reset** and **weight
    refactorization**. We follow one projection step by hand and check it against
    `jaxlm.optim.galore.scale_by_galore`, tabulate memory with `jaxlm.optim.lowrank.state_bytes`,
    and train every method on tinyshakespeare.
    """) + [
    code(PARAMS),
    code("""
        import shutil

        import jax
        import jax.numpy as jnp
        import matplotlib.pyplot as plt
        import numpy as np

        from jaxlm.config import load_config
        from jaxlm.optim.galore import scale_by_galore
        from jaxlm.optim.lowrank import METHODS, method_config, state_bytes
        from jaxlm.optim.restarts import rewarmup
        from jaxlm.optim import make_schedule
        from jaxlm.train.loop import run
        from jaxlm.utils.flops import measure_peak_flops
        from jaxlm.utils.inspect import read_metrics
        """),
    RUNTIME,
    DEVICES,
    md("""
        ## 1. GaLore step by step on one matrix

        Take one weight W (a × b, jaxlm's `[in, out]` layout) and its gradient G. Every T steps
        GaLore takes the SVD G = U Σ Vᵀ and keeps the top-r singular vectors of the *short* side,
        P = U[:, :r] when a ≤ b (GaLore Alg. 2; notes §1.1). Then, at update k:

        $$R_k = P^\\top G_k,\\quad M_k = \\beta_1 M + (1-\\beta_1)R_k,\\quad V_k = \\beta_2 V + (1-\\beta_2)R_k^2,$$
        $$N_k = \\frac{M_k}{\\sqrt{V_k}+\\epsilon},\\qquad
        \\Delta W_k = \\alpha\\, P N_k\\,\\frac{\\sqrt{1-\\beta_2^k}}{1-\\beta_1^k}.$$

        M and V are r × b instead of a × b. Gradients of real networks are close to low rank,
        so a small r keeps most of G; we build a G with a decaying spectrum to see it.
        """),
    code("""
        a, b, r = 64, 128, 8
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        spectrum = 0.7 ** jnp.arange(a)  # a decaying singular spectrum, like real gradients
        U0, _ = jnp.linalg.qr(jax.random.normal(k1, (a, a)))
        V0, _ = jnp.linalg.qr(jax.random.normal(k2, (b, a)))
        G = (U0 * spectrum) @ V0.T + 0.01 * jax.random.normal(k3, (a, b))
        W = jnp.zeros((a, b))

        U, S, Vt = jnp.linalg.svd(G, full_matrices=False)
        P = U[:, :r]                       # projector on the short side (a <= b)
        R = P.T @ G                        # r x b: what Adam sees
        kept = float(jnp.linalg.norm(P @ R) / jnp.linalg.norm(G))
        print(f"G {G.shape} -> R {R.shape}; ||P R|| / ||G|| = {kept:.3f} (rank {r} of {a})")
        plt.semilogy(np.asarray(S), "o", ms=3); plt.axvline(r - 0.5, c="r", ls=":", label=f"r = {r}")
        plt.xlabel("index"); plt.ylabel("singular value of G"); plt.legend(); plt.show()
        """),
    md("""
        Now the first Adam step in the subspace by hand, against the library's optax
        transformation (`scale_by_galore` returns the direction ΔW; the caller multiplies by
        −η). SVD signs are arbitrary, but P N is invariant to flipping a column of P (the row of
        R, M and N flips with it), so the two must agree.
        """),
    code("""
        b1, b2, eps, alpha = 0.9, 0.999, 1e-8, 0.25
        M1, V1 = (1 - b1) * R, (1 - b2) * R**2
        N1 = M1 / (jnp.sqrt(V1) + eps)
        dW_hand = alpha * (P @ N1) * jnp.sqrt(1 - b2) / (1 - b1)

        tx = scale_by_galore(rank=r, gap=200, scale=alpha, b1=b1, b2=b2, eps=eps)
        st = tx.init({"w": W})
        dW_lib, st = tx.update({"w": G}, st, {"w": W})
        print("state shapes:", {k: getattr(st, k)["w"].shape for k in ("mu", "nu", "proj")})
        print(f"max |ΔW_hand − ΔW_lib| = {float(jnp.max(jnp.abs(dW_hand - dW_lib['w']))):.2e}")
        """),
    md("""
        **Fira** keeps GaLore's subspace update and adds the residual G − α·P R that GaLore
        throws away, rescaled column by column by how much Adam rescaled the subspace
        (Fira Alg. 1, eqs. 5–6): φ = ‖N‖/‖R‖ per column, S = (G − α P R) ⊙ φ. A norm-growth
        limiter (eq. 8, γ = 1.01) caps ‖S_k‖ ≤ γ‖S_{k−1}‖ from the second step on, which
        prevents loss spikes. The update is α P N + S.
        """),
    code("""
        phi = jnp.linalg.norm(N1, axis=0, keepdims=True) / (jnp.linalg.norm(R, axis=0, keepdims=True) + 1e-8)
        S_res = (G - alpha * P @ R) * phi
        fira_hand = (alpha * P @ N1 + S_res) * jnp.sqrt(1 - b2) / (1 - b1)
        tx_f = scale_by_galore(rank=r, gap=200, scale=alpha, b1=b1, b2=b2, eps=eps, residual="fira")
        fira_lib, _ = tx_f.update({"w": G}, tx_f.init({"w": W}), {"w": W})
        print(f"max |Fira_hand − Fira_lib| = {float(jnp.max(jnp.abs(fira_hand - fira_lib['w']))):.2e}")
        print(f"||GaLore update|| = {float(jnp.linalg.norm(dW_lib['w'])):.3f}, "
              f"||Fira update|| = {float(jnp.linalg.norm(fira_lib['w'])):.3f} (residual restores the rest)")
        """),
    md("""
        ## 2. Memory per method

        Per m × n matrix (notes §1.8): Adam stores 2mn moments; GaLore/Fira min(m, n)·r + 2r·max(m, n)
        (projector + low-rank moments); low-rank W = B·A stores (m + n)r weights and 2(m + n)r
        moments; SLTrain adds δmn sparse values (+ their indices). `state_bytes` counts
        parameters + optimizer state from shapes only (`jax.eval_shape`, nothing allocated), the
        accounting of `bench/optimizer_memory.py`; at 2 bytes/entry (the papers' bf16) the LLaMA
        presets reproduce the papers' memory figures (1B: ≈ 8.0 GB Adam, ≈ 4.8 GaLore,
        ≈ 3.7 low-rank; `real` mode prints all four presets).
        """),
    code("""
        RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512}  # the papers' ranks per preset
        presets = ["60m", "130m"] if TINY else list(RANKS)
        print("GB of parameters + optimizer state at 2 bytes/entry (ratio to AdamW)")
        print(f"{'preset':7s}" + "".join(f"{m:>15s}" for m in METHODS))
        for p in presets:
            cfg = load_config(f"configs/llama_{p}.yaml", [
                "model.vocab_size=32000", f"optim.rank={RANKS[p]}", f"model.lowrank_rank={RANKS[p]}",
                "model.sparse_density=0.03"])
            gb = {m: state_bytes(method_config(cfg, m), bytes_per_entry=2) / 1e9 for m in METHODS}
            print(f"{p:7s}" + "".join(f"{gb[m]:8.3f} ({gb[m] / gb['adamw']:.2f})" for m in METHODS))
        """),
    md("""
        ## 3. Training every method on tinyshakespeare

        Same model, data order and schedule; only the method changes (`optim.name`, and
        `model.weights` for the factorised models). In `tiny` mode: a d_model-64 model, rank 16,
        GaLore/Fira refresh every T = 16 steps, 48 steps; restarts every 16 steps. At this scale
        the ranking is noisy and need not match the papers (see `bench/RESULTS.md` for 150- and
        400-step tables); the point is the mechanics.
        """),
    code("""
        steps = 48 if TINY else 400
        PEAK = measure_peak_flops("float32", n=1024)  # once, for the MFU column (else once per run)
        base = [f"train.steps={steps}", f"train.log_every={2 if TINY else 10}", "train.eval_every=0",
                f"peak_flops={PEAK}",
                "train.eval_batches=2", "ckpt.every=0", "train.sample_tokens=0",
                "optim.rank=16" if TINY else "optim.rank=32",
                "model.lowrank_rank=16" if TINY else "model.lowrank_rank=32",
                "optim.proj_gap=16" if TINY else "optim.proj_gap=50"]
        if TINY:
            base += ["model.d_model=64", "model.d_ff=192", "model.n_layers=2", "data.seq_len=64",
                     "train.warmup_steps=6"]
        RESTART = [f"optim.reset_every={steps // 3}", f"optim.refactor_every={steps // 3}",
                   "optim.rewarmup_steps=5"]
        methods = {"adamw": [], "galore": [], "fira": [], "lowrank": [], "lowrank+MR+WR": RESTART}
        if not TINY:
            methods.update({"sltrain": [], "lowrank+MR": RESTART[:1] + RESTART[2:],
                            "lowrank+WR": RESTART[1:2], "sltrain+MR+WR": RESTART})
        runs = {}
        for name, extra in methods.items():
            kind = name.split("+")[0]
            weights, opt = METHODS[kind]
            cfg = load_config("configs/shakespeare.yaml", base + extra + [
                f"out_dir={OUT}/04_{name}", f"model.weights={weights}", f"optim.name={opt}"])
            shutil.rmtree(cfg.out_dir, ignore_errors=True)
            runs[name] = run(cfg)
        for name, r in runs.items():
            m = read_metrics(r["out_dir"])["train"]
            plt.plot(m["step"], m["loss"], label=f"{name} ({r['eval']['loss']:.3f})")
        plt.xlabel("step"); plt.ylabel("train loss"); plt.title("held-out loss in parentheses")
        plt.legend(); plt.show()
        """),
    md("""
        ## 4. What momentum reset and refactorization do

        **Momentum reset** (MR, Glentis et al. 2025 §4) zeroes Adam's m, v *and* its step count
        every N updates — flushing stale directions; for GaLore/Fira it also re-computes the
        projector — and re-warms the learning rate over W updates, multiplying it by
        0.001 + 0.999·min(j, W)/W (j = updates since the reset; `jaxlm.optim.restarts.rewarmup`).
        **Weight refactorization** (WR, their Lemma 4.1) replaces the factors (B, A) by the
        balanced B = U√Σ, A = √ΣVᵀ of the same product: the function is unchanged, the
        conditioning improves. In the curves: just after each reset the loss pauses (the LR
        dips to ~0 and Adam restarts its bias correction), then catches up; the paper restarts
        every 200 of many thousand steps, where the gain outweighs the pause.
        """),
    code("""
        every = steps // 3
        j = jnp.arange(steps)
        factor = rewarmup(every, 5)(j)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
        for name in [n for n in runs if n.startswith("lowrank") or n.startswith("sltrain")]:
            m = read_metrics(runs[name]["out_dir"])["train"]
            ax1.plot(m["step"], m["loss"], label=name)
        for s in range(every, steps, every):
            ax1.axvline(s, c="gray", ls=":")
        ax1.set(xlabel="step", ylabel="train loss", title="restarts at the dotted lines"); ax1.legend()
        base_lr = make_schedule(runs["lowrank+MR+WR"]["cfg"].train)(j)  # the run's warmup + cosine
        ax2.plot(j, np.asarray(factor * base_lr), label="with resets")
        ax2.plot(j, np.asarray(base_lr), ":", label="base schedule"); ax2.legend()
        ax2.set(xlabel="step", ylabel="effective LR", title="schedule × re-warmup after each reset")
        plt.tight_layout(); plt.show()
        """),
]

# ---------------------------------------------------------------------------------------------
# 05 dataset decomposition
# ---------------------------------------------------------------------------------------------
DD = header("05_dataset_decomposition", "Dataset Decomposition: variable sequence length batches", """
    Concat-and-chunk glues documents together and cuts fixed windows, so most windows mix
    unrelated documents and every token pays attention over the full context. **Dataset
    Decomposition** (Pouransari et al., NeurIPS 2024, arXiv 2405.13226) cuts each document into
    power-of-two pieces, groups pieces of equal length into buckets, and trains on one bucket per
    step with the *same number of tokens* in every step, following a short-to-long curriculum. We
    picture the decomposition, histogram the buckets of two bundled corpora (WikiText-2 articles
    in `jaxlm/assets/wikitext-2`, tinyshakespeare speeches), check the tokens per step, time each
    bucket, and compare DD with concat. Module: `jaxlm/data/bucketing.py` (`data.mode=dd`).
    """) + [
    code(PARAMS),
    code("""
        import shutil

        import jax
        import matplotlib.pyplot as plt
        import numpy as np

        from jaxlm.config import ASSETS, load_config
        from jaxlm.data import decompose, make_data_source
        from jaxlm.train.loop import evaluate, run
        from jaxlm.train.step import make_eval_step
        from jaxlm.utils.flops import measure_peak_flops
        from jaxlm.utils.inspect import read_metrics
        """),
    RUNTIME,
    DEVICES,
    md("""
        ## 1. The binary decomposition of a document

        A document of n tokens (its end-of-text included) is cut into adjacent pieces by the
        binary expansion of n, largest first (DD §2.1): n = 2^{i₁} + 2^{i₂} + …, and the piece of
        length 2^i goes to bucket D_i. Parts longer than the largest bucket are cut into
        largest-bucket pieces; a remainder shorter than the smallest bucket is dropped. Every
        piece is one training row from a single document, so no attention mask is needed and no
        token attends across documents.
        """),
    code("""
        buckets = [32, 64, 128, 256, 512]
        docs = [1000, 700, 300, 1500, 90]
        colors = {L: plt.cm.viridis(i / (len(buckets) - 1)) for i, L in enumerate(buckets)}
        fig, ax = plt.subplots(figsize=(11, 2.8))
        for row, n in enumerate(docs):
            start = 0
            for L in decompose(n, buckets):
                ax.barh(row, L, left=start, color=colors[L], edgecolor="white")
                ax.text(start + L / 2, row, str(L), ha="center", va="center", fontsize=8, color="w")
                start += L
            ax.barh(row, n - start, left=start, color="lightgray")  # dropped remainder
            print(f"{n:5d} tokens -> pieces {decompose(n, buckets)}, {n - start} dropped")
        ax.set_yticks(range(len(docs)), [f"doc of {n}" for n in docs]); ax.invert_yaxis()
        ax.set_xlabel("token position (gray: shorter than the smallest bucket, dropped)")
        plt.tight_layout(); plt.show()
        """),
    md("""
        ## 2. Buckets of real corpora

        Two bundled corpora with very different document lengths. **WikiText-2** (validation
        file, `jaxlm/assets/wikitext-2`): 60 long Wikipedia articles, split at each
        ` = Title = ` line by the regular expression below (`data.doc_separator`, see its
        `SOURCE.md`). **tinyshakespeare** split at blank lines (the default separator `"\\n\\n"`):
        thousands of short speeches. `make_data_source` with `data.mode=dd` tokenizes a corpus once
        (bytes here; cached and memory-mapped), decomposes every document (`piece_table`) and
        counts pieces per bucket. Long articles put almost all tokens in the largest bucket;
        short speeches fill the small ones — the speed-up DD can give depends on this histogram
        (DD reports 512 as RefinedWeb's heaviest bucket).
        """),
    code("""
        SEP = "re:\\\\n(?= = [^=].* = \\\\n)"  # a WikiText article starts at a " = Title = " line
        CTX = 256 if TINY else 1024  # the largest bucket = the model's context
        dd = [f"data.seq_len={CTX}", "data.min_bucket=32", f"data.cache_dir={OUT}/05_cache",
              "data.cycles=16" if TINY else "data.cycles=8", "data.curriculum=grow_p2"]
        corpora = {"WikiText-2 articles": [f"data.path={ASSETS}/wikitext-2/valid.txt",
                                           f"data.doc_separator={SEP}"],
                   "tinyshakespeare speeches": []}
        sources = {name: make_data_source(load_config("configs/tiny.yaml", extra + dd + ["data.mode=dd"]).data)
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
        """),
    md("""
        ## 3. Same tokens in every step, a curriculum over lengths

        Variable sequence length batching (DD §2.2): with b = batch_size × seq_len tokens per step,
        bucket i supplies b / 2^i rows of length 2^i, so the loss always averages over b tokens
        while short steps cost less attention. The curriculum (DD §3.3, Alg. 1; Grow-P2 with
        cycles c) draws bucket i with odds ∝ 2^{K−1−i} among the buckets that still have batches
        in this cycle: each cycle starts short and ends long.
        """),
    code("""
        it = src.train_iterator(batch_size=8, seed=0)
        for step in range(6):
            x = next(it)["inputs"]
            print(f"step {step}: batch {x.shape[0]:3d} x {x.shape[1]:4d} = {x.size} tokens")
        sched, _ = src.schedule.epoch(0)
        plt.figure(figsize=(11, 2.5))
        plt.plot(np.asarray(src.buckets)[sched], ".", ms=3)
        plt.yscale("log", base=2); plt.xlabel("step in epoch 0"); plt.ylabel("sequence length")
        plt.title("Grow-P2 curriculum: every cycle goes short -> long"); plt.show()
        """),
    md("""
        ## 4. Step time per bucket, and DD vs concat

        We train the same small model on tinyshakespeare twice with equal tokens per step:
        `data.mode=concat` (fixed windows of CTX bytes) and `data.mode=dd`. With `train.log_every=1` every line of
        `metrics.jsonl` carries that step's `seq_len` and `step_time_s` (steps that compile a
        new shape are left out, time 0). The per-step cost is ∝ b·(c_mlp + 2^i·c_attn): it falls
        with shorter buckets, a lot at long contexts (see `bench/RESULTS.md`: 2.3–5× the
        tokens/s of concat at 8192 context), a little at this toy size where the MLP and output
        layer dominate (and on a shared CPU, expect ±30% noise between runs). Both models are then scored on the *same* held-out documents
        (`jaxlm.train.loop.evaluate` on DD's validation batches).
        """),
    code("""
        steps = 40 if TINY else 300
        train = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.d_ff=256",
                 "train.batch_size=8", f"train.steps={steps}", "train.log_every=1",
                 "train.eval_every=0", "train.eval_batches=4", "train.warmup_steps=5",
                 "ckpt.every=0", "train.sample_tokens=0",
                 f"peak_flops={measure_peak_flops('float32', n=1024)}"]  # measured once for MFU
        runs = {}
        for mode in ("concat", "dd"):
            cfg = load_config("configs/tiny.yaml", dd + train + [f"data.mode={mode}",
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
        """),
]

NOTEBOOKS = {
    "01_quickstart": QUICKSTART,
    "02_sharding": SHARDING,
    "03_linear_attention": LINEAR,
    "04_lowrank_optimizers": LOWRANK,
    "05_dataset_decomposition": DD,
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` (no outputs, no execution counts, deterministic cell ids)."""
    cells = []
    for i, (kind, source, tags) in enumerate(NOTEBOOKS[name]):
        meta = {"tags": list(tags)} if tags else {}
        if kind == "markdown":
            cell = new_markdown_cell(source, metadata=meta)
        else:
            cell = new_code_cell(source, metadata=meta)
        cell["id"] = f"{name[:2]}-{i:02d}"
        cells.append(cell)
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    })
    return nb


def path_of(name: str) -> str:
    return os.path.join(HERE, f"{name}.ipynb")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare with the committed files")
    args = ap.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        text = nbformat.writes(build(name)) + "\n"
        path = path_of(name)
        old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if old == text:
            continue
        if args.check:
            stale.append(name)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            print("wrote", path)
    if stale:
        print("out of date (run python colabs/build_notebooks.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
