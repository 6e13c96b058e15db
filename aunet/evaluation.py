"""Evaluation with the training forward: bits per byte, multiple-choice log-likelihoods, and
character-level tasks.

Scoring goes through ``AUNet.forward`` (with ``vocab_norm`` and training attention windows), not
through the official generator, whose missing norm and ``w+1`` window shift every number
(docs/design.md, Evaluation).
Every scored sequence starts with BOS at the top level; levels come from the splitter run on the
whole sequence, as in training.

Every function takes ``tokenizer`` (None: a byte model, unchanged). With a BPE model's tokenizer
(docs/design.md, BPE baseline) sequences are ``[BOS] + token ids`` and everything is still
reported per byte: bits/byte = summed token NLL / (ln 2 x document bytes), and a choice or
continuation is scored by the tokens holding its bytes (``choice_token_span``: the junction
rule).

Length: bits/byte, choices, continuations and character tasks share the sequence encoding
(``encode_with_levels`` / ``encode_ids``, ``_token_sequence``) and the batched scorer
(``_token_scores``); each takes the byte and the BPE path side by side so that the two cannot
drift apart.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from aunet.config import BOS_ID, AUNetConfig, check_tokenizer
from aunet.model import AUNet
from aunet.splitting import Splitter

if TYPE_CHECKING:
    from aunet.tokenizer import BPETokenizer

LN2 = math.log(2.0)


def splitter_for(config: AUNetConfig) -> Splitter | None:
    """The config's splitter, or None for a 1-stage model (no boundaries needed)."""
    return Splitter(config.split_strategy) if config.num_stages else None


def encode_with_levels(data: bytes, splitter: Splitter | None, top: int) -> tuple[list, list]:
    """[BOS] + bytes, with their levels (BOS at the top level)."""
    lv = splitter.levels(data).tolist() if splitter is not None else [0] * len(data)
    return [BOS_ID, *data], [top, *lv]


def encode_ids(
    config: AUNetConfig, data: bytes, tokenizer: BPETokenizer | None
) -> tuple[list, list]:
    """[BOS] + the model's ids of ``data`` (its bytes, or its BPE tokens), with their levels."""
    if tokenizer is None:
        return encode_with_levels(data, splitter_for(config), config.num_stages)
    ids = tokenizer.encode(data).tolist()
    return [config.bos_id, *ids], [0] * (len(ids) + 1)


def _unsampled(config: AUNetConfig, tokenizer: BPETokenizer | None) -> list[int]:
    """Ids greedy decoding never emits (``aunet.generate``): BOS, and a BPE model's PAD."""
    if tokenizer is None:
        return [config.bos_id]
    return [
        i for i, n in enumerate(tokenizer.token_lengths.tolist()) if n == 0 and i != config.eos_id
    ]


def choice_token_span(tokenizer: BPETokenizer, ids: Sequence[int], context_bytes: int) -> int:
    """Index of the first token of ``ids`` (context + choice tokenized as ONE string) that holds
    a byte of the choice, i.e. that ends after the context's ``context_bytes`` bytes.

    The junction rule: BPE may merge the context's last bytes with the choice's first ones, so no
    token boundary need fall at the junction; the token that straddles it counts as the choice's.
    Scoring the tokens from there on is the log-likelihood of the whole string's tokenization
    past the context, never a split the model did not see in training (docs/design.md,
    BPE baseline)."""
    ends = np.cumsum(tokenizer.token_lengths[np.asarray(ids, dtype=np.int64)])
    return int(np.searchsorted(ends, context_bytes, side="right"))


