"""Read a prepared corpus (``jaxlm-prepare --out DIR``): sharded token files + ``manifest.json``.

What it reads (the format is written by :mod:`jaxlm.data.prepare`): ``DIR/manifest.json`` (format
version, the tokenizer's name and fingerprint, the token dtype, per split the list of shards with
their document and token counts) and, per split, shard files ``<split>-NNNNN.bin`` (raw
little-endian uint16/uint32 token ids) with ``<split>-NNNNN.idx.npy`` (int64 document offsets into
that shard). Every shard has the layout of :class:`jaxlm.data.corpus.TokenCorpus`:
``[EOT, d0 …, EOT, d1 …, EOT, …]`` — one leading end-of-text, every document followed by one.

**One stream per split.** The shards of a split are read as ONE token stream: shard 0 whole, then
every later shard without its leading EOT (that EOT would double the EOT that ends the previous
shard). The stream is therefore exactly the token array of a TokenCorpus built from the same
documents in the same order: ``[EOT, d0, EOT, d1, EOT, …]`` with no seam at shard boundaries.
With n_s the token count of shard s (from the manifest, no file is read) and skip_s = [s > 0],

    C_0 = 0,  C_{s+1} = C_s + n_s - skip_s       (cumulative counts, O(shards))
    shard s holds stream positions [C_s, C_{s+1}); position p -> shard s, local p - C_s + skip_s

**concat** (:class:`ShardedWindows`, the rows of :class:`jaxlm.data.pipeline.Windows`):
window i = stream[i*L : i*L + L + 1]; a window that crosses C_s reads the tail of shard s-1 and the
head of shard s. The grain pipeline (:func:`jaxlm.data.pipeline.train_dataset_from_rows`) is the
same, so the global batches do not depend on the process count and resume is exact.

**pack / dd** (:meth:`PreparedCorpus.corpus`): a TokenCorpus whose ``tokens`` is a
:class:`ShardedTokens` view of the stream (int / slice / integer-array indexing, what
:mod:`jaxlm.data.packing` and :mod:`jaxlm.data.bucketing` use) and whose ``offsets`` are the
shards' idx files shifted to stream positions: shard s's offsets[1:] + C_s - skip_s.

Validation split: the manifest's ``val`` split when it has documents; else as for raw text
(concat: the last ``data.val_fraction`` of the train stream; pack/dd: the last documents,
:meth:`TokenCorpus.split`). ``data.val_path`` (a text file or another prepared directory: its val
split if it has documents, else its train split) overrides both.

Costs. Opening reads the manifest and stats every shard file (size check): O(shards), no token is
read. Shards are opened on first access (at most ``_Shards.MAX_OPEN`` at a time per split, least
recently used dropped first) and a row is read with one ``os.pread`` per shard it crosses, so a
process reads only the rows it trains on (its own rows of each global batch; the shuffle is
global, so over an epoch it visits every shard). **Memory**: no memory map — with ``np.memmap``
every random read also maps the kernel's cached neighbouring pages into the process ("fault
around"), and on a 2 GB corpus RSS grew by ~1.6 MB per batch (550 MB after 200 batches, against
230 MB on a 20 MB corpus; ``madvise(MADV_RANDOM)`` did not stop it); with ``pread`` the page cache
stays the kernel's and RSS stays flat. concat: nothing per token or per document in memory. pack/dd:
the document offsets, 8 bytes per document (the idx files are read once at startup: O(documents)
time and memory — 80 MB for 10M documents), plus what those modes build from them in every
process (chunk / piece tables, a few int64 per chunk or piece): these O(documents) tables are the
only memory that grows with the corpus; no token is held.

Example (runnable: prepares the bundled tinyshakespeare first)::

    from jaxlm.data import get_tokenizer
    from jaxlm.data.prepare import prepare
    from jaxlm.data.prepared import is_prepared, open_prepared, ShardedWindows
    prepare(["jaxlm/assets/tinyshakespeare"], "/tmp/shakes_byte", val_fraction=0.05,
            docs_per_shard=1024, progress=False)
    tok = get_tokenizer("byte")
    is_prepared("/tmp/shakes_byte")                          # True
    pc = open_prepared("/tmp/shakes_byte", tok)              # checks manifest, tokenizer, shards
    rows = ShardedWindows(pc.tokens("train"), 256, tok.token_bytes)
    rows[0]["inputs"].shape, pc.corpus("val").n_docs         # ((256,), ...) pack/dd view
    # training: jaxlm-train shakespeare data.path=/tmp/shakes_byte [data.mode=pack|dd]
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict

import numpy as np

from jaxlm.config import ConfigError, resolve_data_path
from jaxlm.data.corpus import TokenCorpus
from jaxlm.data.pipeline import Windows
from jaxlm.data.tokenizer import Tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_FINISH = "re-run jaxlm-prepare with the same arguments to finish it"


def manifest_path(path: str) -> str:
    """The manifest of ``path`` (a manifest.json file or the directory holding one)."""
    return path if os.path.basename(path) == MANIFEST else os.path.join(path, MANIFEST)


def is_prepared(path: str) -> bool:
    """True if ``path`` is a prepared corpus: a manifest.json or a directory holding one."""
    if not path:
        return False
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, MANIFEST))
    return os.path.basename(path) == MANIFEST and os.path.isfile(path)


class _Shards:
    """The shards of one split as one stream (see the module docstring), opened lazily."""

    MAX_OPEN = 64  # shard files kept open per split (each holds a file descriptor)

    def __init__(self, root: str, shards: list[dict], dtype: np.dtype):
        self.files = [os.path.join(root, s["file"]) for s in shards]
        self.indexes = [os.path.join(root, s["index"]) for s in shards]
        self.counts = np.array([int(s["tokens"]) for s in shards], np.int64)  # [S] n_s
        self.docs = np.array([int(s["docs"]) for s in shards], np.int64)  # [S]
        self.skip = (np.arange(len(shards)) > 0).astype(np.int64)  # [S] leading EOT dropped
        self.starts = np.concatenate([[0], np.cumsum(self.counts - self.skip)])  # [S+1] C_s
        self.dtype = dtype
        self.opened = 0  # shard files opened so far (tests and stats)
        self._open: OrderedDict = OrderedDict()
        self._lock = threading.Lock()  # grain reads rows from several threads

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:  # picklable: open maps are not shipped, reopened on use
        return {k: v for k, v in self.__dict__.items() if k not in ("_open", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, opened=0, _open=OrderedDict(), _lock=threading.Lock())

    def shard(self, k: int):
        """Shard k's file (raw, unbuffered), opened on first use; the least recently used is
        dropped from the table (and closed once no reader holds it)."""
        with self._lock:
            f = self._open.get(k)
            if f is not None:
                self._open.move_to_end(k)
                return f
        f = open(self.files[k], "rb", buffering=0)
        with self._lock:
            self._open[k] = f
            self.opened += 1
            while len(self._open) > self.MAX_OPEN:
                self._open.popitem(last=False)
        return f

    def _pread(self, k: int, a: int, n: int) -> np.ndarray:
        """Tokens [a, a+n) of shard k, with one ``os.pread`` (no memory map: see the module
        docstring, "Memory")."""
        f, size = self.shard(k), self.dtype.itemsize
        data = os.pread(f.fileno(), n * size, a * size)
        if len(data) != n * size:
            raise ConfigError(f"shard {self.files[k]} is shorter than the manifest says: "
                              f"{_FINISH}")
        return np.frombuffer(data, self.dtype)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """stream[lo:hi] as int32 [hi - lo], reading from every shard the range crosses."""
        out = np.empty(max(0, hi - lo), np.int32)
        k = int(np.searchsorted(self.starts, lo, "right")) - 1
        pos = lo
        while pos < hi:
            end = min(hi, int(self.starts[k + 1]))
            a = pos - int(self.starts[k]) + int(self.skip[k])  # local index of pos in shard k
            out[pos - lo:end - lo] = self._pread(k, a, end - pos)
            pos, k = end, k + 1
        return out

    def gather(self, pos: np.ndarray) -> np.ndarray:
        """stream[pos] for int64 positions [n] (each in [0, len)) as int32 [n]: one read per run
        of consecutive positions (a DD batch is one run per row)."""
        order = np.argsort(pos, kind="stable")
        sp = pos[order]  # [n] sorted
        cuts = np.flatnonzero(np.diff(sp) != 1) + 1  # run boundaries
        out = np.empty(len(pos), np.int32)
        for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(sp)]])):
            out[order[a:b]] = self.read(int(sp[a]), int(sp[b - 1]) + 1)
        return out

    def offsets(self, what: str) -> np.ndarray:
        """Stream document offsets [D+1] int64 from the idx files (reads them: O(documents))."""
        parts = []
        for k, path in enumerate(self.indexes):
            try:
                idx = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise ConfigError(f"{what}: cannot read shard index {path} ({e}): {_FINISH}"
                                  ) from None
            n, d = int(self.counts[k]), int(self.docs[k])
            if idx.shape != (d + 1,) or d < 1 or idx[0] != 1 or idx[-1] != n:
                raise ConfigError(f"{what}: shard index {path} does not match the manifest "
                                  f"({d} documents, {n} tokens): {_FINISH}")
            parts.append(np.asarray(idx[0 if k == 0 else 1:], np.int64)
                         + (self.starts[k] - self.skip[k]))
        return np.concatenate(parts) if parts else np.ones(1, np.int64)


class ShardedTokens:
    """``stream[lo:hi]`` of a split as a read-only int32 array-like: ``len``, ``x[i]``,
    ``x[a:b]`` (step 1) and ``x[int_array]`` (any shape) return numpy int32, read from the shards
    on demand. ``np.asarray(x)`` reads the whole range (avoid on big corpora)."""

    dtype = np.dtype(np.int32)
    ndim = 1

    def __init__(self, shards: _Shards, lo: int = 0, hi: int | None = None):
        self._shards, self.lo = shards, lo
        self.hi = len(shards) if hi is None else hi

    def __len__(self) -> int:
        return self.hi - self.lo

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def view(self, start: int, stop: int) -> "ShardedTokens":
        """A lazy sub-range [start, stop) of this view (nothing is read)."""
        start, stop, _ = slice(start, stop).indices(len(self))
        return ShardedTokens(self._shards, self.lo + start, self.lo + max(start, stop))

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise TypeError("ShardedTokens supports slices with step 1 only")
            return self._shards.read(self.lo + start, self.lo + max(start, stop))
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {int(key)} out of range for {n} tokens")
            return self._shards.read(self.lo + i, self.lo + i + 1)[0]
        idx = np.asarray(key)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"ShardedTokens cannot be indexed by {idx.dtype} arrays")
        idx = idx.astype(np.int64)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"index out of range for {n} tokens")
        return self._shards.gather(idx.reshape(-1) + self.lo).reshape(idx.shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class ShardedWindows(Windows):
    """:class:`jaxlm.data.pipeline.Windows` over a :class:`ShardedTokens` stream: row i =
    stream[i*L : i*L + L + 1] read on demand (same rows as Windows over the same tokens)."""

    def __init__(self, tokens: ShardedTokens, seq_len: int, token_bytes: np.ndarray):
        self.tokens = tokens  # not materialised: Windows.__getitem__ slices it per row
        self.seq_len = seq_len
        self.token_bytes = token_bytes  # [vocab] int32
        self._positions = np.arange(seq_len, dtype=np.int32)


class PreparedCorpus:
    """An opened, validated prepared corpus (:func:`open_prepared`); splits "train" and "val"."""

    def __init__(self, root: str, manifest: dict, tokenizer: Tokenizer, what: str):
        self.root, self.manifest, self.what = root, manifest, what
        self.eos_id = tokenizer.eos_id
        dtype = _DTYPES[manifest["dtype"]]
        self._splits = {name: _Shards(root, s["shards"], dtype)
                        for name, s in manifest["splits"].items()}

    def n_docs(self, split: str) -> int:
        return int(self._splits[split].docs.sum()) if split in self._splits else 0

    def has(self, split: str) -> bool:
        """True if ``split`` holds at least one document."""
        return self.n_docs(split) > 0

    def heldout_split(self) -> str:
        """The split to evaluate on when this corpus is ``data.val_path``: val if non-empty."""
        return "val" if self.has("val") else "train"

    def tokens(self, split: str) -> ShardedTokens:
        """The split's token stream (lazy; see the module docstring)."""
        return ShardedTokens(self._splits[split])

    def corpus(self, split: str) -> TokenCorpus:
        """The split as a TokenCorpus for pack/dd (reads the idx files: 8 bytes per document)."""
        shards = self._splits[split]
        sk = self.manifest.get("skipped", {})
        stats = {"n_docs": self.n_docs(split), "n_tokens": len(shards), "format": "prepared",
                 "source": self.root, "tokenizer": self.manifest["tokenizer"].get("name"),
                 "text_bytes": int(self.manifest["splits"][split].get("text_bytes", 0)),
                 "skipped_empty_docs": int(sk.get("empty", 0)),
                 "skipped_bad_records": int(sum(v for k, v in sk.items() if k != "empty"))}
        return TokenCorpus(ShardedTokens(shards), shards.offsets(self.what), stats, self.eos_id)


