"""Byte-level BPE: the tokenizer of the BPE Transformer baseline the paper compares AU-Net with.

The paper's baselines are BPE Transformers (arXiv 2506.14761, Section 4); everything the
platform measures stays per byte (docs/data.md), so the tokenizer must be a bijection on byte
strings: ``decode(encode(b)) == b`` for ANY bytes, invalid UTF-8 and NUL included.

Design:
- Ids ``0..255`` ARE the single bytes, in byte order, so a byte-level model and a BPE model share
  the first 256 ids and an invalid byte always has an id. Ids ``256..n-1`` are the merged tokens
  in the order training created them. The three specials BOS, EOS, PAD follow (``n, n+1, n+2``)
  and decode to ``b""``: they are structure, not text.
- Training and encoding use Hugging Face ``tokenizers`` (Rust): a ``Split(pattern)``
  pre-tokenizer (GPT-2 or LLaMA-3 regex), then ``ByteLevel`` (every byte to one printable char),
  then the BPE model. The trained HF model is converted to this module's canonical form (byte
  strings + merges as id pairs) and the encoder is always REBUILT from that canonical form, with
  HF's vocabulary re-indexed to ours: a freshly trained tokenizer and one loaded from JSON are
  the same object, and HF ids need no permutation at encode time.
- HF encodes ``str``. A document is split into maximal valid-UTF-8 runs and the invalid bytes
  between them; runs go through HF, each invalid byte becomes its byte id. Splitting at an
  invalid byte only changes how the text around it is pre-tokenized, never the bytes.
- Training texts are decoded with ``errors="replace"``: U+FFFD can then become part of merges,
  which is harmless, and training never fails on a bad document.
- Identity: the canonical JSON (sorted keys, no whitespace) is what is hashed (``sha256``);
  datasets and checkpoints record it. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

FORMAT = "aunet-bpe"
VERSION = 1
N_SPECIALS = 3
MAX_VOCAB = 2**20

# The pre-tokenization regexes: GPT-2's (Radford et al. 2019) and LLaMA-3's (tiktoken cl100k
# style, digits in groups of up to three), as published with those tokenizers.
PATTERNS: dict[str, str] = {
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "llama3": (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
        r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    ),
}

# Maximal runs of well-formed UTF-8 (RFC 3629: no overlongs, no surrogates, <= U+10FFFF).
_VALID_UTF8 = re.compile(
    rb"(?:[\x00-\x7f]|[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]"
    rb"|[\xe1-\xec\xee\xef][\x80-\xbf]{2}|\xed[\x80-\x9f][\x80-\xbf]"
    rb"|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}|\xf4[\x80-\x8f][\x80-\xbf]{2})+"
)


def byte_to_char() -> list[str]:
    """HF ``ByteLevel``'s byte -> printable char table (GPT-2's ``bytes_to_unicode``)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


_B2C = byte_to_char()
_C2B = {c: b for b, c in enumerate(_B2C)}


def _to_chars(data: bytes) -> str:
    return "".join(_B2C[b] for b in data)


def _from_chars(s: str) -> bytes:
    return bytes(_C2B[c] for c in s)


def utf8_runs(data: bytes) -> list[tuple[bool, bytes]]:
    """``data`` as ``(is_valid_utf8, piece)`` pieces in order: maximal valid runs and the
    invalid bytes between them (an invalid piece may hold several bytes)."""
    try:
        data.decode("utf-8")
        return [(True, data)] if data else []
    except UnicodeDecodeError:
        pass
    out: list[tuple[bool, bytes]] = []
    pos = 0
    for m in _VALID_UTF8.finditer(data):
        if m.start() > pos:
            out.append((False, data[pos : m.start()]))
        out.append((True, m.group()))
        pos = m.end()
    if pos < len(data):
        out.append((False, data[pos:]))
    return out


