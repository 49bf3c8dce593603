"""Training reads a prepared corpus (sharded token files + manifest.json) in every data mode:
concat windows equal those of the same single token stream (shard seams included), two processes
split an epoch exactly, pack/dd batches equal those of the raw corpus, prepare -> train -> resume
is exact, bad corpora are one-line errors, and opening reads no token."""

import json
import os
import pickle

import numpy as np
import pytest

from jaxlm.config import ConfigError, DataConfig
from jaxlm.data.modes import make_data_source
from jaxlm.data.pipeline import BATCH_KEYS, Windows
from jaxlm.data.prepared import is_prepared, open_prepared
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
    from jaxlm.data.prepare import prepare

    d = str(tmp_path / "p")
    prepare([str(raw)], d, docs_per_shard=7, progress=False)
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


def _one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def _break(d, what):
    mpath = os.path.join(d, "manifest.json")
    m = json.load(open(mpath))
    if what == "tokenizer":  # made with the GPT-2 tokenizer
        gpt2 = get_tokenizer("gpt2")
        m["tokenizer"].update(name="gpt2", fingerprint=gpt2.fingerprint(), vocab_size=50257,
                              eos_id=50256)
    elif what == "version":
        m["jaxlm_prepared"] = 99
    elif what == "missing":
        os.remove(os.path.join(d, "train-00001.bin"))
    elif what == "truncated":
        with open(os.path.join(d, "train-00001.bin"), "r+b") as f:
            f.truncate(os.path.getsize(f.name) - 2)
    json.dump(m, open(mpath, "w"))


@pytest.mark.parametrize("what,expect", [
    ("tokenizer", "was prepared with tokenizer gpt2 (vocab 50257) but this run uses byte (vocab "
                  "257): prepare again with --tokenizer byte or set data.tokenizer=gpt2"),
    ("version", "has format version 99 but this jaxlm reads version 1"),
    ("missing", "missing or truncated shard {d}/train-00001.bin of split train (missing): re-run "
                "jaxlm-prepare with the same arguments to finish it"),
    ("truncated", "missing or truncated shard {d}/train-00001.bin of split train (10 bytes, "
                  "expected 12): re-run jaxlm-prepare with the same arguments to finish it"),
])
@pytest.mark.parametrize("mode", ["concat", "dd"])
def test_bad_prepared_corpus_is_one_line(what, expect, mode, tmp_path):
    d = _write_prepared(str(tmp_path / "c"), ["ab", "cd", "e", "fg"], docs_per_shard=2)
    _break(d, what)
    msg = _one_line_error(make_data_source, DataConfig(path=d, mode=mode, seq_len=2, min_bucket=2))
    assert expect.format(d=d) in msg and msg.startswith("data.path: ")


