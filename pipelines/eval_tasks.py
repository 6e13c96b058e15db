"""Evaluation data: text sets, multiple-choice formats, the cloze task and the char-task word list.

Multiple-choice records become ``aunet.evaluation.ChoiceItem``s with the prompt and choice strings
of lm-eval's task definitions (the paper's harness; docs/design.md, Evaluation): the choice carries
lm-eval's target delimiter (a leading space), so its log-likelihood is the one lm-eval scores.
Winogrande differs in kind: its options change the context and the scored continuation is shared
(lm-eval's "partial" scoring), so it is a ``PartialItem``.

Everything generated here (cloze items, word lists) is a pure function of the input files and a
seed: the same call gives the same items on every machine and in every process.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from aunet.evaluation import ChoiceItem
from pipelines.corpus import jsonl_objects


class TaskDataError(ValueError):
    """Bad or unreadable evaluation data; the message names the file (or hub set) and record."""


@dataclass(frozen=True)
class PartialItem:
    """A winogrande item: option k fills the blank of ``contexts[k]``; the rest is scored."""

    contexts: tuple[str, ...]
    continuation: str
    gold: int


# ---------------------------------------------------------------------------------- reading
def read_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of a .jsonl(.gz/.zst) file; errors name the file and line."""
    try:
        yield from jsonl_objects(path)
    except (OSError, pa.ArrowException, EOFError) as e:  # first: ArrowInvalid is a ValueError
        raise TaskDataError(f"{path}: cannot read: {e}") from None
    except ValueError as e:  # a line that is not a JSON object (the message names it)
        raise TaskDataError(str(e)) from None


def read_texts(
    path: str, text_field: str = "text", group_field: str | None = "lang", limit: int | None = None
) -> list[tuple[str, str | None]]:
    """(text, group) per record; group is None when the record has no ``group_field``."""
    out: list[tuple[str, str | None]] = []
    for n, rec in read_jsonl(path):
        if limit is not None and len(out) >= limit:
            break
        text = rec.get(text_field)
        if not isinstance(text, str):
            got = "missing" if text is None else type(text).__name__
            raise TaskDataError(f"{path}: line {n}: key {text_field!r}: expected a string, {got}")
        group = rec.get(group_field) if group_field else None
        out.append((text, None if group is None else str(group)))
    if not out:
        raise TaskDataError(f"{path}: no records")
    return out


def hub_records(path: str, name: str | None, split: str) -> Iterator[dict[str, Any]]:
    """Records of a Hugging Face hub data set (needs ``datasets`` and network, or its cache)."""
    where = f"hub:{path}" + (f"/{name}" if name else "") + f" split {split!r}"
    try:
        import datasets
    except ImportError:
        raise TaskDataError(
            f"{where}: loading from the Hugging Face hub needs the 'datasets' package "
            "(pip install datasets); offline, export the split to JSONL and set the task's path"
        ) from None
    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # offline, unknown set or split, gated set
        raise TaskDataError(
            f"{where}: cannot load ({type(e).__name__}: {e}); offline, use a cached copy "
            "(HF_DATASETS_OFFLINE=1) or export the split to JSONL and set the task's path"
        ) from None
    yield from ds


# ---------------------------------------------------------------------------------- formats
def _get(rec: Mapping[str, Any], key: str) -> Any:
    """``rec["a"]["b"]`` for key ``a.b``; a missing key raises naming the dotted key."""
    node: Any = rec
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"missing key {key!r}")
        node = node[part]
    return node