def _read_manifest(mpath: str, what: str) -> dict:
    try:
        with open(mpath, "rb") as f:
            m = json.loads(f.read())
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {mpath}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}: {mpath} is not a valid JSON manifest ({e}); re-run "
                          "jaxlm-prepare to rewrite it") from None
    if not isinstance(m, dict) or "jaxlm_prepared" not in m:
        raise ConfigError(f"{what}: {mpath} is not a jaxlm-prepare manifest (no "
                          "'jaxlm_prepared' version); point it at a jaxlm-prepare directory")
    if m["jaxlm_prepared"] != FORMAT_VERSION:
        raise ConfigError(f"{what}: {mpath} has format version {m['jaxlm_prepared']!r} but this "
                          f"jaxlm reads version {FORMAT_VERSION}; prepare it again with this "
                          "jaxlm's jaxlm-prepare (or use the jaxlm that wrote it)")
    return m


def _tok_label(name: str, path: str) -> str:
    return f"{name} ({path})" if path else name


def _check_tokenizer(m: dict, tokenizer: Tokenizer, root: str, what: str) -> None:
    """The corpus must have been made with this run's tokenizer (same ``fingerprint()``)."""
    want = m["tokenizer"]
    name, path = str(want.get("name", "?")), str(want.get("path", "") or "")
    if want["fingerprint"] == tokenizer.fingerprint():
        return
    fix = f"data.tokenizer={name}" + (f" data.tokenizer_path={path}" if path else "")
    raise ConfigError(
        f"{what}: {root} was prepared with tokenizer {_tok_label(name, path)} (vocab "
        f"{want.get('vocab_size')}) but this run uses {tokenizer.name} (vocab "
        f"{tokenizer.vocab_size}{', different files' if name == tokenizer.name else ''}): prepare "
        f"again with --tokenizer {tokenizer.name} or set {fix}")


