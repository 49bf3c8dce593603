"""Mode ``dd``: Dataset Decomposition with variable sequence length batches and a length curriculum.

Pouransari et al. 2024, "Dataset Decomposition: Faster LLM Training with Variable Sequence Length
Curriculum" (NeurIPS'24).

**Decomposition (§2.1).** A document of n tokens (its end-of-text included) is cut into adjacent
pieces by the binary decomposition of n, largest first: n = 2^{i1} + 2^{i2} + …, piece lengths
2^{i1} > 2^{i2} > …; each piece goes to bucket D_i of sequences of length 2^i. A part longer than
the largest bucket is cut into largest-bucket pieces first; pieces shorter than the smallest bucket
are dropped (counted). With a general set of power-of-two buckets this is "take the largest bucket
that fits, repeat" (:func:`decompose`). Each piece becomes one training row: targets = the piece,
inputs = the piece shifted right by one token (the first input is the end-of-text that precedes
the document, or the piece's previous token in the same document), so **every token of every
document is a target in exactly one row** and no row crosses a document (no attention mask needed;
``segment_ids`` are all 1, positions 0..2^i-1).

**Variable sequence length batching (§2.2).** Every optimizer step draws one bucket i and a batch
of b / 2^i rows of length 2^i, where b = ``train.batch_size × data.seq_len`` tokens: every step has
the same tokens (and loss denominator), short buckets cost less attention (cost ∝ b·(c_mlp +
2^i·c_attn)). The train step compiles once per bucket shape [b/2^i, 2^i]: at most len(buckets).

**Curriculum (§3.3, Algorithm 1 in App. B.2).** Each bucket's batches of an epoch are split into c
equal parts (``data.cycles``); in cycle j, while any part is non-empty, bucket i is drawn with
probability ∝ o_i · n_{i,j} over non-empty parts (n_{i,j} = its batches in the cycle), and its next
batch taken without replacement. Weighting the odds o_i by n_{i,j} is the official repo's mixture
(``get_dd_params.py``); with equal-size buckets, as in the paper's ablation (Table 2), it is
exactly Algorithm 1. Odds, shortest bucket first (``data.curriculum``):

    uniform       o_i = 1                 (a random order of all batches)
    grow_p2       o_i = 2^(K-1-i)         (paper's winner with 8 cycles: 32 16 8 4 2 1 for K=6)
    grow_linear   o_i = K - i             (6 5 4 3 2 1)

Short sequences dominate the start of each cycle, long ones its end.

**Multi-process.** Every process builds the same schedule from the shared seed (same bucket at the
same step); bucket i's stream is a seeded shuffle of its pieces (reshuffled every epoch) batched
in global batches of b/2^i rows, and process p materialises only rows [p·m, (p+1)·m) of each,
m = b/2^i/process_count. grain: per bucket ``MapDataset.range(pieces).shuffle().repeat().batch()
.map(load own rows)``, mixed by ``MapDataset.select_from_datasets`` with the schedule as a
``DatasetSelectionMap``; the iterator state is ``{'next_index': step}`` (exact resume).

Example::

    from jaxlm.data import decompose
    decompose(1000, [256, 512, 1024])          # [512, 256]      (1000 = 512+256+128+64+32+8)
    decompose(3000, [256, 512, 1024])          # [1024, 1024, 512, 256]
    from jaxlm.config import DataConfig
    from jaxlm.data import make_data_source
    src = make_data_source(DataConfig(mode="dd", seq_len=512, min_bucket=64,
                                      cache_dir="/tmp/jaxlm_cache"))
    it = src.train_iterator(batch_size=4, seed=0)   # 2048 tokens per step
    next(it)["inputs"].shape                        # e.g. (32, 64), then (8, 256), …
"""

from __future__ import annotations

import logging
import sys

import grain
import numpy as np

from jaxlm.config import ConfigError, DataConfig
from jaxlm.data.corpus import TokenCorpus, load_splits
from jaxlm.data.packing import PackedEvalRows
from jaxlm.data.pipeline import HeldOut, local_batch_size
from jaxlm.data.tokenizer import get_tokenizer

log = logging.getLogger("jaxlm")
CURRICULA = ("uniform", "grow_p2", "grow_linear")


def _check_buckets(bucket_lengths) -> list[int]:
    b = sorted(set(int(x) for x in bucket_lengths))
    if not b or any(x <= 0 or x & (x - 1) for x in b):
        raise ValueError(f"bucket lengths must be powers of two, got {list(bucket_lengths)}")
    return b


def decompose(n_tokens: int, bucket_lengths) -> list[int]:
    """Piece lengths, in document order, that a document of ``n_tokens`` tokens is cut into.

    Binary decomposition, largest first; parts above the largest bucket are cut into largest-bucket
    pieces; a remainder shorter than the smallest bucket is dropped (not returned). Example:
    ``decompose(1000, [256, 512, 1024]) == [512, 256]`` (232 tokens dropped).
    """
    buckets = _check_buckets(bucket_lengths)
    out, rem = [], int(n_tokens)
    for L in reversed(buckets):
        c, rem = divmod(rem, L)
        out += [L] * c
    return out


