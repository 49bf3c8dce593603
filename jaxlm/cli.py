"""Command-line entry points: ``jaxlm-train``, ``jaxlm-sample``, ``jaxlm-eval``.

Each is ``main(argv) -> exit code`` around a plain function that notebooks call directly
(``jaxlm.train.loop.run``, ``jaxlm.sample.sample_text``, ``jaxlm.eval.evaluate_file``). User errors
(bad config, missing files, impossible mesh) print one ``error: …`` line and exit 2.

    jaxlm-train [CONFIG.yaml] [section.key=value ...]      # no args: configs/shakespeare.yaml
    jaxlm-sample --ckpt OUT_DIR --prompt "ROMEO:" [--temperature 0.8 --top-k 40 --top-p 0.95]
    jaxlm-eval --ckpt OUT_DIR --data FILE
    python -m jaxlm.cli {train,sample,eval} ...
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxlm.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PRESET = os.path.join(REPO, "configs", "shakespeare.yaml")


def _guard(fn, argv) -> int:
    try:
        return fn(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _train(argv) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    from jaxlm.config import load_config

    path = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if path else argv
    if path is None and os.path.isfile(DEFAULT_PRESET):
        path = DEFAULT_PRESET  # (the dataclass defaults equal this preset when it is absent)
    cfg = load_config(path, overrides)

    from jaxlm.train.loop import run

    result = run(cfg)
    if result["preempted"]:
        return 0
    n = result["cfg"].train.sample_tokens
    if n and result["state"] is not None and _is_primary():
        from jaxlm.sample import sample_text

        text = sample_text(result["spec"].graphdef, result["state"]["params"],
                           result["tokenizer"], "", max_new_tokens=n, temperature=0.8,
                           top_k=0, top_p=0.95, seed=0, context=result["cfg"].data.seq_len)
        print("---- sample ----\n" + text + "\n----------------")
    return 0


def _is_primary() -> bool:
    import jax

    return jax.process_index() == 0


def _sample(argv) -> int:
    p = argparse.ArgumentParser(prog="jaxlm-sample", description="Sample from a checkpoint.")
    p.add_argument("--ckpt", required=True, help="the out_dir of a training run")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true", help="temperature 0 (argmax)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.temperature < 0 or not 0 < a.top_p <= 1 or a.top_k < 0 or a.max_new_tokens <= 0:
        raise ConfigError("need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0, "
                          "--max-new-tokens > 0")
    from jaxlm.data.tokenizer import get_tokenizer
    from jaxlm.sample import sample_text
    from jaxlm.train.checkpoint import load_trained

    cfg, spec, params = load_trained(a.ckpt)
    tok = get_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    text = sample_text(spec.graphdef, params, tok, a.prompt, max_new_tokens=a.max_new_tokens,
                       temperature=0.0 if a.greedy else a.temperature, top_k=a.top_k,
                       top_p=a.top_p, seed=a.seed, context=cfg.data.seq_len)
    print(text)
    return 0


def _eval(argv) -> int:
    p = argparse.ArgumentParser(prog="jaxlm-eval", description="Evaluate a checkpoint on a file.")
    p.add_argument("--ckpt", required=True, help="the out_dir of a training run")
    p.add_argument("--data", required=True, help="a UTF-8 text file")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--max-batches", type=int, default=0, help="0 = the whole file")
    a = p.parse_args(argv)
    from jaxlm.eval import evaluate_file

    r = evaluate_file(a.ckpt, a.data, batch_size=a.batch_size, max_batches=a.max_batches)
    print(f"tokens={r['tokens']}")
    print(f"loss={r['loss']:.4f} ppl={r['ppl']:.3f} bpb={r['bpb']:.4f}")
    return 0


def train_main(argv=None) -> int:
    return _guard(_train, sys.argv[1:] if argv is None else argv)


def sample_main(argv=None) -> int:
    return _guard(_sample, sys.argv[1:] if argv is None else argv)


def eval_main(argv=None) -> int:
    return _guard(_eval, sys.argv[1:] if argv is None else argv)


COMMANDS = {"train": train_main, "sample": sample_main, "eval": eval_main}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m jaxlm.cli {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
