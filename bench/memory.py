"""Memory of the train step at large vocabularies: the fused, chunked head + loss vs the full logits.

    python bench/memory.py                 # vocab 32k, 128k, 256k on configs/bench_tiny_llama.yaml
    python bench/memory.py --vocab 131072  # one size

For each vocabulary size the train step of ``configs/bench_tiny_llama.yaml`` (d_model 256, 4
layers, 8 × 256 tokens, remat full, one device) is compiled twice — ``model.head_chunk=0`` (the
[tokens, vocab] logits and their gradient materialised, as before issue #18) and the default
``model.head_chunk=-1`` (jaxlm/ops/head_loss.py: chunked when the logits exceed 256 MiB) — and
XLA's memory analysis of two compiled programs gives their temporary bytes: the loss gradient
(forward + backward, where the head and the loss live) and the whole train step (that plus the
optimizer update; parameters and optimizer state are arguments, not temporaries). Nothing is
run, so the figures do not drift with the machine's load. Prints one table line per size,
``head_loss_temp_ratio_128k=`` (chunked / full temporaries of the loss gradient at vocab 131072;
issue target <= 0.25) and ``step_temp_ratio_128k=`` (the same for the whole step, whose
remaining temporaries at a large vocabulary are the AdamW update of the [V, D] tables).

Not measured here yet: ``rss_vs_maxtext=`` (peak RSS of jaxlm vs MaxText on the comparison
config), which needs the MaxText venv that bench/vs_maxtext.sh builds; it is skipped with a line
saying so when that venv is absent.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (32768, 131072, 262144)


def step_temp_bytes(vocab: int, head_chunk: int) -> dict:
    """XLA's memory analysis of the compiled train step (nothing allocated, nothing run)."""
    import jax

    from jaxlm.config import load_config
    from jaxlm.optim import build_optimizer
    from jaxlm.data.pipeline import BATCH_KEYS
    from jaxlm.sharding import batch_sharding, make_mesh
    from jaxlm.train.state import StateSpec
    from jaxlm.train.step import loss_fn, make_train_step

    cfg = load_config(os.path.join(ROOT, "configs", "bench_tiny_llama.yaml"),
                      [f"model.vocab_size={vocab}", f"model.head_chunk={head_chunk}"])
    spec = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
    shape, sharding = (cfg.train.batch_size, cfg.data.seq_len), batch_sharding(spec.mesh)
    batch = {k: jax.ShapeDtypeStruct(shape, jax.numpy.float32 if k == "loss_mask" else
                                     jax.numpy.int32, sharding=sharding) for k in BATCH_KEYS}
    abstract = spec.abstract_with_shardings()
    grad = jax.jit(lambda p, b: jax.grad(lambda q: loss_fn(spec, q, b, 1.0)[0])(p))
    with jax.set_mesh(spec.mesh):
        step = make_train_step(spec).jitted.lower(abstract, batch).compile().memory_analysis()
        fwd_bwd = grad.lower(abstract["params"], batch).compile().memory_analysis()
    return {"temp": step.temp_size_in_bytes, "grad_temp": fwd_bwd.temp_size_in_bytes,
            "logits": cfg.train.batch_size * cfg.data.seq_len * vocab * 4}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, action="append", help="vocabulary size(s)")
    a = p.parse_args(argv)
    sizes = tuple(a.vocab or SIZES)
    gib = 1 << 30
    print("| vocab | f32 logits | loss gradient (fwd+bwd): full / chunked / ratio | whole step "
          "(+ optimizer update): full / chunked / ratio |")
    print("|---|---|---|---|")
    ratios = {}
    for v in sizes:
        full, chunked = step_temp_bytes(v, 0), step_temp_bytes(v, -1)
        ratios[v] = (chunked["grad_temp"] / full["grad_temp"], chunked["temp"] / full["temp"])
        print(f"| {v:,} | {full['logits'] / gib:.2f} GiB | {full['grad_temp'] / gib:.3f} / "
              f"{chunked['grad_temp'] / gib:.3f} GiB / {ratios[v][0]:.3f} | "
              f"{full['temp'] / gib:.3f} / {chunked['temp'] / gib:.3f} GiB / {ratios[v][1]:.3f} |",
              flush=True)
    if 131072 in ratios:
        print(f"head_loss_temp_ratio_128k={ratios[131072][0]:.3f}")
        print(f"step_temp_ratio_128k={ratios[131072][1]:.3f}")
    print("rss_vs_maxtext: not measured (needs the MaxText venv of bench/vs_maxtext.sh)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
