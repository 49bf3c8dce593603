"""Tokenizers with one small interface: byte-level, GPT-2 BPE, and SentencePiece.

Every tokenizer has ``name``, ``vocab_size``, ``eos_id``, ``encode(text) -> int32 ids`` (no
special tokens added), ``decode(ids) -> str`` (specials skipped; invalid UTF-8 becomes U+FFFD,
never an error) and ``token_bytes``: an int32 table of shape [vocab_size] with the number of UTF-8
bytes each token stands for (0 for special/control tokens).

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

Example::

    from jaxlm.data.tokenizer import get_tokenizer
    tok = get_tokenizer("gpt2")                   # the bundled GPT-2 files
    ids = tok.encode("Hello world")               # array([15496, 995], dtype=int32)
    tok.decode(ids), int(tok.token_bytes[ids].sum())  # ('Hello world', 11)
"""

from __future__ import annotations

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

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def decode(self, ids) -> str:
        ids = _as_ids(ids)
        ids = ids[(ids >= 0) & (ids < self.vocab_size)]
        ids = ids[~self._special[ids]]
        return self._sp.decode(ids.tolist())


_NAMES = ("byte", "gpt2", "sentencepiece")


def get_tokenizer(name: str, path: str = "") -> Tokenizer:
    """Build a tokenizer by name; ``path`` overrides the bundled files ("" = bundled)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer(path or os.path.join(ASSETS, "gpt2-bpe"))
    if name == "sentencepiece":
        path = path or os.path.join(ASSETS, "sentencepiece", "tokenizer.model")
        return SentencePieceTokenizer(path)
    raise ConfigError(
        f"unknown tokenizer {name!r} (data.tokenizer must be one of: {', '.join(_NAMES)})")