def _labelled(choices: Any, answer: Any, key: str) -> tuple[list[str], int]:
    """ARC/OpenBookQA choices: ``[{text, label}]`` (original) or ``{text: [], label: []}`` (hub)."""
    if isinstance(choices, Mapping):
        texts, labels = list(choices["text"]), list(choices["label"])
    else:
        texts, labels = [c["text"] for c in choices], [c["label"] for c in choices]
    answer = str(answer).strip()
    if answer not in labels:
        raise ValueError(f"{key}: answer {answer!r} is not among the labels {labels}")
    return texts, labels.index(answer)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _common(r: Mapping[str, Any]) -> ChoiceItem:
    """Our own format: choices are appended to the context exactly as written."""
    return ChoiceItem(
        str(_get(r, "context")), tuple(map(str, _get(r, "choices"))), int(_get(r, "gold"))
    )


def _hellaswag(r: Mapping[str, Any]) -> ChoiceItem:
    if "ctx_a" in r:
        ctx = f"{_get(r, 'ctx_a')} {str(_get(r, 'ctx_b')).capitalize()}"
    else:
        ctx = str(_get(r, "ctx"))
    query = f"{r['activity_label']}: {ctx}" if r.get("activity_label") else ctx
    ends = tuple(" " + _hellaswag_clean(e) for e in _get(r, "endings"))
    return ChoiceItem(_hellaswag_clean(query), ends, int(_get(r, "label")))


def _arc(r: Mapping[str, Any]) -> ChoiceItem:
    q = _get(r, "question")
    stem, choices = (q["stem"], q["choices"]) if isinstance(q, Mapping) else (q, _get(r, "choices"))
    texts, gold = _labelled(choices, _get(r, "answerKey"), "answerKey")
    return ChoiceItem(f"Question: {stem}\nAnswer:", tuple(" " + t for t in texts), gold)


def _openbookqa(r: Mapping[str, Any]) -> ChoiceItem:
    if "question_stem" in r:
        stem, choices = r["question_stem"], _get(r, "choices")
    else:
        stem, choices = _get(r, "question.stem"), _get(r, "question.choices")
    texts, gold = _labelled(choices, _get(r, "answerKey"), "answerKey")
    return ChoiceItem(str(stem), tuple(" " + t for t in texts), gold)


def _piqa(r: Mapping[str, Any]) -> ChoiceItem:
    sols = (" " + str(_get(r, "sol1")), " " + str(_get(r, "sol2")))
    return ChoiceItem(f"Question: {_get(r, 'goal')}\nAnswer:", sols, int(_get(r, "label")))


def _boolq(r: Mapping[str, Any]) -> ChoiceItem:
    gold = int(r["label"]) if "label" in r else int(bool(_get(r, "answer")))
    ctx = f"{_get(r, 'passage')}\nQuestion: {_get(r, 'question')}?\nAnswer:"
    return ChoiceItem(ctx, (" no", " yes"), gold)


def _siqa(r: Mapping[str, Any]) -> ChoiceItem:
    answers = tuple(" " + str(_get(r, k)) for k in ("answerA", "answerB", "answerC"))
    ctx = f"Q: {_get(r, 'context')} {_get(r, 'question')}\nA:"
    return ChoiceItem(ctx, answers, int(_get(r, "label")) - 1)


def _copa(r: Mapping[str, Any]) -> ChoiceItem:
    connector = {"cause": "because", "effect": "therefore"}[_get(r, "question")]
    ctx = str(_get(r, "premise")).strip()[:-1] + f" {connector}"  # drop the premise's period
    choices = tuple(" " + c[:1].lower() + c[1:] for c in (r["choice1"], r["choice2"]))
    return ChoiceItem(ctx, choices, int(_get(r, "label")))


def _commonsense_qa(r: Mapping[str, Any]) -> ChoiceItem:
    texts, gold = _labelled(_get(r, "choices"), _get(r, "answerKey"), "answerKey")
    letters = "ABCDE"[: len(texts)]
    listed = "".join(f"\n{a}. {t}" for a, t in zip(letters, texts))
    ctx = f"Question: {str(_get(r, 'question')).strip()}{listed}\nAnswer:"
    return ChoiceItem(ctx, tuple(" " + a for a in letters), gold)


