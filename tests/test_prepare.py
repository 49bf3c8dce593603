"""jaxlm-prepare: round trips, manifest, shards, held-out split, determinism, resume after kill -9,
every bad input, the CLI, and the HF tokenizer.json tokenizer."""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxlm.cli import main as cli_main, prepare_main
from jaxlm.data import prepare as P, readers
from jaxlm.data.prepare import prepare
from jaxlm.data.tokenizer import get_tokenizer
from jaxlm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["Hello world.", "Ünïcödé ✓ and 😀 emoji", "line one\nline two", "  leading spaces",
        "<|endoftext|> inside a document", "x" * 300, "tab\there", "\nstarts with a newline"]


def many_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "délta", "ε", "zeta", "eta\nθ", "😀"]
    return [f"doc {i}: " + " ".join(rng.choice(words, rng.integers(1, 12))) for i in range(n)]


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": 1, field: d}) + "\n")
    return str(path)


def write_parquet(path, docs, field="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({field: docs, "n": list(range(len(docs)))})
    pq.write_table(table, str(path), row_group_size=3)
    return str(path)


def read_split(out, split="train"):
    """(documents as token arrays without EOT, manifest), checking the shard layout."""
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    eos, docs = m["tokenizer"]["eos_id"], []
    for sh in m["splits"][split]["shards"]:
        toks = np.fromfile(os.path.join(out, sh["file"]), dtype=m["dtype"])  # [N]
        off = np.load(os.path.join(out, sh["index"]), mmap_mode="r")  # [D+1]
        assert off[0] == 1 and off[-1] == len(toks) == sh["tokens"] and len(off) == sh["docs"] + 1
        assert toks[0] == eos and (toks[off[1:] - 1] == eos).all()
        docs += [toks[a:b - 1] for a, b in zip(off[:-1], off[1:])]
    return docs, m


def decode_all(out, tok, split="train"):
    docs, _ = read_split(out, split)
    return [tok.decode(d) for d in docs]


def files_of(out):
    """{name: bytes} of a prepared dir, the manifest without its "command"."""
    got = {}
    for name in sorted(os.listdir(out)):
        with open(os.path.join(out, name), "rb") as f:
            got[name] = f.read()
    m = json.loads(got.pop("manifest.json"))
    m.pop("command")
    return got, m


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", ["byte", "gpt2"])
def test_round_trip_txt_and_jsonl(tmp_path, name):
    txt = tmp_path / "a.txt"
    txt.write_text("\n\n".join(DOCS[:4]) + "\n\n\n\n" + "last doc\n", encoding="utf-8")
    jl = write_jsonl(tmp_path / "b.jsonl", DOCS[4:])
    out = str(tmp_path / "out")
    m = prepare([str(txt), jl], out, tokenizer=name, docs_per_shard=3, progress=False)
    want = DOCS[:4] + ["last doc\n"] + DOCS[4:]  # "\n\n\n\n" leaves one empty document
    tok = get_tokenizer(name)
    assert decode_all(out, tok) == want
    tr = m["splits"]["train"]
    assert tr["docs"] == len(want) and m["skipped"]["empty"] == 1
    assert [s["docs"] for s in tr["shards"]] == [3, 3, 3]
    assert tr["text_bytes"] == sum(len(d.encode()) for d in want)
    assert tr["tokens"] == sum(len(tok.encode(d)) + 1 for d in want) + len(tr["shards"])
    assert m["dtype"] == "uint16" and m["tokenizer"]["fingerprint"] == tok.fingerprint()
    assert m["splits"]["val"] == {"docs": 0, "tokens": 0, "text_bytes": 0, "shards": []}


def test_jsonl_gz_parquet_and_hf_local_dir(tmp_path):
    docs = many_docs(20)
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:10])
    pq_file = write_parquet(tmp_path / "d.parquet", docs[10:])
    out = str(tmp_path / "o1")
    prepare([str(gz), pq_file], out, progress=False)
    byte = get_tokenizer("byte")
    assert decode_all(out, byte) == docs
    # a directory and a glob: files sorted by name, recursively
    os.makedirs(tmp_path / "dir" / "sub")
    os.replace(gz, tmp_path / "dir" / "sub" / "c.jsonl.gz")
    os.replace(pq_file, tmp_path / "dir" / "d.parquet")
    (tmp_path / "dir" / "README.md").write_text("ignored")
    prepare([str(tmp_path / "dir")], str(tmp_path / "o2"), progress=False)
    assert decode_all(str(tmp_path / "o2"), byte) == docs[10:] + docs[:10]  # d.parquet < sub/
    prepare([str(tmp_path / "dir" / "**" / "*.jsonl.gz")], str(tmp_path / "o3"), progress=False)
    assert decode_all(str(tmp_path / "o3"), byte) == docs[:10]
    hf_dir = tmp_path / "hfdata"
    hf_dir.mkdir()
    write_jsonl(hf_dir / "train.jsonl", docs, field="content")
    prepare([f"hf:{hf_dir}"], str(tmp_path / "o4"), text_field="content", progress=False)
    assert decode_all(str(tmp_path / "o4"), byte) == docs
    with pytest.raises(ConfigError, match=r"no column 'text' \(its columns: id, content\)"):
        prepare([f"hf:{hf_dir}"], str(tmp_path / "o5"), progress=False)
    with pytest.raises(ConfigError, match="Bad split: test.*check the name or path.*--hf-split"):
        prepare([f"hf:{hf_dir}"], str(tmp_path / "o6"), hf_split="test", progress=False)


