"""Data sources: text file -> tokens -> fixed-shape training batches through a grain pipeline.

A batch is a dict of numpy arrays, each of shape [local_batch, seq_len]:

- ``inputs`` / ``targets`` int32: targets are the next tokens (``targets[:, t] == inputs[:, t+1]``);
- ``positions`` int32 (RoPE positions) and ``segment_ids`` int32 (>= 1 real token, 0 padding);
- ``loss_mask`` float32: 1 where the target counts;
- ``target_bytes`` int32: ``tokenizer.token_bytes[targets] * loss_mask``, for exact bits-per-byte.

Mode ``concat`` (concat-and-chunk, nanoGPT style): the whole file (or a prepared corpus's split,
read lazily from its shards: :mod:`jaxlm.data.prepared`) is one token stream, cut into
windows of ``seq_len + 1`` tokens taken with stride ``seq_len``. Neighbouring windows overlap by one
token, so every token after the first is a target exactly once per epoch and nothing is dropped
except the tail shorter than a window. Validation is ``data.val_path`` if set, else the last
``val_fraction`` of the tokens of ``data.path``.

This module is the bottom of the data layer: the :class:`DataSource` protocol, the shared grain
train pipeline and held-out batching (:class:`HeldOut`), and the ``concat`` mode. Modes ``pack``
(:mod:`jaxlm.data.packing`) and ``dd`` (Dataset Decomposition, :mod:`jaxlm.data.bucketing`) read
document corpora (:mod:`jaxlm.data.corpus`) and build on it; the registry of modes, where all of
them are known, is :mod:`jaxlm.data.modes` (imports go one way: modes -> modes' modules -> here).

Training iterator (grain): source(windows) -> shuffle(seed) -> repeat(None) (reshuffled each
epoch) -> batch(local) -> every ``process_count``-th block from ``process_index``. The shuffle is a
lazy index permutation and rows are built only when read, so a process reads only its own rows:
global batch b is rows ``[b*B, (b+1)*B)`` of the shuffled stream and process p reads its
``[p*local, (p+1)*local)`` part. The global batches are therefore the same for any process count
(a 2-host run trains on exactly the batches of a 1-host run). The iterator state is tiny
(``{'next_index': k}``) and checkpoints with ``it.get_state()/set_state()`` or orbax
``grain.checkpoint.CheckpointSave/CheckpointRestore``.

Example::

    from jaxlm.config import DataConfig
    from jaxlm.data import make_data_source
    src = make_data_source(DataConfig(seq_len=64))          # bundled tinyshakespeare, bytes
    batch = next(src.train_iterator(batch_size=8))          # batch["inputs"].shape == (8, 64)
    val = src.eval_batches(batch_size=8, num_batches=2)     # same two batches on every call
"""

from __future__ import annotations

from typing import Protocol, Sequence

import grain
import numpy as np

from jaxlm.config import (DEFAULT_CORPUS, ConfigError, DataConfig,
                          resolve_data_path)
from jaxlm.data.tokenizer import Tokenizer, get_tokenizer
from jaxlm.utils.files import check_data_file

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask", "target_bytes")


class DataSource(Protocol):
    """What the training loop uses. Batch sizes are global; each process gets its local part."""

    tokenizer: Tokenizer

    def train_iterator(self, *, batch_size: int, process_index: int = 0, process_count: int = 1,
                       seed: int = 0) -> grain.DatasetIterator:
        """Infinite, checkpointable iterator of batches of batch_size // process_count rows."""
        ...

    def train_dataset(self, *, batch_size: int, process_index: int = 0, process_count: int = 1,
                      seed: int = 0) -> grain.IterDataset:
        """The grain dataset ``train_iterator`` iterates (what a mixture mixes)."""
        ...

    def eval_batches(self, *, batch_size: int, num_batches: int, process_index: int = 0,
                     process_count: int = 1) -> list[dict]:
        """The same local validation batches on every call."""
        ...


def read_text(path: str, what: str = "data.path") -> str:
    """Read a UTF-8 text file (or a bundled corpus by name: ``shakespeare``); missing / empty /
    undecodable -> one-line ConfigError."""
    path = resolve_data_path(path, what)
    # a FIFO, /dev/zero, … is named and refused, never read
    check_data_file(path, what, "a UTF-8 text file or a jaxlm-prepare directory")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path}: {e.strerror} (check its permissions)"
                          ) from None
    if not raw:
        raise ConfigError(f"{what}: file is empty: {path} (point {what} at a non-empty text file)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what}: {path} is not valid UTF-8 (bad byte at offset {e.start}); "
                          "convert it with e.g. `iconv -t utf-8`") from None


