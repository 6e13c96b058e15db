"""Throughput of Splitter.levels against a per-character Python loop of the same word rules.

    PYTHONPATH=. python tests/benchmarks/splitting.py [--mb 4] [--loop-mb 0.5] [--doc-mb 1]

Prints MB/s for 1, 2 and 3 word stages ({word1: 1@1}, + {word2: 2@1}, + {word3: 4@1}) on English
(GPL-3 repeated) and Chinese (the passage below repeated), and the speed-up over the loop. Both
implementations are checked against each other on the benchmark text first. Targets: >= 20x the
loop and >= 20 MB/s on one core for two stages on English.

Then a table per document size, 256 B to 1 MB (the English documents of the shipped corpus,
experiments/data/quickstart.jsonl.gz, concatenated and cut to size), for two word stages: MB/s of
Splitter.levels_batch (all documents in one call, as preprocessing does), of one Splitter.levels
call per document, of the per-character loop, and of plain regex.finditer on the official patterns
(docs/design.md, Splitting) per document; all four are checked equal first. Target: levels_batch
>= 50 MB/s on one core for documents of 1-8 KB.

Then the script and entropy strategies on 1 MB of Chinese, of one run of Han (and of English for
entropy). Target: 1 MB of Han in under a second.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import time
from pathlib import Path

import numpy as np
import regex

from aunet.splitting import _ESCAPE, _LETTER, _NEWLINE, _NUMBER, _SPACE, Splitter, _class_table

STAGES = [{"word1": "1@1"}, {"word1": "1@1", "word2": "2@1"}]
STAGES.append({**STAGES[1], "word3": "4@1"})

CHINESE = (
    "北京是中国的首都，也是一座有三千多年历史的古城。城市中心有故宫、天安门广场和景山公园，"
    "每年都有数百万游客来这里参观。秋天是北京最美的季节：天高云淡，香山的红叶漫山遍野。\n"
    "我第一次去长城是在二〇一九年十月。那天早上六点出发，坐了两个小时的车才到八达岭。"
    "爬到最高的烽火台时，大家都累得说不出话来，但看到群山之间蜿蜒的城墙，又觉得一切都值得。\n"
    "晚饭我们吃了烤鸭、炸酱面和豆汁儿。朋友说：“不喝豆汁儿，就不算真正来过北京！”"
    "我尝了一口，味道有点酸，还有点像发酵的绿豆汤。价格也不贵，一共才花了 268 元。\n"
)


@functools.cache
def class_list() -> list[int]:
    """The class table as a Python list, so the loop pays no numpy scalar cost."""
    return _class_table().tolist()


def per_char_levels(text: str, groups: list[int]) -> np.ndarray:
    """The word rules (docs/design.md, Splitting) as a plain left-to-right scan, one Python
    step per char."""
    table = class_list()
    cls = [table[ord(c)] for c in text]
    n = len(text)
    starts = [False] * n
    i = 0
    while i < n:  # \p{N}{1,3} | [^\s\p{L}\p{N}]{1,3}[\r\n]* | \s*[\r\n]
        c = cls[i]
        if c & _NUMBER:
            starts[i] = True
            j = i + 1
            while j < n and j < i + 3 and cls[j] & _NUMBER:
                j += 1
            i = j
        elif not c & (_SPACE | _LETTER | _NUMBER | _ESCAPE):
            starts[i] = True
            j = i + 1
            while j < n and j < i + 3 and not cls[j] & (_SPACE | _LETTER | _NUMBER | _ESCAPE):
                j += 1
            while j < n and cls[j] & _NEWLINE:
                j += 1
            i = j
        elif c & _SPACE:
            j, last_newline = i, -1
            while j < n and cls[j] & _SPACE:
                if cls[j] & _NEWLINE:
                    last_newline = j
                j += 1
            if last_newline >= 0:
                starts[i] = True
                i = last_newline + 1
            else:
                i = j
        else:
            i += 1
    per_char = [len(groups) if s else 0 for s in starts]  # every word stage has the start rule
    for stage, group in enumerate(groups):  # (\S+?\s){N}
        i, in_chain, prev_end = 0, 0, -2
        while i < n:
            if cls[i] & (_SPACE | _ESCAPE):
                i += 1
                continue
            first = i
            while i < n and not cls[i] & (_SPACE | _ESCAPE):
                i += 1
            if i >= n or not cls[i] & _SPACE:
                continue
            in_chain = in_chain + 1 if first == prev_end + 1 else 1
            if in_chain % group == 0:
                per_char[i] = max(per_char[i], stage + 1)
            prev_end = i
            i += 1
    out = []
    for char, level in zip(text, per_char):
        out.extend([0] * (len(char.encode()) - 1))
        out.append(level)
    return np.array(out, np.uint8)


# The official word patterns (docs/design.md, Splitting), run per document as officially.
START_WORD = r"\p{N}{1,3}|(?:[^\s\p{L}\p{N}]{1,3}[\r\n]*)|\s*[\r\n]"
END_WORD = r"(\S+?\s){%d}"
CORPUS = Path(__file__).parents[2] / "experiments" / "data" / "quickstart.jsonl.gz"
SIZES = {"256 B": 256, "1 KB": 1024, "4 KB": 4096, "8 KB": 8192, "64 KB": 65536, "1 MB": 1 << 20}
TARGET_SIZES = ("1 KB", "4 KB", "8 KB")


def official_levels(text: str, groups: list[int]) -> np.ndarray:
    """Word stages by plain finditer on the official patterns (valid UTF-8 only), levels placed
    per codepoint, then moved to its last byte."""
    per_char = [0] * len(text)
    for stage, group in enumerate(groups):
        for m in regex.finditer(START_WORD, text):
            per_char[m.start()] = stage + 1
        for m in regex.finditer(END_WORD % group, text):
            per_char[m.end() - 1] = stage + 1
    out = []
    for char, level in zip(text, per_char):
        out.extend([0] * (len(char.encode()) - 1))
        out.append(level)
    return np.array(out, np.uint8)


def cut_documents(stream: bytes, size: int, total: int) -> list[bytes]:
    """Consecutive documents of about ``size`` bytes (each cut back to a codepoint start),
    ``total`` bytes in all."""
    docs, at = [], 0
    while at < min(total, len(stream)):
        end = min(at + size, len(stream))
        while end < len(stream) and stream[end] & 0xC0 == 0x80:
            end -= 1
        docs.append(stream[at:end])
        at = end
    return docs


def best_seconds(repeats: int, fn, *args) -> tuple[float, object]:
    """Fastest of `repeats` calls in CPU seconds (less disturbed by other load than wall time;
    both implementations run on one thread), and the last result."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        result = fn(*args)
        best = min(best, time.process_time() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0, help="MB of each text for Splitter")
    parser.add_argument("--loop-mb", type=float, default=0.5, help="MB for the per-char loop")
    parser.add_argument("--doc-mb", type=float, default=1.0, help="MB per row of the size table")
    args = parser.parse_args()
    english = Path("/usr/share/common-licenses/GPL-3").read_text()
    texts = {"English (GPL-3)": english, "Chinese": CHINESE}
    class_list()  # built once per process; not part of the throughput
    print(f"{'text':16} {'stages':>6} {'Splitter MB/s':>14} {'loop MB/s':>10} {'ratio':>7}")
    for name, passage in texts.items():
        unit = passage.encode()
        big = unit * max(1, int(args.mb * 1e6 / len(unit)))
        small_text = passage * max(1, int(args.loop_mb * 1e6 / len(unit)))
        small = small_text.encode()
        for strategy in STAGES:
            sp = Splitter(strategy)
            groups = [int(v.split("@")[0]) for v in strategy.values()]
            slow_s, loop_levels = best_seconds(1, per_char_levels, small_text, groups)
            if not np.array_equal(sp.levels(small), loop_levels):
                raise SystemExit(f"{name} {strategy}: the loop and Splitter disagree")
            fast = len(big) / best_seconds(3, sp.levels, big)[0] / 1e6
            slow = len(small) / slow_s / 1e6
            print(f"{name:16} {len(strategy):>6} {fast:>14.1f} {slow:>10.2f} {fast / slow:>6.0f}x")
    print()
    per_size_table(args.doc_mb, args.loop_mb)
    print()
    script_runs()
    print()
    entropy_runs()


