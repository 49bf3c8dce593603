"""Command-line entry points: ``jaxlm-train``, ``jaxlm-sample``, ``jaxlm-eval``.

Each is ``main(argv) -> exit code`` around a plain function that notebooks call directly
(``jaxlm.train.loop.run``, ``jaxlm.sample.sample_text``, ``jaxlm.eval.evaluate_file``). User errors
(bad config, missing files, impossible mesh) print one ``error: …`` line and exit 2.

    jaxlm-train [CONFIG.yaml|PRESET] [section.key=value ...]   # no args: the shakespeare preset
        (one config, first: a .yaml after the overrides is an error; a config path with '='
        in it is still the config if it exists or ends in .yaml and is not key=value)
    jaxlm-sample --ckpt OUT_DIR --prompt "ROMEO:" [--temperature 0.8 --top-k 40 --top-p 0.95]
    jaxlm-eval --ckpt OUT_DIR --data FILE|shakespeare
    python -m jaxlm.cli {train,sample,eval} ...
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from jaxlm.config import ConfigError



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
    p = _Parser(prog="jaxlm-eval", description="Evaluate a checkpoint on a file.")
    p.add_argument("--ckpt", required=True, help="the out_dir of a training run")
    p.add_argument("--data", required=True,
                   help="a UTF-8 text file or a bundled corpus (shakespeare, wikitext2)")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--max-batches", type=int, default=0, help="0 = the whole file")
    p.add_argument("--seq-len", type=int, default=0,
                   help="window length (0 = the checkpoint's data.seq_len; less for short files)")
    a = p.parse_args(argv)
    if a.batch_size < 0 or a.max_batches < 0 or a.seq_len < 0:
        raise ConfigError(f"jaxlm-eval: --batch-size {a.batch_size}, --max-batches "
                          f"{a.max_batches} and --seq-len {a.seq_len} must be >= 0 (0 = default / "
                          "the whole file)")
    from jaxlm.config import resolve_data_path

    data = resolve_data_path(a.data, "jaxlm-eval: --data")
    from jaxlm.utils.files import check_data_file, not_regular_file

    if not os.path.isdir(data) and not_regular_file(data):  # /dev/zero, a FIFO: never read them
        check_data_file(data, "jaxlm-eval --data")
    if not os.path.isfile(data):  # fail before loading the checkpoint
        raise ConfigError(f"jaxlm-eval: --data {a.data} is not a file (pass a UTF-8 text file)")
    from jaxlm.eval import evaluate_file

    r = evaluate_file(a.ckpt, data, batch_size=a.batch_size, max_batches=a.max_batches,
                      seq_len=a.seq_len)
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
        got = f"unknown command {argv[0]!r}" if argv else "no command"
        print(f"error: {got} (usage: python -m jaxlm.cli {{{','.join(COMMANDS)}}} ...)",
              file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
