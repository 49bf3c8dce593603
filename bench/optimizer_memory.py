"""Parameters + optimizer-state memory per method for the papers' LLaMA presets, from shapes only.

    python bench/optimizer_memory.py                      # bf16 accounting (2 B/entry), as the papers
    python bench/optimizer_memory.py --bytes-per-entry 4  # jaxlm's float32 params and moments

One line per (preset, method)::

    opt_memory preset=1b method=galore bytes=4763087192 ratio_vs_adamw=0.5928

Counts come from ``jax.eval_shape`` of the model init and ``tx.init`` (no memory is allocated),
via :func:`jaxlm.optim.lowrank.state_bytes`: weights + optimizer state (scalar counters count as
one entry each), plus 4 B per SLTrain support index. Gradients and activations are not counted.
Shapes are the GaLore/Fira/SLTrain presets (vocab 32000, untied head; shared/notes/optimizers.md
§2.1) with their ranks 128/256/256/512 for both GaLore's projection and the B·A factors, SLTrain
density 0.03. The papers' check (§2.4 of the note): at 1B ≈ 8.0 GB full, ≈ 4.8 GaLore, ≈ 3.7
Low-Rank.
"""

import argparse

from jaxlm.config import load_config
from jaxlm.optim.lowrank import METHODS, method_config, state_bytes

PRESETS = {  # name: (d_model, n_layers, n_heads, d_ff, rank)
    "60m": (512, 8, 8, 1376, 128), "130m": (768, 12, 12, 2048, 256),
    "350m": (1024, 24, 16, 2736, 256), "1b": (2048, 24, 32, 5461, 512)}


def preset_config(name: str):
    d, n_layers, heads, ff, rank = PRESETS[name]
    return load_config(None, [
        "model.vocab_size=32000", f"model.d_model={d}", f"model.n_layers={n_layers}",
        f"model.n_heads={heads}", f"model.d_ff={ff}", f"optim.rank={rank}",
        f"model.lowrank_rank={rank}", "model.sparse_density=0.03"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes-per-entry", type=int, default=2)
    ap.add_argument("--presets", default=",".join(PRESETS))
    args = ap.parse_args()
    for preset in args.presets.split(","):
        cfg = preset_config(preset)
        full = state_bytes(method_config(cfg, "adamw"), args.bytes_per_entry)
        for method in METHODS:
            b = state_bytes(method_config(cfg, method), args.bytes_per_entry)
            print(f"opt_memory preset={preset} method={method} bytes={b} "
                  f"ratio_vs_adamw={b / full:.4f}", flush=True)


if __name__ == "__main__":
    main()