def per_size_table(doc_mb: float, loop_mb: float) -> None:
    """levels_batch, per-document levels, the loop and the official patterns per document size."""
    strategy = STAGES[1]
    sp, groups = Splitter(strategy), [1, 2]
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    stream = "".join(r["text"] for r in rows if r.get("lang") == "en").encode()
    print(f"English of {CORPUS.name} ({len(stream) / 1e6:.2f} MB) cut to size, {strategy}, MB/s:")
    head = f"{'doc size':>8} {'docs':>6} {'batch':>8} {'per-doc':>8} {'loop':>6} {'official':>8}"
    print(f"{head} {'batch/per-doc':>13} {'batch/loop':>10} {'batch/official':>14}")
    met = {}
    for label, size in SIZES.items():
        docs = cut_documents(stream, size, int(max(doc_mb * 1e6, size)))
        data = b"".join(docs)
        lengths = np.array([len(d) for d in docs], np.int64)
        texts = [d.decode() for d in cut_documents(stream, size, int(max(loop_mb * 1e6 / 4, size)))]
        few_bytes = sum(len(t.encode()) for t in texts)
        batch_s, batch = best_seconds(5, sp.levels_batch, data, lengths)
        doc_s, per = best_seconds(3, lambda docs=docs: [sp.levels(d) for d in docs])
        loop_s, loop = best_seconds(1, lambda t=texts: [per_char_levels(x, groups) for x in t])
        off_s, off = best_seconds(1, lambda t=texts: [official_levels(x, groups) for x in t])
        per = np.concatenate(per)
        if not np.array_equal(batch, per):
            raise SystemExit(f"{label}: levels_batch and per-document levels disagree")
        for name, other in (("loop", loop), ("official", off)):
            if not np.array_equal(np.concatenate(other), per[:few_bytes]):
                raise SystemExit(f"{label}: the {name} and Splitter disagree")
        mbs = [len(data) / batch_s, len(data) / doc_s, few_bytes / loop_s, few_bytes / off_s]
        b, d, lo, o = (x / 1e6 for x in mbs)
        met[label] = b
        ratios = f"{b / d:>12.1f}x {b / lo:>9.0f}x {b / o:>13.1f}x"
        print(f"{label:>8} {len(docs):>6} {b:>8.1f} {d:>8.1f} {lo:>6.2f} {o:>8.2f} {ratios}")
    worst = min(met[k] for k in TARGET_SIZES)
    verdict = "met" if worst >= 50 else "NOT met"
    print(f"target levels_batch >= 50 MB/s per core at 1-8 KB: {verdict} (lowest {worst:.1f} MB/s)")


