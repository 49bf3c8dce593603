"""Evaluate a trained checkpoint on a text file: loss, perplexity and bits-per-byte.

Every window of ``seq_len + 1`` tokens (stride ``seq_len``) of the file is scored once:

    loss = Σ nll / Σ tokens,   ppl = exp(loss),   bpb = Σ nll / (ln 2 · Σ bytes of the targets)

Bits-per-byte divides by the UTF-8 bytes the target tokens stand for (the tokenizer's
``token_bytes`` table), so models with different tokenizers are comparable.

Example::

    from jaxlm.eval import evaluate_file
    evaluate_file("out/shakespeare", "jaxlm/assets/tinyshakespeare/input.txt", max_batches=4)
    # {'loss': 1.52, 'ppl': 4.57, 'bpb': 2.19, 'tokens': ...}
"""

from __future__ import annotations

from jaxlm.data.pipeline import Windows, eval_batches_from_rows, read_text
from jaxlm.data.tokenizer import get_tokenizer
from jaxlm.config import ConfigError
from jaxlm.train.checkpoint import load_trained
from jaxlm.train.step import evaluate, make_eval_step


def evaluate_file(out_dir: str, path: str, *, batch_size: int = 0, max_batches: int = 0) -> dict:
    """Score ``path`` with the latest checkpoint of ``out_dir`` (all windows unless max_batches)."""
    cfg, spec, params = load_trained(out_dir)
    tok = get_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    rows = Windows(tok.encode(read_text(path, "--data")), cfg.data.seq_len, tok.token_bytes)
    if len(rows) == 0:
        raise ConfigError(f"--data {path} has fewer than {cfg.data.seq_len + 1} tokens")
    shards = spec.mesh.shape["data"] * spec.mesh.shape["fsdp"]
    bs = batch_size or cfg.train.batch_size // cfg.train.grad_accum
    bs = -(-bs // shards) * shards  # round up to a multiple of the batch shards
    n = max_batches or -(-len(rows) // bs)
    batches = eval_batches_from_rows(rows, batch_size=bs, num_batches=n, process_index=0,
                                     process_count=1)
    result = evaluate(make_eval_step(spec), params, batches, spec.mesh)
    if result is None:
        raise ConfigError(f"--data {path}: the scored windows hold no target tokens; pass a "
                          "longer text file")
    return result
