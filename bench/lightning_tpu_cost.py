"""Lightning attention on TPU without a TPU: the TPU compiler's own memory and cost analysis of the
chunked linear-attention op (and of a TNL train step), pure JAX (``linear_impl=jax``) vs the Pallas
kernels (``linear_impl=pallas``, jaxlm/ops/lightning_pallas.py). Compile only (libtpu from PyPI,
``pip install -e ".[plan]"``; a v5e chip described by ``jax.experimental.topologies``), so these are
the compiler's temp bytes and bytes-accessed estimates, not times. For the Pallas kernel XLA uses
the kernel's cost estimate (each input and output counted once); a while loop's body (the layer
scan) is counted once.

    python bench/lightning_tpu_cost.py                  # the op, B=1 H=32 K=V=128 bf16, chunk 128
    python bench/lightning_tpu_cost.py --chunk 64
    python bench/lightning_tpu_cost.py --model          # a TNL train step (d 1024, 8x128 heads)

One line per (T, impl, what): ``T=8192 C=128 pallas fwd+bwd temp=...MiB bytes_accessed=...MiB``.
Results: bench/RESULTS.md, "Lightning attention as a Pallas TPU kernel".
"""

from __future__ import annotations

import argparse


def _op_lines(chunk: int, lengths, dev):
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from jaxlm.ops import linear_attention_reset
    from jaxlm.plan.compile import cost_analysis, memory_analysis

    sh = SingleDeviceSharding(dev)
    b, h, d = 1, 32, 128
    for t in lengths:
        args = tuple(jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16, sharding=sh)  # [B, T, H, K]
                     for _ in range(3)) + (jax.ShapeDtypeStruct((h,), jnp.float32, sharding=sh),)
        for impl in ("jax", "pallas"):
            def op(q, k, v, g, impl=impl):
                return linear_attention_reset(q, k, v, g, chunk_size=chunk, impl=impl)

            def loss(q, k, v, g, op=op):
                return jnp.sum(op(q, k, v, g).astype(jnp.float32) ** 2)

            for what, fn in (("fwd", op), ("fwd+bwd", jax.grad(loss, argnums=(0, 1, 2)))):
                c = jax.jit(fn).lower(*args).compile()
                m, ca = memory_analysis(c), cost_analysis(c)
                print(f"T={t} C={chunk} {impl} {what} temp={m['temp'] / 2**20:.1f}MiB "
                      f"bytes_accessed={ca['bytes_accessed'] / 2**20:.1f}MiB", flush=True)


def _model_lines(chunk: int, lengths, dev):
    from jaxlm.config import load_config
    from jaxlm.plan.compile import compile_train_step, cost_analysis, memory_analysis

    for t in lengths:
        for impl in ("jax", "pallas"):
            cfg = load_config("tiny", [
                "model.vocab_size=32000", "train.batch_size=1", f"data.seq_len={t}",
                "model.attention=tnl", "model.n_kv_heads=0", "model.d_model=1024",
                "model.n_heads=8", "model.d_ff=2816", "model.n_layers=4", "model.dtype=bfloat16",
                f"model.linear_chunk={chunk}", f"model.linear_impl={impl}",
                "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
            out = compile_train_step(cfg, [dev])
            m, c = memory_analysis(out.compiled), cost_analysis(out.compiled)
            print(f"T={t} C={chunk} {impl} train_step temp={m['temp'] / 2**20:.1f}MiB "
                  f"bytes_accessed_loop_once={c['bytes_accessed'] / 2**30:.2f}GiB", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--model", action="store_true", help="a TNL train step instead of the op")
    a = ap.parse_args(argv)
    from jaxlm.plan.compile import tpu_devices

    dev = tpu_devices("v5e:2x2")[0]
    (_model_lines if a.model else _op_lines)(a.chunk, a.lengths, dev)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
