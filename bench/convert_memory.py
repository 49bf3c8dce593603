"""Host memory of importing a large Hugging Face checkpoint (issue #16): streamed, one tensor at a
time, onto the run's shardings.

    python bench/convert_memory.py                    # a generated ~2.2 GB LLaMA checkpoint
    python bench/convert_memory.py --layers 2         # smaller, for a quick look

Generates (once, in ``--work``; never committed) a LLaMA checkpoint in HF layout — hidden 2048,
8 layers, MLP 5632, vocab 32000, untied, float32, two ``model-0000k-of-00002.safetensors`` shards
with their index — then, in a fresh process, imports it with
:func:`jaxlm.convert.hf.load_hf_params` (what ``init_from=hf:DIR`` and ``jaxlm-convert`` use) on
one CPU device and reads the process's peak resident memory (VmHWM).

On a CPU the imported parameters themselves live in host memory (on an accelerator they would be
in HBM), so the figure is the memory *beyond* them::

    import_peak_rss_over_largest_tensor = (VmHWM − RSS before the import − bytes of the params)
                                          / bytes of the largest tensor

(issue target ≤ 3: a streaming import holds a tensor or two at a time, not the model). The raw
figures are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMPORT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
import jax
from jaxlm.config import from_dict
from jaxlm.convert.hf_config import model_overrides
from jaxlm.convert.hf import load_hf_params
from jaxlm.optim import build_optimizer
from jaxlm.sharding import make_mesh
from jaxlm.train.state import StateSpec
hf = sys.argv[1]
model, seq_len, _ = model_overrides(json.load(open(os.path.join(hf, "config.json"))))
cfg = from_dict({"model": model, "data": {"seq_len": 256}})
spec = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
before = status("VmRSS")
params = load_hf_params(hf, cfg, spec)
jax.block_until_ready(params)
nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
print(json.dumps({"before": before, "peak": status("VmHWM"), "after": status("VmRSS"),
                  "params_bytes": nbytes}))
"""


def generate(hf_dir: str, layers: int, hidden: int = 2048, mlp: int = 5632,
             vocab: int = 32000) -> dict:
    """A random float32 LLaMA checkpoint in HF layout (2 shards + index + config.json)."""
    from safetensors.numpy import save_file

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": 16,
           "num_key_value_heads": 16, "vocab_size": vocab, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "max_position_embeddings": 2048,
           "tie_word_embeddings": False, "torch_dtype": "float32"}
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{n}_proj.weight": (hidden, hidden) for n in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": (mlp, hidden),
                       p + "mlp.up_proj.weight": (mlp, hidden),
                       p + "mlp.down_proj.weight": (hidden, mlp),
                       p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    if os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json")):
        return shapes
    os.makedirs(hf_dir, exist_ok=True)
    names = list(shapes)
    halves = [names[:len(names) // 2], names[len(names) // 2:]]
    rng = np.random.default_rng(0)
    weight_map = {}
    for k, part in enumerate(halves):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: (rng.standard_normal(shapes[n], np.float32) * 0.02) for n in part},
                  os.path.join(hf_dir, fname))
        weight_map.update({n: fname for n in part})
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return shapes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/jaxlm_convert_memory")
    p.add_argument("--layers", type=int, default=8)
    a = p.parse_args(argv)
    hf_dir = os.path.join(a.work, f"llama_{a.layers}l")
    shapes = generate(hf_dir, a.layers)
    largest = max(int(np.prod(s)) * 4 for s in shapes.values())
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    out = subprocess.run([sys.executable, "-c", IMPORT, hf_dir], check=True, cwd=ROOT,
                         capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    beyond = r["peak"] - r["before"] - r["params_bytes"]
    mib = 1 << 20
    print(f"checkpoint_bytes={total} largest_tensor_bytes={largest} "
          f"params_bytes={r['params_bytes']}")
    print(f"rss_before_mib={r['before'] / mib:.0f} peak_rss_mib={r['peak'] / mib:.0f} "
          f"after_mib={r['after'] / mib:.0f} beyond_params_mib={beyond / mib:.0f}")
    print(f"import_peak_rss_over_largest_tensor={beyond / largest:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
