"""Dataset Decomposition (mode dd): decompose(), piece table, curricula, VSL batches, invariants
(every token in exactly one row or counted as dropped, no row crosses a document, constant tokens
per step, power-of-two lengths), exact save/restore, disjoint + covering process shards, errors.
A short training run whose metrics show the bucket schedule is in tests/test_dd_faithful.py."""

import numpy as np
import pytest

from jaxlm.config import ConfigError, DataConfig
from jaxlm.data import decompose, make_data_source
from jaxlm.data.bucketing import curriculum_odds, curriculum_schedule, cycle_quota, piece_table

L, B = 64, 2  # largest bucket, batch_size -> 128 tokens per step; buckets 8, 16, 32, 64
TOK = B * L


@pytest.fixture(scope="module")
def corpus_cfg(tmp_path_factory):
    """~150 random-letter documents of 0..300 bytes separated by '#' (byte tokenizer)."""
    rng = np.random.default_rng(0)
    lens = rng.integers(0, 300, 150)
    docs = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz "), n)) for n in lens]
    d = tmp_path_factory.mktemp("dd")
    path = d / "docs.txt"
    path.write_text("#".join(docs))
    return DataConfig(mode="dd", path=str(path), doc_separator="#", seq_len=L, min_bucket=8,
                      cache_dir=str(d / "cache"), val_fraction=0.1, cycles=2)


def test_decompose():
    b = [256, 512, 1024, 2048, 4096, 8192]
    assert decompose(1000, b) == [512, 256]
    assert decompose(8192, b) == [8192]
    assert decompose(20000, b) == [8192, 8192, 2048, 1024, 512]  # 32 dropped
    assert decompose(255, b) == [] and decompose(0, b) == []
    assert decompose(3000, [256, 1024]) == [1024, 1024, 256, 256, 256]  # gaps: greedy fit
    rng = np.random.default_rng(1)
    for n in rng.integers(1, 40000, 300).tolist():
        p = decompose(n, b)
        assert p == sorted(p, reverse=True) and all(x in b for x in p)
        assert 0 <= n - sum(p) < 256  # only a sub-minimum remainder is dropped
        if n < 2 * 8192:  # below the overflow the pieces are exactly n's binary digits >= 256
            assert sum(p) == n & ~255 and len(set(p)) == len(p)
    with pytest.raises(ValueError, match="powers of two"):
        decompose(100, [256, 300])


def test_piece_table_matches_decompose(corpus_cfg):
    src = make_data_source(corpus_cfg)
    tr = src.train
    buckets = [8, 16, 32, 64]
    pieces, dropped = piece_table(tr, buckets)
    assert src.stats["dropped_tokens"] == dropped and src.stats["skipped_empty_docs"] >= 1
    starts = sorted((int(s), Lk) for Lk, ss in pieces.items() for s in ss)
    by_doc = {}
    for s, Lk in starts:
        j = int(np.searchsorted(tr.offsets, s, side="right")) - 1
        assert s + Lk <= tr.offsets[j + 1]  # inside one document
        by_doc.setdefault(j, []).append((s, Lk))
    covered = 0
    for j, n in enumerate(tr.doc_lengths().tolist()):
        got = by_doc.get(j, [])
        assert [Lk for _, Lk in got] == decompose(n, buckets)  # order: largest first
        if got:  # contiguous from the document start
            assert got[0][0] == tr.offsets[j]
            assert all(a + la == b for (a, la), (b, _) in zip(got, got[1:]))
        covered += sum(Lk for _, Lk in got)
    assert covered + dropped == int(tr.doc_lengths().sum())  # every token: one piece or dropped


def test_curricula():
    rng = np.random.default_rng(0)
    batches = np.array([40, 40, 40, 40])
    odds = curriculum_odds("grow_p2", 4)
    assert odds.tolist() == [8, 4, 2, 1] and curriculum_odds("uniform", 3).tolist() == [1, 1, 1]
    assert curriculum_odds("grow_linear", 3).tolist() == [3, 2, 1]
    s = curriculum_schedule(cycle_quota(batches, 2), odds, rng)
    assert np.bincount(s).tolist() == [40, 40, 40, 40]
    for half in (s[:80], s[80:]):  # each cycle holds half of every bucket, short ones early
        assert np.bincount(half).tolist() == [20, 20, 20, 20]
        assert half[:40].mean() < half[40:].mean() - 0.8
    u = curriculum_schedule(cycle_quota(batches, 1), curriculum_odds("uniform", 4), rng)
    assert abs(u[:80].mean() - u[80:].mean()) < 0.6  # no trend
    with pytest.raises(ConfigError, match="data.curriculum='shrink'"):
        curriculum_odds("shrink", 3)


