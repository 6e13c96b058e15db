"""Documents to fixed-length training windows, with the official packer's semantics (spec §2.7).

A document becomes ``[BOS] + bytes + [EOS]`` with its level mask. BOS gets the top level ``K`` in
every document (spec §11: the official code uses "max level present", which leaks across documents
through the deep stages and crashes on documents without boundaries); EOS gets level 0.

Documents are concatenated in stream order and cut into windows of ``T + 1`` tokens that overlap by
one: window ``k`` covers stream positions ``[k*T, k*T + T]``, so window ``k+1``'s first input is
window ``k``'s last target and no byte is lost between windows. Inputs are ``window[:-1]``, targets
``window[1:]``. Only the tail that cannot fill a last window is dropped (reported by ``finish``).

Pure numpy: used by the Ray preprocessing pipeline, the single-process benchmark loop and tests.
"""

from __future__ import annotations

import numpy as np

from aunet.config import BOS_ID, EOS_ID

TOKEN_DTYPE = np.uint16  # ids 0..257 do not fit in a byte
LEVEL_DTYPE = np.uint8


def encode_document(
    data: bytes, levels: np.ndarray, top_level: int
) -> tuple[np.ndarray, np.ndarray]:
    """Bytes + their Splitter levels -> (tokens [L+2] uint16, levels [L+2] uint8) with BOS/EOS.

    BOS is forced to ``top_level`` (K, the number of strategy entries), EOS to 0.
    """
    if len(levels) != len(data):
        raise ValueError(f"levels has {len(levels)} entries for {len(data)} bytes")
    n = len(data)
    tokens = np.empty(n + 2, dtype=TOKEN_DTYPE)
    tokens[0] = BOS_ID
    tokens[1:-1] = np.frombuffer(data, dtype=np.uint8)
    tokens[-1] = EOS_ID
    lev = np.empty(n + 2, dtype=LEVEL_DTYPE)
    lev[0] = top_level
    lev[1:-1] = levels
    lev[-1] = 0
    return tokens, lev