class Windows:
    """Random-access rows over a token stream: row i = tokens[i*L : i*L + L + 1] as a batch row.

    Picklable and lazy (grain calls ``__getitem__`` only for the rows it needs).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, token_bytes: np.ndarray):
        self.tokens = np.asarray(tokens, np.int32)  # [n_tokens]
        self.seq_len = seq_len
        self.token_bytes = token_bytes  # [vocab] int32
        self._positions = np.arange(seq_len, dtype=np.int32)

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        L = self.seq_len
        w = self.tokens[i * L: i * L + L + 1]  # [L+1]
        return {
            "inputs": w[:-1].copy(),
            "targets": w[1:].copy(),
            "positions": self._positions.copy(),
            "segment_ids": np.ones(L, np.int32),
            "loss_mask": np.ones(L, np.float32),
            "target_bytes": self.token_bytes[w[1:]],
        }


def pad_row(seq_len: int) -> dict:
    """An all-padding row: segment_ids 0, loss_mask 0, target_bytes 0."""
    return {k: np.zeros(seq_len, np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS}


def local_batch_size(batch_size: int, process_count: int) -> int:
    if batch_size <= 0 or process_count <= 0 or batch_size % process_count:
        raise ConfigError(f"batch size {batch_size} must be a positive multiple of the process "
                          f"count {process_count} (change train.batch_size)")
    return batch_size // process_count


def train_dataset_from_rows(rows, *, batch_size: int, process_index: int, process_count: int,
                            seed: int, shuffle: bool) -> grain.IterDataset:
    """The shared grain pipeline: shuffle -> repeat forever -> blocks of ``local`` rows -> this
    process's blocks (block k belongs to process k % process_count) -> IterDataset.

    The ``process_count`` blocks of global batch b are consecutive, so the global batch (the local
    batches concatenated in process order) does not depend on ``process_count``.
    """
    local = local_batch_size(batch_size, process_count)
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} not in [0, {process_count})")
    if len(rows) == 0:
        raise ConfigError("the train split has no windows (use more data or a smaller "
                          "data.seq_len)")
    ds = grain.MapDataset.source(rows)
    if shuffle:
        ds = ds.shuffle(seed)
    ds = ds.repeat(None).batch(local, drop_remainder=True)[process_index::process_count]
    # Small thread pool and buffer: batches are cheap slices, and a deep buffer only costs memory.
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    return ds.to_iter_dataset(read)


class HeldOut:
    """What every mode shares: ``eval_batches`` = the first batches of ``self.val_rows`` (any
    sequence of row dicts with a ``seq_len``, see :func:`eval_batches_from_rows`), and
    ``train_iterator(**kw)`` = ``iter(self.train_dataset(**kw))``. A mode defines
    ``train_dataset``, the grain IterDataset of this process's batches, so that a mixture
    (:mod:`jaxlm.data.mixture`) can mix the datasets of several sources."""

    val_rows: Sequence

    def train_iterator(self, **kw) -> grain.DatasetIterator:
        return iter(self.train_dataset(**kw))

    def eval_batches(self, *, batch_size: int, num_batches: int, process_index: int = 0,
                     process_count: int = 1) -> list[dict]:
        return eval_batches_from_rows(self.val_rows, batch_size=batch_size, num_batches=num_batches,
                                      process_index=process_index, process_count=process_count)


class ConcatDataSource(HeldOut):
    """Concat-and-chunk over one text file or a prepared corpus (see the module docstring)."""

    def __init__(self, cfg: DataConfig):
        from jaxlm.data import prepared  # here, not at the top: prepared.py builds on this module

        self.cfg = cfg
        self.tokenizer = get_tokenizer(cfg.tokenizer, cfg.tokenizer_path)
        train, val = self._token_splits(cfg, prepared)
        tb = self.tokenizer.token_bytes
        self.train_rows = prepared.rows_over(train, cfg.seq_len, tb)
        self.val_rows = prepared.rows_over(val, cfg.seq_len, tb)
        for split, rows in (("train", self.train_rows), ("val", self.val_rows)):
            if len(rows) == 0:
                raise ConfigError(
                    f"{split} split has {len(rows.tokens)} tokens but data.seq_len={cfg.seq_len} "
                    f"needs at least {cfg.seq_len + 1} (use more text or a smaller data.seq_len)")

    def _token_splits(self, cfg: DataConfig, prepared) -> tuple:
        """(train, val) token streams: int32 arrays from text, lazy ShardedTokens from a
        prepared corpus (its val split, if any, is the validation split)."""
        tok = self.tokenizer
        path = cfg.path or DEFAULT_CORPUS
        corpus = prepared.open_if_prepared(path, tok, "data.path")
        tokens = corpus.tokens("train") if corpus else tok.encode(read_text(path, "data.path"))
        if cfg.val_path:
            vc = prepared.open_if_prepared(cfg.val_path, tok, "data.val_path", need_train=False)
            val = (vc.tokens(vc.heldout_split()) if vc
                   else tok.encode(read_text(cfg.val_path, "data.val_path")))
            return tokens, val
        if corpus is not None and corpus.has("val"):
            return tokens, corpus.tokens("val")
        # nanoGPT split: first (1 - val_fraction) of the tokens train, the rest val
        return prepared.split_stream(tokens, int(len(tokens) * (1 - cfg.val_fraction)))

    def train_dataset(self, *, batch_size: int, process_index: int = 0, process_count: int = 1,
                      seed: int = 0) -> grain.IterDataset:
        return train_dataset_from_rows(
            self.train_rows, batch_size=batch_size, process_index=process_index,
            process_count=process_count, seed=seed, shuffle=self.cfg.shuffle)


def eval_batches_from_rows(rows, *, batch_size: int, num_batches: int, process_index: int,
                           process_count: int) -> list[dict]:
    """The first ``num_batches`` global batches of ``rows`` in order, never wrapping around.

    Global batch b holds rows [b*B, (b+1)*B); process p gets the contiguous block
    [b*B + p*local, b*B + (p+1)*local), so the global batch is the process batches concatenated
    in process order and the evaluated rows do not depend on process_count. If the split is
    short there are fewer batches, and the last one is padded with rows whose loss_mask is 0:
    every val window counts exactly once, with a fixed batch shape (no recompile). Average the
    loss as sum(loss * loss_mask) / sum(loss_mask) over all processes.
    """
    local = local_batch_size(batch_size, process_count)
    n = len(rows)
    n_batches = min(num_batches, -(-n // batch_size))
    out = []
    for b in range(n_batches):
        start = b * batch_size + process_index * local
        items = [rows[i] if i < n else pad_row(rows.seq_len) for i in range(start, start + local)]
        out.append({k: np.stack([it[k] for it in items]) for k in BATCH_KEYS})  # [local, L]
    return out
