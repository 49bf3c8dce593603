"""Document corpora: text with literal / regex separators, JSONL, ArrayRecord; the on-disk token
cache (built once, memory-mapped, invalidated when the file changes); bad input -> ConfigError or
a counted skip; the bundled WikiText-2 validation articles."""

import json
import os

import numpy as np
import pytest

from jaxlm.config import ASSETS, ConfigError
from jaxlm.data import get_tokenizer
from jaxlm.data.corpus import load_corpus

BYTE = get_tokenizer("byte")
EOS = BYTE.eos_id


def _docs(c):
    return [BYTE.decode(c.doc(j)[:-1]) for j in range(c.n_docs)]


def test_text_separators_and_layout(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first doc\n\nsecond\n\n\n\n  \n\nthird one")
    c = load_corpus(str(p), BYTE, cache_dir=str(tmp_path / "c"))
    assert _docs(c) == ["first doc", "second", "third one"]
    assert c.stats["skipped_empty_docs"] == 2  # "" and "  "
    assert c.tokens[0] == EOS and all(c.doc(j)[-1] == EOS for j in range(3))
    assert c.offsets[0] == 1 and c.offsets[-1] == len(c.tokens)
    assert c.doc_lengths().tolist() == [10, 7, 10]  # tokens + EOT
    r = load_corpus(str(p), BYTE, separator="re:\\n+", cache_dir=str(tmp_path / "c"))
    assert _docs(r) == ["first doc", "second", "third one"]  # "  " skipped
    with pytest.raises(ConfigError, match="bad regex"):
        load_corpus(str(p), BYTE, separator="re:(", cache_dir=str(tmp_path / "c"))


def test_jsonl_and_arrayrecord(tmp_path):
    p = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "alpha"}), "not json", json.dumps({"body": "x"}),
             json.dumps({"text": "beta gamma"}), "", json.dumps([1, 2])]
    p.write_text("\n".join(lines))
    c = load_corpus(str(p), BYTE, cache_dir=str(tmp_path / "c"))
    assert _docs(c) == ["alpha", "beta gamma"] and c.stats["skipped_bad_records"] == 3
    q = tmp_path / "e.jsonl"
    q.write_text(json.dumps({"body": "delta"}))
    assert _docs(load_corpus(str(q), BYTE, text_field="body", cache_dir=str(tmp_path / "c"))) == [
        "delta"]
    from array_record.python.array_record_module import ArrayRecordWriter

    ar = str(tmp_path / "docs.array_record")
    w = ArrayRecordWriter(ar, "group_size:1")
    for rec in (b"one", "tw\u00f6".encode(), b"\xff\xfe bad", b"three"):
        w.write(rec)
    w.close()
    c = load_corpus(ar, BYTE, cache_dir=str(tmp_path / "c"))
    assert _docs(c) == ["one", "tw\u00f6", "three"] and c.stats["skipped_bad_records"] == 1


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    p.write_text("one\n\ntwo")
    cache = tmp_path / "c"
    a = load_corpus(str(p), BYTE, cache_dir=str(cache))
    assert isinstance(a.tokens, np.memmap) and len(os.listdir(cache)) == 1
    calls = []
    monkeypatch.setattr(BYTE, "encode", lambda t: calls.append(t) or np.zeros(0, np.int32))
    b = load_corpus(str(p), BYTE, cache_dir=str(cache))  # no re-tokenizing
    assert not calls and np.array_equal(a.tokens, b.tokens)
    monkeypatch.undo()
    p.write_text("one\n\ntwo\n\nthree")  # changed file: new cache entry
    assert _docs(load_corpus(str(p), BYTE, cache_dir=str(cache))) == ["one", "two", "three"]
    assert len([d for d in os.listdir(cache) if not d.startswith(".")]) == 2


def test_bad_input(tmp_path):
    cache = str(tmp_path / "c")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n\n")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff")
    cases = [(tmp_path / "missing.txt", "file not found"), (empty, "file is empty"),
             (blank, "holds no non-empty document"), (bad, "not valid UTF-8")]
    for path, msg in cases:
        with pytest.raises(ConfigError, match=msg) as e:
            load_corpus(str(path), BYTE, cache_dir=cache)
        assert "\n" not in str(e.value)
    one = tmp_path / "one.txt"
    one.write_text("just one document")
    with pytest.raises(ConfigError, match="too few to hold out"):
        load_corpus(str(one), BYTE, cache_dir=cache).split(0.1)
    with pytest.raises(ConfigError, match="data.format='xml'"):
        load_corpus(str(one), BYTE, fmt="xml", cache_dir=cache)
    huge = tmp_path / "huge.txt"  # one 200k-token document next to tiny ones: kept whole
    huge.write_text("a" * 200_000 + "\n\nb\n\nc")
    assert load_corpus(str(huge), BYTE, cache_dir=cache).doc_lengths().tolist() == [
        200_001, 2, 2]


def test_vocab_mismatch(tmp_path):
    """A cache whose ids do not fit the tokenizer (or a model smaller than it) is refused."""
    from jaxlm.config import load_config
    from jaxlm.train.state import resolve_vocab

    p = tmp_path / "a.txt"
    p.write_text("x\n\ny")
    c = load_corpus(str(p), BYTE, cache_dir=str(tmp_path / "c"))
    stats = os.path.join(tmp_path / "c", os.listdir(tmp_path / "c")[0], "stats.json")
    with open(stats) as f:
        s = json.load(f)
    s["max_id"] = 999
    with open(stats, "w") as f:
        json.dump(s, f)
    with pytest.raises(ConfigError, match="holds id 999"):
        load_corpus(str(p), BYTE, cache_dir=str(tmp_path / "c"))
    assert c.n_docs == 2
    with pytest.raises(ConfigError, match="model.vocab_size=100 is smaller"):
        resolve_vocab(load_config(None, ["model.vocab_size=100"]), 257)


def test_bundled_wikitext_articles(tmp_path):
    path = os.path.join(ASSETS, "wikitext-2", "valid.txt")
    c = load_corpus(path, BYTE, separator="re:\\n(?= = [^=].* = \\n)", cache_dir=str(tmp_path))
    # bytes - 60 cut newlines - one skipped " " + 61 EOTs
    assert c.n_docs == 60 and c.stats["n_tokens"] == 1_121_681
    assert BYTE.decode(c.doc(0)[:22]) == " = Homarus gammarus = "
