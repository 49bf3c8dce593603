"""Evaluate a trained checkpoint on a text file, or on its own held-out data: loss, perplexity
and bits-per-byte.

Every window of ``seq_len + 1`` tokens (stride ``seq_len``) of the file is scored once:

    loss = Σ nll / Σ tokens,   ppl = exp(loss),   bpb = Σ nll / (ln 2 · Σ bytes of the targets)

Bits-per-byte divides by the UTF-8 bytes the target tokens stand for (the tokenizer's
``token_bytes`` table), so models with different tokenizers are comparable.

Example::

    from jaxlm.eval import evaluate_file
    evaluate_file("out/shakespeare", "jaxlm/assets/tinyshakespeare/input.txt", max_batches=4)
    # {'loss': 1.52, 'ppl': 4.57, 'bpb': 2.19, 'tokens': ...}
    evaluate_run("out/mix")   # the run's held-out split(s); a mixture adds {"sources": {name: ...}}

:func:`evaluate_run` scores what the run held out (the val split of ``data.path`` / a prepared
corpus, or of every ``data.sources`` entry), with the run's data config and the same batching as
the training loop's eval; for a mixture the overall numbers pool every source's held-out tokens.
"""

from __future__ import annotations

from jaxlm.data.modes import make_data_source
from jaxlm.data.pipeline import Windows, eval_batches_from_rows, read_text
from jaxlm.data.prepared import ShardedWindows, is_prepared, open_prepared
from jaxlm.config import ConfigError
from jaxlm.train.checkpoint import load_trained, trained_tokenizer
from jaxlm.train.step import evaluate, evaluate_groups, make_eval_step


def evaluate_file(out_dir: str, path: str, *, batch_size: int = 0, max_batches: int = 0,
                  seq_len: int = 0) -> dict:
    """Score ``path`` (a text file, or a prepared corpus's held-out split) with the latest
    checkpoint of ``out_dir`` (all windows unless max_batches).

    ``seq_len``: the window length (0 = the checkpoint's data.seq_len); a shorter window scores
    files too short for the training context (positions stay inside the trained range)."""
    cfg, spec, params = load_trained(out_dir)
    trained = cfg.data.seq_len
    if not 0 <= seq_len <= trained:
        raise ConfigError(f"jaxlm-eval: --seq-len {seq_len} must be in [1, {trained}] (the "
                          f"checkpoint's data.seq_len; 0 = {trained})")
    length = seq_len or trained
    tok = trained_tokenizer(cfg, out_dir)
    if is_prepared(path):  # a jaxlm-prepare directory: its val split (else train), never read whole
        pc = open_prepared(path, tok, "jaxlm-eval: --data", need_train=False)
        tokens = pc.tokens(pc.heldout_split())
        rows = ShardedWindows(tokens, length, tok.token_bytes)
    else:
        tokens = tok.encode(read_text(path, "--data"))
        rows = Windows(tokens, length, tok.token_bytes)
    if len(rows) == 0:
        window = f"--seq-len {length}" if seq_len else f"the checkpoint's data.seq_len={length}"
        shorter = (f", or score shorter windows with --seq-len {len(tokens) - 1}"
                   if len(tokens) >= 2 else "")
        raise ConfigError(f"jaxlm-eval: --data {path} has {len(tokens)} tokens, but one window of "
                          f"{window} needs {length + 1}; pass a longer file{shorter}")
    # a batch larger than the file is only padding (--batch-size 1e9)
    bs = _batch_size(spec, cfg, min(batch_size or cfg.train.batch_size // cfg.train.grad_accum,
                                    len(rows)))
    n = max_batches or -(-len(rows) // bs)
    batches = eval_batches_from_rows(rows, batch_size=bs, num_batches=n, process_index=0,
                                     process_count=1)
    result = evaluate(make_eval_step(spec), params, batches, spec.mesh)
    if result is None:
        raise ConfigError(f"--data {path}: the scored windows hold no target tokens; pass a "
                          "longer text file")
    return result


def _batch_size(spec, cfg, batch_size: int) -> int:
    """``batch_size`` (0 = the run's micro-batch) rounded up to a multiple of the batch shards."""
    shards = spec.mesh.shape["data"] * spec.mesh.shape["fsdp"]
    bs = batch_size or cfg.train.batch_size // cfg.train.grad_accum
    return -(-bs // shards) * shards


def evaluate_run(out_dir: str, *, batch_size: int = 0, max_batches: int = 0) -> dict:
    """Score the latest checkpoint of ``out_dir`` on the run's own held-out data (every window
    unless ``max_batches`` per source). A mixture's result has ``"sources"``: {name: metrics}."""
    cfg, spec, params = load_trained(out_dir)
    data = make_data_source(cfg.data)
    kw = dict(batch_size=_batch_size(spec, cfg, batch_size), num_batches=max_batches or 2**31,
              process_index=0, process_count=1)
    if hasattr(data, "eval_groups"):
        result = evaluate_groups(make_eval_step(spec), params, data.eval_groups(**kw), spec.mesh)
    else:
        result = evaluate(make_eval_step(spec), params, data.eval_batches(**kw), spec.mesh)
    if result is None:
        raise ConfigError(f"jaxlm-eval --ckpt {out_dir}: the run's held-out data holds no target "
                          "tokens; pass --data FILE to score a file instead")
    return result
