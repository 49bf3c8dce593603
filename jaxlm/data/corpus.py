"""Document corpora -> one memory-mapped token array + document offsets, tokenized once and cached.

Used by the ``pack`` and ``dd`` modes, which need document boundaries (``concat`` reads one text
stream). Three input formats (``data.format``; ``auto`` picks by file extension):

- ``text``: a UTF-8 file cut into documents at ``data.doc_separator`` (a literal string, default a
  blank line ``"\\n\\n"``; ``"re:<pattern>"`` = a Python regex, e.g. ``re:\\n(?= = [^=])`` cuts
  WikiText before every ``= Title =`` line);
- ``jsonl`` (``.jsonl``/``.json``): one JSON object per line, the document in ``data.text_field``;
- ``arrayrecord`` (``.array_record``/``.arrayrecord``): one UTF-8 document per record, read with
  ``grain.sources.ArrayRecordDataSource`` (for corpora too large for one text file).

Layout on disk and in memory (every document followed by end-of-text, one leading end-of-text)::

    tokens  = [EOT, d0_0 … d0_{n0-1}, EOT, d1_0 …, EOT, …]        int32 [N]   (np.memmap)
    offsets = [1, 1 + n0 + 1, …]                                   int64 [D+1]
    document j with its EOT = tokens[offsets[j] : offsets[j+1]]

so the token before every document is an EOT: a training row whose targets are
``tokens[s : s+L]`` takes ``tokens[s-1 : s+L]`` (L+1 tokens) and its first input is the document
start marker when ``s`` is a document start: no row ever needs a token of another document.

Cache: ``<cache_dir>/<sha256 of (path, size, mtime, format, separator, field, tokenizer)>/`` holds
``tokens.npy``, ``offsets.npy`` and ``stats.json``, written to a temporary directory and renamed,
so a crash never leaves a half cache. Restarts ``np.load(mmap_mode="r")`` them (no re-tokenizing).

Bad input is never a crash mid-run: a missing or empty file, invalid UTF-8 in a text file, or a
corpus with no usable document is a one-line :class:`ConfigError`; an empty document, a JSONL line
that is not JSON / lacks the field, and an undecodable record are skipped, counted in ``stats``
and logged once.

Example::

    from jaxlm.data import get_tokenizer
    from jaxlm.data.corpus import load_corpus
    c = load_corpus("jaxlm/assets/wikitext-2/valid.txt", get_tokenizer("gpt2"),
                    separator="re:\\n(?= = [^=])", cache_dir="/tmp/jaxlm_cache")
    c.n_docs, c.doc_lengths()[:3], c.stats      # 60 articles; lengths include the EOT
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile

import numpy as np

from jaxlm.config import ConfigError, resolve_data_path
from jaxlm.data.pipeline import read_text
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.utils.files import check_data_file

log = logging.getLogger("jaxlm")
_VERSION = 1  # bump when the cache layout changes


class TokenCorpus:
    """``tokens`` [N] int32 (memmap) and ``offsets`` [D+1] int64 as in the module docstring."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, stats: dict, eos_id: int):
        self.tokens, self.offsets, self.stats, self.eos_id = tokens, offsets, stats, eos_id

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    def doc_lengths(self) -> np.ndarray:
        """[D] tokens per document including its end-of-text."""
        return np.diff(self.offsets)

    def doc(self, j: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[j]:self.offsets[j + 1]])

    def split(self, val_fraction: float) -> tuple["TokenCorpus", "TokenCorpus"]:
        """(train, val) by whole documents: the last ``val_fraction`` of documents (>= 1) held out.

        Both share the memory map; val keeps absolute offsets into the same ``tokens``.
        """
        if self.n_docs < 2:
            raise ConfigError(f"the corpus has {self.n_docs} document(s): too few to hold out "
                              "validation documents; set data.val_path or add documents")
        n_val = max(1, int(round(self.n_docs * val_fraction)))
        cut = self.n_docs - n_val
        mk = lambda off: TokenCorpus(self.tokens, off, dict(self.stats), self.eos_id)  # noqa: E731
        return mk(self.offsets[:cut + 1]), mk(self.offsets[cut:])


