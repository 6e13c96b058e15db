r"""Incremental levels for generation: ``Splitter.stream()`` (docs/design.md, Generation:
incremental levels).

Generation gives each new byte ``splitter.levels(prefix)[-1]``, the prefix ending at that byte
(docs/design.md, Prefix stability). Re-splitting the whole prefix per byte is quadratic in the
generated length. ``LevelStream.push`` returns exactly those levels in O(1) per byte for word and
script stages by keeping, per codepoint, the state the rules of aunet/splitting.py read:

- ``\p{N}{1,3}`` and ``[^\s\p{L}\p{N}]{1,3}``: the position in the current number / other run
  (a boundary on every third character from the run start);
- ``\s*[\r\n]``: a newline whose previous character is neither whitespace nor punctuation (a
  punctuation match absorbs the newlines after it; a newline later in a whitespace run marks
  the run's first character, never itself);
- ``(\S+?\s){N}``: a whitespace character right after a non-space, non-escape character ends a
  token; tokens separated by exactly one whitespace character form a chain, and a match ends on
  every N-th token of a chain; for the exact keys ``word`` / ``script`` the kept match counter
  (mod M) restarts at every undecodable byte;
- script families: the family of the current run and the base characters seen in it;
- UTF-8: the pending bytes of an unfinished codepoint. A prefix that ends inside a codepoint
  decodes those bytes as escapes, whose level is 0; once the codepoint completes, its level goes
  to its last byte, and a sequence that turns out invalid feeds its bytes as escapes.

Any other stage kind (custom patterns, or kinds added later) is exact by re-splitting: the last
``stage.lookback`` bytes when the stage declares that integer (the bytes of context that decide
the last byte's level), else the whole prefix.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np

from aunet.scripts import _MARK, family_table
from aunet.splitting import (
    _ESCAPE,
    _LETTER,
    _NEWLINE,
    _NUMBER,
    _SPACE,
    _class_table,
)

if TYPE_CHECKING:
    from aunet.splitting import Splitter

_STATEFUL = ("word", "script")
_OTHER_MASK = _SPACE | _LETTER | _NUMBER | _ESCAPE


def _utf8_need(lead: int) -> tuple[int, int, int]:
    """(continuation bytes, low, high bound of the first one) for a lead byte; need 0: ASCII,
    -1: never a lead (the decoder escapes it)."""
    if lead < 0x80:
        return 0, 0, 0
    if 0xC2 <= lead <= 0xDF:
        return 1, 0x80, 0xBF
    if lead == 0xE0:
        return 2, 0xA0, 0xBF
    if lead == 0xED:
        return 2, 0x80, 0x9F  # no surrogates
    if 0xE1 <= lead <= 0xEF:
        return 2, 0x80, 0xBF
    if lead == 0xF0:
        return 3, 0x90, 0xBF
    if 0xF1 <= lead <= 0xF3:
        return 3, 0x80, 0xBF
    if lead == 0xF4:
        return 3, 0x80, 0x8F  # <= U+10FFFF
    return -1, 0, 0


class _WordState:
    """The per-stage counters of one word or script stage."""

    __slots__ = ("group", "moduli", "chars", "matches", "fam", "base")

    def __init__(self, group: int, moduli: tuple[int, ...], chars: tuple[int, ...]):
        self.group, self.moduli, self.chars = group, moduli, chars
        self.matches = 0  # kept (\S+?\s){N} matches since the last escape
        self.fam = 0  # script family of the current run (0: none)
        self.base = 0  # base characters seen in that run


class LevelStream:
    """Levels of bytes appended one push at a time; see the module docstring.

    ``push(data)`` -> uint8 levels of the new bytes (shape (len(data),)), each equal to
    ``splitter.levels(everything pushed so far up to that byte)[-1]``.
    """

    def __init__(self, splitter: Splitter) -> None:
        self.splitter = splitter
        self.text = bytearray()  # kept only for re-split stages
        # re-split stages: (stage index, a Splitter of that stage alone, lookback or None)
        self._resplit: list[tuple[int, Splitter, int | None]] = []
        self._word: list[tuple[int, _WordState]] = []
        for i, stage in enumerate(splitter.stages):
            if stage.kind in _STATEFUL:
                self._word.append((i, _WordState(stage.group, stage.moduli, stage.chars)))
            else:
                one = copy.copy(splitter)
                one.stages = (stage,)
                lookback = getattr(stage, "lookback", None)
                lookback = lookback if isinstance(lookback, int) and lookback > 0 else None
                self._resplit.append((i, one, lookback))
        self._classes = _class_table()
        self._families = family_table() if any(s.chars for _, s in self._word) else None
        self._pending: list[int] = []  # bytes of an unfinished codepoint
        self._need = 0  # continuation bytes it still needs
        self._lo, self._hi = 0x80, 0xBF  # bounds of its next continuation byte
        self._prev = -1  # class bits of the previous codepoint (-1: none yet)
        self._num = 0  # position in the current \p{N} run
        self._other = 0  # position in the current [^\s\p{L}\p{N}] run
        self._space_len = 0  # length of the current whitespace run
        self._run_token = False  # the current whitespace run started by ending a token
        self._chain = -1  # index in its chain of the latest token
        self._cont = False  # the non-space run being read continues that chain

    def push(self, data: bytes) -> np.ndarray:
        """Levels of ``data``'s bytes (uint8, shape (len(data),)), appended to the stream."""
        out = np.zeros(len(data), np.uint8)
        for k, b in enumerate(bytes(data)):
            out[k] = self.push_byte(b)
        return out

    def push_byte(self, b: int) -> int:
        """Level of one more byte (0..255), appended to the stream (a decode step's per-row
        call: no array)."""
        if not self._word:
            self.text.append(b)
            return self._resplit_level(0)
        level = self._byte(b)
        if self._resplit:
            self.text.append(b)
            level = self._resplit_level(level)
        return level

    def _resplit_level(self, level: int) -> int:
        for i, one, lookback in self._resplit:
            if i + 1 > level:
                tail = bytes(self.text[-lookback:] if lookback else self.text)
                if one.levels(tail)[-1]:
                    level = i + 1
        return level

    def _byte(self, b: int) -> int:
        """Level of one more byte from the word/script stages."""
        if self._pending:
            if self._lo <= b <= self._hi:
                self._pending.append(b)
                self._need -= 1
                self._lo, self._hi = 0x80, 0xBF
                if self._need:
                    return 0  # still unfinished: an escape at the end of the prefix
                cp = bytes(self._pending).decode("utf-8")
                self._pending = []
                return self._codepoint(ord(cp))
            for e in self._pending:  # an invalid sequence: its bytes are escapes
                self._codepoint(0xDC00 + e)
            self._pending = []
        need, lo, hi = _utf8_need(b)
        if need == 0:
            return self._codepoint(b)
        if need < 0:
            return self._codepoint(0xDC00 + b)
        self._pending, self._need, self._lo, self._hi = [b], need, lo, hi
        return 0

    def _codepoint(self, cp: int) -> int:
        """Advance the rules by one codepoint (escapes as U+DC80..U+DCFF) -> its level."""
        c = int(self._classes[cp])
        prev = self._prev
        prev_space = prev >= 0 and prev & _SPACE != 0
        prev_other = prev >= 0 and prev & _OTHER_MASK == 0
        start = False  # a match of the shared word-start rules starts here
        if c & _NUMBER:
            self._num = self._num + 1 if prev >= 0 and prev & _NUMBER else 0
            start = self._num % 3 == 0
        if c & _OTHER_MASK == 0:
            self._other = self._other + 1 if prev_other else 0
            start = start or self._other % 3 == 0
        if c & _NEWLINE and not prev_space and not prev_other:
            start = True
        token = -1  # chain index of the token this whitespace char ends
        if c & _SPACE:
            if prev >= 0 and not prev_space and not prev & _ESCAPE:
                self._chain = self._chain + 1 if self._cont else 0
                token, self._run_token = self._chain, True
            elif not prev_space:
                self._run_token = False
            self._space_len = self._space_len + 1 if prev_space else 1
        else:
            if prev_space:
                self._cont = self._run_token and self._space_len == 1
            if c & _ESCAPE:
                self._cont = False
        fam = int(self._families[cp]) if self._families is not None else 0
        level = 0
        for i, st in self._word:
            hit = start
            if token >= 0 and (token + 1) % st.group == 0:
                hit = hit or any(st.matches % m == 0 for m in st.moduli)
                st.matches += 1
            if c & _ESCAPE:
                st.matches = 0
            if st.chars:
                fid = fam & ~_MARK
                if fid != st.fam:
                    st.fam, st.base = fid, 0
                if fid and not fam & _MARK:
                    size = st.chars[fid - 1]
                    hit = hit or (size > 0 and st.base % size == 0)
                    st.base += 1
            if hit:
                level = i + 1
        self._prev = c
        return level