def _check_shards(root: str, split: str, s: dict, itemsize: int, what: str) -> None:
    """Every shard file present with exactly tokens * itemsize bytes (stat only, nothing read)."""
    for sh in s["shards"]:
        path, want = os.path.join(root, sh["file"]), int(sh["tokens"]) * itemsize
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size != want or not os.path.isfile(os.path.join(root, sh["index"])):
            got = ("missing" if size is None else f"{size} bytes, expected {want}"
                   if size != want else "its index file is missing")
            raise ConfigError(f"{what}: missing or truncated shard {path} of split {split} "
                              f"({got}): {_FINISH}")


def open_prepared(path: str, tokenizer: Tokenizer, what: str = "data.path", *,
                  need_train: bool = True) -> PreparedCorpus:
    """Open and validate the prepared corpus at ``path`` (manifest.json or its directory).

    Checks the format version, the tokenizer (fingerprint, vocab, eos), that every shard is
    present with its exact size, and (``need_train``) that the train split has documents; any
    failure is a one-line ConfigError naming the fix. Reads no token (see the module docstring).
    """
    mpath = manifest_path(resolve_data_path(path, what))
    root = os.path.dirname(mpath) or "."
    m = _read_manifest(mpath, what)
    try:
        _check_tokenizer(m, tokenizer, root, what)
        if m["dtype"] not in _DTYPES:
            raise ConfigError(f"{what}: {mpath} has token dtype {m['dtype']!r}, not one of "
                              f"{', '.join(_DTYPES)}; re-run jaxlm-prepare")
        m["splits"].setdefault("val", {"docs": 0, "tokens": 0, "shards": []})
        for split, s in m["splits"].items():
            _check_shards(root, split, s, _DTYPES[m["dtype"]].itemsize, what)
        pc = PreparedCorpus(root, m, tokenizer, what)
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{what}: {mpath} is a malformed manifest ({type(e).__name__}: {e}); "
                          "re-run jaxlm-prepare to rewrite it") from None
    if need_train and not pc.has("train"):
        raise ConfigError(f"{what}: the train split of {root} is empty (0 documents); prepare it "
                          "from inputs that hold text (or lower --val-fraction)")
    if not need_train and not pc.has(pc.heldout_split()):
        raise ConfigError(f"{what}: {root} holds no document in any split; prepare it from "
                          "inputs that hold text")
    return pc