def resolve_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in ("text", "jsonl", "arrayrecord"):
            raise ConfigError(f"data.format={fmt!r} is not one of: auto, text, jsonl, arrayrecord")
        return fmt
    low = path.lower()
    if low.endswith((".jsonl", ".json")):
        return "jsonl"
    if low.endswith((".array_record", ".arrayrecord")) or "array_record-" in low:
        return "arrayrecord"
    return "text"


def split_documents(text: str, separator: str) -> list[str]:
    """Cut text at a literal separator or, with a ``re:`` prefix, at a regex."""
    if separator.startswith("re:"):
        try:
            return re.split(separator[3:], text)
        except re.error as e:
            raise ConfigError(f"data.doc_separator: bad regex {separator[3:]!r}: {e}") from None
    if not separator:
        return [text]
    return text.split(separator)


def _check_unused_separator(path: str, separator: str) -> None:
    """A separator that never occurs: an error when it holds a literal backslash escape (the shell
    override ``data.doc_separator=\\n\\n`` is backslash-n, not a newline), else a warning."""
    if not separator.startswith("re:") and re.search(r"\\[ntr]", separator):
        raise ConfigError(
            f"data.doc_separator={separator!r} never occurs in {path}: it holds a literal "
            "backslash, not a newline; for a blank line write data.doc_separator='\"\\n\\n\"' "
            "(YAML double quotes) or use a regex: data.doc_separator='re:\\n\\n'")
    log.warning("%s: data.doc_separator=%r never occurs: the whole file is one document", path,
                separator)


def _iter_documents(path: str, fmt: str, separator: str, field: str, what: str, stats: dict):
    """Yield document strings; count skips in ``stats``."""
    if fmt == "text":
        text = read_text(path, what)
        docs = split_documents(text, separator)
        if len(docs) == 1 and separator:  # the whole file is one document: rarely meant
            _check_unused_separator(path, separator)
        yield from docs
        return
    if fmt == "jsonl":
        if not os.path.isfile(path):
            raise ConfigError(f"{what}: file not found: {path}")
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                    doc = obj.get(field) if isinstance(obj, dict) else None
                except (ValueError, UnicodeDecodeError):
                    doc = None
                if not isinstance(doc, str):
                    stats["skipped_bad_records"] += 1
                    if stats["skipped_bad_records"] == 1:
                        log.warning("%s: line %d is not a JSON object with a string %r field; "
                                    "skipping (counted in stats)", path, lineno, field)
                    continue
                yield doc
        return
    import grain  # arrayrecord

    try:
        src = grain.sources.ArrayRecordDataSource([path])
    except Exception as e:  # noqa: BLE001 (array_record raises plain errors)
        raise ConfigError(f"{what}: cannot open ArrayRecord file {path}: {e}") from None
    for i in range(len(src)):
        try:
            yield bytes(src[i]).decode("utf-8")
        except UnicodeDecodeError:
            stats["skipped_bad_records"] += 1
            if stats["skipped_bad_records"] == 1:
                log.warning("%s: record %d is not valid UTF-8; skipping (counted)", path, i)


def _cache_key(path: str, fmt: str, separator: str, field: str, tokenizer: Tokenizer,
               tokenizer_path: str) -> str:
    st = os.stat(path)
    ident = [_VERSION, os.path.abspath(path), st.st_size, st.st_mtime_ns, fmt, separator, field,
             tokenizer.name, tokenizer.vocab_size, tokenizer.eos_id, tokenizer_path]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:24]


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxlm", "tokens")


