"""Per-request decoding for a server: continuous batching over one ``Generator``.

A server batches unrelated requests, so every row carries its own settings (``Sampling``) and its
own random generator, samples from its own logits only, and is released byte by byte. Rows join
a running generation between two steps (``Decoder.add``: their prompts are prefilled and their
caches appended) and leave it when they finish (``Generator.keep``), so a finished row's slot
goes to the next request at once instead of idling until the whole batch ends
(docs/serving.md, Batching). A row's bytes equal ``generate(model, prompt, **its settings)``
whatever else shares the batch and whenever it joined: rows never read each other's state.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from aunet.config import check_tokenizer
from aunet.generate import (
    ByteRow,
    Generator,
    TokenRow,
    TokenVocab,
    check_sampling,
    sample_next,
    stack_allowed,
)
from aunet.model import AUNet

if TYPE_CHECKING:
    from aunet.tokenizer import BPETokenizer


@dataclass(frozen=True)
class Sampling:
    """One row's generation settings, as ``generate`` takes them (checked by ``check``)."""

    max_new_bytes: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop: bytes | None = None
    seed: int | None = None
    ignore_eos: bool = False

    def check(self) -> None:
        """Raise ValueError naming the bad setting."""
        check_sampling(self.max_new_bytes, self.temperature, self.top_k, self.top_p)
        if self.stop is not None and (
            not isinstance(self.stop, (bytes, bytearray)) or not self.stop
        ):
            raise ValueError(f"stop: expected non-empty bytes or None, got {self.stop!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f"seed: expected an int or None, got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos: expected true or false, got {self.ignore_eos!r}")


def _held(out: bytearray, stop: bytes | None) -> int:
    """Bytes at the end of ``out`` that may begin ``stop``: not released until resolved."""
    if not stop:
        return 0
    for k in range(min(len(stop) - 1, len(out)), 0, -1):
        if out.endswith(stop[:k]):
            return k
    return 0


class _Live:
    """One running request: its key, settings, RNG, row bookkeeping and bytes released so far."""

    def __init__(self, key: Hashable, row: ByteRow | TokenRow, s: Sampling, dev: torch.device):
        self.key, self.row, self.s, self.sent = key, row, s, 0
        self.rng = torch.Generator(device=dev)
        self.rng.manual_seed(s.seed) if s.seed is not None else self.rng.seed()


class Decoder:
    """Continuous batching: ``add`` requests at any time, ``step`` all of them one id.

    ``step`` returns, for every request running or just added, ``(bytes released, finished)``;
    a finished request has left the batch. Bytes that could begin a request's ``stop`` are held
    back until resolved. A BPE model needs its ``tokenizer`` (rows are ``TokenRow``s).
    """

    def __init__(self, model: AUNet, tokenizer: BPETokenizer | None = None) -> None:
        check_tokenizer(model.config, tokenizer, "Decoder: tokenizer")
        self.model = model
        self.vocab = TokenVocab.of(tokenizer) if tokenizer is not None else None
        self.dev = model.tok_embeddings.weight.device
        self.gen = Generator(model)
        self.live: list[_Live] = []  # in Generator row order
        self.logits: torch.Tensor | None = None  # (len(live), V): each row's next-id logits
        self.empty: list[Hashable] = []  # added with max_new_bytes 0: finished at the next step

    def __len__(self) -> int:
        return len(self.live) + len(self.empty)

    def add(self, prompts: Sequence[bytes], settings: Sequence[Sampling], keys: Sequence) -> None:
        """Join requests to the running generation (one prefill for all of them)."""
        if not len(prompts) == len(settings) == len(keys):
            raise ValueError(
                f"Decoder.add: {len(prompts)} prompts, {len(settings)} settings, {len(keys)} keys"
            )
        for s in settings:
            s.check()
        new = []
        for p, s, key in zip(prompts, settings, keys):
            if s.max_new_bytes == 0:
                self.empty.append(key)
                continue
            row = (
                ByteRow(bytes(p), s.max_new_bytes, s.stop, s.ignore_eos)
                if self.vocab is None
                else TokenRow(self.vocab, bytes(p), s.max_new_bytes, s.stop, s.ignore_eos)
            )
            new.append(_Live(key, row, s, self.dev))
        if not new:
            return
        logits = self.gen.add([x.row.context for x in new], max(x.row.steps for x in new))
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        self.live += new

    def drop(self, keys: Sequence[Hashable]) -> None:
        """Remove requests before they finish (a client went away)."""
        gone = set(keys)
        self.empty = [k for k in self.empty if k not in gone]
        self._keep([j for j, x in enumerate(self.live) if x.key not in gone])

    def _keep(self, rows: list[int]) -> None:
        if len(rows) == len(self.live):
            return
        self.gen.keep(rows)
        self.live = [self.live[j] for j in rows]
        self.logits = self.logits[rows] if rows else None

    def _sample(self) -> list[int]:
        """One id per live row, each from its own logits with its own generator. Rows with the
        same settings share the batched part (masking, top-k/p, softmax; only the random draw is
        per row): the ids ``sample_next`` gives each row alone."""
        groups: dict[tuple, list[int]] = {}
        for j, x in enumerate(self.live):
            groups.setdefault((x.s.temperature, x.s.top_k, x.s.top_p), []).append(j)
        ids = [0] * len(self.live)
        for (temperature, top_k, top_p), rows in groups.items():
            mask = stack_allowed([self.live[j].row.allowed() for j in rows])
            logits = self.logits[rows] if len(rows) < len(self.live) else self.logits
            rngs = [self.live[j].rng for j in rows]
            got = sample_next(logits, temperature, top_k, top_p, rngs, mask).tolist()
            for j, t in zip(rows, got):
                ids[j] = int(t)
        return ids

    def step(self) -> dict[Hashable, tuple[bytes, bool]]:
        """Sample one id per running request, release its bytes, drop the finished, and run one
        decode step for the rest."""
        out: dict[Hashable, tuple[bytes, bool]] = {k: (b"", True) for k in self.empty}
        self.empty = []
        ids = self._sample()
        keep, fed = [], []
        for j, (x, t) in enumerate(zip(self.live, ids)):
            done = x.row.feed(t)
            out_b = x.row.out
            end = len(out_b) if done else len(out_b) - _held(out_b, x.s.stop)
            out[x.key] = (bytes(out_b[x.sent : end]), done)
            x.sent = end
            if not done:
                keep.append(j)
                fed.append(t)
        self._keep(keep)
        if fed:
            self.logits = self.gen.step(fed)
        return out


def decode_rows(
    model: AUNet,
    prompts: Sequence[bytes],
    settings: Sequence[Sampling],
    tokenizer: BPETokenizer | None = None,
) -> Iterator[list[bytes | None]]:
    """One batched generation of fixed rows (``Decoder`` without joining).

    Each ``next()`` runs one decode step and gives, per row, the bytes it releases on that step
    (b"" while a possible ``stop`` prefix is held back), then None on every step after the row
    finished. A row's bytes joined equal ``generate(model, prompt, **its settings)``.
    """
    n = len(prompts)
    if len(settings) != n:
        raise ValueError(f"decode_rows: {len(settings)} settings for {n} prompts")
    dec = Decoder(model, tokenizer)
    dec.add(prompts, settings, list(range(n)))
    while len(dec):
        chunks: list[bytes | None] = [None] * n
        for b, (chunk, _) in dec.step().items():
            chunks[b] = chunk
        yield chunks