def _race(r: Mapping[str, Any]) -> ChoiceItem:
    """lm-eval's per-article form (earlier questions answered in the prompt) or one question."""
    letter = {"A": 0, "B": 1, "C": 2, "D": 3}
    if "problems" in r:
        probs = r["problems"]
        probs = ast.literal_eval(probs) if isinstance(probs, str) else probs
        text = f"Article: {_get(r, 'article')}\n\n"
        for p in probs[:-1]:
            ans = p["options"][letter[p["answer"]]]
            if p["question"][-6:] == "  _  .":
                text += p["question"][-5:] + ans + "\n"
            else:
                text += f"Question: {p['question']}\nAnswer: {ans}\n"
        last = probs[-1]
    else:
        text, last = f"Article: {_get(r, 'article')}\n\n", r
    opts = tuple(" " + str(o) for o in _get(last, "options"))
    return ChoiceItem(text + str(_get(last, "question")), opts, letter[_get(last, "answer")])


def _winogrande(r: Mapping[str, Any]) -> PartialItem:
    sentence = str(_get(r, "sentence"))
    if "_" not in sentence:
        raise ValueError("key 'sentence': no '_' blank")
    i = sentence.index("_")
    contexts = (sentence[:i] + str(_get(r, "option1")), sentence[:i] + str(_get(r, "option2")))
    return PartialItem(contexts, " " + sentence[i + 1 :].strip(), int(_get(r, "answer")) - 1)


FORMATS: dict[str, Callable[[Mapping[str, Any]], ChoiceItem | PartialItem]] = {
    "common": _common,
    "hellaswag": _hellaswag,
    "arc": _arc,
    "openbookqa": _openbookqa,
    "piqa": _piqa,
    "boolq": _boolq,
    "siqa": _siqa,
    "copa": _copa,
    "commonsense_qa": _commonsense_qa,
    "race": _race,
    "winogrande": _winogrande,
}


def parse_record(rec: Mapping[str, Any], fmt: str, where: str) -> ChoiceItem | PartialItem:
    """One record in format ``fmt``; errors name ``where`` (file and line) and the key."""
    if fmt not in FORMATS:
        raise TaskDataError(f"{where}: unknown format {fmt!r} (valid: {', '.join(FORMATS)})")
    try:
        item = FORMATS[fmt](rec)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise TaskDataError(f"{where}: {fmt} record: {msg}") from None
    n = len(item.contexts if isinstance(item, PartialItem) else item.choices)
    if not 0 <= item.gold < n:
        raise TaskDataError(f"{where}: {fmt} record: gold index {item.gold} not in [0, {n})")
    return item


def load_choice_items(
    fmt: str,
    path: str | None = None,
    hub: tuple[str, str | None, str] | None = None,
    limit: int | None = None,
) -> list[ChoiceItem | PartialItem]:
    """Items of a local JSONL file, or of a hub set ``(path, name, split)``; the first ``limit``."""
    if (path is None) == (hub is None):
        raise ValueError("give exactly one of path and hub")
    if path is not None:
        records: Iterator[tuple[str, Mapping[str, Any]]] = (
            (f"{path}: line {n}", r) for n, r in read_jsonl(path)
        )
    else:
        assert hub is not None
        name = f"hub:{hub[0]}" + (f"/{hub[1]}" if hub[1] else "")
        records = ((f"{name}: record {i}", r) for i, r in enumerate(hub_records(*hub)))
    items = []
    for where, rec in records:
        if limit is not None and len(items) >= limit:
            break
        items.append(parse_record(rec, fmt, where))
    if not items:
        raise TaskDataError(f"{path or hub}: no records")
    return items


# ---------------------------------------------------------------------------------- cloze
def _lines(text: str, min_chars: int) -> list[tuple[int, str]]:
    """(offset, line without its indentation) of prose lines: ``min_chars`` characters or more,
    at least half of them letters (table rules and command lines carry no language signal)."""
    out, pos = [], 0
    for line in text.split("\n"):
        body = line.lstrip()
        if len(body.strip()) >= min_chars and 2 * sum(c.isalpha() for c in body) >= len(body):
            out.append((pos + len(line) - len(body), body.rstrip()))
        pos += len(line) + 1
    return out


