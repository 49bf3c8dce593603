"""Data layer: tokenizer round-trips and byte tables, concat-and-chunk windows, grain iterator
determinism / coverage / sharding / checkpointing, eval batches, and one-line ConfigErrors."""

import os

import numpy as np
import pytest

from jaxlm.config import DEFAULT_CORPUS, ConfigError, DataConfig
from jaxlm.data import get_tokenizer, make_data_source, register_data_mode
from jaxlm.data.tokenizer import _CHUNK_CHARS

SAMPLES = ["Hello world", "naïve café — 😀 ☃ 日本語",
           "  two  spaces\n\n\nand tabs\there\r\nCRLF \n", "<|endoftext|> is just text here", ""]


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def spm():
    return get_tokenizer("sentencepiece")


@pytest.fixture(scope="module")
def shakespeare():
    with open(DEFAULT_CORPUS, encoding="utf-8") as f:
        return f.read()


def _write(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(p)


# ----------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer():
    tok = get_tokenizer("byte")
    assert (tok.vocab_size, tok.eos_id, tok.token_bytes.shape) == (257, 256, (257,))
    for t in SAMPLES:
        ids = tok.encode(t)
        assert ids.dtype == np.int32 and tok.decode(ids) == t
        assert tok.token_bytes[ids].sum() == len(t.encode())
    assert tok.token_bytes[tok.eos_id] == 0
    assert tok.decode([72, 105, 256, 999, -1]) == "Hi"  # specials / out of range skipped
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # cut multi-byte char: replaced, no crash


def test_gpt2_tokenizer(gpt2, shakespeare):
    assert (gpt2.vocab_size, gpt2.eos_id) == (50257, 50256)
    assert gpt2.encode("Hello world").tolist() == [15496, 995]
    assert gpt2.token_bytes[gpt2.eos_id] == 0
    for t in SAMPLES:
        ids = gpt2.encode(t)
        assert ids.dtype == np.int32 and gpt2.decode(ids) == t
        assert gpt2.token_bytes[ids].sum() == len(t.encode())
        assert gpt2.eos_id not in ids.tolist()  # the literal string is not the special token
    assert gpt2.decode([15496, 50256, 995, 10**6]) == "Hello world"
    assert "\ufffd" in gpt2.decode(gpt2.encode("😀")[:1])
    # Chunked encode_batch of a long text gives exactly the ids of one whole-string encode.
    text = shakespeare[:6 * _CHUNK_CHARS] + "\n\n  end  \r\nx\n\n\n" + SAMPLES[1] * 300 + "\n \n"
    assert len(text) > _CHUNK_CHARS
    ids = gpt2.encode(text)
    assert ids.tolist() == gpt2._tok.encode(text).ids
    assert gpt2.decode(ids) == text and gpt2.token_bytes[ids].sum() == len(text.encode())


def test_sentencepiece_tokenizer(spm, shakespeare):
    assert spm.vocab_size == 32768 and spm.eos_id == 2
    t = "The quick brown fox jumps over the lazy dog."
    ids = spm.encode(t)
    assert ids.dtype == np.int32 and spm.decode(ids) == t
    assert spm.token_bytes[ids].sum() == len(t.encode()) + 1  # + the dummy-prefix space
    assert spm.decode([spm.eos_id, *ids.tolist(), 1, 10**6, -3]) == t
    assert spm.token_bytes[[0, 1, 2]].tolist() == [0, 0, 0]  # unk, bos, eos
    text = shakespeare[:50_000]  # normalisation collapses blank lines: close, not exact
    n = spm.token_bytes[spm.encode(text)].sum()
    assert abs(n / len(text.encode()) - 1) < 0.03


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown tokenizer 'bpe'"):
        get_tokenizer("bpe")
    with pytest.raises(ConfigError, match=f"vocab.json not found in {tmp_path}"):
        get_tokenizer("gpt2", str(tmp_path))
    missing = str(tmp_path / "nope.model")
    with pytest.raises(ConfigError, match="model file not found: .*nope.model"):
        get_tokenizer("sentencepiece", missing)
    with pytest.raises(ConfigError, match="cannot load"):
        get_tokenizer("sentencepiece", _write(tmp_path, "bad.model", b"not a model"))


# ----------------------------------------------------------------------------- pipeline

L = 8  # seq_len of the synthetic tests


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A 1000-byte random-letter text whose 8-token windows are all distinct."""
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 1000))
    path = _write(tmp_path_factory.mktemp("synth"), "synth.txt", text)
    return DataConfig(path=path, seq_len=L, val_fraction=0.2)


def _rows(it, n):
    """The first n rows of an iterator, as a list of tuple(inputs)."""
    out = []
    while len(out) < n:
        out += [tuple(r) for r in next(it)["inputs"].tolist()]
    return out[:n]


def test_batch_layout(synth):
    src = make_data_source(synth)
    train = src.train_rows.tokens
    assert len(train) == 800 and len(src.val_rows.tokens) == 200  # nanoGPT-style token split
    assert len(src.train_rows) == (800 - 1) // L
    b = next(src.train_iterator(batch_size=4, seed=0))
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        "inputs": ((4, L), "int32"), "targets": ((4, L), "int32"), "positions": ((4, L), "int32"),
        "segment_ids": ((4, L), "int32"), "loss_mask": ((4, L), "float32"),
        "target_bytes": ((4, L), "int32")}
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    np.testing.assert_array_equal(b["positions"], np.broadcast_to(np.arange(L), (4, L)))
    assert (b["segment_ids"] == 1).all() and (b["loss_mask"] == 1).all()
    np.testing.assert_array_equal(b["target_bytes"], src.tokenizer.token_bytes[b["targets"]])
    for inp, tgt in zip(b["inputs"], b["targets"]):  # each row is a stride-L window of the stream
        (starts,) = np.nonzero([(train[s:s + L] == inp).all() for s in range(0, len(train) - L, L)])
        s = starts[0] * L
        np.testing.assert_array_equal(tgt, train[s + 1:s + L + 1])


def test_every_target_once_per_epoch(synth):
    src = make_data_source(synth)
    n = len(src.train_rows)
    windows = [tuple(src.train_rows[i]["inputs"].tolist()) for i in range(n)]
    assert len(set(windows)) == n
    it = src.train_iterator(batch_size=5, seed=3)
    rows = _rows(it, 2 * n)  # epochs need not align with batches (99 windows, batch 5)
    ep1, ep2 = rows[:n], rows[n:]
    assert sorted(ep1) == sorted(windows) and sorted(ep2) == sorted(windows)
    assert ep1 != ep2 and ep1 != windows  # shuffled, and reshuffled every epoch
    by_input = {w: src.train_rows[i]["targets"] for i, w in enumerate(windows)}
    targets = np.sort(np.concatenate([by_input[w] for w in ep1]))  # every target exactly once
    np.testing.assert_array_equal(targets, np.sort(src.train_rows.tokens[1:n * L + 1]))


def test_determinism_and_no_shuffle(synth):
    src = make_data_source(synth)
    a = _rows(src.train_iterator(batch_size=4, seed=7), 40)
    assert a == _rows(src.train_iterator(batch_size=4, seed=7), 40)
    assert a != _rows(src.train_iterator(batch_size=4, seed=8), 40)
    plain = make_data_source(
        DataConfig(path=synth.path, seq_len=L, val_fraction=0.2, shuffle=False))
    n = len(plain.train_rows)
    assert _rows(plain.train_iterator(batch_size=4), n) == [
        tuple(plain.train_rows[i]["inputs"].tolist()) for i in range(n)]


def test_iterator_state_roundtrip(synth, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    src = make_data_source(synth)
    it = src.train_iterator(batch_size=4, seed=1)
    for _ in range(30):  # 120 rows: past the end of the first epoch (99 windows)
        next(it)
    state = it.get_state()
    ckptr = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
    ckptr.save(tmp_path / "data", args=grain.checkpoint.CheckpointSave(it))
    expect = [next(it) for _ in range(5)]
    fresh = src.train_iterator(batch_size=4, seed=1)
    fresh.set_state(state)
    restored = src.train_iterator(batch_size=4, seed=1)
    ckptr.restore(tmp_path / "data", args=grain.checkpoint.CheckpointRestore(restored))
    for e in expect:
        for other in (next(fresh), next(restored)):
            for k in e:
                np.testing.assert_array_equal(e[k], other[k])


def test_process_shards(synth):
    src = make_data_source(synth)
    n = len(src.train_rows)
    its = [src.train_iterator(batch_size=4, process_index=p, process_count=2, seed=0)
           for p in (0, 1)]
    assert next(its[0])["inputs"].shape == (2, L)
    its = [src.train_iterator(batch_size=4, process_index=p, process_count=2, seed=0)
           for p in (0, 1)]
    shards = [_rows(its[0], (n + 1) // 2), _rows(its[1], n // 2)]  # one epoch of each shard
    assert not set(shards[0]) & set(shards[1])
    all_windows = {tuple(src.train_rows[i]["inputs"].tolist()) for i in range(n)}
    assert set(shards[0]) | set(shards[1]) == all_windows
    with pytest.raises(ConfigError, match="multiple of the process count 3"):
        src.train_iterator(batch_size=4, process_count=3)


def test_eval_batches(synth):
    src = make_data_source(synth)
    n = len(src.val_rows)  # (200 - 1) // 8 = 24 windows
    a = src.eval_batches(batch_size=4, num_batches=3)
    b = src.eval_batches(batch_size=4, num_batches=3)
    assert len(a) == 3
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    np.testing.assert_array_equal(a[1]["inputs"][0], src.val_rows[4]["inputs"])  # in order
    # Two processes: the concatenated local batches are the single-process global batch.
    halves = [src.eval_batches(batch_size=4, num_batches=3, process_index=p, process_count=2)
              for p in (0, 1)]
    for g, h0, h1 in zip(a, *halves):
        np.testing.assert_array_equal(g["targets"], np.concatenate([h0["targets"], h1["targets"]]))
    # A short split gives fewer batches; the last is padded with masked rows, never wrapped.
    many = src.eval_batches(batch_size=10, num_batches=100)
    assert len(many) == -(-n // 10)
    mask = np.concatenate([m["loss_mask"] for m in many])
    assert mask.sum() == n * L and (mask[n:] == 0).all()
    assert (many[-1]["segment_ids"][n % 10:] == 0).all()
    assert (many[-1]["target_bytes"][n % 10:] == 0).all()


def test_val_path_and_default_corpus(synth, tmp_path):
    val = _write(tmp_path, "val.txt", "x" * 100)
    src = make_data_source(DataConfig(path=synth.path, val_path=val, seq_len=L))
    assert len(src.train_rows.tokens) == 1000 and len(src.val_rows) == (100 - 1) // L
    assert (src.val_rows[0]["inputs"] == ord("x")).all()
    default = make_data_source(DataConfig(seq_len=256))  # bundled tinyshakespeare, bytes
    assert len(default.train_rows.tokens) == 1_003_854 and len(default.val_rows.tokens) == 111_540


def test_data_errors(tmp_path, synth):
    cases = [
        (DataConfig(path=str(tmp_path / "missing.txt")), "data.path: file not found: .*missing"),
        (DataConfig(path=_write(tmp_path, "empty.txt", b"")), "data.path: file is empty"),
        (DataConfig(path=_write(tmp_path, "bad.txt", b"ok \xff\xfe")),
         "not valid UTF-8 \\(bad byte at offset 3\\)"),
        (DataConfig(path=_write(tmp_path, "short.txt", "tiny text"), seq_len=16),
         "train split has 8 tokens but data.seq_len=16 needs at least 17"),
        (DataConfig(path=synth.path, seq_len=L, val_path=_write(tmp_path, "v.txt", "abc")),
         "val split has 3 tokens"),
        (DataConfig(path=synth.path, val_path=str(tmp_path / "nov.txt")),
         "data.val_path: file not found"),
        (DataConfig(path=synth.path, tokenizer="wordpiece"), "unknown tokenizer"),
        (DataConfig(path=synth.path, mode="nosuchmode"), "data.mode='nosuchmode'"),
    ]
    for cfg, msg in cases:
        with pytest.raises(ConfigError, match=msg) as e:
            make_data_source(cfg)
        assert "\n" not in str(e.value)


def test_register_data_mode(synth):
    built = []

    def builder(cfg):
        built.append(cfg)
        return make_data_source(DataConfig(path=cfg.path, seq_len=cfg.seq_len))

    register_data_mode("test_custom_mode", builder)
    src = make_data_source(DataConfig(path=synth.path, seq_len=L, mode="test_custom_mode"))
    assert built and next(src.train_iterator(batch_size=2))["inputs"].shape == (2, L)
    assert os.path.samefile(built[0].path, synth.path)
