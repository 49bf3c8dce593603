"""jaxlm-prepare's input readers: local paths / globs / ``hf:`` names -> a stream of documents.

Every reader streams (bounded memory whatever the file size: a block, a line or a record batch
at a time; only one document is ever whole in memory) and yields ``str`` documents in file order:

- ``.txt``: UTF-8 text cut into documents at every blank line ``"\\n\\n"`` (exactly
  ``text.split("\\n\\n")``, the default of ``data.doc_separator`` in jaxlm/data/corpus.py; bytes
  are kept as they are, so a CRLF file has no ``"\\n\\n"`` to cut at);
- ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, the document in ``text_field`` (blank lines
  are ignored);
- ``.parquet``: the ``text_field`` column, read in record batches with pyarrow;
- ``hf:NAME_OR_PATH``: ``datasets.load_dataset(NAME_OR_PATH, config, split=split,
  streaming=True)`` (a hub name or a local directory of jsonl/parquet files), field ``text_field``.

A directory means every supported file under it (recursive, sorted by path; other files are
ignored); a glob (``*``, ``?``, ``[``) means its sorted matches. Remote URLs are refused: prepare
reads local files only (copy them, or mount the bucket with gcsfuse).

Bad records are skipped and counted, not fatal (``Skips``): a line that is not JSON
(``bad_json``), an object without a string ``text_field`` (``missing_field``), a document that is
not UTF-8 (``not_utf8``), an empty document (``empty``). Why skip-and-count rather than stop: one
broken line in a 100 GB crawl should not kill a day of preparing, and the counts go into the
manifest's ``"skipped"`` and one warning line at the end, so nothing is hidden. A source where
*every* record is bad is a wrong ``--text-field`` or a wrong file, never data noise: that is a
ConfigError. A truncated ``.jsonl.gz`` or an unreadable parquet is a ConfigError naming the file.

Example::

    from jaxlm.data.readers import Skips, expand_inputs, iter_documents
    skips = Skips()
    for doc in iter_documents(expand_inputs(["jaxlm/assets/tinyshakespeare"]), "text", skips):
        ...                                   # every .txt under it, cut at blank lines
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import zlib

from jaxlm.errors import ConfigError
from jaxlm.utils.files import not_regular_file

EXTENSIONS = (".jsonl.gz", ".jsonl", ".txt", ".parquet")  # longest first: .jsonl.gz before .jsonl
SKIP_KINDS = ("empty", "bad_json", "missing_field", "not_utf8")
_BLOCK = 1 << 20  # .txt read size
_ROWS = 1024  # parquet record-batch rows
_DATA_EXTRA = "pip install 'jaxlm[data]'"


class Skips:
    """Counts of skipped records by kind, and where the first bad (non-empty) one was."""

    def __init__(self):
        self.counts = dict.fromkeys(SKIP_KINDS, 0)
        self.first_bad = ""  # of the whole run
        self.source_first_bad = ""  # of the current source (read_source resets it)

    def add(self, kind: str, where: str) -> None:
        self.counts[kind] += 1
        if kind != "empty":
            self.first_bad = self.first_bad or f"{where} ({kind})"
            self.source_first_bad = self.source_first_bad or f"{where} ({kind})"

    def bad(self) -> int:
        return sum(v for k, v in self.counts.items() if k != "empty")

    def warning(self) -> str:
        """One line for the end of a run ('' when nothing bad was skipped)."""
        if not self.bad():
            return ""
        parts = ", ".join(f"{k}={v}" for k, v in self.counts.items() if k != "empty" and v)
        return (f"skipped {self.bad()} bad record(s) ({parts}); the first: {self.first_bad}; "
                "they are counted in the manifest's 'skipped'")


def _kind(path: str) -> str:
    low = path.lower()
    return next((ext for ext in EXTENSIONS if low.endswith(ext)), "")


def _unsupported(path: str) -> ConfigError:
    return ConfigError(f"input {path}: unsupported file type (jaxlm-prepare reads "
                       f"{', '.join(EXTENSIONS)}, a directory of them, or hf:NAME); convert it")


def _file(path: str) -> tuple[str, str]:
    special = not_regular_file(path)
    if special:
        raise ConfigError(f"input {path} is {special}, not a regular file; prepare reads files, "
                          "so copy it into one")
    if not _kind(path):
        raise _unsupported(path)
    return _kind(path), path


def _directory(path: str) -> list[tuple[str, str]]:
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, f) for f in files if _kind(f) and not f.startswith(".")]
    return [(_kind(f), f) for f in sorted(found, key=lambda f: os.path.relpath(f, path))]


def expand_inputs(inputs: list[str]) -> list[tuple[str, str]]:
    """[(kind, path)] in document order: kind is an extension of EXTENSIONS or "hf"."""
    if not inputs:
        raise ConfigError("jaxlm-prepare: no input given (pass files, directories, globs or "
                          "hf:NAME)")
    out = []
    for given in inputs:
        if given.startswith("hf:") and not given.startswith("hf://"):
            if not given[3:]:
                raise ConfigError("input 'hf:' names no dataset (write hf:NAME_OR_PATH)")
            out.append(("hf", given[3:]))
        elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", given):
            raise ConfigError(f"input {given}: prepare reads local files only; copy it to a "
                              "local disk (gsutil cp / aws s3 cp / curl) or mount the bucket "
                              "(gcsfuse, s3fs) and pass the local path")
        elif any(c in given for c in "*?["):
            matches = sorted(glob.glob(given, recursive=True))
            if not matches:
                raise ConfigError(f"input {given}: no file matches this glob (check the pattern)")
            for m in matches:
                out += _directory(m) if os.path.isdir(m) else [_file(m)]
        elif os.path.isdir(given):
            found = _directory(given)
            if not found:
                raise ConfigError(f"input {given}: the directory holds no {', '.join(EXTENSIONS)} "
                                  "file (point at the files, or convert them)")
            out += found
        elif os.path.exists(given):
            out.append(_file(given))
        else:
            hint = " (a broken symlink)" if os.path.islink(given) else ""
            raise ConfigError(f"input {given}: no such file or directory{hint} (check the path)")
    return out


def _read_txt(path: str, skips: Skips):
    """Documents of a UTF-8 file cut at "\\n\\n", streamed in blocks (== text.split("\\n\\n"))."""
    buf, scan, base, n = bytearray(), 0, 0, 0  # base = file offset of buf[0]
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            start = 0
            if block:
                buf += block
                while (cut := buf.find(b"\n\n", max(start, scan))) >= 0:
                    yield from _utf8(bytes(buf[start:cut]), f"{path} document {n} (byte "
                                     f"{base + start})", skips)
                    n, start = n + 1, cut + 2
                del buf[:start]
                base += start
                scan = max(0, len(buf) - 1)  # no "\n\n" starts before the last byte
            else:
                yield from _utf8(bytes(buf), f"{path} document {n} (byte {base})", skips)
                return


def _utf8(raw: bytes, where: str, skips: Skips):
    try:
        yield raw.decode("utf-8")
    except UnicodeDecodeError:
        skips.add("not_utf8", where)


def _read_jsonl(path: str, gz: bool, field: str, skips: Skips):
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path} line {lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    skips.add("not_utf8", where)
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    skips.add("bad_json", where)
                    continue
                doc = obj.get(field) if isinstance(obj, dict) else None
                if isinstance(doc, str):
                    yield doc
                else:
                    keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
                    skips.add("missing_field", f"{where}: no string {field!r}, has: {keys}")
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ConfigError(f"input {path} is truncated or corrupt ({e}); re-download or "
                          "re-compress it (gzip -t checks a .gz)") from None
    except OSError as e:
        raise ConfigError(f"input {path}: cannot read: {e.strerror or e} (check the file and "
                          "its permissions)") from None


def _read_parquet(path: str, field: str, skips: Skips):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"input {path}: reading parquet needs pyarrow: {_DATA_EXTRA}") from None
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if field not in names:
            raise ConfigError(f"input {path} has no column {field!r} (its columns: "
                              f"{', '.join(names)}); set --text-field to its text column")
        kind = pf.schema_arrow.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            raise ConfigError(f"input {path}: column {field!r} holds {kind}, not text; set "
                              "--text-field to its text column")
        row = 0
        for batch in pf.iter_batches(batch_size=_ROWS, columns=[field]):
            for value in batch.column(0).to_pylist():
                if isinstance(value, bytes):
                    yield from _utf8(value, f"{path} row {row}", skips)
                elif isinstance(value, str):
                    yield value
                else:
                    skips.add("missing_field", f"{path} row {row}: {field!r} is null")
                row += 1
    except (pa.ArrowException, OSError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"input {path} is not a readable parquet file ({first}); re-download "
                          "or re-export it") from None


def _read_hf(name: str, field: str, skips: Skips, config: str, split: str):
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"input hf:{name} needs Hugging Face datasets: {_DATA_EXTRA}") from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 (datasets raises many kinds: not found, bad split, ...)
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"input hf:{name}: cannot load it ({type(e).__name__}: {first}); "
                          "check the name or path, --hf-config and --hf-split") from None
    features = getattr(ds, "features", None)
    if features is not None and field not in features:
        raise ConfigError(f"input hf:{name} has no column {field!r} (its columns: "
                          f"{', '.join(features)}); set --text-field to its text column")
    for i, example in enumerate(ds):
        value = example.get(field)
        if isinstance(value, str):
            yield value
        else:
            skips.add("missing_field", f"hf:{name} row {i}: no string {field!r}")


def read_source(kind: str, path: str, field: str, skips: Skips, hf_config: str = "",
                hf_split: str = "train"):
    """The documents of one (kind, path) from expand_inputs; a source with records but not one
    usable document (every record bad) is a ConfigError naming the first bad record."""
    bad_before, good = skips.bad(), 0
    skips.source_first_bad = ""
    if kind == ".txt":
        docs = _read_txt(path, skips)
    elif kind in (".jsonl", ".jsonl.gz"):
        docs = _read_jsonl(path, kind == ".jsonl.gz", field, skips)
    elif kind == ".parquet":
        docs = _read_parquet(path, field, skips)
    else:
        docs = _read_hf(path, field, skips, hf_config, hf_split)
    for doc in docs:
        good += 1
        yield doc
    n_bad = skips.bad() - bad_before
    if n_bad and not good:
        name = f"hf:{path}" if kind == "hf" else path
        raise ConfigError(f"input {name}: all {n_bad} records are bad, the first: "
                          f"{skips.source_first_bad}; check --text-field (now {field!r}) and that "
                          "the input is UTF-8 text in the format its name says")


def iter_documents(sources: list[tuple[str, str]], field: str, skips: Skips,
                   hf_config: str = "", hf_split: str = "train"):
    """All documents of all sources, in order (empty ones included: the caller counts them)."""
    for kind, path in sources:
        yield from read_source(kind, path, field, skips, hf_config, hf_split)
