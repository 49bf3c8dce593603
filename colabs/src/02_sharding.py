# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Sharding one model four ways: DP, FSDP, TP, FSDP + TP
#
# The same model and the same batch on 8 (fake CPU) devices, sharded four ways — data
# parallel, fully sharded data parallel (FSDP), tensor parallel (Megatron) and FSDP + TP. For
# each we print where every parameter lives, how many bytes each device holds, and which
# collectives XLA inserted into the compiled train step, and we check that the loss is the same.
# jaxlm never names mesh axes in model code: parameters carry *logical* axis names and one
# rules table, `jaxlm.sharding.RULES`, maps them onto the mesh `(data, fsdp, tensor)`.

# %% shared="install"

# %% shared="params"
# 8 fake CPU devices: must be set before jax is imported (on Colab: Runtime → Restart first
# if jax was already imported). CPU only, so the notebook is identical on any runtime.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

# %%
import jax
import matplotlib.pyplot as plt

from jaxlm.config import load_config
from jaxlm.data import make_data_source
from jaxlm.optim import build_optimizer
from jaxlm.sharding import RULES, host_to_global, logical_to_spec, make_mesh
from jaxlm.train.state import StateSpec
from jaxlm.train.step import make_train_step
from jaxlm.utils.flops import format_bytes
from jaxlm.utils.inspect import bytes_per_device, compile_step, count_collectives, sharding_table

# %% [markdown]
# **Runtime.** This notebook always runs on 8 *fake* CPU devices
# (`--xla_force_host_platform_device_count=8`): XLA partitions the program exactly as it
# would for 8 chips, so shardings, per-device bytes and collectives are real; only the
# speed is not. On a TPU v5e-8 or a multi-GPU machine the same code runs unchanged.

# %% shared="devices"

# %% [markdown]
# ## 1. Notation: `W[D_fsdp, F_tensor]`
#
# Following the [JAX scaling book](https://jax-ml.github.io/scaling-book/sharding/),
# `A[I_X, J]` means dimension *I* of array *A* is split over mesh axis *X* and *J* is
# whole on every device. jaxlm's SwiGLU weights are `W_gate, W_up[D_fsdp, F_tensor]` (FSDP
# splits the model dimension D, Megatron splits the hidden F column-wise) and
# `W_down[F_tensor, D_fsdp]` (row-split), and activations are `x[B_(data,fsdp), T, D]`: the
# batch is split over `data` and `fsdp` together. A mesh axis of size 1 means "not split",
# so the four layouts below are just four mesh shapes with the *same* rules table.

# %%
for name, axis in RULES.items():
    print(f"{name:>10} -> {axis}")
print("W_gate logical ('embed', 'mlp') ->", logical_to_spec(("embed", "mlp")))
print("W_down logical ('mlp', 'embed') ->", logical_to_spec(("mlp", "embed")))

# %% [markdown]
# ## 2. One model, one batch, four meshes
#
# The model has 8 heads so tensor parallelism can split them 8 ways, and a vocabulary
# padded to 264 (the byte tokenizer's 257 rounded up to a multiple of 8) so embeddings and
# logits shard evenly (a dimension the mesh does not divide is replicated, with a warning).
# For each mesh `(data, fsdp, tensor)` we build the sharded state with
# `StateSpec.build(...).init()` (a jitted init: each device only materialises its shards),
# compile the train step with `jaxlm.utils.inspect.compile_step`, count the collectives in
# its optimized HLO, and run it once on the same tinyshakespeare batch.

# %%
D = 64 if TINY else 256
model = [f"model.d_model={D}", f"model.d_ff={4 * D}", "model.n_layers=2", "model.n_heads=8",
         "model.n_kv_heads=8", "model.vocab_size=264", "data.seq_len=64",
         "train.batch_size=16", "train.warmup_steps=0"]
LAYOUTS = {"DP": (8, 1, 1), "FSDP": (1, 8, 1), "TP": (1, 1, 8), "FSDP+TP": (1, 2, 4)}

cfg0 = load_config("tiny", model)
local = next(iter(make_data_source(cfg0.data).train_iterator(batch_size=16, seed=0)))
print({k: v.shape for k, v in local.items()})

results = {}
for name, (dp, fsdp, tp) in LAYOUTS.items():
    cfg = load_config("tiny", model + [f"mesh.data={dp}", f"mesh.fsdp={fsdp}",
                                                    f"mesh.tensor={tp}"])
    mesh = make_mesh(cfg.mesh)
    spec = StateSpec.build(cfg, mesh, build_optimizer(cfg))
    state = spec.init()
    batch = host_to_global(local, mesh)
    exe = compile_step(make_train_step(spec), state, batch, mesh=mesh)
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