def _token_sequence(
    config: AUNetConfig,
    tokenizer: BPETokenizer,
    ctx: bytes,
    cont: bytes,
    max_len: int | None,
    where: str,
) -> tuple[tuple[list, list], tuple[int, int]]:
    """([BOS] + ids of ctx + cont, levels) and (a, n): the continuation's log-probabilities are
    entries a..a+n-1 of the sequence's. Over ``max_len`` tokens, context tokens are dropped from
    the left (after BOS), never the continuation's."""
    ids = tokenizer.encode(ctx + cont).tolist()
    first = choice_token_span(tokenizer, ids, len(ctx)) if cont else len(ids)
    drop = max(0, len(ids) + 1 - max_len) if max_len is not None else 0
    if drop > first:
        raise ValueError(
            f"{where}: the continuation has {len(ids) - first} tokens; with BOS it does not fit "
            f"the {max_len}-token context"
        )
    ids = ids[drop:]
    return ([config.bos_id, *ids], [0] * (len(ids) + 1)), (first - drop, len(ids) - first + drop)


@torch.no_grad()
def _token_logprobs(
    model: AUNet, seqs: Sequence[tuple[list, list]], batch_size: int
) -> list[torch.Tensor]:
    """log p(seq[t+1] | seq[:t+1]) for every sequence, batched with right padding."""
    return [lp for lp, _ in _token_scores(model, seqs, batch_size)]


