"""Training reads a prepared corpus (sharded token files + manifest.json) in every data mode:
concat windows equal those of the same single token stream (shard seams included), two processes
split an epoch exactly, pack/dd batches equal those of the raw corpus, prepare -> train -> resume
is exact, bad corpora are one-line errors, and opening reads no token."""

import json
import os

import numpy as np
import pytest

from jaxlm.config import ConfigError, DataConfig
from jaxlm.data.modes import make_data_source
from jaxlm.data.pipeline import BATCH_KEYS, Windows
from jaxlm.data.prepared import ShardedTokens, is_prepared, open_prepared
from jaxlm.data.tokenizer import get_tokenizer

BYTE = get_tokenizer("byte")
EOT = BYTE.eos_id


def _write_prepared(d, train_docs, val_docs=(), docs_per_shard=3, tok=BYTE, version=1):
    """A minimal writer of the format (briefs/format.md), independent of jaxlm.data.prepare."""
    os.makedirs(d, exist_ok=True)
    splits = {}
    for split, docs in (("train", list(train_docs)), ("val", list(val_docs))):
        shards = []
        for k in range(0, len(docs), docs_per_shard):
            part = [tok.encode(t) for t in docs[k:k + docs_per_shard]]
            offsets = np.cumsum([1] + [len(p) + 1 for p in part])  # [d+1]
            toks = np.concatenate([[EOT]] + [np.append(p, EOT) for p in part])  # [n]
            name = f"{split}-{k // docs_per_shard:05d}"
            toks.astype("<u2").tofile(os.path.join(d, name + ".bin"))
            np.save(os.path.join(d, name + ".idx.npy"), offsets.astype(np.int64))
            shards.append({"file": name + ".bin", "index": name + ".idx.npy", "docs": len(part),
                           "tokens": int(offsets[-1]), "text_bytes": int(sum(map(len, part)))})
        splits[split] = {"docs": len(docs), "tokens": sum(s["tokens"] for s in shards),
                         "text_bytes": sum(s["text_bytes"] for s in shards), "shards": shards}
    manifest = {"jaxlm_prepared": version, "dtype": "uint16", "docs_per_shard": docs_per_shard,
                "tokenizer": {"name": tok.name, "path": "", "fingerprint": tok.fingerprint(),
                              "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
                "val_fraction": 0.0, "splits": splits, "inputs": [], "command": "test",
                "skipped": {"empty": 0, "bad_json": 0, "missing_field": 0, "not_utf8": 0}}
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return d


def _docs(n, seed=0, lo=5, hi=150):
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz  ,.\n", np.uint8)
    return [bytes(rng.choice(letters, rng.integers(lo, hi))).decode() for _ in range(n)]


def _stream(docs):
    """The one token stream of a TokenCorpus of these documents: [EOT, d0, EOT, d1, EOT, ...]."""
    return np.concatenate([[EOT]] + [np.append(BYTE.encode(t), EOT) for t in docs]).astype(np.int32)


def _assert_rows_equal(a, b, n=None):
    assert len(a) == len(b)
    for i in range(len(a) if n is None else n):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(a[i][k], b[i][k], err_msg=f"row {i} key {k}")


def test_concat_windows_equal_the_single_stream_across_shard_seams(tmp_path):
    train, val = _docs(20), _docs(6, seed=1)
    d = _write_prepared(str(tmp_path / "c"), train, val, docs_per_shard=3)
    assert is_prepared(d) and is_prepared(os.path.join(d, "manifest.json"))
    assert not is_prepared(str(tmp_path)) and not is_prepared("")
    L = 16
    src = make_data_source(DataConfig(path=d, seq_len=L))
    tb = BYTE.token_bytes
    _assert_rows_equal(src.train_rows, Windows(_stream(train), L, tb))
    _assert_rows_equal(src.val_rows, Windows(_stream(val), L, tb))  # the manifest's val split
    seams = open_prepared(d, BYTE)._splits["train"].starts[1:-1]  # C_1 .. C_{S-1}
    crossing = [i for i in range(len(src.train_rows))
                if any(i * L < c < i * L + L for c in seams)]
    assert len(seams) == 6 and len(crossing) >= 3  # windows that read two shards were compared
    # array-like view: slices, ints and fancy (2-D) indexing equal the stream's
    toks, ref = open_prepared(d, BYTE).tokens("train"), _stream(train)
    idx = np.random.default_rng(0).integers(0, len(ref), (5, 7))
    np.testing.assert_array_equal(toks[idx], ref[idx])
    np.testing.assert_array_equal(toks[3:len(ref) - 2], ref[3:-2])
    assert len(toks) == len(ref) and toks[-1] == ref[-1] == EOT


def test_concat_val_fallback_and_val_path_override(tmp_path):
    train = _docs(12)
    d = _write_prepared(str(tmp_path / "noval"), train, docs_per_shard=5)
    src = make_data_source(DataConfig(path=d, seq_len=16, val_fraction=0.25))
    ref = _stream(train)
    cut = int(len(ref) * 0.75)  # as for raw text: the last val_fraction of the train tokens
    _assert_rows_equal(src.train_rows, Windows(ref[:cut], 16, BYTE.token_bytes))
    _assert_rows_equal(src.val_rows, Windows(ref[cut:], 16, BYTE.token_bytes))
    other = _docs(4, seed=5)
    v = _write_prepared(str(tmp_path / "v"), other, docs_per_shard=2)  # held-out set: train split
    src = make_data_source(DataConfig(path=d, val_path=v, seq_len=16))
    _assert_rows_equal(src.train_rows, Windows(ref, 16, BYTE.token_bytes))
    _assert_rows_equal(src.val_rows, Windows(_stream(other), 16, BYTE.token_bytes))


def _exact_epoch_docs(L, B, n_docs=15):
    """Documents whose stream has exactly k*L*B + 1 tokens: an epoch is k whole global batches."""
    docs = _docs(n_docs, seed=2)
    extra = (-(len(_stream(docs)) - 1)) % (L * B)
    docs[-1] += _docs(1, seed=3, lo=extra, hi=extra + 1)[0]  # random letters: windows stay unique
    return docs


def test_two_processes_split_an_epoch_exactly_and_match_one_process(tmp_path):
    L, B = 16, 4
    docs = _exact_epoch_docs(L, B)
    d = _write_prepared(str(tmp_path / "c"), docs, _docs(3, seed=9), docs_per_shard=4)
    src = make_data_source(DataConfig(path=d, seq_len=L))
    n = len(src.train_rows)
    assert n % B == 0 and n >= 3 * B
    key = {src.train_rows[i]["inputs"].tobytes(): i for i in range(n)}
    assert len(key) == n  # every window identifiable by its tokens

    def batches(p, count):
        it = src.train_iterator(batch_size=B, process_index=p, process_count=count, seed=3)
        return [next(it) for _ in range(n // B)]

    one, p0, p1 = batches(0, 1), batches(0, 2), batches(1, 2)
    rows = {0: [], 1: []}
    for b in range(n // B):
        for k in BATCH_KEYS:  # the global batch = process batches in process order
            np.testing.assert_array_equal(one[b][k], np.concatenate([p0[b][k], p1[b][k]]))
        for p, pb in ((0, p0[b]), (1, p1[b])):
            rows[p] += [key[r.tobytes()] for r in pb["inputs"]]
    assert not set(rows[0]) & set(rows[1])
    assert sorted(rows[0] + rows[1]) == list(range(n))  # every window exactly once


def _first_batches(src, n, **kw):
    it = src.train_iterator(batch_size=4, seed=1, **kw)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("mode", ["pack", "dd"])
def test_pack_and_dd_equal_the_raw_corpus(mode, tmp_path):
    """The stream of a prepared corpus is the raw TokenCorpus's token array and its offsets are
    the same, so with the same document split every batch is the same."""
    docs = _docs(40, seed=4, lo=3, hi=90)
    raw = tmp_path / "docs.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    d = _write_prepared(str(tmp_path / "p"), docs, docs_per_shard=7)
    common = dict(mode=mode, seq_len=32, val_fraction=0.2, cache_dir=str(tmp_path / "cache"),
                  min_bucket=8)
    a = make_data_source(DataConfig(path=str(raw), **common))
    b = make_data_source(DataConfig(path=d, **common))
    np.testing.assert_array_equal(a.train.offsets, b.train.offsets)
    np.testing.assert_array_equal(np.asarray(a.train.tokens), np.asarray(b.train.tokens))
    kw = {"total_steps": 12} if mode == "dd" else {}
    for x, y in zip(_first_batches(a, 6, **kw), _first_batches(b, 6, **kw)):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    ea, eb = (s.eval_batches(batch_size=4, num_batches=3) for s in (a, b))
    assert len(ea) == len(eb) > 0
    for x, y in zip(ea, eb):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    if mode == "pack":  # document masks: every segment is one chunk, ending at its doc's EOT
        multi = 0
        for row in range(4):
            x = {k: v[row] for k, v in _first_batches(b, 1)[0].items()}
            for seg in range(1, x["segment_ids"].max() + 1):
                t = np.flatnonzero(x["segment_ids"] == seg)
                np.testing.assert_array_equal(x["positions"][t], np.arange(len(t)))
                assert len(t) == 32 or x["targets"][t[-1]] == EOT
            multi += x["segment_ids"].max() > 1
        assert multi > 0  # some row packs several documents
