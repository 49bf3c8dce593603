"""Mode pack: chunks cover every document token once, packed rows carry the right segment ids /
positions / loss mask, attention on a packed row equals attention on each document alone, exact
save/restore, disjoint + covering process shards, deterministic eval rows."""

import numpy as np
import pytest

from jaxlm.config import DataConfig
from jaxlm.data import make_data_source
from jaxlm.data.packing import chunk_table

L = 32


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """80 random-letter documents of 5..100 bytes (some longer than L) separated by '#'."""
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), n))
            for n in rng.integers(5, 100, 80)]
    d = tmp_path_factory.mktemp("pack")
    (d / "docs.txt").write_text("#".join(docs))
    return DataConfig(mode="pack", path=str(d / "docs.txt"), doc_separator="#", seq_len=L,
                      cache_dir=str(d / "cache"), val_fraction=0.2)


def _segments(b):
    """Yield (targets, inputs, positions) of every segment of every row of a batch."""
    for r in range(b["inputs"].shape[0]):
        seg = b["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            (idx,) = np.nonzero(seg == s)
            assert (np.diff(idx) == 1).all()  # contiguous
            yield b["targets"][r, idx], b["inputs"][r, idx], b["positions"][r, idx]


def test_chunks_cover_documents(cfg):
    src = make_data_source(cfg)
    ch = src.train_chunks
    starts, lengths, split = chunk_table(src.train, L)
    assert split == src.stats["split_docs"] > 0 and (lengths <= L).all() and (lengths > 0).all()
    off = src.train.offsets
    covered = np.zeros(off[-1], int)
    for s, n in zip(starts, lengths):
        covered[s:s + n] += 1
    assert (covered[off[0]:] == 1).all()  # every token (EOTs included) in exactly one chunk
    assert len(ch) == len(starts)


def test_packed_rows(cfg):
    src = make_data_source(cfg)
    tok, eos = src.train_chunks.tokens, src.tokenizer.eos_id
    chunks = {tuple(src.train_chunks[i]["targets"].tolist()): i
              for i in range(len(src.train_chunks))}
    it = src.train_iterator(batch_size=4, seed=0)
    seen = []
    for _ in range(6):
        b = next(it)
        assert b["inputs"].shape == (4, L)
        np.testing.assert_array_equal(b["loss_mask"], (b["segment_ids"] > 0).astype(np.float32))
        assert (b["target_bytes"][b["segment_ids"] == 0] == 0).all()
        for tgt, inp, pos in _segments(b):
            i = chunks[tuple(tgt.tolist())]
            s = src.train_chunks.starts[i]
            np.testing.assert_array_equal(inp, tok[s - 1:s - 1 + len(tgt)])
            np.testing.assert_array_equal(pos, np.arange(len(tgt)))  # restart per document
            if s in src.train.offsets:
                assert inp[0] == eos
            seen.append(i)
    assert len(seen) == len(set(seen)) > 20  # no chunk twice within the first epoch's rows


def test_attention_masks_other_documents(cfg):
    """Reference attention on a packed row == attention on each document segment alone."""
    import jax
    from jaxlm import ops

    src = make_data_source(cfg)
    b = next(src.train_iterator(batch_size=2, seed=1))
    seg = b["segment_ids"][:1]  # [1, L]
    q, k, v = jax.random.normal(jax.random.key(0), (3, 1, L, 4, 8))
    out = np.asarray(ops.attention(q, k, v, seg))
    for s in np.unique(seg[seg > 0]):
        (idx,) = np.nonzero(seg[0] == s)
        alone = ops.attention(q[:, idx], k[:, idx], v[:, idx])
        np.testing.assert_allclose(out[0, idx], np.asarray(alone)[0], atol=1e-5)


def test_pack_resume_and_shards(cfg):
    src = make_data_source(cfg)
    it = src.train_iterator(batch_size=4, seed=2)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(4)]
    fresh = src.train_iterator(batch_size=4, seed=2)
    fresh.set_state(state)
    for w in want:
        got = next(fresh)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])
    n = len(src.train_chunks)
    found = []
    for p in (0, 1):  # each process packs only its own chunks[p::2]
        it = src.train_iterator(batch_size=4, seed=2, process_index=p, process_count=2)
        mine = set()
        for _ in range(40):
            mine |= {tuple(t.tolist()) for t, _, _ in _segments(next(it))}
            if len(mine) >= (n + 1 - p) // 2:
                break
        found.append(mine)
    everything = {tuple(src.train_chunks[i]["targets"].tolist()) for i in range(n)}
    assert not found[0] & found[1] and found[0] | found[1] == everything


def test_pack_eval_rows(cfg):
    src = make_data_source(cfg)
    rows = src.val_rows
    a = src.eval_batches(batch_size=4, num_batches=100)
    assert len(a) == -(-len(rows) // 4)
    n_targets = sum(m["loss_mask"].sum() for m in a)
    assert n_targets == int(rows.chunks.lengths.sum())  # every held-out token once
    b = src.eval_batches(batch_size=2, num_batches=100, process_index=1, process_count=2)
    np.testing.assert_array_equal(b[0]["targets"], a[0]["targets"][1:2])