def test_empty_train_split_and_remote_paths(tmp_path, capsys):
    from jaxlm.cli import train_main

    d = _write_prepared(str(tmp_path / "e"), [], ["only val"])
    assert "the train split of" in _one_line_error(open_prepared, d, BYTE)
    for mode in ("concat", "pack"):
        for url in ("gs://bucket/corpus", "s3://b/c", "hf://datasets/x", "https://x.org/a.txt"):
            msg = _one_line_error(make_data_source, DataConfig(path=url, mode=mode))
            assert msg.startswith(f"data.path: {url} is a remote URL")
    assert "gcsfuse" in msg or "curl" in msg
    msg = _one_line_error(make_data_source, DataConfig(path="gs://b/c"))
    assert "mount the bucket with gcsfuse" in msg
    assert "jaxlm-prepare with an hf: input" in _one_line_error(
        make_data_source, DataConfig(path="hf://datasets/x"))
    assert train_main(["tiny", "data.path=gs://bucket/corpus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.path: gs://bucket/corpus is a remote")


def test_malformed_manifest_bad_index_and_prepared_val_path(tmp_path):
    d = _write_prepared(str(tmp_path / "c"), _docs(6), docs_per_shard=2)
    v = _write_prepared(str(tmp_path / "v"), _docs(4, seed=7), _docs(3, seed=8))
    src = make_data_source(DataConfig(path=d, val_path=v, mode="pack", seq_len=32))
    assert (src.train.n_docs, src.stats["val_docs"]) == (6, 3)  # val_path's own val split
    np.save(os.path.join(d, "train-00001.idx.npy"), np.array([1, 5], np.int64))
    msg = _one_line_error(make_data_source, DataConfig(path=d, mode="pack", seq_len=32))
    assert "train-00001.idx.npy does not match the manifest (2 documents" in msg
    os.rename(os.path.join(d, "manifest.json"), os.path.join(d, "m.json"))
    open(os.path.join(d, "prepare-args.json"), "w").write("{}")  # a prepare that was killed
    msg = _one_line_error(make_data_source, DataConfig(path=d, seq_len=32))
    assert msg == (f"data.path: {d} has no manifest.json: its jaxlm-prepare did not finish; "
                   "re-run jaxlm-prepare with the same arguments to finish it")
    os.rename(os.path.join(d, "m.json"), os.path.join(d, "manifest.json"))
    m = json.load(open(os.path.join(d, "manifest.json")))
    del m["splits"]
    json.dump(m, open(os.path.join(d, "manifest.json"), "w"))
    msg = _one_line_error(make_data_source, DataConfig(path=d, seq_len=32))
    assert "is a malformed manifest (KeyError: 'splits'); re-run jaxlm-prepare" in msg


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_opening_reads_no_token_and_rows_open_only_their_shards(tmp_path):
    """Two shards of 256M tokens (sparse 512 MB files): opening costs neither time nor memory,
    and a row opens only the shard(s) it reads."""
    d = _write_prepared(str(tmp_path / "big"), ["ab", "cd"], docs_per_shard=1)
    m = json.load(open(os.path.join(d, "manifest.json")))
    n = 1 << 28
    for k, sh in enumerate(m["splits"]["train"]["shards"]):
        with open(os.path.join(d, sh["file"]), "r+b") as f:
            f.truncate(2 * n)  # sparse: zeros (token 0) after the document
        np.save(os.path.join(d, sh["index"]), np.array([1, n], np.int64))
        sh["tokens"] = n
    json.dump(m, open(os.path.join(d, "manifest.json"), "w"))
    before = _rss_bytes()
    src = make_data_source(DataConfig(path=d, seq_len=64, val_fraction=0.001))
    shards = src.train_rows.tokens._shards
    assert shards.opened == 0 and _rss_bytes() - before < 64 << 20
    assert len(src.train_rows) == (int((2 * n - 1) * 0.999) - 1) // 64
    row = src.train_rows[0]
    assert shards.opened == 1 and row["inputs"][:3].tolist() == [EOT, ord("a"), ord("b")]
    seam = (n - 1) // 64  # the window holding the last token of shard 0 and the first of shard 1
    src.train_rows[seam]
    assert shards.opened == 2 and _rss_bytes() - before < 64 << 20
    copy = pickle.loads(pickle.dumps(src.train_rows))  # picklable; maps reopen on first use
    assert copy.tokens._shards.opened == 0
    np.testing.assert_array_equal(copy[seam]["targets"], src.train_rows[seam]["targets"])


@pytest.fixture(scope="module")
def prepared_shakespeare(tmp_path_factory):
    """The first 60 kB of tinyshakespeare through the real jaxlm-prepare: ~8 train shards, a
    held-out split by document hash."""
    from jaxlm.config import DEFAULT_CORPUS
    from jaxlm.data.prepare import prepare

    base = tmp_path_factory.mktemp("prep")
    (base / "shakespeare.txt").write_text(open(DEFAULT_CORPUS, encoding="utf-8").read()[:60_000])
    m = prepare([str(base / "shakespeare.txt")], str(base / "out"), val_fraction=0.05,
                docs_per_shard=40, progress=False)
    assert len(m["splits"]["train"]["shards"]) > 4 and m["splits"]["val"]["docs"] > 0
    return str(base / "out")


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


@pytest.mark.parametrize("mode", ["concat", pytest.param("dd", marks=pytest.mark.slow)])
def test_prepared_train_resume_equals_uninterrupted(mode, prepared_shakespeare, tmp_path):
    import jax

    from jaxlm.config import load_config
    from jaxlm.train.loop import run

    def cfg(out, *extra):
        return load_config("tiny", [
            f"out_dir={out}", f"data.path={prepared_shakespeare}", f"data.mode={mode}",
            "data.min_bucket=32", "train.steps=8", "train.log_every=1", "train.warmup_steps=2",
            "train.lr=1e-2", "train.eval_every=0", "train.eval_batches=0", "ckpt.every=4",
            *extra])

    full = run(cfg(tmp_path / "full"))
    assert run(cfg(tmp_path / "resumed", "train.stop_at=4"))["step"] == 4
    second = run(cfg(tmp_path / "resumed"))
    assert second["start_step"] == 4 and second["step"] == 8
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert [s for s, _ in a] == list(range(1, 9)) and a == b  # the same curve, bit for bit
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(full["state"]["params"]),
                 jax.device_get(second["state"]["params"]))
    assert a[-1][1] < a[0][1] - 0.5  # it learns from the prepared corpus
    if mode == "concat":  # jaxlm-eval --data DIR scores its val split = the run's held-out data
        from jaxlm.eval import evaluate_file, evaluate_run

        on_dir = evaluate_file(str(tmp_path / "full"), str(prepared_shakespeare), max_batches=2)
        assert on_dir == evaluate_run(str(tmp_path / "full"), max_batches=2)
