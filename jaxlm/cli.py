"""Command-line entry points: ``jaxlm-train``, ``jaxlm-sample``, ``jaxlm-eval``, ``jaxlm-prepare``.

Each is ``main(argv) -> exit code`` around a plain function that notebooks call directly
(``jaxlm.train.loop.run``, ``jaxlm.sample.sample_text``, ``jaxlm.eval.evaluate_file``,
``jaxlm.data.prepare.prepare``). User errors
(bad config, missing files, impossible mesh) print one ``error: …`` line and exit 2.

    jaxlm-train [CONFIG.yaml|PRESET] [section.key=value ...]   # no args: the shakespeare preset
        (one config, first: a .yaml after the overrides is an error; a config path with '='
        in it is still the config if it exists or ends in .yaml and is not key=value)
    jaxlm-sample --ckpt OUT_DIR --prompt "ROMEO:" [--temperature 0.8 --top-k 40 --top-p 0.95]
    jaxlm-eval --ckpt OUT_DIR [--data FILE|shakespeare]   # no --data: the run's held-out data
    jaxlm-prepare INPUT... --out DIR [--tokenizer byte|gpt2|sentencepiece|hf] [--tokenizer-path P]
        [--num-proc N] [--text-field F] [--val-fraction X] [--docs-per-shard N]
        [--hf-config C] [--hf-split S] [--no-progress]
        (INPUT: .txt/.jsonl/.jsonl.gz/.parquet files, directories, globs, hf:NAME_OR_PATH; ends
        with `prepared docs= tokens= shards= val_docs= skipped= tokens_per_s=`: docs, tokens and
        shards of both splits, tokens_per_s = the corpus' tokens / this run's wall time)
    python -m jaxlm.cli {train,sample,eval,prepare} ...

``jaxlm-train`` (the console command only) first re-executes itself with glibc's transparent
huge pages tunable, which makes XLA:CPU's train steps faster (jaxlm/utils/hugepages.py; opt out
with ``JAXLM_HUGEPAGES=0``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from jaxlm.config import ConfigError
from jaxlm.utils.hugepages import reexec_with_hugepages



def _guard(fn, argv) -> int:
    try:
        return fn(argv)
    except ConfigError as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)  # always one line
        return 2
    except BrokenPipeError:  # `jaxlm-sample ... | head -1`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (exit flush is quiet)
        return 141  # the shell's code for "ended by SIGPIPE"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one ConfigError line (not usage text + exit)."""

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


def _train(argv) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0].startswith("-"):
        raise ConfigError(f"jaxlm-train: unknown option {argv[0]!r} (usage: jaxlm-train "
                          "[CONFIG.yaml] [section.key=value ...])")
    from jaxlm.config import DEFAULT_PRESET, load_config

    path, overrides = split_train_args(argv)
    cfg = load_config(path or DEFAULT_PRESET, overrides)  # a preset name or a YAML path

    from jaxlm.distributed import is_primary
    from jaxlm.train.loop import run

    result = run(cfg)
    if result["preempted"]:
        return 0
    n = result["cfg"].train.sample_tokens
    if n and result["state"] is not None and is_primary():
        from jaxlm.sample import sample_text

        text = sample_text(result["spec"].graphdef, result["state"]["params"],
                           result["tokenizer"], "", max_new_tokens=n, temperature=0.8,
                           top_k=0, top_p=0.95, seed=0, context=result["cfg"].data.seq_len)
        _print_text("---- sample ----\n" + text + "\n----------------")
    return 0


def _is_override(arg: str) -> bool:
    """``section.key=value`` whose first key is a config field (so ``runs/a=b.yaml`` is not)."""
    import dataclasses

    from jaxlm.config import Config

    key = arg.split("=", 1)[0].strip()
    fields = {f.name for f in dataclasses.fields(Config)}
    return "=" in arg and key.split(".")[0] in fields


def split_train_args(argv) -> tuple[str | None, list]:
    """(config path or preset name or None, overrides). The config comes first; a first argument
    with ``=`` is still the config when it names an existing file or ends in .yaml/.yml and does
    not start with a config key (``out_dir=x.yaml`` is an override). A YAML file given after the
    overrides is an error, not a "bad override"."""
    first = argv[0] if argv else None
    is_config = first is not None and (
        "=" not in first or os.path.isfile(first)
        or (first.endswith((".yaml", ".yml")) and not _is_override(first)))
    path, overrides = (first, list(argv[1:])) if is_config else (None, list(argv))
    for arg in overrides:
        if "=" not in arg and arg.endswith((".yaml", ".yml")):
            if path is not None:
                raise ConfigError(f"jaxlm-train takes one config file, got a second: {arg!r} "
                                  "(merge them, or pass its settings as key=value overrides)")
            raise ConfigError(f"jaxlm-train: {arg!r} comes after other arguments, but the config "
                              "file must come first: jaxlm-train CONFIG.yaml key=value ...")
    return path, overrides