def encode_documents(
    data: np.ndarray, levels: np.ndarray, lengths: np.ndarray, top_level: int
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated documents -> their concatenated ``encode_document`` outputs.

    ``data`` / ``levels``: uint8 [N], the documents' bytes and Splitter levels back to back;
    ``lengths``: [n] byte counts summing to N. Returns (tokens [N + 2n] uint16, levels [N + 2n]
    uint8). Lets a producer ship bytes + levels (2 bytes per text byte) and the consumer add
    BOS/EOS, instead of shipping uint16 tokens (3 bytes per text byte).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(data) != len(levels) or int(lengths.sum()) != len(data) or (lengths < 0).any():
        raise ValueError(
            f"{len(data)} bytes, {len(levels)} levels, document lengths summing to {lengths.sum()}"
        )
    tokens = np.empty(len(data) + 2 * len(lengths), dtype=TOKEN_DTYPE)
    lev = np.empty(len(tokens), dtype=LEVEL_DTYPE)
    src = dst = 0
    for n in lengths.tolist():  # one slice copy per document: ~1 us each, memcpy-bound
        tokens[dst], lev[dst] = BOS_ID, top_level
        tokens[dst + 1 : dst + 1 + n] = data[src : src + n]
        lev[dst + 1 : dst + 1 + n] = levels[src : src + n]
        tokens[dst + 1 + n], lev[dst + 1 + n] = EOS_ID, 0
        src, dst = src + n, dst + n + 2
    return tokens, lev


class Packer:
    """Concatenates documents and cuts the stream into chunks of ``chunk`` windows of ``T+1``.

    A chunk is the contiguous stream slice ``[k*T*chunk, (k+1)*T*chunk + 1)``: ``chunk*T + 1``
    tokens holding ``chunk`` windows that overlap by one (``windows`` materialises them). Shipping
    slices instead of windows keeps the copy, and the ``T+1``-for-``T`` blow-up, out of the caller.
    The carried remainder always starts with the last token of the previous chunk.
    """

    def __init__(self, seq_len: int, chunk: int = 1):
        if seq_len < 1 or chunk < 1:
            raise ValueError(f"seq_len and chunk must be >= 1, got {seq_len}, {chunk}")
        self.seq_len, self.chunk = seq_len, chunk
        self._tok: list[np.ndarray] = []
        self._lev: list[np.ndarray] = []
        self._buffered = 0
        self.tokens_in = 0  # every token handed to add()
        self.windows_out = 0

    def add(self, tokens: np.ndarray, levels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Append a token run (documents, concatenated); return the chunks it completed."""
        if len(tokens) != len(levels):
            raise ValueError(f"{len(tokens)} tokens but {len(levels)} levels")
        self._tok.append(np.asarray(tokens, dtype=TOKEN_DTYPE))
        self._lev.append(np.asarray(levels, dtype=LEVEL_DTYPE))
        self._buffered += len(tokens)
        self.tokens_in += len(tokens)
        size = self.chunk * self.seq_len
        if self._buffered < size + 1:
            return []
        tok, lev = self._joined()
        n = (len(tok) - 1) // size
        out = [
            (tok[i * size : (i + 1) * size + 1], lev[i * size : (i + 1) * size + 1])
            for i in range(n)
        ]
        self._keep(tok[n * size :], lev[n * size :])
        self.windows_out += n * self.chunk
        return out

    def finish(self) -> tuple[tuple[np.ndarray, np.ndarray] | None, int]:
        """Flush: (last chunk with the remaining whole windows or None, tokens dropped).

        Conservation: ``tokens_in == windows_out * T + 1 + dropped`` once any window was emitted
        (the +1 is the very first input, nobody's target), else ``dropped == tokens_in``.
        """
        last = None
        if self._buffered:
            tok, lev = self._joined()
            n = (len(tok) - 1) // self.seq_len
            if n:
                last = (tok[: n * self.seq_len + 1], lev[: n * self.seq_len + 1])
                self.windows_out += n
        dropped = self.tokens_in - (self.windows_out * self.seq_len + 1 if self.windows_out else 0)
        self._keep(np.zeros(0, TOKEN_DTYPE), np.zeros(0, LEVEL_DTYPE))
        return last, dropped

    def _joined(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self._tok) == 1:
            return self._tok[0], self._lev[0]
        return np.concatenate(self._tok), np.concatenate(self._lev)

    def _keep(self, tok: np.ndarray, lev: np.ndarray) -> None:
        self._tok, self._lev, self._buffered = [tok.copy()], [lev.copy()], len(tok)


def windows(tokens: np.ndarray, levels: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """A stream slice of ``n*T + 1`` tokens -> its ``n`` windows, (tokens, levels) [n, T+1]."""
    n, rest = divmod(len(tokens) - 1, seq_len)
    if rest or len(levels) != len(tokens):
        raise ValueError(f"a stream slice of {len(tokens)} tokens is not n*{seq_len} + 1")
    view = np.lib.stride_tricks.sliding_window_view
    return (
        view(tokens, seq_len + 1)[::seq_len].copy(),
        view(levels, seq_len + 1)[::seq_len].copy(),
    )


def split_point_counts(levels: np.ndarray, num_stages: int) -> np.ndarray:
    """Positions that start a token at each pooling stage: ``counts[s-1] = #(levels >= s)``.

    The model reads level ``L`` as a boundary for stages ``1..L`` (spec §2.1), so stage ``s`` keeps
    every byte whose level is at least ``s``. Returns int64 ``[K]``.
    """
    if num_stages == 0:
        return np.zeros(0, dtype=np.int64)
    hist = np.bincount(np.asarray(levels, dtype=np.int64).ravel(), minlength=num_stages + 1)
    hist[num_stages] = hist[num_stages:].sum()  # levels above K count as K (defensive)
    return np.cumsum(hist[: num_stages + 1][::-1])[::-1][1:].astype(np.int64)


def contraction_ratios(num_tokens: int, counts: np.ndarray) -> list[float | None]:
    """Tokens per stage-``s`` position (``num_tokens / counts[s-1]``); None where no split point.

    Multiply a window length by ``1 / ratio`` to size ``max_seqlens[s]``.
    """
    return [float(num_tokens / c) if c else None for c in counts.tolist()]
