r"""Per-byte level arrays for AU-Net's pooling stages, byte-exact with the official code.

The rules and the decisions behind this module: docs/design.md (Splitting).

A ``Splitter`` takes the official strategy mapping (``{"word1": "1@1", "word2": "2@1"}``): dict
order is the stage, and a key picks its strategy by prefix, tested in the official order ``word``,
``pretok``, ``punct`` (so ``word2`` and ``words`` are word strategies, and ``punc`` is rejected),
then ours, ``script``, then the longest name registered with ``register_strategy`` that prefixes
the key. For word keys the value is ``N@M`` (N words per end match; ``@M`` is read only for the
exact key ``word``, as officially); pretok, punct and custom strategies ignore the value. A script
key is a word key whose value may add ``family=K`` options (``"1@1 han=2 thai=4"``): the word
rules plus a boundary every K characters inside runs of scripts written without spaces
(aunet/scripts.py; ``@M`` is read for the exact key ``script``). An ``entropy`` key's value is a
resolved entropy stage (``"t=4.5 order=3 model=... sha256=..."``, aunet/entropy.py): a boundary on
each codepoint whose last byte's next-byte entropy reaches t bits. ``levels(data)`` gives each byte
``1 + max(index of a stage with a boundary there)`` or 0, on the last byte of each codepoint.
``levels_batch(data, lengths)`` does the same for many concatenated documents in one pass, each
document split exactly as on its own (docs/design.md, Splitting: many documents per call).

Why not ``regex.finditer``: the official patterns backtrack quadratically on long runs
(``(\S+?\s){N}`` on text without whitespace, ``\s*[\r\n]`` on long runs of spaces, punct's
thousands lookahead on long digit runs): 40 k chars take 11 s, one 1 MB line takes hours. The
built-in strategies are re-derived as run-length arithmetic on numpy class arrays (the classes
``\s``, ``\p{L}``, ``\p{N}`` and ``\d`` are read once from the ``regex`` module itself, so they
cannot drift from the official matcher); tests compare them with plain ``finditer`` on random
text. Custom strategies run plain ``regex.finditer`` per text run, so they are as slow (and as
quadratic) as their patterns.

Bad input never raises: bytes that are not UTF-8 get level 0 and split the data into runs that are
each treated as a separate text; the output always has one level per input byte.

Prefix stability (docs/design.md, Prefix stability; generation gives a new byte the level
computed on the prefix that ends there and never revises it):

- entropy is prefix-stable: a byte's level reads only the bytes up to it (``_Stage.lookback``
  of them fix it).
- word and script (any ``N@M``) are prefix-stable except on a space or tab that starts a
  whitespace run ending in a newline: ``\s*[\r\n]`` puts a boundary there only once the newline
  has arrived.
- pretok is not: ``\s+(?!\S)`` looks ahead, and `` ?\p{L}`` gives a space to the next word.
- punct is not: digits are grouped in thousands from the right (``1234`` is ``1|234``).

Length: the rules of all built-in strategies share one set of class arrays (``_Text``) and one
entry point (``Splitter._levels``, also behind ``levels_batch``); splitting the module would
export those private pieces to a single caller. The script families live in aunet/scripts.py.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import regex

from aunet.entropy import EntropyStage, stage_where
from aunet.entropy import parse_stage as parse_entropy_stage
from aunet.scripts import chunk_starts, family_table, parse_chars

# Codepoint class bits. ESCAPE marks a byte that is not UTF-8 (a surrogate from surrogateescape).
_SPACE, _LETTER, _NUMBER, _DIGIT, _NEWLINE, _BLANK, _ESCAPE = 1, 2, 4, 8, 16, 32, 64
_GROUP_BYTES = 1 << 18  # levels_batch's unit of work (Splitter.levels_batch)
# The official prefix order (docs/design.md, Splitting), then ours (aunet/scripts.py).
_BUILTIN = ("word", "pretok", "punct", "script", "entropy")
_CUSTOM: dict[str, tuple[regex.Pattern, regex.Pattern | None]] = {}


def register_strategy(name: str, start: str | None, end: str | None = None) -> None:
    """Make keys starting with ``name`` use these patterns: a boundary on the first codepoint of
    every ``start`` match and on the last codepoint of every ``end`` match (plain finditer)."""
    if not name or any(name.startswith(b) or b.startswith(name) for b in _BUILTIN):
        raise ValueError(f"strategy name {name!r} is empty or collides with a built-in prefix")
    if start is None and end is None:
        raise ValueError(f"strategy {name!r}: give a start or an end pattern")
    _CUSTOM[name] = (regex.compile(start) if start else None, regex.compile(end) if end else None)


@dataclass(frozen=True)
class _Stage:
    key: str
    kind: str  # "word", "pretok", "punct", "script", or a registered name
    group: int = 1  # N: words per end match (word only)
    moduli: tuple[int, ...] = (1,)  # end match n is kept iff n % M == 0 for some M (word only)
    patterns: tuple | None = None  # custom: (start, end), kept here so a pickled Splitter works
    chars: tuple[int, ...] = ()  # script: chunk size per family (aunet/scripts.py)
    entropy: EntropyStage | None = None  # entropy: model and threshold (aunet/entropy.py)
    lookback: int | None = None  # entropy: bytes of context that fix the last byte's level


def _parse_stage(key: str, value: str) -> _Stage:
    kind = next((b for b in _BUILTIN if key.startswith(b)), None)
    if kind is None:
        custom = [c for c in _CUSTOM if key.startswith(c)]
        if not custom:
            hint = " (did you mean 'punct'?)" if key.startswith("punc") else ""
            raise ValueError(
                f"strategy key {key!r}: unknown prefix{hint}; expected a key starting "
                f"with one of {_BUILTIN + tuple(_CUSTOM)}"
            )
        name = max(custom, key=len)
        return _Stage(key, name, patterns=_CUSTOM[name])
    if kind == "entropy":
        stage = parse_entropy_stage(key, value)
        return _Stage(key, kind, entropy=stage, lookback=stage.lookback)
    if kind not in ("word", "script"):
        return _Stage(key, kind)  # the value is ignored, as officially
    value, *options = str(value).split() or [""]
    if options and kind == "word":
        raise ValueError(f"strategy {key!r}: value {value!r} takes no options {options}")
    chars = parse_chars(key, options) if kind == "script" else ()
    head, at, tail = value.partition("@")
    try:
        group = int(head)
    except ValueError:
        raise ValueError(f"strategy {key!r}: value {value!r} is not 'N@M' with integer N") from None
    if group < 1:
        raise ValueError(f"strategy {key!r}: group size N={group} must be >= 1")
    if key != kind:
        if at and tail.strip() != "1":  # '@1' (the shipped configs) changes nothing either way
            warnings.warn(
                f"strategy {key!r}: '@{tail}' is ignored (only the key {kind!r} reads @M,"
                " as officially for 'word')",
                UserWarning,
                stacklevel=3,
            )
        return _Stage(key, kind, group, chars=chars)
    if not at:
        raise ValueError(f"strategy {key!r}: value {value!r} needs '@M' (e.g. '1@2' or '1@2-3')")
    try:
        moduli = tuple(int(m) for m in tail.split("-"))
    except ValueError:
        raise ValueError(f"strategy {key!r}: moduli in {value!r} must be integers") from None
    if min(moduli) < 1:
        raise ValueError(f"strategy {key!r}: moduli in {value!r} must be >= 1")
    return _Stage(key, kind, group, moduli, chars=chars)


@functools.cache
def _class_table() -> np.ndarray:
    """Class bits of every codepoint, read from the regex module so they match it exactly."""
    table = np.zeros(0x110000, np.uint8)
    everything = "".join(map(chr, range(0x110000)))
    for bit, pattern in {
        _SPACE: r"\s",
        _LETTER: r"\p{L}",
        _NUMBER: r"\p{N}",
        _DIGIT: r"\d",
    }.items():
        for m in regex.finditer(pattern + "+", everything):
            table[m.start() : m.end()] |= bit
    table[[10, 13]] |= _NEWLINE
    table[32] |= _BLANK
    table[0xDC80:0xDD00] = _ESCAPE
    return table


@functools.cache
def _byte_table() -> np.ndarray:
    """Class bits of ASCII bytes, and 0xFF (never UTF-8, levels_batch's separator) an escape."""
    table = _class_table()[:256].copy()
    table[0xFF] = _ESCAPE
    return table


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximal True runs of a bool array as [starts, ends) index arrays."""
    edges = np.flatnonzero(np.diff(mask, prepend=False, append=False))
    return edges[0::2], edges[1::2]


def _steps(origin: np.ndarray, length: np.ndarray, step: int) -> np.ndarray:
    """origin + step*j for every j >= 1 with |step*j| < length, per run."""
    count = (length - 1) // abs(step)
    total = int(count.sum())
    if total == 0:
        return origin[:0]
    before = np.cumsum(count) - count
    j = np.arange(1, total + 1) - np.repeat(before, count)
    return np.repeat(origin, count) + step * j


class _Text:
    """Class arrays of one decoded text, shared by all stages. Each rule returns the codepoint
    indices where the official pattern's matches start (or end), duplicates allowed."""

    def __init__(self, bits: np.ndarray):
        self.n = len(bits)
        self.bits = bits
        self.space = (bits & _SPACE) != 0
        self.newline = (bits & _NEWLINE) != 0
        self.escape = (bits & _ESCAPE) != 0
        self.escapes = np.flatnonzero(self.escape)  # text separators: few, so kept as indices
        self.has_escape = len(self.escapes) > 0
        self.other = (bits & (_SPACE | _LETTER | _NUMBER | _ESCAPE)) == 0  # [^\s\p{L}\p{N}]

    def chunks(self, runs: tuple[np.ndarray, np.ndarray], size: int, lead: bool = True):
        """Starts of size-long chunks counted from each run's start; lead=False drops the first
        chunk's start where a space before the run starts that match instead (` ?` in pretok)."""
        s, e = runs
        first = s if lead else s[(s == 0) | (self.bits[s - 1] & _BLANK == 0)]
        return np.concatenate([first, _steps(s, e - s, size)])

    @functools.cached_property
    def other_runs(self) -> tuple[np.ndarray, np.ndarray]:
        return _runs(self.other)

    @functools.cached_property
    def number_runs(self) -> tuple[np.ndarray, np.ndarray]:
        return _runs((self.bits & _NUMBER) != 0)

    @functools.cached_property
    def space_runs(self) -> tuple[np.ndarray, np.ndarray]:
        return _runs(self.space)

    @functools.cached_property
    def newline_runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r"""For whitespace runs holding a \r or \n: (run number, first free char, last newline).
        The first free char is the run start, unless a punctuation run just before absorbed the
        run's leading newlines (`[^\s\p{L}\p{N}]{1,3}[\r\n]*`); the last newline is -1 when
        all of them were absorbed."""
        s, _ = self.space_runs
        nl_s, nl_e = _runs(self.newline)
        run = np.searchsorted(s, nl_s, "right") - 1  # the whitespace run holding each
        final = np.ones(len(run), bool)  # the last newline run of its whitespace run
        final[:-1] = run[1:] != run[:-1]
        run, last = run[final], nl_e[final] - 1
        free = s[run]
        absorbs = (free > 0) & self.newline[free]
        absorbs[absorbs] = self.other[free[absorbs] - 1]
        free[absorbs] = nl_e[np.searchsorted(nl_s, free[absorbs])]
        return run, free, np.where(last >= free, last, -1)

    def newline_starts(self) -> np.ndarray:
        r"""`\s*[\r\n]`: one match at the first free char of a whitespace run holding a newline."""
        _, free, last = self.newline_runs
        return free[last >= 0]

    @functools.cached_property
    def word_start(self) -> np.ndarray:
        r"""`\p{N}{1,3}|(?:[^\s\p{L}\p{N}]{1,3}[\r\n]*)|\s*[\r\n]`, match starts."""
        return np.concatenate(
            [
                self.chunks(self.number_runs, 3),
                self.chunks(self.other_runs, 3),
                self.newline_starts(),
            ]
        )

    @functools.cached_property
    def tokens(self) -> tuple[np.ndarray, np.ndarray]:
        r"""`\S+?\s` tokens: (index of the whitespace char ending each, its index in its chain).
        A token is a non-space run plus the one whitespace char after it; back-to-back tokens
        form a chain."""
        b, e = self.space_runs
        a = np.concatenate([[0], e[:-1]])[: len(b)]  # non-space runs sit between whitespace runs
        if self.has_escape:  # ... and start after the last escape before their whitespace
            k = np.searchsorted(self.escapes, b) - 1
            a = np.maximum(a, np.where(k >= 0, self.escapes[k] + 1, 0))
        token = a < b
        a, b = a[token], b[token]
        chain = np.ones(len(a), bool)
        chain[1:] = a[1:] != b[:-1] + 1
        t = np.arange(len(a))
        return b, t - np.maximum.accumulate(np.where(chain, t, 0))

    def word_end(self, group: int, moduli: tuple[int, ...]) -> np.ndarray:
        r"""`(\S+?\s){N}`, last char of each kept match: chains are cut into groups of N from
        their start; a tail shorter than N matches nothing."""
        b, k = self.tokens
        ends = b[(k + 1) % group == 0] if group > 1 else b
        if moduli != (1,):
            n = np.arange(len(ends))
            if self.has_escape:  # the match counter restarts in every text run
                seg = np.searchsorted(self.escapes, ends)
                n = n - np.searchsorted(seg, seg)
            ends = ends[np.any([n % m == 0 for m in moduli], axis=0)]
        return ends

    def pretok(self) -> np.ndarray:
        r"""`( ?\p{L}{1,16})|\p{N}{1,3}| ?([^\s\p{L}\p{N}]){1,3}+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+`.
        A space right before a letter or punctuation run starts that run's first match; a
        whitespace run gets a match at its first free char, after its last newline, and (unless
        it ends its text) on its last char when 2+ chars are left after the newline."""
        s, e = self.space_runs
        run, free, last = self.newline_runs
        s, rest = s.copy(), s.copy()
        s[run] = free
        rest[run] = np.where(last >= 0, last + 1, free)
        keep = s < e
        s, e, rest = s[keep], e[keep], rest[keep]
        at_end = e >= self.n
        at_end[~at_end] = self.escape[e[~at_end]]
        tail = (e - rest >= 2) & ~at_end
        return np.concatenate(
            [
                self.chunks(_runs((self.bits & _LETTER) != 0), 16, lead=False),
                self.chunks(self.other_runs, 3, lead=False),
                self.chunks(self.number_runs, 3),
                s,
                rest[rest < e],
                e[tail] - 1,
            ]
        )

    def punct(self) -> np.ndarray:
        r"""`\d{1,3}(?=(\d{3})+(?!\d))|\d{1,3}(?=\D|$)|([^\s\p{L}\p{N}]){1,3}+[\r\n]*|\s*[\r\n]`:
        digit runs are cut in threes from the right, the first chunk taking the remainder."""
        s, e = _runs((self.bits & _DIGIT) != 0)
        return np.concatenate(
            [s, _steps(e, e - s, -3), self.chunks(self.other_runs, 3), self.newline_starts()]
        )

    def custom(self, text: str, start: regex.Pattern | None, end: regex.Pattern | None):
        """Plain finditer per text run (runs are cut at undecodable bytes)."""
        hits = []
        for run in regex.finditer(r"[^\udc80-\udcff]+", text):
            piece, base = run.group(), run.start()
            found = [m.start() for m in start.finditer(piece)] if start else []
            found += [m.end() - 1 for m in end.finditer(piece)] if end else []
            hits += [base + h for h in found if 0 <= h < len(piece)]  # empty end matches: none
        return np.array(hits, np.int64)


class Splitter:
    """Level arrays for one strategy mapping: ``Splitter({"word1": "1@1", "word2": "2@1"})``."""

    def __init__(self, strategy: dict[str, str]):
        if not isinstance(strategy, dict) or not strategy:
            raise ValueError(
                f"strategy: expected a non-empty dict of key -> 'N@M', got {strategy!r}"
            )
        for key in strategy:
            if not isinstance(key, str):
                raise ValueError(f"strategy key {key!r}: keys must be strings")
        stages = []
        for key, value in strategy.items():  # a loop, so warnings point at the caller
            stages.append(_parse_stage(key, value))
        self.stages = tuple(stages)

    @property
    def num_stages(self) -> int:
        """Pooling stages this mapping defines; levels run from 0 to this number."""
        return len(self.stages)

    @property
    def prefix_stable(self) -> bool:
        """True for word, script and entropy mappings: prefix-stable (word and script up to the
        whitespace-before-newline case)."""
        return all(s.kind in ("word", "script", "entropy") for s in self.stages)

    def stream(self) -> LevelStream:  # noqa: F821  (aunet/splitstream.py imports this module)
        """Levels of bytes appended one at a time, as generation gives them: each byte's level
        on the prefix ending there, O(1) per byte for word and script stages (aunet/splitstream.py).
        """
        from aunet.splitstream import LevelStream

        return LevelStream(self)

    def levels(self, data: bytes) -> np.ndarray:
        """Level of each byte of ``data`` (uint8, shape (T,)); no BOS/EOS, position 0 not forced."""
        if isinstance(data, str):
            raise TypeError("Splitter.levels takes bytes; encode the text as UTF-8 first")
        data = bytes(data)
        if not data:
            return np.zeros(0, np.uint8)
        return self._levels(data, data.isascii())

    def levels_batch(self, data: bytes, lengths: np.ndarray) -> np.ndarray:
        """Levels of many documents in one pass: ``data`` is the documents concatenated,
        ``lengths`` (int, shape (D,)) their byte counts summing to ``len(data)``; returns uint8,
        shape (len(data),), equal to ``np.concatenate([self.levels(doc) for doc in docs])``.

        Why: at 1-8 KB per document the fixed cost of a call (decoding, the class lookup, some
        forty small numpy operations) outweighs the per-byte work, so preprocessing splits a whole
        block of documents at once. The documents are joined with a 0xFF byte between
        neighbours: 0xFF is never UTF-8, so it decodes to an escape, and an escape already ends
        a text for every rule (module docstring): character runs, word chains, the ``@M`` match
        counter, pretok's end of text and a custom strategy's finditer all restart there, and a
        document that ends mid-codepoint cannot combine with its neighbour's bytes. The
        separators' levels are then dropped. So every strategy, custom ones included, is batched
        exactly; none falls back to per-document calls. Documents go through in groups of about
        256 KB: temporaries of a few MB each cost more in fresh pages than in work (measured:
        ~60 MB/s for 1 MB at once, ~120 MB/s in 256 KB groups, tests/benchmarks/splitting.py).
        A document of 32 KB or more is a call of its own: the separators would cost it more
        than one call's overhead.
        """
        if isinstance(data, str):
            raise TypeError("Splitter.levels_batch takes bytes; encode the text as UTF-8 first")
        raw = np.frombuffer(data, np.uint8)
        lengths = np.asarray(lengths)
        if (
            lengths.ndim != 1
            or lengths.dtype.kind not in "iu"
            or (len(lengths) and lengths.min() < 0)
            or int(lengths.sum()) != len(raw)
        ):
            raise ValueError(
                f"Splitter.levels_batch: lengths must be a 1-D array of non-negative integers "
                f"summing to len(data)={len(raw)}; got shape {lengths.shape}, dtype "
                f"{lengths.dtype}, sum {lengths.sum() if lengths.size else 0}"
            )
        starts = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=starts[1:])
        first = np.diff(starts[:-1] // _GROUP_BYTES, prepend=-1) != 0  # first of each group
        alone = lengths >= _GROUP_BYTES // 8  # long documents: one call each is cheaper
        first |= alone
        first[1:] |= alone[:-1]
        bounds = np.append(np.flatnonzero(first), len(lengths)).tolist()
        out = np.zeros(len(raw), np.uint8)
        for a, b in zip(bounds[:-1], bounds[1:]):
            lo, hi = starts[a], starts[b]
            if hi == lo:
                continue
            if b - a == 1:
                out[lo:hi] = self._levels(raw[lo:hi].tobytes(), not (raw[lo:hi] >= 0x80).any())
                continue
            cuts = starts[a + 1 : b] - lo
            joined = np.insert(raw[lo:hi], cuts, np.uint8(0xFF))
            level = self._levels(joined.tobytes(), not (raw[lo:hi] >= 0x80).any())
            out[lo:hi] = np.delete(level, cuts + np.arange(len(cuts)))
        return out

    def _levels(self, data: bytes, ascii_only: bool) -> np.ndarray:
        """``levels`` of non-empty bytes; ``ascii_only``: no byte >= 0x80 but levels_batch's
        0xFF separators, so one byte is one codepoint."""
        raw = np.frombuffer(data, np.uint8)
        text = family = None
        if ascii_only:
            bits = _byte_table()[raw]
        else:  # numpy copies codepoints, escapes included (encode(surrogatepass) is ~100x slower)
            text = data.decode("utf-8", "surrogateescape")
            cps = np.array(text).reshape(1).view(np.uint32)
            if len(cps) != len(text):
                cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
            bits = _class_table()[cps]
        t = _Text(bits)
        level = np.zeros(t.n, np.uint8)
        for i, stage in enumerate(self.stages):
            if stage.kind == "entropy":
                continue  # on bytes, below
            if stage.kind in ("word", "script"):
                where = np.concatenate([t.word_start, t.word_end(stage.group, stage.moduli)])
                if stage.kind == "script" and not ascii_only:
                    family = family_table()[cps] if family is None else family
                    where = np.concatenate([where, chunk_starts(family, stage.chars)])
            elif stage.kind in ("pretok", "punct"):
                where = getattr(t, stage.kind)()
            else:
                if text is None:
                    text = data.decode("utf-8", "surrogateescape")
                where = t.custom(text, *stage.patterns)
            level[where] = i + 1  # later stages overwrite: the level is the max stage index + 1
        if ascii_only:
            return self._entropy_levels(level, raw, ~t.escape)
        # A codepoint ends where no continuation byte (10xxxxxx) follows. That holds for every
        # codepoint iff it yields one end per codepoint: an escaped byte of a broken sequence
        # (or a stray continuation byte) would share its end with a neighbour.
        last = np.flatnonzero(np.append((raw[1:] & 0xC0) != 0x80, True))
        if len(last) != t.n:  # an escape stands for one byte
            cps = cps.astype(np.int64)
            width = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000) - 2 * t.escape
            last = np.cumsum(width) - 1
        out = np.zeros(len(data), np.uint8)
        out[last] = level
        if any(s.entropy for s in self.stages):
            ends = np.zeros(len(data), bool)
            ends[last[~t.escape]] = True
            out = self._entropy_levels(out, raw, ends)
        return out

    def _entropy_levels(self, out: np.ndarray, raw: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Raise ``out`` (per byte) to i + 1 where entropy stage i has a boundary; ``ends``: the
        last bytes of valid codepoints (bool, shape (len(raw),))."""
        for i, stage in enumerate(self.stages):
            if stage.entropy is not None:
                where = stage_where(stage.entropy, raw, ends)
                out[where] = np.maximum(out[where], i + 1)
        return out