def _sample(argv) -> int:
    p = _Parser(prog="jaxlm-sample", description="Sample from a checkpoint.")
    p.add_argument("--ckpt", required=True, help="the out_dir of a training run")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true", help="temperature 0 (argmax)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    checks = {"--temperature": (a.temperature, math.isfinite(a.temperature)
                                and a.temperature >= 0, "a finite number >= 0"),
              "--top-p": (a.top_p, 0 < a.top_p <= 1, "in (0, 1]"),
              "--top-k": (a.top_k, a.top_k >= 0, ">= 0 (0 = off)"),
              "--max-new-tokens": (a.max_new_tokens, a.max_new_tokens > 0, "> 0"),
              "--seed": (a.seed, 0 <= a.seed < 2**63, f"in [0, {2**63 - 1}]")}
    for flag, (value, ok, want) in checks.items():
        if not ok:
            raise ConfigError(f"jaxlm-sample: {flag} {value} must be {want}")
    from jaxlm.sample import sample_text
    from jaxlm.train.checkpoint import load_trained, trained_tokenizer

    cfg, spec, params = load_trained(a.ckpt)
    tok = trained_tokenizer(cfg, a.ckpt)
    text = sample_text(spec.graphdef, params, tok, _prompt(a.prompt, tok),
                       max_new_tokens=a.max_new_tokens,
                       temperature=0.0 if a.greedy else a.temperature, top_k=a.top_k,
                       top_p=a.top_p, seed=a.seed, context=cfg.data.seq_len)
    _print_text(text)
    return 0


def _prompt(arg: str, tok):
    """argv text -> what the tokenizer gets. Python decodes argv with ``surrogateescape``, so bytes
    that are not UTF-8 (``--prompt $'\\xff\\xfe abc'``) arrive as lone surrogates: the byte
    tokenizer takes the exact bytes, the others get them as U+FFFD (they only encode text)."""
    raw = arg.encode("utf-8", "surrogateescape")
    return raw if tok.name == "byte" else raw.decode("utf-8", "replace")


def _print_text(text: str) -> None:
    """print, but never a UnicodeEncodeError: characters stdout cannot encode become '?'."""
    try:
        print(text)
    except UnicodeEncodeError:
        enc = getattr(sys.stdout, "encoding", None) or "utf-8"
        print(text.encode(enc, "replace").decode(enc, "replace"))


def _eval(argv) -> int:
    p = _Parser(prog="jaxlm-eval", description="Evaluate a checkpoint on a file, or on the "
                "run's own held-out data (every source of a mixture) when --data is not given.")
    p.add_argument("--ckpt", required=True, help="the out_dir of a training run")
    p.add_argument("--data", default="",
                   help="a UTF-8 text file, a jaxlm-prepare directory (its val split) or a bundled "
                   "corpus (shakespeare, wikitext2); "
                   "omitted: the run's held-out split(s), eval_bpb/<name> per mixture source")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--max-batches", type=int, default=0, help="0 = the whole file")
    p.add_argument("--seq-len", type=int, default=0,
                   help="window length (0 = the checkpoint's data.seq_len; less for short files)")
    a = p.parse_args(argv)
    if a.batch_size < 0 or a.max_batches < 0 or a.seq_len < 0:
        raise ConfigError(f"jaxlm-eval: --batch-size {a.batch_size}, --max-batches "
                          f"{a.max_batches} and --seq-len {a.seq_len} must be >= 0 (0 = default / "
                          "the whole file)")
    if not a.data:
        return _eval_run(a)
    from jaxlm.config import resolve_data_path

    data = resolve_data_path(a.data, "jaxlm-eval: --data")
    from jaxlm.utils.files import check_data_file, not_regular_file

    if not os.path.isdir(data) and not_regular_file(data):  # /dev/zero, a FIFO: never read them
        check_data_file(data, "jaxlm-eval --data")
    from jaxlm.data.prepared import is_prepared

    if not os.path.isfile(data) and not is_prepared(data):  # fail before loading the checkpoint
        raise ConfigError(f"jaxlm-eval: --data {a.data} is not a file (pass a UTF-8 text file "
                          "or a jaxlm-prepare directory)")
    from jaxlm.eval import evaluate_file

    r = evaluate_file(a.ckpt, data, batch_size=a.batch_size, max_batches=a.max_batches,
                      seq_len=a.seq_len)
    print(f"tokens={r['tokens']}")
    print(f"loss={r['loss']:.4f} ppl={r['ppl']:.3f} bpb={r['bpb']:.4f}")
    return 0