@torch.no_grad()
def _token_scores(
    model: AUNet,
    seqs: Sequence[tuple[list, list]],
    batch_size: int,
    unsampled: Sequence[int] = (BOS_ID,),
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence of n tokens: log p(seq[t+1] | seq[:t+1]) (n-1,) float32 and whether seq[t+1]
    is the greedy choice at t (n-1,) bool, batched with right padding.

    Right padding is harmless: the model is causal and capacity caps keep the first boundaries, so
    padding after a sequence changes none of its logits.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out: list[tuple[torch.Tensor, torch.Tensor]] = [(torch.empty(0), torch.empty(0))] * len(seqs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        L = max(len(seqs[i][0]) for i in idx)
        toks = torch.zeros(len(idx), L, dtype=torch.long)
        lvls = torch.zeros(len(idx), L, dtype=torch.long)
        for r, i in enumerate(idx):
            t, lv = seqs[i]
            toks[r, : len(t)] = torch.tensor(t)
            lvls[r, : len(lv)] = torch.tensor(lv)
        logits = model(toks.to(device), lvls.to(device)).float()
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        ll = logp.gather(-1, toks[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu()
        # greedy decoding never emits BOS (aunet.generate.sample_next): leave it out of argmax
        greedy = logp.index_fill(-1, torch.tensor(list(unsampled), device=device), -torch.inf)
        greedy = greedy.argmax(-1).cpu() == toks[:, 1:]
        for r, i in enumerate(idx):
            n = len(seqs[i][0]) - 1
            out[i] = (ll[r, :n], greedy[r, :n])
    return out


# ---------------------------------------------------------------------------------------- bits/byte
@dataclass
class TextScore:
    nats: float  # summed negative log-likelihood of the scored bytes
    num_bytes: int

    @property
    def bits_per_byte(self) -> float:
        return self.nats / LN2 / max(self.num_bytes, 1)


def sliding_windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of n+1 tokens ([BOS] + n bytes): (start, end, first_scored).

    Window k covers tokens [start, end) and scores the predictions of tokens first_scored..end-1.
    Every byte is scored exactly once, with at least ``context - stride`` tokens before it in its
    window (all of them when the document fits): no byte is scored without the context the model
    can see, unlike chunking, which scores each chunk's first byte blind.
    """
    if not 0 < stride <= context - 1:
        raise ValueError(f"stride must be in [1, context-1], got {stride} for context {context}")
    total = n + 1
    if total <= context:
        return [(0, total, 1)]
    wins = [(0, context, 1)]
    scored_to = context
    while scored_to < total:
        end = min(scored_to + stride, total)
        wins.append((end - context, end, scored_to))
        scored_to = end
    return wins


@torch.no_grad()
def score_texts(
    model: AUNet,
    docs: Sequence[bytes],
    context: int,
    stride: int | None = None,
    batch_size: int = 8,
    tokenizer: BPETokenizer | None = None,
) -> list[TextScore]:
    """Per-document NLL of the document bytes (BOS is context, EOS is not scored).

    Levels are computed once per whole document and sliced per window; the model forces each
    window's first position to the top level, exactly as for mid-document training windows.
    A BPE model's windows (``context``, ``stride``) count tokens; its NLL is the sum over the
    document's tokens and ``num_bytes`` the document's bytes, so bits/byte compares with bytes.
    """
    cfg = model.config
    check_tokenizer(cfg, tokenizer, "score_texts: tokenizer")
    stride = stride or max(context // 2, 1)
    if tokenizer is None:
        splitter = splitter_for(cfg)
        seqs = [encode_with_levels(doc, splitter, cfg.num_stages) for doc in docs]
    else:  # one batched call of the Rust encoder
        seqs = [
            ([cfg.bos_id, *ids.tolist()], [0] * (len(ids) + 1))
            for ids in tokenizer.encode_batch([bytes(doc) for doc in docs])
        ]
    pieces, owners, firsts = [], [], []
    for d, (toks, lvls) in enumerate(seqs):
        for start, end, first in sliding_windows(len(toks) - 1, context, stride):
            pieces.append((toks[start:end], lvls[start:end]))
            owners.append(d)
            firsts.append(first - start)
    lls = _token_logprobs(model, pieces, batch_size)
    scores = [TextScore(0.0, 0) for _ in docs]
    for ll, d, f in zip(lls, owners, firsts):
        part = ll[f - 1 :]  # prediction of token j is ll[j-1]
        scores[d].nats -= float(part.double().sum())
        scores[d].num_bytes += part.numel()
    if tokenizer is not None:  # tokens scored once each; the bytes are the document's
        for s, doc in zip(scores, docs):
            s.num_bytes = len(doc)
    return scores


def aggregate(scores: Iterable[TextScore]) -> TextScore:
    scores = list(scores)
    return TextScore(sum(s.nats for s in scores), sum(s.num_bytes for s in scores))


# ---------------------------------------------------------------------------------------- choices
# lm-eval's default target delimiter: it scores ``delimiter + choice`` after the context.
TARGET_DELIMITER = " "


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]  # as scored after the context (with the delimiter, when one is used)
    gold: int
    delimiter: str = TARGET_DELIMITER  # the target delimiter the choices carry, if they start so


def choice_length(choice: str, delimiter: str = TARGET_DELIMITER) -> int:
    """lm-eval's ``acc_norm`` denominator: the choice's length in characters (not bytes) without
    the target delimiter. lm-eval scores ``delimiter + choice`` but divides by ``len(choice)``; our
    choices carry the delimiter, so a leading ``delimiter`` is not counted (docs/design.md,
    Evaluation)."""
    if delimiter and choice.startswith(delimiter):
        return len(choice) - len(delimiter)
    return len(choice)


@dataclass
class ChoiceResult:
    loglik: list[list[float]]  # per item, per choice: summed log-likelihood (nats)
    pred: list[int]  # argmax of loglik
    pred_norm: list[int]  # argmax of loglik / choice_length(choice) (lm-eval's acc_norm)
    accuracy: float
    accuracy_norm: float


@torch.no_grad()
def score_choices(
    model: AUNet,
    items: Sequence[ChoiceItem],
    batch_size: int = 16,
    max_len: int | None = None,
    tokenizer: BPETokenizer | None = None,
) -> ChoiceResult:
    """Byte-level log-likelihood of each choice given its context (choices packed into batches).

    Contexts longer than ``max_len`` are cut from the left (after BOS), never the choice.
    A BPE model scores the choice's BYTES without a penalty for the split at the junction:
    context + choice is tokenized as one string and the choice's log-likelihood is the sum over
    the tokens that hold any byte of the choice, the junction token included
    (``choice_token_span``); ``max_len`` then counts tokens. ``acc_norm`` divides by the choice's
    length in characters either way.
    """
    cfg = model.config
    check_tokenizer(cfg, tokenizer, "score_choices: tokenizer")
    splitter = splitter_for(cfg)
    seqs, spans = [], []
    for i, it in enumerate(items):
        ctx = it.context.encode()
        for j, ch in enumerate(it.choices):
            cb = ch.encode()
            if tokenizer is not None:
                where = f"item {i} choice {j}"
                seq, span = _token_sequence(cfg, tokenizer, ctx, cb, max_len, where)
                seqs.append(seq)
                spans.append(span)
                continue
            if max_len is not None and len(ctx) + len(cb) + 1 > max_len:
                ctx_cut = ctx[len(ctx) + len(cb) + 1 - max_len :]
            else:
                ctx_cut = ctx
            toks, lvls = encode_with_levels(ctx_cut + cb, splitter, cfg.num_stages)
            seqs.append((toks, lvls))
            spans.append((len(ctx_cut), len(cb)))
    lls = _token_logprobs(model, seqs, batch_size)
    loglik, pred, pred_norm, k = [], [], [], 0
    for it in items:
        row = []
        for _ in it.choices:
            c0, n = spans[k]
            row.append(float(lls[k][c0 : c0 + n].double().sum()))  # predictions of choice bytes
            k += 1
        loglik.append(row)
        pred.append(int(np.argmax(row)))
        norm = [v / max(choice_length(c, it.delimiter), 1) for v, c in zip(row, it.choices)]
        pred_norm.append(int(np.argmax(norm)))
    n = max(len(items), 1)
    return ChoiceResult(
        loglik=loglik,
        pred=pred,
        pred_norm=pred_norm,
        accuracy=sum(p == it.gold for p, it in zip(pred, items)) / n,
        accuracy_norm=sum(p == it.gold for p, it in zip(pred_norm, items)) / n,
    )


@dataclass(frozen=True)
class ContinuationScore:
    loglik: float  # summed log-probability (nats) of the continuation's bytes
    greedy: bool  # every continuation byte is the argmax of its prediction
    num_bytes: int


@torch.no_grad()
def score_continuations(
    model: AUNet,
    pairs: Sequence[tuple[bytes, bytes]],
    batch_size: int = 16,
    max_len: int | None = None,
    tokenizer: BPETokenizer | None = None,
) -> list[ContinuationScore]:
    """log p(continuation | context) of each (context, continuation) pair of bytes, and whether
    greedy decoding would produce the continuation: lm-eval's ``loglikelihood`` request.

    Scored exactly as ``score_choices`` scores a choice: one sequence ``[BOS] + context +
    continuation`` with levels from the whole sequence; a context longer than ``max_len`` allows
    is cut from the left (after BOS), never the continuation. A BPE model scores the tokens that
    hold the continuation's bytes (the junction rule of ``score_choices``; ``max_len`` in tokens)
    and ``greedy`` asks whether greedy decoding emits exactly those tokens.
    """
    cfg = model.config
    check_tokenizer(cfg, tokenizer, "score_continuations: tokenizer")
    splitter = splitter_for(cfg)
    seqs, spans = [], []
    for k, (ctx, cont) in enumerate(pairs):
        if tokenizer is not None:
            seq, span = _token_sequence(cfg, tokenizer, ctx, cont, max_len, f"pair {k}")
            seqs.append(seq)
            spans.append(span)
            continue
        if max_len is not None and len(cont) + 1 > max_len:
            raise ValueError(
                f"pair {k}: the continuation has {len(cont)} bytes; with BOS it does not fit "
                f"the {max_len}-byte context"
            )
        if max_len is not None and len(ctx) + len(cont) + 1 > max_len:
            ctx = ctx[len(ctx) + len(cont) + 1 - max_len :]
        seqs.append(encode_with_levels(ctx + cont, splitter, cfg.num_stages))
        spans.append((len(ctx), len(cont)))
    out = []
    scored = _token_scores(model, seqs, batch_size, _unsampled(cfg, tokenizer))
    for (lp, greedy), (c0, n), (_, cont) in zip(scored, spans, pairs):
        # the prediction of token j (j >= 1) is entry j-1; the continuation is tokens c0+1..c0+n
        out.append(
            ContinuationScore(
                float(lp[c0 : c0 + n].double().sum()), bool(greedy[c0 : c0 + n].all()), len(cont)
            )
        )
    return out


# ------------------------------------------------------------------------------------ char tasks
CHAR_TASKS = ("spell", "reverse", "insert", "swap", "count")


@dataclass(frozen=True)
class CharExample:
    task: str
    prompt: str
    answer: str


def _char_example(task: str, word: str, rng: random.Random) -> tuple[str, str]:
    if task == "spell":
        return f"Spell {word}: ", " ".join(word)
    if task == "reverse":
        return f"Reverse {word}: ", word[::-1]
    if task == "insert":
        i, c = rng.randrange(len(word) + 1), rng.choice("abcdefghijklmnopqrstuvwxyz")
        return f"Insert {c} at {i} in {word}: ", word[:i] + c + word[i:]
    if task == "swap":
        i = rng.randrange(len(word) - 1)
        swapped = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        return f"Swap {i} and {i + 1} in {word}: ", swapped
    if task == "count":
        c = rng.choice(sorted(set(word)))
        return f"Count {c} in {word}: ", str(word.count(c))
    raise ValueError(f"unknown character task {task!r} (valid: {', '.join(CHAR_TASKS)})")


def make_char_tasks(
    words: Sequence[str], task: str, n: int, seed: int, shots: int = 3
) -> list[CharExample]:
    """n examples of a character task, each a few-shot prompt; reproducible from (task, seed)."""
    pool = sorted({w for w in words if w.isalpha() and w.isascii() and 3 <= len(w) <= 10})
    if len(pool) < shots + 1:
        raise ValueError(
            f"character tasks need at least {shots + 1} distinct words, got {len(pool)}"
        )
    rng = random.Random(f"{task}:{seed}")
    out = []
    for _ in range(n):
        chosen = rng.sample(pool, shots + 1)
        demos = [_char_example(task, w, rng) for w in chosen[:shots]]
        q, a = _char_example(task, chosen[-1], rng)
        prompt = "".join(f"{dq}{da}\n" for dq, da in demos) + q
        out.append(CharExample(task=task, prompt=prompt, answer=a))
    return out


def score_char_tasks(
    examples: Sequence[CharExample], generate: Callable[[list[bytes], int], list[bytes]]
) -> float:
    """Exact-match accuracy of greedy completions (up to the first newline).

    ``generate(prompts, max_new_bytes)`` returns bytes for every model: a BPE model's is
    ``aunet.generate.generate(..., tokenizer=)``, which decodes its ids (``greedy_bytes``)."""
    if not examples:
        return float("nan")
    prompts = [e.prompt.encode() for e in examples]
    max_new = max(len(e.answer.encode()) for e in examples) + 1
    outs = generate(prompts, max_new)
    hits = 0
    for e, o in zip(examples, outs):
        text = o.decode("utf-8", errors="replace").split("\n", 1)[0]
        hits += text == e.answer
    return hits / len(examples)


def greedy_bytes(
    model: AUNet, tokenizer: BPETokenizer | None = None, stop: bytes | None = b"\n"
) -> Callable[[list[bytes], int], list[bytes]]:
    """The ``generate`` of ``score_char_tasks``: greedy continuations as bytes, for byte and BPE
    models alike (a BPE model's prompt is healed and its ids decoded: ``aunet.generate``)."""
    from aunet.generate import generate

    def run(prompts: list[bytes], max_new: int) -> list[bytes]:
        out = generate(model, prompts, max_new, temperature=0.0, stop=stop, tokenizer=tokenizer)
        return list(out)

    return run