# ----------------------------------------------------------------------------- split, determinism

def test_val_split_by_hash(tmp_path):
    docs = many_docs(300) + ["a duplicate"] * 5
    out = str(tmp_path / "out")
    m = prepare([write_jsonl(tmp_path / "a.jsonl", docs)], out, val_fraction=0.3,
                docs_per_shard=40, progress=False)
    byte = get_tokenizer("byte")
    train, val = decode_all(out, byte, "train"), decode_all(out, byte, "val")

    def in_val(d):
        return int.from_bytes(hashlib.sha256(d.encode()).digest()[:8], "little") / 2**64 < 0.3

    assert train == [d for d in docs if not in_val(d)] and val == [d for d in docs if in_val(d)]
    assert not set(train) & set(val) and 50 < len(val) < 130
    assert m["splits"]["val"]["docs"] == len(val)
    assert all(s["docs"] == 40 for s in m["splits"]["train"]["shards"][:-1])


def test_deterministic_across_num_proc(tmp_path, monkeypatch):
    """Same files for num_proc 1 and 2 (and any chunk size); at most 2 * num_proc chunks are in
    flight, however long the input."""
    src = write_jsonl(tmp_path / "a.jsonl", many_docs(700))
    in_flight = []
    submit = P._Encoder.submit
    monkeypatch.setattr(P._Encoder, "submit",
                        lambda self, *a: (submit(self, *a), in_flight.append(len(self.pending))))
    runs = []
    for n, chunk in ((1, 256), (2, 8)):
        monkeypatch.setattr(P, "_CHUNK_DOCS", chunk)
        out = str(tmp_path / f"o{n}")
        prepare([src], out, tokenizer="gpt2", num_proc=n, val_fraction=0.1, docs_per_shard=128,
                progress=False)
        runs.append(files_of(out))
    assert runs[0] == runs[1]
    assert "val-00000.bin" in runs[0][0] and "train-00004.bin" in runs[0][0]
    assert len(in_flight) > 80 and max(in_flight) == 2 * 2 + 1  # the submit before a drain


@pytest.mark.parametrize("block", [1, 2, 3, 5, 64])
def test_txt_streamed_in_blocks(tmp_path, monkeypatch, block):
    """Cutting at "\n\n" block by block == str.split("\n\n") of the whole file."""
    text = "a\n\n\nb\n\n\n\nc\nd\n\n\n\n\n" + "é😀\n" * 7 + "\n\nlast\n\n"
    monkeypatch.setattr(readers, "_BLOCK", block)
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    skips = readers.Skips()
    assert list(readers._read_txt(str(path), skips)) == text.split("\n\n")


_SLOW_DRIVER = """
import sys, time
from jaxlm.data import prepare as P
finish = P._SplitWriter.finish
def slow_finish(self):
    finish(self)
    time.sleep(0.05)
P._SplitWriter.finish = slow_finish
P.prepare([sys.argv[1]], sys.argv[2], tokenizer="gpt2", docs_per_shard=4, val_fraction=0.2,
          progress=False)
"""


