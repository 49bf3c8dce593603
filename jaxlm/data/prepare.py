"""``jaxlm-prepare``: raw text -> a sharded, tokenized corpus on disk, once, in parallel.

Inputs are local ``.txt`` (cut into documents at blank lines ``"\\n\\n"``), ``.jsonl``,
``.jsonl.gz`` and ``.parquet`` files, directories and globs of them, and ``hf:NAME_OR_PATH``
Hugging Face datasets (streamed); see jaxlm/data/readers.py for the readers and why a bad record
is skipped and counted rather than fatal. The output directory DIR holds::

    DIR/manifest.json
    DIR/train-00000.bin      raw little-endian token ids, dtype "uint16" if vocab_size <= 65536
                             else "uint32"
    DIR/train-00000.idx.npy  int64 [D+1] document offsets into that shard's .bin (np.save format,
                             loaded with mmap_mode="r")
    DIR/train-00001.bin ...
    DIR/val-00000.bin, DIR/val-00000.idx.npy ...   (only when val_fraction > 0)
    DIR/train-00000.done.json ...  a finished shard's counts (for resuming; readers ignore them)
    DIR/prepare-args.json    the arguments that made DIR (a re-run must match them)

Each shard has exactly the layout of jaxlm.data.corpus.TokenCorpus: one leading end-of-text,
every document followed by end-of-text::

    tokens  = [EOT, d0_0 ... d0_{n0-1}, EOT, d1_0 ..., EOT, ...]
    offsets = [1, 1 + n0 + 1, ...]      (offsets[0] == 1, offsets[-1] == len(tokens))
    document j with its EOT = tokens[offsets[j] : offsets[j+1]]

Empty (whitespace-only) documents are skipped and counted. A shard holds whole documents only;
shard k of a split holds documents [k*docs_per_shard, (k+1)*docs_per_shard) of that split's
document stream (the inputs in the order given, files of a directory/glob sorted by name,
documents in file order), so the shards depend only on the inputs, the tokenizer and
docs_per_shard - never on num_proc. A document goes to the held-out split ``val`` iff
``int.from_bytes(sha256(text.encode("utf-8")).digest()[:8], "little") / 2**64 < val_fraction``:
by content, so it never leaks into train and identical documents land together.

manifest.json is ``json.dumps(indent=1, sort_keys=True)`` of::

    {"jaxlm_prepared": 1,                                    # format version
     "tokenizer": {"name", "path", "fingerprint", "vocab_size", "eos_id"},
     "dtype": "uint16", "docs_per_shard": 65536, "val_fraction": 0.001,
     "splits": {"train": {"docs": D, "tokens": N, "text_bytes": B,
                          "shards": [{"file": "train-00000.bin", "index": "train-00000.idx.npy",
                                      "docs": d, "tokens": n, "text_bytes": b}, ...]},
                "val": {... same, "shards" possibly []}},
     "skipped": {"empty": 0, "bad_json": 0, "missing_field": 0, "not_utf8": 0},
     "inputs": ["<as given>", ...], "command": "jaxlm-prepare ..."}

"tokens" of a shard = its .bin length in tokens (EOTs included); "text_bytes" = UTF-8 bytes of its
documents' text (for bits per byte); "fingerprint" = ``Tokenizer.fingerprint()``.

Why numpy token files + an offsets index and not ArrayRecord: a ``.bin`` opened with
``np.memmap`` gives zero-copy, O(1) random access to *any token range* (a training row that
starts mid-document and spans several documents is one slice), with no per-record decode and no
reader library; it is the layout of the existing token cache (TokenCorpus), so pack/dd/concat
read both the same way. ArrayRecord gives O(1) access to whole records only, each decoded on
read, which fits documents but not fixed-length token windows.

How it runs: the main process streams documents from the readers, routes each to its split and
position, and sends bounded chunks (<= 256 documents or 1M characters) to a ``spawn`` pool of
``num_proc`` workers (each builds the tokenizer once), keeping at most 2 * num_proc chunks in
flight (``Pool.imap`` would read the whole input ahead); results come back in order and are
appended to the open shard of their split. A finished shard is written to a temporary name and
``os.replace``d, then its ``.done.json`` is written (atomically). A re-run with the same arguments
skips finished shards (it re-reads the input to count their documents but does not tokenize
them) and writes manifest.json last, atomically; a re-run with other arguments is a ConfigError
(unless no shard was finished yet: a first run stopped by bad input may be fixed and re-run).

Example (a runnable one; the bundled tinyshakespeare is one .txt)::

    from jaxlm.data.prepare import prepare
    m = prepare(["jaxlm/assets/tinyshakespeare"], "/tmp/shakes_gpt2", tokenizer="gpt2",
                num_proc=2, val_fraction=0.05, docs_per_shard=2048)
    m["splits"]["train"]["docs"], m["splits"]["val"]["tokens"]
    # shell: jaxlm-prepare data/*.jsonl.gz --out DIR --tokenizer gpt2 --num-proc 8
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import shlex
import sys
import time
from collections import deque

import numpy as np

from jaxlm.data.readers import Skips, expand_inputs, iter_documents
from jaxlm.data.tokenizer import Tokenizer, get_tokenizer
from jaxlm.errors import ConfigError
from jaxlm.utils.files import write_fix

FORMAT_VERSION = 1
SPLITS = ("train", "val")
ARGS_FILE = "prepare-args.json"
_CHUNK_DOCS, _CHUNK_CHARS = 256, 1 << 20  # one task for a worker
_DONE = re.compile(r"(train|val)-(\d{5,})\.done\.json")


def is_val(text: str, val_fraction: float) -> bool:
    """The held-out rule of the module docstring (by content hash)."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    return h / 2**64 < val_fraction


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}"


