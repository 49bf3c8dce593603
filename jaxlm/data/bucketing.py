"""Mode ``dd``: Dataset Decomposition with variable sequence length batches and a length curriculum.

Pouransari et al. 2024, "Dataset Decomposition: Faster LLM Training with Variable Sequence Length
Curriculum" (NeurIPS'24).

**Decomposition (§2.1).** A document of n tokens (its end-of-text included) is cut into adjacent
pieces by the binary decomposition of n, largest first: n = 2^{i1} + 2^{i2} + …, piece lengths
2^{i1} > 2^{i2} > …; each piece goes to bucket D_i of sequences of length 2^i. While at least
twice the largest bucket is left (a part the largest bucket cannot hold in one binary digit), the
next piece's length is drawn with P(2^k) ∝ 2^(max-k) (``data.dd_overflow=random``, the default of
the official repo's ``get_binary(..., randomize=True)``: every bucket gets the same expected share
of the overflow tokens; drawn from a fixed seed, so the table is identical in every process and
after a restart) or is a largest-bucket piece (``greedy``, the repo's ``randomize=False``). Pieces
shorter than the smallest bucket are dropped (counted). With a general set of power-of-two buckets
the binary part is "take the largest bucket that fits, repeat" (:func:`decompose`). Each piece
becomes one training row: targets = the piece,
inputs = the piece shifted right by one token (the first input is the end-of-text that precedes
the document, or the piece's previous token in the same document), so **every token of every
document is a target in exactly one row** and no row crosses a document (no attention mask needed;
``segment_ids`` are all 1, positions 0..2^i-1).

**Variable sequence length batching (§2.2).** Every optimizer step draws one bucket i and a batch
of b / 2^i rows of length 2^i, where b = ``train.batch_size × data.seq_len`` tokens: every step has
the same tokens (and loss denominator), short buckets cost less attention (cost ∝ b·(c_mlp +
2^i·c_attn)). The train step compiles once per bucket shape [b/2^i, 2^i]: at most len(buckets).

**Curriculum (§3.3, Algorithm 1 in App. B.2).** The training run (``train.steps``, passed by the
loop as ``total_steps``) is split into c cycles (``data.cycles``), as in the repo (one OpenLM
"epoch" = 1/c of the token budget); each cycle's steps are shared among the buckets in proportion
to their size (:func:`cycle_quota`), repeating a bucket's data if the run is longer than the
data. In cycle j, while any bucket has batches left, bucket i is drawn with probability
∝ w_i over those buckets and its next batch used (:func:`curriculum_schedule`):

    data.curriculum_weights=paper   w_i = o_i                (Algorithm 1 as printed)
    data.curriculum_weights=repo    w_i = o_i · tokens_i,j   (get_dd_params.py: odds × tokens)

With equal buckets (the paper's Table 2 ablation: 2^34 tokens each) the two coincide; with the
natural, unequal mix, ``paper`` drains the short buckets early in every cycle and ends each cycle
on the long ones, while ``repo`` keeps a big bucket in play all cycle. Odds, shortest bucket
first (``data.curriculum``):

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
    it = src.train_iterator(batch_size=4, seed=0, total_steps=1000)  # 2048 tokens/step
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


def overflow_probs(buckets) -> np.ndarray:
    """P(piece length = L) for a document part longer than the largest bucket (randomized rule).

    The repo's ``get_binary(..., randomize=True)``: P(2^k) ∝ 2^(max-k), i.e. ∝ 1/L, so every
    bucket receives the same expected number of overflow tokens. Buckets sorted shortest first.
    """
    inv = 1.0 / np.asarray(_check_buckets(buckets), float)
    return inv / inv.sum()


def decompose(n_tokens: int, bucket_lengths, rng: np.random.Generator | None = None) -> list[int]:
    """Piece lengths, in document order, that a document of ``n_tokens`` tokens is cut into.

    While at least twice the largest bucket is left (the repo's k > max), the next piece is drawn
    with :func:`overflow_probs` if ``rng`` is given (``data.dd_overflow=random``), else it is a
    largest-bucket piece (``greedy``, the repo's ``randomize=False``). The rest is the binary
    decomposition, largest first; a remainder shorter than the smallest bucket is dropped. Example:
    ``decompose(1000, [256, 512, 1024]) == [512, 256]`` (232 tokens dropped).
    """
    buckets = _check_buckets(bucket_lengths)
    out, rem = [], int(n_tokens)
    if rng is not None:
        p = overflow_probs(buckets)
        while rem >= 2 * buckets[-1]:
            out.append(buckets[int(rng.choice(len(buckets), p=p))])
            rem -= out[-1]
    for L in reversed(buckets):
        c, rem = divmod(rem, L)
        out += [L] * c
    return out


def _random_overflow(cursor, rem, buckets, rng) -> dict[int, list[np.ndarray]]:
    """Cut randomized pieces off every document while rem >= 2 * max bucket; in place."""
    p, Lmax = overflow_probs(buckets), buckets[-1]
    lens = np.asarray(buckets, np.int64)
    out: dict[int, list[np.ndarray]] = {L: [] for L in buckets}
    live = np.flatnonzero(rem >= 2 * Lmax)
    while len(live):  # one piece per live document per round, in document order
        take = lens[rng.choice(len(lens), size=len(live), p=p)]  # [live]
        for L in buckets:
            out[L].append(cursor[live[take == L]])
        cursor[live] += take
        rem[live] -= take
        live = live[rem[live] >= 2 * Lmax]
    return out


def piece_table(corpus: TokenCorpus, buckets, overflow: str = "greedy",
                seed: int = 0) -> tuple[dict[int, np.ndarray], int]:
    """Decompose every document at once: ({L: target start of each piece [n_L]}, dropped tokens).

    Vectorised form of :func:`decompose` (``overflow="random"`` draws the overflow pieces from
    ``np.random.default_rng([seed, 0xDD])``, so the table is the same in every process and after a
    restart). Starts are sorted, i.e. in corpus order.
    """
    buckets = _check_buckets(buckets)
    cursor = corpus.offsets[:-1].astype(np.int64).copy()  # [D] next uncut token of each doc
    rem = np.diff(corpus.offsets).astype(np.int64)  # [D] tokens left (EOT included)
    parts: dict[int, list[np.ndarray]] = {L: [] for L in buckets}
    if overflow == "random":
        parts = _random_overflow(cursor, rem, buckets, np.random.default_rng([seed, 0xDD]))
    elif overflow != "greedy":
        raise ConfigError(f"data.dd_overflow={overflow!r} is not one of: random, greedy")
    for L in reversed(buckets):
        c = rem // L
        doc = np.repeat(np.arange(len(c)), c)  # [n_L]
        k = np.arange(len(doc)) - np.repeat(np.cumsum(c) - c, c)  # piece index within the doc
        parts[L].append(cursor[doc] + k * L)
        cursor += c * L
        rem -= c * L
    out = {L: np.sort(np.concatenate(parts[L])) if parts[L] else np.zeros(0, np.int64)
           for L in buckets}
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


def cycle_quota(batches, cycles: int, total_steps: int = 0) -> np.ndarray:
    """Batches of each bucket in each cycle, [cycles, K] int: the s_{i,j} of Algorithm 1.

    ``total_steps`` > 0 (the run length, ``train.steps``): the cycles span the training run, as in
    the repo (``get_dd_params.py``: cycle = 1/c of the token budget): cycle j has
    S(j+1)//c - Sj//c steps, shared among the buckets in proportion to their batches per pass
    (largest remainder), reading each bucket's stream on (repeating it if the run is longer than
    the data). ``total_steps`` = 0: the cycles split one pass over the data (every bucket's batches
    into c near-equal parts).
    """
    n = np.asarray(batches, np.int64)
    if total_steps <= 0:
        return np.stack([n * (j + 1) // cycles - n * j // cycles for j in range(cycles)])
    out, given = [], np.zeros(len(n), np.int64)
    for j in range(cycles):
        steps = total_steps * (j + 1) // cycles - total_steps * j // cycles
        owed = total_steps * (j + 1) // cycles * n / n.sum() - given  # ideal so far - given
        q = np.maximum(np.floor(owed), 0).astype(np.int64)
        extra = np.argsort(-(owed - q), kind="stable")[:steps - int(q.sum())]
        q[extra] += 1  # largest remainder on what is owed: every bucket stays within 1 of ideal
        given += q
        out.append(q)
    return np.stack(out)


def curriculum_schedule(quota: np.ndarray, odds: np.ndarray, rng: np.random.Generator,
                        weights: str = "paper") -> np.ndarray:
    """Algorithm 1 (App. B.2): the bucket index of every step, [quota.sum()] int.

    ``quota[j, i]`` = batches of bucket i in cycle j. Within cycle j, while any bucket has batches
    left, bucket i is drawn with probability ∝ w_i over the buckets with batches left, and one of
    its batches is used. ``weights="paper"``: w_i = o_i (Algorithm 1). ``weights="repo"``:
    w_i = o_i × (tokens of bucket i in the cycle) — the official repo's mixture weights
    (``get_dd_params.py``: odds × tokens needed per bucket), fixed for the cycle; every batch holds
    the same tokens, so this is o_i × quota[j, i]. The two coincide when the buckets are equal.
    """
    if weights not in ("paper", "repo"):
        raise ConfigError(f"data.curriculum_weights={weights!r} is not one of: paper, repo")
    out = []
    for part in np.asarray(quota, np.int64):
        w = odds * part if weights == "repo" else np.asarray(odds, float)
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
    """Step -> (bucket, index of that bucket's next global batch); infinite, period after period.

    A period is the training run (``total_steps`` > 0) or one pass over the data (0), holding
    ``cycles`` cycles (:func:`cycle_quota`); period e's schedule comes from
    ``default_rng([seed, e, 0xDD])``, so every process computes the same map and a restored
    iterator continues exactly. The latest period's schedule is cached.
    """

    def __init__(self, batches, odds, cycles: int, seed: int, total_steps: int = 0,
                 weights: str = "paper"):
        self.batches = np.asarray(batches, np.int64)  # [K] batches per bucket per pass
        self.quota = cycle_quota(self.batches, cycles, total_steps)  # [c, K]
        self.per_period = self.quota.sum(0)  # [K] batches of each bucket per period
        self.odds, self.cycles, self.seed = np.asarray(odds, float), cycles, seed
        self.weights = weights
        self.epoch_len = int(self.quota.sum())  # steps per period
        self._cache: tuple = (-1, None, None)

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(bucket of each step [E], rank of the step within its bucket this period [E])."""
        cache = self._cache  # one read: grain's reader threads may swap it concurrently
        if cache[0] != e:
            rng = np.random.default_rng([self.seed, e, 0xDD])
            sched = curriculum_schedule(self.quota, self.odds, rng, self.weights)
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
        return k, e * int(self.per_period[k]) + int(rank[j])


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
        if cfg.curriculum_weights not in ("paper", "repo"):
            raise ConfigError(f"data.curriculum_weights={cfg.curriculum_weights!r} is not one "
                              "of: paper, repo")
        train, val = load_splits(cfg, self.tokenizer)
        self.train = train
        self.pieces, dropped = piece_table(train, self.buckets, cfg.dd_overflow)
        total = int(np.diff(train.offsets).sum())
        self.stats = dict(train.stats, train_docs=train.n_docs, val_docs=val.n_docs,
                          train_tokens=total, dropped_tokens=dropped,
                          pieces={L: len(v) for L, v in self.pieces.items()},
                          token_share={L: len(v) * L / max(total, 1)
                                       for L, v in self.pieces.items()})
        log.info("dd: %d docs, %d tokens -> pieces per bucket %s (overflow %s); %d tokens "
                 "(%.2f%%) dropped (shorter than the smallest bucket %d)", train.n_docs, total,
                 self.stats["pieces"], cfg.dd_overflow, dropped, 100 * dropped / max(total, 1),
                 self.buckets[0])
        self.val_rows = PackedEvalRows(val, cfg.seq_len, self.tokenizer.token_bytes)

    def rows_per_batch(self, batch_size: int) -> dict[int, int]:
        """Global rows of each bucket's batch: batch_size * seq_len / L (same tokens per step)."""
        return {L: batch_size * self.cfg.seq_len // L for L in self.buckets}

    def batch_shapes(self, batch_size: int) -> list[tuple[int, int]]:
        """The global [rows, L] shapes a train batch can have (one compile each)."""
        return [(r, L) for L, r in self.rows_per_batch(batch_size).items()]

    wants_total_steps = True  # the loop passes total_steps=train.steps (cycles span the run)

    def train_dataset(self, *, batch_size: int, process_index: int = 0, process_count: int = 1,
                      seed: int = 0, total_steps: int = 0) -> grain.IterDataset:
        """``total_steps``: the run length the curriculum's cycles span (0 = one pass over the
        data per set of cycles); see :func:`cycle_quota`."""
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
        schedule = CurriculumMap(batches, self.odds, self.cfg.cycles, seed, total_steps,
                                 self.cfg.curriculum_weights)
        self.schedule = schedule
        ds = grain.MapDataset.select_from_datasets(datasets, schedule)
        return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