def load_corpus(path: str, tokenizer: Tokenizer, *, fmt: str = "auto", separator: str = "\n\n",
                text_field: str = "text", cache_dir: str = "", tokenizer_path: str = "",
                what: str = "data.path") -> TokenCorpus:
    """Tokenize ``path`` (or a bundled corpus name) once (cached) and memory-map it. See the
    module docstring."""
    path = resolve_data_path(path, what)
    fmt = resolve_format(path, fmt)
    check_data_file(path, what, "a corpus file")  # FIFO, /dev/zero, … -> one line, never a hang
    if os.path.getsize(path) == 0:
        raise ConfigError(f"{what}: file is empty: {path} (point {what} at a non-empty corpus)")
    cache_dir = cache_dir or default_cache_dir()
    key = _cache_key(path, fmt, separator, text_field, tokenizer, tokenizer_path)
    final = os.path.join(cache_dir, key)
    if not os.path.isfile(os.path.join(final, "stats.json")):
        _build_cache(path, fmt, separator, text_field, tokenizer, final, what)
    tokens = np.load(os.path.join(final, "tokens.npy"), mmap_mode="r")  # [N] int32
    offsets = np.load(os.path.join(final, "offsets.npy"))  # [D+1] int64
    with open(os.path.join(final, "stats.json")) as f:
        stats = json.load(f)
    if stats.get("max_id", 0) >= tokenizer.vocab_size:
        raise ConfigError(f"token cache {final} holds id {stats['max_id']} >= the tokenizer's "
                          f"vocab {tokenizer.vocab_size}; delete the cache directory")
    for k in ("skipped_empty_docs", "skipped_bad_records"):
        if stats.get(k):
            what_ = k.replace("skipped_", "").replace("_", " ")
            log.info("%s: skipped %d %s", path, stats[k], what_)
    return TokenCorpus(tokens, offsets, stats, tokenizer.eos_id)


def _build_cache(path, fmt, separator, field, tokenizer, final, what) -> None:
    stats = {"skipped_empty_docs": 0, "skipped_bad_records": 0}
    eos = tokenizer.eos_id
    pieces, offsets, n = [np.array([eos], np.int32)], [1], 1
    for doc in _iter_documents(path, fmt, separator, field, what, stats):
        if not doc.strip():
            stats["skipped_empty_docs"] += 1
            continue
        ids = tokenizer.encode(doc)  # [n_j] int32
        pieces += [ids, np.array([eos], np.int32)]
        n += len(ids) + 1
        offsets.append(n)
    if len(offsets) == 1:
        raise ConfigError(f"{what}: {path} holds no non-empty document (format {fmt}, separator "
                          f"{separator!r}, field {field!r}); check data.format/doc_separator")
    tokens = np.concatenate(pieces)
    stats.update(n_docs=len(offsets) - 1, n_tokens=int(n), max_id=int(tokens.max()),
                 tokenizer=tokenizer.name, source=os.path.abspath(path), format=fmt)
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    except OSError as e:
        raise ConfigError(f"cannot write the token cache in {parent}: {e.strerror}; "
                          "set data.cache_dir to a writable directory") from None
    np.save(os.path.join(tmp, "tokens.npy"), tokens)
    np.save(os.path.join(tmp, "offsets.npy"), np.asarray(offsets, np.int64))
    with open(os.path.join(tmp, "stats.json"), "w") as f:
        json.dump(stats, f)
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("tokenized %s: %d documents, %d tokens (cached in %s)", path, stats["n_docs"], n,
             final)


def load_splits(cfg, tokenizer: Tokenizer) -> tuple[TokenCorpus, TokenCorpus]:
    """(train, val) corpora for a DataConfig: ``val_path`` if set, else the val split of a prepared
    corpus (:mod:`jaxlm.data.prepared`) if it has one, else a document split."""
    from jaxlm.config import DEFAULT_CORPUS
    from jaxlm.data import prepared  # here, not at the top: prepared.py builds on this module

    kw = dict(fmt=cfg.format, separator=cfg.doc_separator, text_field=cfg.text_field,
              cache_dir=cfg.cache_dir, tokenizer_path=cfg.tokenizer_path)
    path = cfg.path or DEFAULT_CORPUS
    pc = prepared.open_if_prepared(path, tokenizer, "data.path")
    train = pc.corpus("train") if pc else load_corpus(path, tokenizer, **kw)
    if cfg.val_path:
        vc = prepared.open_if_prepared(cfg.val_path, tokenizer, "data.val_path", need_train=False)
        if vc is not None:
            return train, vc.corpus(vc.heldout_split())
        return train, load_corpus(cfg.val_path, tokenizer, what="data.val_path", **kw)
    if pc is not None and pc.has("val"):
        return train, pc.corpus("val")
    return train.split(cfg.val_fraction)
