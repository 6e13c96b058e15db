"""Documents to fixed-length training windows, with the official packer's semantics.

The format and its reasons: docs/data.md (Packing into windows).

A document becomes ``[BOS] + bytes + [EOS]`` with its level mask. BOS gets the top level ``K`` in
every document (docs/design.md, Where we differ: the official code uses "max level present",
which leaks across documents through the deep stages and crashes on documents without
boundaries); EOS gets level 0.

Documents are concatenated in stream order and cut into windows of ``T + 1`` tokens that overlap by
one: window ``k`` covers stream positions ``[k*T, k*T + T]``, so window ``k+1``'s first input is
window ``k``'s last target and no byte is lost between windows. Inputs are ``window[:-1]``, targets
``window[1:]``. Only the tail that cannot fill a last window is dropped (reported by ``finish``);
the preprocessing pipeline packs each work unit with its own Packer (docs/data.md, Work units).

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


class Packer:
    """Concatenates documents and cuts the stream into chunks of ``chunk`` windows of ``T+1``.

    A chunk is the contiguous stream slice ``[k*T*chunk, (k+1)*T*chunk + 1)``: ``chunk*T + 1``
    tokens holding ``chunk`` windows that overlap by one (``windows`` materialises them). Shipping
    slices instead of windows keeps the copy, and the ``T+1``-for-``T`` blow-up, out of the caller.
    Tokens are written once, into the buffer of the chunk being filled; a full buffer is handed
    out as the chunk (the caller owns it) and the next one starts with its last token.
    """

    def __init__(
        self,
        seq_len: int,
        chunk: int = 1,
        *,
        dtype: type = TOKEN_DTYPE,
        bos_id: int = BOS_ID,
        eos_id: int = EOS_ID,
    ):
        """``dtype``, ``bos_id``, ``eos_id``: the byte vocabulary's by default; a BPE vocabulary
        (aunet/tokenizer.py) packs its ids with its own specials, in uint16 or uint32."""
        if seq_len < 1 or chunk < 1:
            raise ValueError(f"seq_len and chunk must be >= 1, got {seq_len}, {chunk}")
        self.seq_len, self.chunk = seq_len, chunk
        self.dtype, self.bos_id, self.eos_id = dtype, bos_id, eos_id
        self._cap = chunk * seq_len + 1
        self._tok, self._lev, self._fill = self._buffers()
        self.tokens_in = 0  # every token handed to add() / add_documents()
        self.windows_out = 0

    def add(self, tokens: np.ndarray, levels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Append a token run (documents, concatenated); return the chunks it completed."""
        if len(tokens) != len(levels):
            raise ValueError(f"{len(tokens)} tokens but {len(levels)} levels")
        out, i = [], 0
        while i < len(tokens):
            k = min(len(tokens) - i, self._cap - self._fill)
            self._tok[self._fill : self._fill + k] = tokens[i : i + k]
            self._lev[self._fill : self._fill + k] = levels[i : i + k]
            self._fill += k
            i += k
            if self._fill == self._cap:
                out.append(self._emit())
        self.tokens_in += len(tokens)
        return out

    def add_documents(
        self, data: np.ndarray, levels: np.ndarray, lengths: np.ndarray, top_level: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``add`` of each document's ``encode_document`` output, without building them.

        ``data`` / ``levels``: [N], documents' bytes (uint8) or token ids and their levels
        (uint8) back to back;
        ``lengths``: [n] byte counts summing to N. Lets a producer ship bytes + levels (2 bytes
        per text byte) and the packer add BOS/EOS as it copies them into the chunk buffer.
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(data) != len(levels) or int(lengths.sum()) != len(data) or (lengths < 0).any():
            raise ValueError(
                f"{len(data)} bytes, {len(levels)} levels, document lengths summing to "
                f"{lengths.sum()}"
            )
        out, src = [], 0
        for n in lengths.tolist():  # ~1 us of Python per document; the copies are memcpy
            f = self._fill
            if f + n + 2 <= self._cap:  # the common case: the whole document fits
                self._tok[f], self._lev[f] = self.bos_id, top_level
                self._tok[f + 1 : f + 1 + n] = data[src : src + n]
                self._lev[f + 1 : f + 1 + n] = levels[src : src + n]
                self._tok[f + 1 + n], self._lev[f + 1 + n] = self.eos_id, 0
                self._fill += n + 2
                self.tokens_in += n + 2
                if self._fill == self._cap:
                    out.append(self._emit())
            else:  # encode_document's layout, for any id dtype and specials
                tok = np.empty(n + 2, self.dtype)
                lev = np.empty(n + 2, LEVEL_DTYPE)
                tok[0], tok[1:-1], tok[-1] = self.bos_id, data[src : src + n], self.eos_id
                lev[0], lev[1:-1], lev[-1] = top_level, levels[src : src + n], 0
                out += self.add(tok, lev)
            src += n
        return out

    def finish(self) -> tuple[tuple[np.ndarray, np.ndarray] | None, int]:
        """Flush: (last chunk with the remaining whole windows or None, tokens dropped).

        Conservation: ``tokens_in == windows_out * T + 1 + dropped`` once any window was emitted
        (the +1 is the very first input, nobody's target), else ``dropped == tokens_in``.
        """
        last = None
        n = (self._fill - 1) // self.seq_len if self._fill else 0
        if n:
            last = (self._tok[: n * self.seq_len + 1], self._lev[: n * self.seq_len + 1])
            self.windows_out += n
        dropped = self.tokens_in - (self.windows_out * self.seq_len + 1 if self.windows_out else 0)
        self._tok, self._lev, self._fill = self._buffers()
        return last, dropped

    def _buffers(self) -> tuple[np.ndarray, np.ndarray, int]:
        return np.empty(self._cap, self.dtype), np.empty(self._cap, LEVEL_DTYPE), 0

    def _emit(self) -> tuple[np.ndarray, np.ndarray]:
        full = self._tok, self._lev
        self._tok, self._lev, _ = self._buffers()
        self._tok[0], self._lev[0], self._fill = full[0][-1], full[1][-1], 1
        self.windows_out += self.chunk
        return full


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

    The model reads level ``L`` as a boundary for stages ``1..L`` (docs/design.md, Splitting), so
    stage ``s`` keeps every byte whose level is at least ``s``. Returns int64 ``[K]``.
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