def _row_index(src):
    """tuple(targets) -> (start, L) for every piece of the train split."""
    idx = {}
    for Lk, ss in src.pieces.items():
        for s in ss.tolist():
            idx[tuple(src.train.tokens[s:s + Lk].tolist())] = (s, Lk)
    return idx


def test_dd_batches_one_epoch(corpus_cfg):
    src = make_data_source(corpus_cfg)
    it = src.train_iterator(batch_size=B, seed=0)
    E = src.schedule.epoch_len
    idx, tok = _row_index(src), src.train.tokens
    seen = []
    for _ in range(E):
        b = next(it)
        rows, n = b["inputs"].shape
        assert n in (8, 16, 32, 64) and rows * n == TOK and b["loss_mask"].sum() == TOK
        assert (b["segment_ids"] == 1).all() and (b["positions"] == np.arange(n)).all()
        np.testing.assert_array_equal(b["target_bytes"], src.tokenizer.token_bytes[b["targets"]])
        for inp, tgt in zip(b["inputs"], b["targets"]):
            s, Lk = idx[tuple(tgt.tolist())]
            assert Lk == n
            np.testing.assert_array_equal(inp, tok[s - 1:s + n - 1])  # shifted by one token
            if s in src.train.offsets:  # a document's first piece starts from end-of-text
                assert inp[0] == src.tokenizer.eos_id
            seen.append((s, n))
    assert len(set(seen)) == len(seen)  # no piece (so no token) twice in an epoch
    rows = src.rows_per_batch(B)
    for Lk, ss in src.pieces.items():  # all but < one batch of each bucket (carried over)
        used = sum(1 for _, n in seen if n == Lk)
        assert used == len(ss) // rows[Lk] * rows[Lk]
    assert len({n for _, n in seen}) >= 3


def test_dd_determinism_resume_and_shards(corpus_cfg, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    src = make_data_source(corpus_cfg)
    first = [next(src.train_iterator(batch_size=B, seed=3))["targets"] for _ in range(1)]
    a = src.train_iterator(batch_size=B, seed=3)
    stream = [next(a)["targets"] for _ in range(12)]
    np.testing.assert_array_equal(first[0], stream[0])
    other = src.train_iterator(batch_size=B, seed=4)
    assert any(not np.array_equal(x, next(other)["targets"]) for x in stream)
    # Save mid-epoch (plain state and grain's orbax handler); the continuation is identical.
    it = src.train_iterator(batch_size=B, seed=3)
    for _ in range(7):
        next(it)
    state = it.get_state()
    ocp.Checkpointer(grain.checkpoint.CheckpointHandler()).save(
        tmp_path / "d", args=grain.checkpoint.CheckpointSave(it))
    fresh = src.train_iterator(batch_size=B, seed=3)
    fresh.set_state(state)
    restored = src.train_iterator(batch_size=B, seed=3)
    ocp.Checkpointer(grain.checkpoint.CheckpointHandler()).restore(
        tmp_path / "d", args=grain.checkpoint.CheckpointRestore(restored))
    for want in stream[7:]:
        for x in (next(fresh), next(restored)):
            np.testing.assert_array_equal(x["targets"], want)
    # Two processes: same bucket each step, disjoint halves that together are the global batch.
    its = [src.train_iterator(batch_size=B, seed=3, process_index=p, process_count=2)
           for p in (0, 1)]
    for want in stream:
        h0, h1 = (next(i)["targets"] for i in its)
        assert h0.shape == h1.shape == (want.shape[0] // 2, want.shape[1])
        assert not {tuple(r) for r in h0.tolist()} & {tuple(r) for r in h1.tolist()}
        np.testing.assert_array_equal(np.concatenate([h0, h1]), want)


def test_dd_errors(corpus_cfg, tmp_path):
    import dataclasses

    bad = [
        (dict(seq_len=48), "power of two, got 48"),
        (dict(min_bucket=12), "data.min_bucket=12 must be a power of two"),
        (dict(buckets="8,16,128"), "bucket 128 is longer than data.seq_len=64"),
        (dict(buckets="8,24"), "powers of two"),
        (dict(buckets="a,b"), "comma-separated integers"),
        (dict(curriculum="shrink"), "data.curriculum"),
        (dict(cycles=0), "data.cycles=0"),
    ]
    for kw, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            make_data_source(dataclasses.replace(corpus_cfg, **kw))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abc#defgh#ijklmnop")
    src = make_data_source(dataclasses.replace(corpus_cfg, path=str(tiny)))
    with pytest.raises(ConfigError, match="too small for one batch"):
        src.train_iterator(batch_size=B)