def test_resume_after_kill(tmp_path):
    """kill -9 mid-run, re-run (with another num_proc): byte-identical to an uninterrupted run,
    and the shards finished before the kill are not written again."""
    src = write_jsonl(tmp_path / "a.jsonl", many_docs(400))
    out, ref = str(tmp_path / "killed"), str(tmp_path / "ref")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_DRIVER, src, out], env=env)
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(out, "train-00001.done.json")):
        assert proc.poll() is None and time.time() < deadline, "prepare ended before the kill"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    first = os.stat(os.path.join(out, "train-00000.bin"))
    prepare([src], out, tokenizer="gpt2", docs_per_shard=4, val_fraction=0.2, num_proc=2,
            progress=False)
    prepare([src], ref, tokenizer="gpt2", docs_per_shard=4, val_fraction=0.2, progress=False)
    assert files_of(out) == files_of(ref)
    again = os.stat(os.path.join(out, "train-00000.bin"))
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)


def test_rerun_same_args_and_other_args(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", many_docs(30))
    out = str(tmp_path / "out")
    m1 = prepare([src], out, docs_per_shard=8, progress=False)
    assert prepare([src], out, docs_per_shard=8, progress=False) == m1  # all shards skipped
    with pytest.raises(ConfigError, match=r"other arguments \(docs_per_shard: 8 -> 9\).*new --out"):
        prepare([src], out, docs_per_shard=9, progress=False)
    with pytest.raises(ConfigError, match="tokenizer: byte .* -> gpt2.*delete it"):
        prepare([src], out, docs_per_shard=8, tokenizer="gpt2", progress=False)


# ----------------------------------------------------------------------------- bad input

def test_bad_records_are_counted_and_skipped(tmp_path, capsys):
    jl = tmp_path / "a.jsonl"
    jl.write_bytes(b'{"text": "good one"}\n\n{"text": oops\n{"title": "no text"}\n'
                   b'{"text": "bad \xff byte"}\n{"text": "good two"}\n{"text": ""}\n[1, 2]\n')
    txt = tmp_path / "b.txt"
    txt.write_bytes(b"fine doc\n\nnot \xfe utf8\n\nfine again")
    out = str(tmp_path / "out")
    m = prepare([str(jl), str(txt)], out, progress=False)
    assert decode_all(out, get_tokenizer("byte")) == ["good one", "good two", "fine doc",
                                                      "fine again"]
    assert m["skipped"] == {"bad_json": 1, "missing_field": 2, "not_utf8": 2, "empty": 1}
    err = capsys.readouterr().err
    assert err.startswith("warning: skipped 5 bad record(s)") and err.count("\n") == 1
    assert f"the first: {jl} line 3 (bad_json)" in err


def write_bad(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("case", ["glob", "missing", "ext", "parquet_col", "all_bad", "gz",
                                  "val_hi", "val_neg", "num_proc", "dps", "gs", "s3", "https",
                                  "empty_dir", "no_docs"])
def test_bad_inputs(tmp_path, case):
    good = write_jsonl(tmp_path / "good.jsonl", ["a doc"])
    gz_data = gzip.compress(b'{"text": "x"}\n' * 2000)
    kw, inputs = {}, [good]
    if case == "glob":
        inputs, want = [str(tmp_path / "*.parquet")], "no file matches this glob"
    elif case == "missing":
        inputs, want = [str(tmp_path / "nope.jsonl")], "nope.jsonl: no such file or directory"
    elif case == "ext":
        inputs, want = [write_bad(tmp_path, "a.csv", b"text\nx\n")], "unsupported file type"
    elif case == "parquet_col":
        inputs = [write_parquet(tmp_path / "p.parquet", ["x"], field="body")]
        want = r"no column 'text' \(its columns: body, n\); set --text-field"
    elif case == "all_bad":
        inputs = [write_jsonl(tmp_path / "c.jsonl", ["x", "y"], field="body")]
        want = r"all 2 records are bad.*line 1.*--text-field \(now 'text'\)"
    elif case == "gz":
        inputs = [write_bad(tmp_path, "t.jsonl.gz", gz_data[:len(gz_data) // 2])]
        want = "t.jsonl.gz is truncated or corrupt"
    elif case in ("val_hi", "val_neg"):
        kw, want = {"val_fraction": 1.0 if case == "val_hi" else -0.1}, r"must be in \[0, 1\)"
    elif case == "num_proc":
        kw, want = {"num_proc": 0}, "num_proc=0 must be an integer >= 1"
    elif case == "dps":
        kw, want = {"docs_per_shard": 0}, "docs_per_shard=0 must be"
    elif case in ("gs", "s3", "https"):
        inputs = [{"gs": "gs://b/x.jsonl", "s3": "s3://b/x", "https": "https://h/x.txt"}[case]]
        want = "prepare reads local files only.*gcsfuse"
    elif case == "empty_dir":
        (tmp_path / "e").mkdir()
        inputs, want = [str(tmp_path / "e")], "directory holds no .jsonl.gz"
    else:
        inputs, want = [write_bad(tmp_path, "blank.txt", b"\n\n  \n\n")], "no non-empty document"
    with pytest.raises(ConfigError, match=want) as e:
        prepare(inputs, str(tmp_path / "out"), progress=False, **kw)
    assert "\n" not in str(e.value)
    if case == "all_bad":  # nothing was finished: the fixed command may reuse the directory
        m = prepare(inputs, str(tmp_path / "out"), text_field="body", progress=False)
        assert m["splits"]["train"]["docs"] == 2


def test_hf_input_without_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'jaxlm\[data\]'"):
        prepare([f"hf:{tmp_path}"], str(tmp_path / "out"), progress=False)


def test_out_dir_not_made_by_prepare(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="without prepare-args.json.*new --out"):
        prepare([write_jsonl(tmp_path / "a.jsonl", ["x"])], str(out), progress=False)


# ----------------------------------------------------------------------------- CLI

def test_cli(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", many_docs(12))
    out = str(tmp_path / "out")
    argv = [src, "--out", out, "--docs-per-shard", "5", "--no-progress", "--val-fraction", "0.2"]
    assert cli_main(["prepare", *argv]) == 0
    line = capsys.readouterr().out.strip()
    m = json.load(open(os.path.join(out, "manifest.json")))
    n_val = m["splits"]["val"]["docs"]
    assert line.startswith("prepared docs=12 tokens=") and f"val_docs={n_val}" in line
    assert "tokens_per_s=" in line and m["command"] == "jaxlm-prepare " + " ".join(argv)
    for bad, want in [([src, "--out", out, "--val-fraction", "1.5"], "val_fraction=1.5"),
                      ([src, "--out", str(tmp_path / "o2"), "--num-proc", "0"], "num_proc=0"),
                      ([src], "the following arguments are required: --out"),
                      ([src, "--out", out, "--tokenizer", "bpe"], "invalid choice: 'bpe'"),
                      (["gs://b/x", "--out", out], "gcsfuse")]:
        assert prepare_main(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and want in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- HF tokenizer

def train_bpe(directory, vocab_size, specials=("<|endoftext|>",)):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(many_docs(200) + DOCS, trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    return str(directory)


def test_hf_tokenizer(tmp_path):
    d = train_bpe(tmp_path / "t1", 300)
    tok = get_tokenizer("hf", d)
    assert tok.name == "hf" and tok.eos_id == 0 and tok.vocab_size == len(tok.token_bytes)
    for text in DOCS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.eos_id not in ids
        assert tok.token_bytes[ids].sum() == len(text.encode())
    same = get_tokenizer("hf", os.path.join(d, "tokenizer.json"))
    assert same.fingerprint() == tok.fingerprint()
    other = get_tokenizer("hf", train_bpe(tmp_path / "t2", 280))
    assert other.fingerprint() != tok.fingerprint() != get_tokenizer("byte").fingerprint()
    # eos from tokenizer_config.json beside it, before the name fallback
    d3 = train_bpe(tmp_path / "t3", 300, specials=("<|endoftext|>", "<eos>"))
    (tmp_path / "t3" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    assert get_tokenizer("hf", d3).eos_id == 1
    with pytest.raises(ConfigError, match="no end-of-text token"):
        get_tokenizer("hf", train_bpe(tmp_path / "t4", 300, specials=("<pad>",)))
    with pytest.raises(ConfigError, match="tokenizer.json not found"):
        get_tokenizer("hf", str(tmp_path))
    with pytest.raises(ConfigError, match="cannot load"):
        get_tokenizer("hf", write_bad(tmp_path, "bad.json", b"{not json"))
    out = str(tmp_path / "out")
    m = prepare([write_jsonl(tmp_path / "a.jsonl", DOCS)], out, tokenizer="hf",
                tokenizer_path=d, progress=False)
    assert decode_all(out, tok) == DOCS and m["tokenizer"]["fingerprint"] == tok.fingerprint()