def piece_table(corpus: TokenCorpus, buckets) -> tuple[dict[int, np.ndarray], int]:
    """Decompose every document at once: ({L: target start of each piece [n_L]}, dropped tokens).

    Vectorised form of :func:`decompose`: going from the largest bucket down, each document
    takes ``rem // L`` pieces at its cursor; the pieces keep document order inside each document.
    """
    cursor = corpus.offsets[:-1].astype(np.int64).copy()  # [D] next uncut token of each doc
    rem = np.diff(corpus.offsets).astype(np.int64)  # [D] tokens left (EOT included)
    out = {}
    for L in reversed(_check_buckets(buckets)):
        c = rem // L
        doc = np.repeat(np.arange(len(c)), c)  # [n_L]
        k = np.arange(len(doc)) - np.repeat(np.cumsum(c) - c, c)  # piece index within the doc
        out[L] = cursor[doc] + k * L
        cursor += c * L
        rem -= c * L
    return out, int(rem.sum())


def curriculum_odds(name: str, n_buckets: int) -> np.ndarray:
    """Odds o_i for buckets sorted shortest first (see the module docstring)."""
    i = np.arange(n_buckets)
    if name == "uniform":
        return np.ones(n_buckets)
    if name == "grow_p2":
        return 2.0 ** (n_buckets - 1 - i)
    if name == "grow_linear":
        return (n_buckets - i).astype(float)
    raise ConfigError(f"data.curriculum={name!r} is not one of: {', '.join(CURRICULA)}")


def curriculum_schedule(batches: np.ndarray, odds: np.ndarray, cycles: int,
                        rng: np.random.Generator) -> np.ndarray:
    """One epoch of Algorithm 1: the bucket index of every step, [sum(batches)] int.

    ``batches[i]`` = batches of bucket i this epoch, split into ``cycles`` near-equal parts.
    """
    batches = np.asarray(batches, np.int64)
    out = []
    for j in range(cycles):
        part = batches * (j + 1) // cycles - batches * j // cycles  # [K] this cycle's batches
        w = odds * part  # repo mixture weights (= Algorithm 1's odds for equal buckets)
        left = part.copy()
        for u in rng.random(int(part.sum())).tolist():
            live = np.where(left > 0, w, 0.0)
            i = min(int(np.searchsorted(np.cumsum(live), u * live.sum(), side="right")),
                    len(left) - 1)
            while left[i] == 0:  # float edge case: step back onto a live bucket
                i -= 1
            left[i] -= 1
            out.append(i)
    return np.asarray(out, np.int64)


class CurriculumMap(grain.transforms.DatasetSelectionMap):
    """Step -> (bucket, index of that bucket's next global batch); infinite, epoch after epoch.

    Deterministic given (seed, epoch), so every process computes the same map. The latest epoch's
    schedule is cached.
    """

    def __init__(self, batches, odds, cycles: int, seed: int):
        self.batches = np.asarray(batches, np.int64)  # [K] batches per bucket per epoch
        self.odds, self.cycles, self.seed = np.asarray(odds, float), cycles, seed
        self.epoch_len = int(self.batches.sum())
        self._cache: tuple = (-1, None, None)

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(bucket of each step [E], rank of the step within its bucket this epoch [E])."""
        cache = self._cache  # one read: grain's reader threads may swap it concurrently
        if cache[0] != e:
            rng = np.random.default_rng([self.seed, e, 0xDD])
            sched = curriculum_schedule(self.batches, self.odds, self.cycles, rng)
            rank = np.zeros_like(sched)
            for i in range(len(self.batches)):
                m = sched == i
                rank[m] = np.arange(m.sum())
            cache = self._cache = (e, sched, rank)
        return cache[1], cache[2]

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> tuple[int, int]:
        e, j = divmod(int(index), self.epoch_len)
        sched, rank = self.epoch(e)
        k = int(sched[j])
        return k, e * int(self.batches[k]) + int(rank[j])


class LoadRows:
    """Global batch of piece ids [rows] -> this process's rows as a batch dict [local, L]."""

    def __init__(self, tokens, starts, L: int, lo: int, hi: int, token_bytes):
        self.tokens, self.starts, self.L, self.lo, self.hi = tokens, starts, L, lo, hi
        self.token_bytes = token_bytes
        self._idx = np.arange(-1, L, dtype=np.int64)  # [L+1] window offsets

    def __call__(self, ids: np.ndarray) -> dict:
        s = self.starts[np.asarray(ids)[self.lo:self.hi]]  # [local] target starts
        w = np.asarray(self.tokens[s[:, None] + self._idx], np.int32)  # [local, L+1]
        n = len(s)
        return {"inputs": w[:, :-1], "targets": w[:, 1:],
                "positions": np.broadcast_to(np.arange(self.L, dtype=np.int32), (n, self.L)).copy(),
                "segment_ids": np.ones((n, self.L), np.int32),
                "loss_mask": np.ones((n, self.L), np.float32),
                "target_bytes": self.token_bytes[w[:, 1:]]}