# ----------------------------------------------------------------------------- workers

_WORKER: dict = {}


def _init_worker(name: str, path: str) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # num_proc processes already
    _WORKER["tok"] = get_tokenizer(name, path)


def _encode_chunk(texts: list[str], dtype: str, tok: Tokenizer | None = None):
    """-> (flat [sum(n_j + 1)] ids, each document followed by EOT; lengths [len(texts)])."""
    tok = tok or _WORKER["tok"]
    eos = np.array([tok.eos_id], dtype)
    pieces = []
    for text in texts:
        pieces += [tok.encode(text).astype(dtype), eos]
    lengths = np.array([len(p) for p in pieces[::2]], np.int64) + 1
    return np.concatenate(pieces), lengths


class _Encoder:
    """Tokenize chunks in a pool (or inline for num_proc=1); results in submission order, with
    at most 2 * num_proc chunks in flight."""

    def __init__(self, tok: Tokenizer, path: str, dtype: str, num_proc: int):
        self.tok, self.dtype, self.pending = tok, dtype, deque()
        self.limit = 2 * num_proc if num_proc > 1 else 0
        self.pool = None
        if num_proc > 1:
            ctx = mp.get_context("spawn")  # never fork: the parent may hold jax/rayon threads
            self.pool = ctx.Pool(num_proc, _init_worker, (tok.name, path))

    def submit(self, texts: list[str], meta: list) -> None:
        if self.pool is None:
            self.pending.append((meta, _encode_chunk(texts, self.dtype, self.tok)))
        else:
            self.pending.append((meta, self.pool.apply_async(_encode_chunk, (texts, self.dtype))))

    def results(self, drain: bool = False):
        """Yield (meta, (flat, lengths)) oldest first while over the limit (all when drain)."""
        while self.pending and (drain or len(self.pending) > self.limit):
            meta, res = self.pending.popleft()
            yield meta, (res if self.pool is None else res.get())

    def close(self, ok: bool) -> None:
        if self.pool is not None:
            (self.pool.close if ok else self.pool.terminate)()
            self.pool.join()


# ----------------------------------------------------------------------------- shard writing