def _eval_run(a) -> int:
    """jaxlm-eval without --data: the run's held-out data; a mixture prints one line per source."""
    if a.seq_len:
        raise ConfigError("jaxlm-eval: --seq-len needs --data (the run's held-out data is scored "
                          "at its training length)")
    from jaxlm.eval import evaluate_run

    r = evaluate_run(a.ckpt, batch_size=a.batch_size, max_batches=a.max_batches)
    print(f"tokens={r['tokens']}")
    print(f"loss={r['loss']:.4f} ppl={r['ppl']:.3f} bpb={r['bpb']:.4f}")
    for name, m in r.get("sources", {}).items():
        print(f"eval_bpb/{name}={m['bpb']:.4f} eval_loss/{name}={m['loss']:.4f} "
              f"tokens/{name}={m['tokens']}")
    return 0


def _prepare(argv) -> int:
    p = _Parser(prog="jaxlm-prepare",
                description="Tokenize raw text into a sharded corpus (see jaxlm/data/prepare.py).")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".txt (cut into documents at blank lines), .jsonl, .jsonl.gz, .parquet "
                        "files, directories and globs of them, hf:NAME_OR_PATH")
    p.add_argument("--out", required=True, help="output directory")
    from jaxlm.data.tokenizer import TOKENIZER_NAMES

    p.add_argument("--tokenizer", default="byte", choices=TOKENIZER_NAMES)
    p.add_argument("--tokenizer-path", default="",
                   help="gpt2: dir with vocab.json+merges.txt, sentencepiece: .model ('' = "
                        "bundled); hf: a tokenizer.json or its directory (required)")
    p.add_argument("--num-proc", type=int, default=1, help="tokenizer processes")
    p.add_argument("--text-field", default="text", help="jsonl/parquet/hf text column")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="held-out fraction of documents, by content hash, in [0, 1)")
    p.add_argument("--docs-per-shard", type=int, default=65536)
    p.add_argument("--hf-config", default="", help="hf: inputs' dataset config name")
    p.add_argument("--hf-split", default="train", help="hf: inputs' split")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    import shlex
    import time

    from jaxlm.data.prepare import prepare
    from jaxlm.utils.files import check_local_dir

    check_local_dir(a.out, "--out")  # gs://... would make a local "gs:" directory

    t0 = time.perf_counter()
    m = prepare(a.inputs, a.out, tokenizer=a.tokenizer, tokenizer_path=a.tokenizer_path,
                num_proc=a.num_proc, text_field=a.text_field, val_fraction=a.val_fraction,
                docs_per_shard=a.docs_per_shard, hf_config=a.hf_config, hf_split=a.hf_split,
                progress=not a.no_progress, command=shlex.join(["jaxlm-prepare", *argv]))
    sp = m["splits"]
    tokens = sp["train"]["tokens"] + sp["val"]["tokens"]
    print(f"prepared docs={sp['train']['docs'] + sp['val']['docs']} tokens={tokens} "
          f"shards={len(sp['train']['shards']) + len(sp['val']['shards'])} "
          f"val_docs={sp['val']['docs']} skipped={sum(m['skipped'].values())} "
          f"tokens_per_s={tokens / max(time.perf_counter() - t0, 1e-9):.0f} out={a.out}")
    return 0


def train_main(argv=None) -> int:
    if argv is None:  # the console command (not a notebook or a test): huge pages for XLA:CPU
        reexec_with_hugepages()
    return _guard(_train, sys.argv[1:] if argv is None else argv)


def sample_main(argv=None) -> int:
    return _guard(_sample, sys.argv[1:] if argv is None else argv)


def eval_main(argv=None) -> int:
    return _guard(_eval, sys.argv[1:] if argv is None else argv)


def prepare_main(argv=None) -> int:
    return _guard(_prepare, sys.argv[1:] if argv is None else argv)


COMMANDS = {"train": train_main, "sample": sample_main, "eval": eval_main,
            "prepare": prepare_main}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        got = f"unknown command {argv[0]!r}" if argv else "no command"
        print(f"error: {got} (usage: python -m jaxlm.cli {{{','.join(COMMANDS)}}} ...)",
              file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
