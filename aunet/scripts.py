r"""Script families of the ``script`` split strategy: runs of scripts written without spaces, cut
into chunks of N characters (docs/design.md, Splitting: scripts without spaces).

Why: the word rules find boundaries only at whitespace, punctuation, digits and newlines, so a
Chinese, Japanese or Thai sentence pools as one giant word (the paper names languages without
clear word boundaries as AU-Net's limitation). A ``script`` stage keeps every word rule and adds,
inside each run of one family, a boundary on the first character of every N-character chunk.

A family's characters are the letters and combining marks (``\p{L}``, ``\p{M}``) whose Unicode
Script_Extensions include one of its scripts, read from the ``regex`` module like the classes of
aunet/splitting.py. Extensions rather than Script keep ``ー`` (script Common, extensions Hiragana
and Katakana) inside a katakana word; digits and punctuation are left to the word rules. A
character in two families belongs to the first listed in ``FAMILIES``. Chunks count base
characters (letters) from the run start; a mark never starts a chunk, so a Thai vowel sign is not
split from its consonant by a boundary placed on it.

Prefix-stable: whether a character starts a chunk depends only on the characters before it in
its run. Linear: one pass of run arithmetic per family present.
"""

from __future__ import annotations

import functools

import numpy as np
import regex

FAMILIES = {
    "han": ("Hani",),
    "kana": ("Hira", "Kana"),
    "thai": ("Thai",),
    "lao": ("Laoo",),
    "khmer": ("Khmr",),
    "myanmar": ("Mymr",),
    "tibetan": ("Tibt",),
}
# Starting points, not tuned: Chinese words average about 2 characters, Japanese kana runs
# (inflections, katakana loanwords) and the Southeast Asian scripts' syllables run longer.
DEFAULT_CHARS = {"han": 2, "kana": 3, "thai": 4, "lao": 4, "khmer": 4, "myanmar": 4, "tibetan": 4}
_MARK = 0x80  # family table bit: a combining mark, part of a run but never a chunk start


def parse_chars(key: str, options: list[str]) -> tuple[int, ...]:
    """Chunk size per family, in ``FAMILIES`` order, from ``family=N`` options (0: no chunks)."""
    chars = dict(DEFAULT_CHARS)
    for option in options:
        name, eq, size = option.partition("=")
        if name not in FAMILIES or not eq:
            raise ValueError(
                f"strategy {key!r}: option {option!r} is not 'family=N' with a family in "
                f"{', '.join(FAMILIES)}"
            )
        try:
            chars[name] = int(size)
        except ValueError:
            chars[name] = -1
        if chars[name] < 0:
            raise ValueError(f"strategy {key!r}: option {option!r}: N must be an integer >= 0")
    return tuple(chars[f] for f in FAMILIES)


@functools.cache
def family_table() -> np.ndarray:
    """Per codepoint: 1 + the index of its family in ``FAMILIES`` (0: none), ``_MARK`` on marks."""
    everything = "".join(map(chr, range(0x110000)))

    def mask(pattern: str) -> np.ndarray:
        out = np.zeros(0x110000, bool)
        for m in regex.finditer(pattern + "+", everything):
            out[m.start() : m.end()] = True
        return out

    letter, mark = mask(r"\p{L}"), mask(r"\p{M}")
    table = np.zeros(0x110000, np.uint8)
    for fid, scripts in reversed(list(enumerate(FAMILIES.values(), 1))):  # the first one wins
        inside = mask("[" + "".join(rf"\p{{scx={s}}}" for s in scripts) + "]") & (letter | mark)
        table[inside] = fid
    table[mark & (table > 0)] |= _MARK
    return table


def chunk_starts(family: np.ndarray, chars: tuple[int, ...]) -> np.ndarray:
    """Codepoint indices of chunk starts; ``family``: ``family_table()`` of each codepoint,
    uint8 shape (n,); ``chars``: chunk size per family (``parse_chars``)."""
    found = [np.zeros(0, np.int64)]
    ids = family & ~np.uint8(_MARK)
    for f in np.flatnonzero(np.bincount(ids, minlength=len(chars) + 1)[1:]) + 1:
        size = chars[f - 1]
        if size == 0:
            continue
        inside = ids == f
        starts = np.flatnonzero(inside & ~np.concatenate([[False], inside[:-1]]))
        base = np.flatnonzero(inside & (family < _MARK))
        run = np.searchsorted(starts, base, "right") - 1  # the run of each base character
        rank = np.arange(len(base)) - np.searchsorted(base, starts)[run]  # its place in the run
        found.append(base[rank % size == 0])
    return np.concatenate(found)