def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class _SplitWriter:
    """Appends documents to the open shard of one split; finishes shards atomically."""

    def __init__(self, out: str, split: str, dtype: str, eos: int, dps: int, done: dict):
        self.out, self.split, self.dtype, self.dps = out, split, dtype, dps
        self.eos = np.array([eos], dtype).tobytes()
        self.done = dict(done)  # shard index -> its manifest entry (from .done.json)
        self.resumed = set(done)
        self.cur, self.fh = None, None

    def add(self, index: int, ids: np.ndarray, text_bytes: int) -> None:
        """Document ``index`` of this split (ids end with EOT)."""
        k = index // self.dps
        if k != self.cur:
            self.finish()
            self.cur, self.offsets, self.text_bytes = k, [1], 0
            self.fh = open(self._path(k, ".bin.tmp"), "wb")
            self.fh.write(self.eos)
        self.fh.write(ids.tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))
        self.text_bytes += text_bytes

    def _path(self, k: int, suffix: str) -> str:
        return os.path.join(self.out, shard_name(self.split, k) + suffix)

    def finish(self) -> None:
        """Close the open shard: .bin and .idx.npy renamed into place, then its .done.json."""
        if self.fh is None:
            return
        k, name = self.cur, shard_name(self.split, self.cur)
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        self.fh = None
        os.replace(self._path(k, ".bin.tmp"), self._path(k, ".bin"))
        with open(self._path(k, ".idx.npy.tmp"), "wb") as f:
            np.save(f, np.asarray(self.offsets, np.int64))  # [D+1]
        os.replace(self._path(k, ".idx.npy.tmp"), self._path(k, ".idx.npy"))
        entry = {"file": name + ".bin", "index": name + ".idx.npy", "docs": len(self.offsets) - 1,
                 "tokens": self.offsets[-1], "text_bytes": self.text_bytes}
        _write_atomic(self._path(k, ".done.json"), json.dumps(entry, sort_keys=True).encode())
        self.done[k] = entry

    def abort(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None

    def summary(self, n_docs: int) -> dict:
        n_shards = -(-n_docs // self.dps)
        shards = [self.done[k] for k in range(n_shards)]  # every one is finished by now
        return {"docs": sum(s["docs"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                "text_bytes": sum(s["text_bytes"] for s in shards), "shards": shards}


# ----------------------------------------------------------------------------- the output dir

def _finished_shards(out: str, dtype: str) -> dict:
    """{split: {k: entry}} for shards whose .done.json, .bin (of the right size) and index exist."""
    done = {s: {} for s in SPLITS}
    for name in sorted(os.listdir(out)):
        m = _DONE.fullmatch(name)
        if not m:
            continue
        try:
            with open(os.path.join(out, name)) as f:
                entry = json.load(f)
            size = os.path.getsize(os.path.join(out, entry["file"]))
            ok = (size == entry["tokens"] * np.dtype(dtype).itemsize
                  and os.path.isfile(os.path.join(out, entry["index"])))
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if ok:  # else: written again
            done[m.group(1)][int(m.group(2))] = entry
    return done


def _claim(out: str, ident: dict) -> None:
    """Create DIR, or check that it was made with the same arguments (prepare-args.json); a DIR
    where no shard was finished yet takes the new arguments."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} is a file; pass a directory (new or made by jaxlm-prepare)")
    path = os.path.join(out, ARGS_FILE)
    try:
        os.makedirs(out, exist_ok=True)
        names = os.listdir(out)
        if ARGS_FILE not in names:
            if any(n == "manifest.json" or re.match(r"(train|val)-\d", n) for n in names):
                raise ConfigError(f"{out} holds a corpus prepared without {ARGS_FILE} (unknown "
                                  "arguments); use a new --out or delete it")
            _write_atomic(path, json.dumps(ident, indent=1, sort_keys=True).encode())
            return
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"cannot write to --out {out}: {e.strerror or e}; {write_fix(e)}"
                          ) from None
    try:
        old = json.loads(raw)
    except ValueError:
        raise ConfigError(f"{path} is not valid JSON (not written by jaxlm-prepare); use a new "
                          "--out or delete it") from None
    if old != ident and not any(n == "manifest.json" or _DONE.fullmatch(n) for n in names):
        for n in names:  # nothing was finished (a first run stopped by bad input): start afresh
            if n.endswith(".tmp"):
                os.remove(os.path.join(out, n))
        _write_atomic(path, json.dumps(ident, indent=1, sort_keys=True).encode())
    elif old != ident:
        diff = [k for k in sorted(set(old) | set(ident)) if old.get(k) != ident.get(k)]
        what = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(ident.get(k))}" for k in diff)
        raise ConfigError(f"{out} holds a corpus prepared with other arguments ({what}); use a "
                          "new --out or delete it")


def _short(value) -> str:
    if isinstance(value, dict) and "fingerprint" in value:  # the tokenizer
        value = f"{value['name']} {value['path']!r} {value['fingerprint'][:12]}"
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------- prepare

def _check_numbers(num_proc, val_fraction, docs_per_shard) -> None:
    if not (isinstance(num_proc, int) and num_proc >= 1):
        raise ConfigError(f"num_proc={num_proc} must be an integer >= 1 (--num-proc)")
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise ConfigError(f"val_fraction={val_fraction} must be in [0, 1) (--val-fraction; 0 = "
                          "no held-out split)")
    if not (isinstance(docs_per_shard, int) and docs_per_shard >= 1):
        raise ConfigError(f"docs_per_shard={docs_per_shard} must be an integer >= 1 "
                          "(--docs-per-shard)")


def _command(inputs, out, kw: dict) -> str:
    """The equivalent jaxlm-prepare command line (for a manifest made from Python)."""
    args = ["jaxlm-prepare", *inputs, "--out", out]
    for key, value in kw.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(args)


class _Progress:
    """A tqdm bar over documents with documents/s and tokens/s (of this run) in its postfix."""

    def __init__(self, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(unit="doc", disable=not enabled, mininterval=0.5,
                        bar_format="prepare: {n_fmt} docs [{elapsed}{postfix}]")
        self.t0, self.docs, self.tokens = time.perf_counter(), 0, 0

    def update(self, docs: int, tokens: int = 0) -> None:
        self.docs, self.tokens = self.docs + docs, self.tokens + tokens
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.docs / dt:.0f} docs/s, {self.tokens / dt:.4g} tokens/s",
                                 refresh=False)
        self.bar.update(docs)


def _write_results(results, writers: dict, bar: _Progress) -> None:
    """Append each tokenized document to its split's open shard, in stream order."""
    for meta, (flat, lengths) in results:
        ends = np.cumsum(lengths)  # [n_docs] end of each document (with its EOT) in flat
        for (split, index, nbytes), end, n in zip(meta, ends.tolist(), lengths.tolist()):
            writers[split].add(index, flat[end - n:end], nbytes)
        bar.update(len(meta), int(ends[-1]))


def _run(docs, writers: dict, enc: _Encoder, skips: Skips, val_fraction: float,
         bar: _Progress) -> dict:
    """Route every document to (split, index); tokenize those not already on disk."""
    counts = dict.fromkeys(SPLITS, 0)
    texts, meta, chars = [], [], 0
    for text in docs:
        if not text.strip():
            skips.add("empty", "")
            continue
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, e.g. from a JSON "\ud800" escape
            skips.add("not_utf8", "a document holding a lone surrogate (a JSON \\ud800 escape)")
            continue
        h = int.from_bytes(hashlib.sha256(raw).digest()[:8], "little") if val_fraction else 0
        split = "val" if val_fraction and h / 2**64 < val_fraction else "train"
        index, counts[split] = counts[split], counts[split] + 1
        if index // writers[split].dps in writers[split].resumed:
            bar.update(1)  # its shard is finished on disk: not tokenized again
            continue
        texts.append(text)
        meta.append((split, index, len(raw)))
        chars += len(text)
        if len(texts) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            enc.submit(texts, meta)
            texts, meta, chars = [], [], 0
            _write_results(enc.results(), writers, bar)
    if texts:
        enc.submit(texts, meta)
    _write_results(enc.results(drain=True), writers, bar)
    for w in writers.values():
        w.finish()
    return counts


def prepare(inputs: list[str], out: str, *, tokenizer: str = "byte", tokenizer_path: str = "",
            num_proc: int = 1, text_field: str = "text", val_fraction: float = 0.0,
            docs_per_shard: int = 65536, hf_config: str = "", hf_split: str = "train",
            progress: bool = True, command: str | None = None) -> dict:
    """Prepare ``inputs`` into the directory ``out`` (see the module docstring); returns the
    manifest. ``command`` is recorded in it (default: the equivalent jaxlm-prepare command)."""
    _check_numbers(num_proc, val_fraction, docs_per_shard)
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    sources = expand_inputs(inputs)
    tok = get_tokenizer(tokenizer, tokenizer_path)
    dtype = token_dtype(tok.vocab_size)
    tok_info = {"name": tok.name, "path": tokenizer_path, "fingerprint": tok.fingerprint(),
                "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    settings = {"tokenizer": tokenizer, "tokenizer_path": tokenizer_path, "num_proc": num_proc,
                "text_field": text_field, "val_fraction": float(val_fraction),
                "docs_per_shard": docs_per_shard, "hf_config": hf_config, "hf_split": hf_split}
    ident = {"jaxlm_prepared": FORMAT_VERSION, "inputs": inputs, "tokenizer": tok_info,
             "files": [[k, p, None if k == "hf" else os.path.getsize(p)] for k, p in sources],
             **{k: v for k, v in settings.items() if k not in ("tokenizer", "num_proc")}}
    _claim(out, ident)
    writers = {s: _SplitWriter(out, s, dtype, tok.eos_id, docs_per_shard, done)
               for s, done in _finished_shards(out, dtype).items()}
    skips, bar = Skips(), _Progress(progress)
    enc, ok = _Encoder(tok, tokenizer_path, dtype, num_proc), False
    try:
        docs = iter_documents(sources, text_field, skips, hf_config, hf_split)
        counts = _run(docs, writers, enc, skips, float(val_fraction), bar)
        ok = True
    finally:
        enc.close(ok)
        bar.bar.close()
        for w in writers.values():
            w.abort()
    if skips.warning():  # one plain stderr line (like the bar), whatever logging is set up
        print("warning: " + skips.warning(), file=sys.stderr)
    if not sum(counts.values()):
        raise ConfigError(f"the inputs hold no non-empty document ({skips.counts}); check the "
                          "inputs and --text-field")
    manifest = {"jaxlm_prepared": FORMAT_VERSION, "tokenizer": tok_info, "dtype": dtype,
                "docs_per_shard": docs_per_shard, "val_fraction": float(val_fraction),
                "splits": {s: writers[s].summary(counts[s]) for s in SPLITS},
                "skipped": dict(skips.counts), "inputs": inputs,
                "command": command or _command(inputs, out, settings)}
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    _write_atomic(os.path.join(out, "manifest.json"), text.encode())
    return manifest
