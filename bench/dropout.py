"""Dropout on the default preset: held-out bits-per-byte with ``model.dropout`` 0 / 0.1 / 0.2.

    python bench/dropout.py                 # every arm; finished arms are skipped
    python bench/dropout.py --arms default_d0.1

Three regimes of the ``shakespeare`` preset (0.9M params, byte tokens, 2,048 tokens/step):
``default`` is the preset as shipped (400 steps, 0.8 epochs of ~1.0M training bytes), ``4ep``
trains 2,000 steps (4 epochs), and ``small`` trains 1,000 steps on only the first 10% of the text
(~100 KB, ~20 epochs) and validates on the other 90% — the regime where a model memorises its
data and dropout is expected to help (nanoGPT's Shakespeare config uses 0.2). Each finished arm is appended to
``bench/results/dropout.jsonl`` (``arm``, ``dropout``, ``steps``, ``val_bpb``, ``val_loss``,
``train_loss``) and skipped next time, so the sweep resumes after an interruption.
"""

import argparse
import json
import os
import tempfile

ARMS = {  # name: overrides
    "default_d0": ["model.dropout=0"],
    "default_d0.1": ["model.dropout=0.1"],
    "4ep_d0": ["model.dropout=0", "train.steps=2000", "train.warmup_steps=100"],
    "4ep_d0.1": ["model.dropout=0.1", "train.steps=2000", "train.warmup_steps=100"],
    # train on the first 10% (~100 KB) of the text, validate on the other 90%: ~20 epochs
    "small_d0": ["model.dropout=0", "data.val_fraction=0.9", "train.steps=1000"],
    "small_d0.2": ["model.dropout=0.2", "data.val_fraction=0.9", "train.steps=1000"],
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "dropout.jsonl")


def done_arms() -> set:
    if not os.path.exists(RESULTS):
        return set()
    with open(RESULTS) as f:
        return {json.loads(line)["arm"] for line in f if line.strip()}


def run_arm(name: str) -> dict:
    from jaxlm.config import load_config
    from jaxlm.train.loop import run

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config("shakespeare", [f"out_dir={out}", "train.sample_tokens=0",
                                          "train.eval_every=0", "ckpt.every=0", *ARMS[name]])
        res = run(cfg)
    return {"arm": name, "dropout": cfg.model.dropout, "steps": cfg.train.steps,
            "tokens": cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len,
            "val_bpb": res["eval"]["bpb"], "val_loss": res["eval"]["loss"],
            "train_loss": res["loss"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default=",".join(ARMS))
    args = ap.parse_args(argv)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    for name in args.arms.split(","):
        if name in done_arms():
            print(f"skip {name} (in {RESULTS})")
            continue
        row = run_arm(name)
        with open(RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")
        print("dropout_result " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