def parse_buckets(cfg: DataConfig) -> list[int]:
    """Bucket lengths from config; every one a power of two <= data.seq_len."""
    L = cfg.seq_len
    if cfg.buckets:
        try:
            raw = [int(x) for x in str(cfg.buckets).replace(" ", "").split(",") if x]
        except ValueError:
            raise ConfigError(f"data.buckets={cfg.buckets!r}: expected comma-separated "
                              "integers like '256,512,1024'") from None
    else:
        if cfg.min_bucket <= 0 or cfg.min_bucket & (cfg.min_bucket - 1) or cfg.min_bucket > L:
            raise ConfigError(f"data.min_bucket={cfg.min_bucket} must be a power of two "
                              f"<= data.seq_len={L}")
        if L & (L - 1):
            raise ConfigError(f"data.mode=dd needs data.seq_len (the largest bucket) to be a "
                              f"power of two, got {L}")
        raw = [1 << k for k in range(cfg.min_bucket.bit_length() - 1, L.bit_length())]
    bad = [b for b in raw if b <= 0 or b & (b - 1)]
    if bad or not raw:
        raise ConfigError(f"data.buckets={cfg.buckets!r}: bucket lengths must be powers of two")
    if max(raw) > L:
        raise ConfigError(f"data.buckets: bucket {max(raw)} is longer than data.seq_len={L}, the "
                          "model's maximum sequence length; raise data.seq_len or drop it")
    return sorted(set(raw))


class DDDataSource(HeldOut):
    """Mode ``dd`` (see the module docstring)."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.tokenizer = get_tokenizer(cfg.tokenizer, cfg.tokenizer_path)
        self.buckets = parse_buckets(cfg)
        self.odds = curriculum_odds(cfg.curriculum, len(self.buckets))
        if cfg.cycles <= 0:
            raise ConfigError(f"data.cycles={cfg.cycles} must be positive")
        train, val = load_splits(cfg, self.tokenizer)
        self.train = train
        self.pieces, dropped = piece_table(train, self.buckets)
        total = int(np.diff(train.offsets).sum())
        self.stats = dict(train.stats, train_docs=train.n_docs, val_docs=val.n_docs,
                          train_tokens=total, dropped_tokens=dropped,
                          pieces={L: len(v) for L, v in self.pieces.items()})
        log.info("dd: %d docs, %d tokens -> pieces per bucket %s; %d tokens (%.2f%%) dropped "
                 "(shorter than the smallest bucket %d)", train.n_docs, total,
                 self.stats["pieces"], dropped, 100 * dropped / max(total, 1), self.buckets[0])
        self.val_rows = PackedEvalRows(val, cfg.seq_len, self.tokenizer.token_bytes)

    def rows_per_batch(self, batch_size: int) -> dict[int, int]:
        """Global rows of each bucket's batch: batch_size * seq_len / L (same tokens per step)."""
        return {L: batch_size * self.cfg.seq_len // L for L in self.buckets}

    def batch_shapes(self, batch_size: int) -> list[tuple[int, int]]:
        """The global [rows, L] shapes a train batch can have (one compile each)."""
        return [(r, L) for L, r in self.rows_per_batch(batch_size).items()]

    def train_iterator(self, *, batch_size: int, process_index: int = 0, process_count: int = 1,
                       seed: int = 0) -> grain.DatasetIterator:
        local_batch_size(batch_size, process_count)
        if not 0 <= process_index < process_count:
            raise ConfigError(f"process_index {process_index} not in [0, {process_count})")
        datasets, batches = [], []
        for k, (L, rows) in enumerate(self.rows_per_batch(batch_size).items()):
            n = len(self.pieces[L])
            nb = n // rows
            if nb == 0 and n:
                log.warning("dd: bucket %d has %d pieces, fewer than one batch of %d rows; "
                            "skipped", L, n, rows)
            batches.append(nb)
            ds = grain.MapDataset.range(max(n, 1))
            if self.cfg.shuffle:
                ds = ds.shuffle(seed + 7919 * k)
            local = rows // process_count
            lo = process_index * local
            load = LoadRows(self.train.tokens, self.pieces[L], L, lo, lo + local,
                            self.tokenizer.token_bytes)
            datasets.append(ds.repeat(None).batch(rows, drop_remainder=True).map(load))
        if sum(batches) == 0:
            raise ConfigError(f"dd: the train split is too small for one batch of "
                              f"{batch_size * self.cfg.seq_len} tokens in any bucket "
                              f"{self.buckets}; use more data or a smaller train.batch_size")
        schedule = CurriculumMap(batches, self.odds, self.cfg.cycles, seed)
        self.schedule = schedule
        ds = grain.MapDataset.select_from_datasets(datasets, schedule)
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
