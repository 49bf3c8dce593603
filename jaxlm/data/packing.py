"""Mode ``pack``: whole documents packed into rows of ``seq_len`` with document masks (grain).

Each document j (tokens + end-of-text, see :mod:`jaxlm.data.corpus`) becomes one or more *chunks*
of at most L = ``data.seq_len`` target tokens; a document longer than L is cut into consecutive
L-token chunks (counted in ``stats["split_docs"]``) — that is the only place a document is ever
cut. A chunk with targets ``tokens[s : s+n]`` takes inputs ``tokens[s-1 : s+n-1]``, so its first
input is the end-of-text before the document (a start marker) or the chunk's previous token.

grain's ``FirstFitPackIterDataset`` (first-fit with ``data.pack_bins`` open bins; Pouransari et
al. 2024 §4 compare against best-fit "Pack-8k+DM", which fills rows a little better but needs the
whole corpus up front) puts chunks into rows and emits per-token segment ids (1, 2, …; 0 = padding)
and positions that restart at 0 in every chunk. The batch then carries:

    segment_ids[b, t]  document slot of token t (0 = padding)      -> attention mask
    positions[b, t]    index of t inside its chunk                  -> RoPE
    loss_mask[b, t]    = segment_ids[b, t] > 0                      (no target crosses documents)

and the model's attention allows q -> k iff ``seg[q] == seg[k] != 0 and k <= q`` (document
masking), so a packed row computes exactly what the chunks would compute one by one.

Training pipeline (per process): chunks[process_index::process_count] -> shuffle(seed) ->
repeat (reshuffled every epoch) -> to_iter_dataset -> first-fit pack -> batch(local). The state is
the packer's (small: parent index + open bins' position) and restores exactly.

Evaluation (``pack`` and ``dd``): :class:`PackedEvalRows` — the held-out chunks in order, packed
greedily next-fit into rows (deterministic, independent of batch size and process count).

Example::

    from jaxlm.config import DataConfig
    from jaxlm.data import make_data_source
    src = make_data_source(DataConfig(mode="pack", seq_len=256, cache_dir="/tmp/jaxlm_cache"))
    b = next(src.train_iterator(batch_size=8))      # [8, 256] each; b["segment_ids"].max() > 1
"""

from __future__ import annotations

import grain
import numpy as np

from jaxlm.config import ConfigError, DataConfig
from jaxlm.data.corpus import TokenCorpus, load_splits
from jaxlm.data.pipeline import BATCH_KEYS, HeldOut, local_batch_size
from jaxlm.data.tokenizer import get_tokenizer


def chunk_table(corpus: TokenCorpus, seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(starts [C], lengths [C], split_docs): documents cut into chunks of <= seq_len targets."""
    off = corpus.offsets
    lens = np.diff(off)  # [D]
    per_doc = -(-lens // seq_len)  # chunks per document
    doc_of = np.repeat(np.arange(len(lens)), per_doc)  # [C]
    first = np.cumsum(per_doc) - per_doc
    k = np.arange(len(doc_of)) - first[doc_of]  # chunk index inside its document
    starts = off[:-1][doc_of] + k * seq_len
    lengths = np.minimum(seq_len, off[1:][doc_of] - starts)
    return starts.astype(np.int64), lengths.astype(np.int64), int((per_doc > 1).sum())


class Chunks:
    """Random access to chunk i as {inputs, targets, target_bytes} of its own length n <= L."""

    def __init__(self, corpus: TokenCorpus, seq_len: int, token_bytes: np.ndarray):
        self.tokens, self.token_bytes = corpus.tokens, token_bytes
        self.starts, self.lengths, self.split_docs = chunk_table(corpus, seq_len)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict:
        s, n = int(self.starts[i]), int(self.lengths[i])
        w = np.asarray(self.tokens[s - 1:s + n], np.int32)  # [n+1]
        return {"inputs": w[:-1], "targets": w[1:], "target_bytes": self.token_bytes[w[1:]]}


def _finish(x: dict) -> dict:
    """grain packer output -> the batch format of jaxlm.data.pipeline (one row)."""
    seg = x["inputs_segment_ids"].astype(np.int32)
    return {"inputs": x["inputs"].astype(np.int32), "targets": x["targets"].astype(np.int32),
            "positions": x["inputs_positions"].astype(np.int32), "segment_ids": seg,
            "loss_mask": (seg > 0).astype(np.float32),
            "target_bytes": (x["target_bytes"] * (seg > 0)).astype(np.int32)}


class PackedEvalRows:
    """Held-out chunks in corpus order, packed next-fit into rows of seq_len (for eval)."""

    def __init__(self, corpus: TokenCorpus, seq_len: int, token_bytes: np.ndarray):
        self.chunks, self.seq_len = Chunks(corpus, seq_len, token_bytes), seq_len
        rows, cur, used = [], [], 0
        for i, n in enumerate(self.chunks.lengths.tolist()):
            if used + n > seq_len:
                rows.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += n
        rows.append(cur)
        self.rows = rows  # list of chunk-index lists

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> dict:
        L = self.seq_len
        out = {k: np.zeros(L, np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS}
        t = 0
        for seg, i in enumerate(self.rows[r], 1):
            c = self.chunks[i]
            n = len(c["targets"])
            for k in ("inputs", "targets", "target_bytes"):
                out[k][t:t + n] = c[k]
            out["positions"][t:t + n] = np.arange(n)
            out["segment_ids"][t:t + n] = seg
            out["loss_mask"][t:t + n] = 1.0
            t += n
        return out


class PackDataSource(HeldOut):
    """Mode ``pack`` (see the module docstring)."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.tokenizer = get_tokenizer(cfg.tokenizer, cfg.tokenizer_path)
        train, val = load_splits(cfg, self.tokenizer)
        tb = self.tokenizer.token_bytes
        self.train = train
        self.train_chunks = Chunks(train, cfg.seq_len, tb)
        self.val_rows = PackedEvalRows(val, cfg.seq_len, tb)
        self.stats = dict(train.stats, split_docs=self.train_chunks.split_docs,
                          train_docs=train.n_docs, val_docs=val.n_docs)

    def train_dataset(self, *, batch_size: int, process_index: int = 0, process_count: int = 1,
                      seed: int = 0) -> grain.IterDataset:
        local = local_batch_size(batch_size, process_count)
        ds = grain.MapDataset.source(self.train_chunks)[process_index::process_count]
        if len(ds) == 0:
            raise ConfigError(f"{len(self.train_chunks)} training chunks: too few for "
                              f"{process_count} processes")
        if self.cfg.shuffle:
            ds = ds.shuffle(seed)
        it = ds.repeat(None).to_iter_dataset(grain.ReadOptions(num_threads=2,
                                                               prefetch_buffer_size=64))
        L = self.cfg.seq_len
        it = grain.experimental.FirstFitPackIterDataset(
            it, length_struct={"inputs": L, "targets": L, "target_bytes": L},
            num_packing_bins=self.cfg.pack_bins or local, seed=seed,
            shuffle_bins=self.cfg.shuffle)
        return it.map(_finish).batch(local, drop_remainder=True)