def _cut(line: str, rng: random.Random) -> int:
    """A cut point in the middle 40% of the line: a space when there is one (the continuation
    then starts with it, like lm-eval's delimiter), else any character (ja/zh text)."""
    lo, hi = int(len(line) * 0.3), int(len(line) * 0.7)
    spaces = [i for i in range(lo, hi + 1) if line[i] == " "]
    return rng.choice(spaces) if spaces else rng.randint(max(lo, 1), hi)


def make_cloze(
    docs: list[tuple[str, str | None]],
    n_per_group: int,
    num_choices: int = 4,
    seed: int = 0,
    prefix_chars: int = 128,
    min_chars: int = 40,
) -> list[tuple[str, ChoiceItem]]:
    """(group, item) pairs: the context ends inside a line of a held-out document, the gold choice
    is the rest of that line, the distractors are line endings from other documents of the same
    group (language). Groups with fewer than two documents are skipped (no distractor source)."""
    if num_choices < 2:
        raise ValueError(f"num_choices must be >= 2, got {num_choices}")
    by_group: dict[str, list[int]] = {}
    for i, (_, g) in enumerate(docs):
        by_group.setdefault(g or "all", []).append(i)
    out = []
    for group in sorted(by_group):
        ids = by_group[group]
        if len(ids) < 2:
            continue
        rng = random.Random(f"cloze:{seed}:{group}")
        cands = [(d, off, line) for d in ids for off, line in _lines(docs[d][0], min_chars)]
        for d, off, line in rng.sample(cands, min(n_per_group, len(cands))):
            c = _cut(line, rng)
            text = docs[d][0]
            context = text[max(0, off + c - prefix_chars) : off + c]
            gold = line[c:]
            others = [x for x in cands if x[0] != d]
            choices = [gold]
            for _ in range(20 * num_choices):  # distinct endings; a few draws may collide
                if len(choices) == num_choices:
                    break
                _, _, other = rng.choice(others)
                ending = other[_cut(other, rng) :]
                if ending not in choices:
                    choices.append(ending)
            if len(choices) < num_choices:
                continue
            distractors = choices[1:]
            rng.shuffle(distractors)
            g = rng.randrange(num_choices)
            choices = distractors[:g] + [gold] + distractors[g:]
            out.append((group, ChoiceItem(context, tuple(choices), g)))
    return out


# ---------------------------------------------------------------------------------- word list
def build_word_list(
    path: str, lang: str = "en", top: int = 1000, min_len: int = 3, max_len: int = 10
) -> list[str]:
    """The ``top`` most frequent lower-cased ASCII words of ``lang`` records, ties by spelling."""
    counts: Counter[str] = Counter()
    for n, rec in read_jsonl(path):
        if rec.get("lang") == lang:
            text = rec.get("text")
            if not isinstance(text, str):
                raise TaskDataError(f"{path}: line {n}: key 'text': expected a string")
            counts.update(w.lower() for w in re.findall(r"[A-Za-z]+", text))
    words = [w for w in counts if min_len <= len(w) <= max_len]
    words.sort(key=lambda w: (-counts[w], w))
    if not words:
        raise TaskDataError(f"{path}: no {lang!r} words of {min_len}-{max_len} letters")
    return words[:top]


def read_words(path: str) -> list[str]:
    """One word per line; blank lines and ``#`` comments ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            words = [w.strip() for w in f if w.strip() and not w.lstrip().startswith("#")]
    except OSError as e:
        raise TaskDataError(f"{path}: cannot read word list: {e.strerror or e}") from None
    if not words:
        raise TaskDataError(f"{path}: empty word list")
    return words