def script_runs() -> None:
    """The script strategy on 1 MB of Chinese: the passage above repeated, and one run of Han."""
    strategy = {"script1": "1@1", "script2": "2@1 han=4 kana=6"}
    sp = Splitter(strategy)
    sp.levels("中".encode())  # the family table is built once per process
    worst = 0.0
    for name, text in (("Chinese passage", CHINESE), ("one run of Han", "中文字")):
        data = (text * (1_000_000 // len(text.encode()) + 1)).encode()[: 1_000_000 // 3 * 3]
        seconds = best_seconds(3, sp.levels, data)[0]
        worst = max(worst, seconds)
        print(f"{strategy} on 1 MB, {name}: {seconds:.3f} s ({len(data) / seconds / 1e6:.0f} MB/s)")
    print(f"target script: 1 MB of Han in under a second: {'met' if worst < 1 else 'NOT met'}")


def entropy_runs() -> None:
    """The entropy strategy (aunet/entropy.py) on 1 MB: a model fitted on the Chinese passage and
    English, thresholds for 0.2 and 0.07 boundaries per byte; per-document cost in the batch."""
    from aunet.entropy import resolve

    english = Path("/usr/share/common-licenses/GPL-3").read_bytes()
    strategy, _ = resolve(
        {"entropy1": "rate=0.2", "entropy2": "rate=0.07"}, [CHINESE.encode(), english]
    )
    sp = Splitter(strategy)
    worst = 0.0
    for name, text in (
        ("Chinese passage", CHINESE),
        ("one run of Han", "中文字"),
        ("English", None),
    ):
        unit = english if text is None else text.encode()
        data = (unit * (1_000_000 // len(unit) + 1))[: 1_000_000 // 3 * 3]
        seconds = best_seconds(3, sp.levels, data)[0]
        worst = max(worst, seconds)
        print(
            f"entropy (2 stages) on 1 MB, {name}: {seconds:.3f} s "
            f"({len(data) / seconds / 1e6:.0f} MB/s)"
        )
    docs = cut_documents(english * 4, 4096, 2_000_000)
    lengths = np.array([len(d) for d in docs])
    batch_s = best_seconds(3, sp.levels_batch, b"".join(docs), lengths)[0]
    print(f"entropy levels_batch, 4 KB documents: {lengths.sum() / batch_s / 1e6:.0f} MB/s")
    print(f"target entropy: 1 MB of Han in under a second: {'met' if worst < 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