class BPETokenizer:
    """A byte-level BPE vocabulary: ids ``0..255`` the bytes, then merges, then BOS/EOS/PAD."""

    def __init__(self, tokens: Sequence[bytes], merges: Sequence[tuple[int, int]], pattern: str):
        if pattern not in PATTERNS:
            raise ValueError(f"tokenizer pattern {pattern!r}: expected one of {sorted(PATTERNS)}")
        tokens = [bytes(t) for t in tokens]
        if tokens[:256] != [bytes([b]) for b in range(256)]:
            raise ValueError("tokenizer tokens: ids 0..255 must be the single bytes in order")
        if len(set(tokens)) != len(tokens):
            raise ValueError("tokenizer tokens: duplicate byte strings")
        if len(tokens) + N_SPECIALS > MAX_VOCAB:
            raise ValueError(f"tokenizer: {len(tokens)} tokens exceed the {MAX_VOCAB} id limit")
        index = {t: i for i, t in enumerate(tokens)}
        n = len(tokens)
        for k, (a, b) in enumerate(merges):
            if not (0 <= a < n and 0 <= b < n) or tokens[a] + tokens[b] not in index:
                raise ValueError(f"tokenizer merge {k} ({a}, {b}): not a pair of known tokens")
        self.pattern = pattern
        self.token_bytes: list[bytes] = tokens
        self.merges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in merges]
        self.bos_id, self.eos_id, self.pad_id = n, n + 1, n + 2
        self.vocab_size = n + N_SPECIALS
        lengths = [len(t) for t in tokens] + [0] * N_SPECIALS
        self.token_lengths = np.asarray(lengths, dtype=np.int64)
        self._hf = self._build_hf()

    def _build_hf(self) -> Tokenizer:
        """The HF encoder whose ids are ours (vocab re-indexed, merges in rank order)."""
        vocab = {_to_chars(t): i for i, t in enumerate(self.token_bytes)}
        merges = [
            (_to_chars(self.token_bytes[a]), _to_chars(self.token_bytes[b])) for a, b in self.merges
        ]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = _pre_tokenizer(self.pattern)
        tok.decoder = decoders.ByteLevel()
        return tok

    # ---- training ----------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[bytes], vocab_size: int, pattern: str = "gpt2") -> BPETokenizer:
        """Train on ``texts`` to at most ``vocab_size`` ids (specials included); fewer when the
        corpus runs out of pairs. Deterministic: HF's trainer breaks count ties by pair ids."""
        if pattern not in PATTERNS:
            raise ValueError(f"tokenizer pattern {pattern!r}: expected one of {sorted(PATTERNS)}")
        if not 256 + N_SPECIALS < vocab_size <= MAX_VOCAB:
            raise ValueError(f"tokenizer vocab_size {vocab_size}: expected 260..{MAX_VOCAB}")
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = _pre_tokenizer(pattern)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - N_SPECIALS,
            min_frequency=2,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
        )
        hf.train_from_iterator((t.decode("utf-8", errors="replace") for t in texts), trainer)
        model = json.loads(hf.to_str())["model"]
        hf_vocab: dict[str, int] = model["vocab"]
        pairs = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
        tokens = [bytes([b]) for b in range(256)]
        index = {t: i for i, t in enumerate(tokens)}
        for s, _ in sorted(hf_vocab.items(), key=lambda kv: kv[1]):
            t = _from_chars(s)
            if t not in index:
                index[t] = len(tokens)
                tokens.append(t)
        merges = [(index[_from_chars(a)], index[_from_chars(b)]) for a, b in pairs]
        return cls(tokens, merges, pattern)

    # ---- encode / decode ---------------------------------------------------------------------

    def encode(self, data: bytes) -> np.ndarray:
        """(n,) int64 ids of ``data``, no BOS/EOS; ``decode`` gives ``data`` back exactly."""
        return self.encode_batch([data])[0]

    def encode_batch(self, docs: list[bytes]) -> list[np.ndarray]:
        """Per document (n_i,) int64 ids; all valid-UTF-8 runs of all documents in one HF call."""
        plans = [utf8_runs(bytes(d)) for d in docs]
        texts = [piece.decode("utf-8") for plan in plans for ok, piece in plan if ok]
        encoded = iter(self._hf.encode_batch_fast(texts, add_special_tokens=False) if texts else [])
        out = []
        for plan in plans:
            parts: list[np.ndarray] = []
            for ok, piece in plan:
                if ok:
                    parts.append(np.asarray(next(encoded).ids, dtype=np.int64))
                else:
                    parts.append(np.frombuffer(piece, dtype=np.uint8).astype(np.int64))
            out.append(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> bytes:
        """The bytes of ``ids``; specials decode to ``b""``, an id outside the vocabulary raises."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = int(arr[(arr < 0) | (arr >= self.vocab_size)][0])
            raise ValueError(f"token id {bad} outside the vocabulary of {self.vocab_size}")
        tb = self.token_bytes
        n = len(tb)
        return b"".join(tb[i] for i in arr.tolist() if i < n)

    # ---- persistence -------------------------------------------------------------------------

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): the bytes ``sha256`` hashes."""
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "pattern": self.pattern,
            "regex": PATTERNS[self.pattern],
            "tokens": [t.hex() for t in self.token_bytes[256:]],
            "merges": [list(m) for m in self.merges],
            "specials": {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id},
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> BPETokenizer:
        """Parse and validate; a malformed file raises ``ValueError`` naming what is wrong."""
        try:
            doc = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"tokenizer JSON: {e}") from None
        if (
            not isinstance(doc, dict)
            or doc.get("format") != FORMAT
            or doc.get("version") != VERSION
        ):
            raise ValueError(f"tokenizer JSON: not a {FORMAT} v{VERSION} file")
        pattern = doc.get("pattern")
        if pattern in PATTERNS and doc.get("regex") != PATTERNS[pattern]:
            raise ValueError(
                f"tokenizer JSON: regex differs from this version's {pattern!r} pattern"
            )
        try:
            tokens = [bytes([b]) for b in range(256)] + [bytes.fromhex(h) for h in doc["tokens"]]
            merges = [(int(a), int(b)) for a, b in doc["merges"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"tokenizer JSON: bad tokens/merges ({e})") from None
        tok = cls(tokens, merges, pattern)
        n = len(tokens)
        if doc.get("specials") != {"bos": n, "eos": n + 1, "pad": n + 2}:
            raise ValueError(f"tokenizer JSON: specials must be bos={n}, eos={n + 1}, pad={n + 2}")
        return tok

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read tokenizer ({e})") from None
        try:
            return cls.from_json(text)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        sha = self.sha256[:12]
        return f"BPETokenizer(vocab_size={self.vocab_size}, pattern={self.pattern!r}, sha256={sha})"


def _pre_tokenizer(pattern: str) -> pre_tokenizers.PreTokenizer:
    """Split by the regex (matches kept as pieces), then map every byte to one char."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERNS[pattern]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
