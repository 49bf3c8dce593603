"""Tokenizers with one small interface: byte-level, GPT-2 BPE, SentencePiece, HF tokenizer.json.

Every tokenizer has ``name``, ``vocab_size``, ``eos_id``, ``encode(text) -> int32 ids`` (no
special tokens added), ``decode(ids) -> str`` (specials skipped; invalid UTF-8 becomes U+FFFD,
never an error) and ``token_bytes``: an int32 table of shape [vocab_size] with the number of UTF-8
bytes each token stands for (0 for special/control tokens), and ``fingerprint()``: a sha256 hex of
the class name, vocab size, eos id and the tokenizer's defining files (a constant for ``byte``), so
a prepared corpus (jaxlm/data/prepare.py) can be checked against the tokenizer of a run.

Why the byte table: summing ``token_bytes`` over the target tokens gives the byte count of the
text being predicted, so ``bits/byte = sum(nll) / ln 2 / sum(bytes)`` compares models across
tokenizers. The sum is exact for ``byte`` and ``gpt2``. For ``sentencepiece`` it is close but not
exact, because the model normalises text (NFKC, a dummy leading space, whitespace runs collapsed).

- ``byte``: ids 0..255 are the UTF-8 bytes, 256 is ``<|endoftext|>`` (eos). vocab 257.
- ``gpt2``: HF ``tokenizers`` byte-level BPE from ``vocab.json`` + ``merges.txt``. vocab 50257,
  eos ``<|endoftext|>`` = 50256. Text that contains the literal string "<|endoftext|>" is encoded as
  plain text. Large texts are cut at safe boundaries and encoded with ``encode_batch_fast``, which
  is about 2x faster than one ``encode`` of a 1 MB string and gives identical ids.
- ``sentencepiece``: a ``.model`` file. eos is the model's eos id; vocab is the piece count.
- ``hf``: any Hugging Face ``tokenizers`` ``tokenizer.json`` (the file, or a directory holding it;
  no bundled default). eos is ``eos_token`` of a ``tokenizer_config.json`` (or ``eos_token_id`` of
  a ``config.json``) beside it, else a token named ``<|endoftext|>``, ``</s>`` or
  ``<|end_of_text|>``. No special tokens are added (no BOS); special-token strings inside the text
  are encoded as plain text, as for ``gpt2``. ``token_bytes`` and decode are exact for byte-level
  BPE files (GPT-2, Llama 3, Qwen, ...); for others (SentencePiece-style ``▁`` pieces, WordPiece)
  the byte table is the pieces' UTF-8 length with ``▁`` as one space and ``<0xNN>`` as one byte.

Example::

    from jaxlm.data.tokenizer import get_tokenizer
    tok = get_tokenizer("gpt2")                   # the bundled GPT-2 files
    ids = tok.encode("Hello world")               # array([15496, 995], dtype=int32)
    tok.decode(ids), int(tok.token_bytes[ids].sum())  # ('Hello world', 11)
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from jaxlm.config import ASSETS, ConfigError

EOT = "<|endoftext|>"


class Tokenizer:
    """The common interface. Subclasses set the attributes and implement encode/decode."""

    name: str
    vocab_size: int
    eos_id: int
    token_bytes: np.ndarray  # [vocab_size] int32
    _files: tuple = ()  # the files that define the tokenizer (hashed by fingerprint)

    def fingerprint(self) -> str:
        """sha256 hex over the class name, vocab size, eos id and the defining files' bytes."""
        h = hashlib.sha256(f"{type(self).__name__}:{self.vocab_size}:{self.eos_id}".encode())
        for path in self._files:
            with open(path, "rb") as f:
                raw = f.read()
            h.update(len(raw).to_bytes(8, "little") + raw)  # length-prefixed: unambiguous
        return h.hexdigest()

    def encode(self, text: str) -> np.ndarray:  # -> [n] int32
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _as_ids(ids) -> np.ndarray:
    """Any int sequence / numpy / jax array -> flat int64 numpy array."""
    return np.asarray(ids, dtype=np.int64).reshape(-1)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens, plus one end-of-text id (256)."""

    name = "byte"

    def __init__(self):
        self.vocab_size = 257
        self.eos_id = 256
        self.token_bytes = np.ones(257, np.int32)
        self.token_bytes[self.eos_id] = 0

    def encode(self, text: str | bytes) -> np.ndarray:
        """Bytes as given; a str as UTF-8, where lone surrogates from ``surrogateescape``
        (undecodable bytes in argv or file names, e.g. ``$'\\xff'``) become those raw bytes."""
        raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
        return np.frombuffer(raw, np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = _as_ids(ids)
        ids = ids[(ids >= 0) & (ids < 256)]
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte is shown as one printable unicode character.

    Printable latin-1 bytes stand for themselves; the remaining 68 bytes (controls, space, ...)
    are mapped, in byte order, to code points 256, 257, ...
    """
    keep = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# Cut before a newline that follows a non-space character. The GPT-2 pre-tokenizer never joins