# %% [markdown]
# The loss is identical (to float rounding) in all four layouts: sharding changes *where*
# the arithmetic happens and which messages are exchanged, never the math.
#
# ## 3. Where the parameters live
#
# The table lists each parameter's global shape, its `PartitionSpec` (one entry per
# dimension: the mesh axis it is split over, or `None`) and the shard each device holds.
# The leading `2` is the stacked layer axis (`lax.scan` over layers), never split. Under DP
# every spec is replicated; under FSDP the `embed` dimension is split 8 ways; under TP the
# heads / MLP hidden / vocabulary are.

# %%
for name in ("DP", "FSDP+TP"):
    print(f"--- {name} ---")
    print(results[name]["table"])

# %% [markdown]
# `jax.debug.visualize_array_sharding` draws a 2-D array's layout: which device holds which
# block. The embedding `E[V_tensor, D_fsdp]` under FSDP + TP is cut into 4 row blocks
# (tensor) × 2 column blocks (fsdp); under pure FSDP into 8 column blocks.

# %%
for name in ("FSDP", "FSDP+TP"):
    print(name)
    jax.debug.visualize_array_sharding(results[name]["embedding"])

# %% [markdown]
# ## 4. Per-device memory
#
# `bytes_per_device` sums the bytes of every addressable shard on each device (a replicated
# array counts in full on every device). Data parallelism keeps a full copy of the
# parameters *and* both AdamW moments on each device (≈ 3 × 4 bytes × N); FSDP and TP split
# all three 8 ways; only the small norm gains stay replicated.

# %%
names = list(results)
print(f"{'layout':8s} {'params / device':>16s} {'params+AdamW / device':>22s}")
for n in names:
    r = results[n]
    print(f"{n:8s} {format_bytes(r['params/dev']):>16s} {format_bytes(r['state/dev']):>22s}")
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(names, [results[n]["state/dev"] / 2**20 for n in names])
ax.set(ylabel="MiB per device", title="parameters + optimizer state per device")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 5. The collectives in the compiled step
#
# We count the communication instructions in the optimized HLO text of each train step
# (`count_collectives(exe.as_text())`). What to expect, for N parameter bytes, n devices,
# and activations of B·T·D per layer (ring algorithms; the scaling book, "Sharded Matrices"):
#
# | layout | what moves | bytes per device per step |
# |---|---|---|
# | DP `W[D, F]`, `x[B_data]` | all-reduce of every gradient | ≈ 2N (n−1)/n |
# | FSDP `W[D_fsdp, F]`, `x[B_fsdp]` | all-gather weights (forward, again in backward) + reduce-scatter gradients | ≈ 3N (n−1)/n |
# | TP `W[D, F_tensor]` | all-reduce of the B·T·D activations after every row-parallel matmul (attention out, MLP down): 2 per layer forward, 2 backward | ≈ 8·L·B·T·D·(n−1)/n elements, independent of N |
# | FSDP + TP | both, each over its own (smaller) group | |
#
# So DP and FSDP move parameter-sized messages (FSDP ≈ 1.5× DP but n× less memory) and
# overlap them with compute layer by layer, while TP moves activation-sized messages on the
# critical path — it pays off when the weights are big relative to B·T·D and the `tensor`
# axis sits on a fast interconnect (inside a host/pod slice). XLA may fuse or rewrite: on
# CPU a reduce-scatter often appears as an all-reduce followed by a slice, small all-reduces
# are combined into one, and all-to-all / collective-permute show up where the batch is
# resharded. The counts below are *instructions* in the program that this compiler
# produced: the layers run in a `lax.scan`, so an instruction inside the scanned block
# executes once per layer.

# %%
kinds = ["all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute"]
print(f"{'layout':8s} " + " ".join(f"{k:>18s}" for k in kinds))
for n in names:
    c = results[n]["collectives"]
    print(f"{n:8s} " + " ".join(f"{c[k]:>18d}" for k in kinds))

# %% [markdown]
# **Try it.** Change the model width `D` (e.g. `JAXLM_NOTEBOOK_SIZE=real` uses 256): the
# per-device bytes of DP grow with D², of FSDP/TP with D²/8, while TP's activation
# all-reduces grow only with D. In training, the same layouts are `mesh.data`, `mesh.fsdp`,
# `mesh.tensor` in the config (`jaxlm-train ... mesh.fsdp=2 mesh.tensor=4`).