def open_if_prepared(path: str, tokenizer: Tokenizer, what: str = "data.path",
                     **kw) -> PreparedCorpus | None:
    """:func:`open_prepared` if ``path`` is a prepared corpus, else None (a raw text path).
    Remote paths and unknown bundled names are refused first (:func:`resolve_data_path`)."""
    path = resolve_data_path(path, what)
    if os.path.isfile(os.path.join(path, "prepare-args.json")) and not is_prepared(path):
        raise ConfigError(f"{what}: {path} has no manifest.json: its jaxlm-prepare did not "
                          f"finish; {_FINISH}")
    return open_prepared(path, tokenizer, what, **kw) if is_prepared(path) else None


def split_stream(tokens, n: int) -> tuple:
    """(tokens[:n], tokens[n:]): lazy views for ShardedTokens, numpy slices otherwise."""
    if isinstance(tokens, ShardedTokens):
        return tokens.view(0, n), tokens.view(n, len(tokens))
    return tokens[:n], tokens[n:]


def rows_over(tokens, seq_len: int, token_bytes: np.ndarray) -> Windows:
    """Concat windows over a token stream: ShardedWindows for a prepared split, else Windows."""
    if isinstance(tokens, ShardedTokens):
        return ShardedWindows(tokens, seq_len, token_bytes)
    return Windows(tokens, seq_len, token_bytes)