# a non-space character with a following whitespace run, and a whitespace run that starts a chunk
# starts at the same place as in the full text, so encoding the chunks separately gives the same
# ids. (Cutting *after* newlines would not: a trailing "\n\n" becomes one token at end of string.)
_SAFE_CUT = re.compile(r"(?<=\S)(?=\r?\n)")
_CHUNK_CHARS = 4096  # chunk size for encode_batch; ~4 KB was fastest on 2 cores


def _refuse_special(path: str) -> None:
    """/dev/zero, a FIFO… as a tokenizer file: say what it is (never read it: it may not end)."""
    from jaxlm.utils.files import check_data_file, not_regular_file

    if not os.path.isdir(path) and not_regular_file(path):
        check_data_file(path, "data.tokenizer_path", "a tokenizer file")


class GPT2Tokenizer(Tokenizer):
    """GPT-2 byte-level BPE via HF ``tokenizers``; decode goes through an exact byte table."""

    name = "gpt2"

    def __init__(self, directory: str):
        from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

        for fname in ("vocab.json", "merges.txt"):
            _refuse_special(os.path.join(directory, fname))
            if not os.path.isfile(os.path.join(directory, fname)):
                raise ConfigError(
                    f"gpt2 tokenizer: {fname} not found in {directory} "
                    "(set data.tokenizer_path to a dir with vocab.json and merges.txt)")
        try:
            bpe = models.BPE.from_file(os.path.join(directory, "vocab.json"),
                                       os.path.join(directory, "merges.txt"))
        except Exception as e:  # noqa: BLE001 (tokenizers raises plain Exception)
            raise ConfigError(f"gpt2 tokenizer: cannot load vocab.json/merges.txt in {directory}: "
                              f"{e} (use GPT-2 style BPE files)") from None
        self._tok = HFTokenizer(bpe)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.vocab_size = self._tok.get_vocab_size()
        eos = self._tok.token_to_id(EOT)
        if eos is None:
            raise ConfigError(f"gpt2 tokenizer: {EOT} missing from {directory}/vocab.json "
                              "(use the GPT-2 vocab, which has it at id 50256)")
        self.eos_id = eos
        char_to_byte = {c: b for b, c in _byte_to_char().items()}
        # token_to_bytes[i] = the raw bytes of token i (b"" for specials).
        self._bytes: list[bytes] = []
        for i in range(self.vocab_size):
            tok = self._tok.id_to_token(i) or ""
            if i == eos or any(c not in char_to_byte for c in tok):
                self._bytes.append(b"")
            else:
                self._bytes.append(bytes(char_to_byte[c] for c in tok))
        self.token_bytes = np.array([len(b) for b in self._bytes], np.int32)
        self._files = (os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))

    def encode(self, text: str) -> np.ndarray:
        if len(text) <= _CHUNK_CHARS:
            return np.asarray(self._tok.encode(text).ids, np.int32)
        chunks, cur, size = [], [], 0
        for piece in _SAFE_CUT.split(text):
            cur.append(piece)
            size += len(piece)
            if size >= _CHUNK_CHARS:
                chunks.append("".join(cur))
                cur, size = [], 0
        if cur:
            chunks.append("".join(cur))
        encs = self._tok.encode_batch_fast(chunks)
        return np.concatenate([np.asarray(e.ids, np.int32) for e in encs])

    def decode(self, ids) -> str:
        table, n = self._bytes, self.vocab_size
        raw = b"".join(table[i] for i in _as_ids(ids).tolist() if 0 <= i < n)
        return raw.decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``. ``<unk>`` decodes to ' ⁇ ' and counts 0 bytes."""

    name = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece as spm

        _refuse_special(path)
        if not os.path.isfile(path):
            raise ConfigError(f"sentencepiece tokenizer: model file not found: {path} "
                              "(set data.tokenizer_path to a .model file)")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"sentencepiece tokenizer: cannot load {path}: {e} "
                              "(data.tokenizer_path must be a SentencePiece .model file)") from None
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        self.eos_id = sp.eos_id()
        if self.eos_id < 0:
            raise ConfigError(f"sentencepiece tokenizer: {path} defines no eos piece "
                              "(use a model trained with an eos id)")
        nbytes = np.zeros(self.vocab_size, np.int32)
        self._special = np.zeros(self.vocab_size, bool)
        for i in range(self.vocab_size):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                self._special[i] = sp.is_control(i) or sp.is_unused(i)
                continue
            if sp.is_byte(i):  # byte-fallback piece <0xNN>
                nbytes[i] = 1
            else:  # '▁' is the space marker: one byte
                nbytes[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        self.token_bytes = nbytes
        self._files = (path,)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def decode(self, ids) -> str:
        ids = _as_ids(ids)
        ids = ids[(ids >= 0) & (ids < self.vocab_size)]
        ids = ids[~self._special[ids]]
        return self._sp.decode(ids.tolist())


_EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>")


def _hf_eos_from_configs(tok, directory: str) -> int | None:
    """eos id from tokenizer_config.json's eos_token or config.json's eos_token_id, else None."""
    for fname, key in (("tokenizer_config.json", "eos_token"), ("config.json", "eos_token_id")):
        path = os.path.join(directory, fname)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as f:
                cfg = json.loads(f.read())
        except (OSError, ValueError) as e:
            raise ConfigError(f"hf tokenizer: cannot read {path}: {e} (fix or remove it)") from None
        value = cfg.get(key) if isinstance(cfg, dict) else None
        if isinstance(value, list) and value:  # config.json may list several eos ids
            value = value[0]
        if isinstance(value, dict):  # {"content": "</s>", ...}
            value = value.get("content")
        if isinstance(value, str):
            eos = tok.token_to_id(value)
            if eos is None:
                raise ConfigError(f"hf tokenizer: {path} names eos_token {value!r}, which is not "
                                  "in tokenizer.json's vocabulary (fix eos_token there)")
            return eos
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _is_byte_level(decoder) -> bool:
    """Does a tokenizer.json "decoder" entry (maybe a Sequence) hold a ByteLevel decoder?"""
    if not isinstance(decoder, dict):
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return any(_is_byte_level(d) for d in decoder.get("decoders") or ())


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` ``tokenizer.json`` (a file or a directory holding one)."""

    name = "hf"

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tok

        fix = ("set data.tokenizer_path (jaxlm-prepare: --tokenizer-path) to a tokenizer.json or "
               "a directory holding one")
        if not path:
            raise ConfigError(f"hf tokenizer: no tokenizer file given; {fix}")
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        _refuse_special(file)
        if not os.path.isfile(file):
            raise ConfigError(f"hf tokenizer: {file} not found; {fix}")
        try:
            with open(file, "rb") as f:
                raw = f.read().decode("utf-8")
            spec = json.loads(raw)
            self._tok = _Tok.from_str(raw)
        except Exception as e:  # noqa: BLE001 (tokenizers raises plain Exception)
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"hf tokenizer: cannot load {file}: {first} (use a `tokenizers` "
                              "tokenizer.json, e.g. from a model's Hugging Face repo)") from None
        self._tok.encode_special_tokens = True  # "<|endoftext|>" inside a text is plain text
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        eos = _hf_eos_from_configs(self._tok, os.path.dirname(file))
        if eos is None:
            eos = next((i for i in map(self._tok.token_to_id, _EOS_NAMES) if i is not None), None)
        if eos is None or not 0 <= eos < self.vocab_size:
            raise ConfigError(f"hf tokenizer: {file} has no end-of-text token (none of "
                              f"{', '.join(_EOS_NAMES)}, and no eos_token in a "
                              "tokenizer_config.json beside it); add eos_token there")
        self.eos_id = eos
        self._byte_level = _is_byte_level(spec.get("decoder") if isinstance(spec, dict) else None)
        self._bytes = self._byte_table()
        self.token_bytes = np.array([len(b) for b in self._bytes], np.int32)
        self._files = (file,)

    def _byte_table(self) -> list[bytes]:
        """The UTF-8 bytes of every id (b"" for special tokens and unused ids)."""
        added = self._tok.get_added_tokens_decoder()  # {id: AddedToken}
        char_to_byte = {c: b for b, c in _byte_to_char().items()}
        table = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is None or i == self.eos_id or (i in added and added[i].special):
                table.append(b"")
            elif i in added:  # a plain added token: its text as written
                table.append(added[i].content.encode("utf-8"))
            elif self._byte_level:
                ok = all(c in char_to_byte for c in piece)
                table.append(bytes(char_to_byte[c] for c in piece) if ok else b"")
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):  # byte-fallback piece
                table.append(bytes([int(piece[3:5], 16)]))
            else:
                table.append(piece.replace("\u2581", " ").encode("utf-8"))
        return table

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        ids = [i for i in _as_ids(ids).tolist() if 0 <= i < self.vocab_size]
        if self._byte_level:
            return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")
        return self._tok.decode(ids, skip_special_tokens=True)


TOKENIZER_NAMES = _NAMES = ("byte", "gpt2", "sentencepiece", "hf")


def get_tokenizer(name: str, path: str = "") -> Tokenizer:
    """Build a tokenizer by name; ``path`` overrides the bundled files ("" = bundled; ``hf`` has
    none: its path is required)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer(path or os.path.join(ASSETS, "gpt2-bpe"))
    if name == "sentencepiece":
        path = path or os.path.join(ASSETS, "sentencepiece", "tokenizer.model")
        return SentencePieceTokenizer(path)
    if name == "hf":
        return HFTokenizer(path)
    raise ConfigError(
        f"unknown tokenizer {name!r} (data.tokenizer must be one of: {', '.join(_NAMES)})")
