"""Data layer: tokenizers (byte, GPT-2 BPE, SentencePiece) and grain batch pipelines.

Example::

    from jaxlm.config import DataConfig
    from jaxlm.data import make_data_source
    src = make_data_source(DataConfig(seq_len=64, tokenizer="gpt2"))
    it = src.train_iterator(batch_size=8, seed=0)   # infinite; it.get_state() checkpoints it
    batch = next(it)                                # dict of [8, 64] numpy arrays

Corpora: a text file, or a directory made by ``jaxlm-prepare`` (:mod:`jaxlm.data.prepare` writes
it, :mod:`jaxlm.data.prepared` reads it: sharded token files, each process reads what it needs);
``data.sources`` mixes several (:mod:`jaxlm.data.mixture`).

Modes (``data.mode``): ``concat`` (concat-and-chunk), ``pack`` (whole documents packed with
document masks), ``dd`` (Dataset Decomposition; ``jaxlm.data.decompose(n_tokens, buckets)`` gives
the piece lengths a document is cut into).
"""

from jaxlm.data.bucketing import DDDataSource, decompose
from jaxlm.data.modes import MODES, make_data_source, register_data_mode
from jaxlm.data.packing import PackDataSource
from jaxlm.data.pipeline import BATCH_KEYS, ConcatDataSource, DataSource, Windows, read_text
from jaxlm.data.tokenizer import (
    ByteTokenizer,
    GPT2Tokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    get_tokenizer,
)

__all__ = [
    "BATCH_KEYS", "ByteTokenizer", "ConcatDataSource", "DataSource", "GPT2Tokenizer",
    "HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "Windows", "get_tokenizer",
    "make_data_source",
    "read_text", "register_data_mode", "decompose", "DDDataSource", "PackDataSource", "MODES",
]
