"""Splitter.levels: golden official masks, worked examples, and a plain-finditer oracle.

The rules under test: docs/design.md (Splitting).
"""

from __future__ import annotations

import gzip
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from aunet.splitting import Splitter, register_strategy

FIXTURE = Path(__file__).parent / "fixtures" / "splitting" / "official_levels.json"

# The official patterns (docs/design.md, Splitting), quoted as data for the naive oracle.
START_WORD = r"\p{N}{1,3}|(?:[^\s\p{L}\p{N}]{1,3}[\r\n]*)|\s*[\r\n]"
END_WORD = r"(\S+?\s){%d}"
START_PRETOK = (
    r"( ?\p{L}{1,16})|\p{N}{1,3}| ?([^\s\p{L}\p{N}]){1,3}+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
)
START_PUNCT = r"\d{1,3}(?=(\d{3})+(?!\d))|\d{1,3}(?=\D|$)|([^\s\p{L}\p{N}]){1,3}+[\r\n]*|\s*[\r\n]"

ORACLE_STRATEGIES = [
    {"word1": "1@1"},
    {"word1": "1@1", "word2": "2@1"},
    {"word": "1@2-3"},
    {"pretok": ""},
    {"punct": ""},
    {"word1": "1@1", "word2": "2@1", "word3": "4@1"},
]
WORD_STRATEGIES = [{"word1": "1@1"}, {"word1": "1@1", "word2": "2@1"}, {"word": "2@2-3"}]


def oracle_offsets(key: str, value: str, text: str) -> list[int]:
    """Codepoint offsets of one strategy by plain regex.finditer (docs/design.md, Splitting)."""
    if key.startswith("word"):
        group = int(value.split("@")[0])
        moduli = [int(m) for m in value.split("@")[1].split("-")] if key == "word" else [1]
        out = [m.start() for m in regex.finditer(START_WORD, text)]
        ends = regex.finditer(END_WORD % group, text)
        out += [m.end() - 1 for n, m in enumerate(ends) if any(n % k == 0 for k in moduli)]
        return out
    pattern = START_PRETOK if key.startswith("pretok") else START_PUNCT
    return [m.start() for m in regex.finditer(pattern, text)]


def oracle_levels(strategy: dict[str, str], text: str) -> np.ndarray:
    """The rules of docs/design.md (Splitting) on valid text: max stage index + 1, on each
    codepoint's last UTF-8 byte."""
    per_char = [0] * len(text)
    for i, (key, value) in enumerate(strategy.items()):
        for o in oracle_offsets(key, value, text):
            per_char[o] = max(per_char[o], i + 1)
    out = []
    for char, level in zip(text, per_char):
        out += [0] * (len(char.encode()) - 1) + [level]
    return np.array(out, np.uint8)


def oracle_bytes(strategy: dict[str, str], data: bytes) -> np.ndarray:
    """Bad-input rule: undecodable bytes get 0, the decodable runs between them are texts."""
    out = []
    for piece in regex.split(r"([\udc80-\udcff])", data.decode("utf-8", "surrogateescape")):
        escaped = len(piece) == 1 and "\udc80" <= piece <= "\udcff"
        out.append(np.zeros(1, np.uint8) if escaped else oracle_levels(strategy, piece))
    return np.concatenate(out)


def splitter(strategy: dict[str, str]) -> Splitter:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Splitter(strategy)


def digits(levels: np.ndarray) -> str:
    return "".join(map(str, levels.tolist()))


# -- golden fixtures from the official loader ------------------------------------------------------

GOLDEN = json.loads(FIXTURE.read_text(encoding="utf-8"))


def test_fixture_provenance():
    assert GOLDEN["commit"].startswith("437d680")
    assert len(GOLDEN["cases"]) >= 25 and len(GOLDEN["strategies"]) == 7
    crashed_texts = {GOLDEN["cases"][c["text"]]["text"] for c in GOLDEN["crashed"]}
    assert {"hello", ""} <= crashed_texts  # the official loader's failure cases (docs/design.md)


@pytest.mark.parametrize("s", range(len(GOLDEN["strategies"])))
def test_golden_official_levels(s):
    strategy = GOLDEN["strategies"][s]
    sp = splitter(strategy)
    for case in GOLDEN["cases"]:
        data = case["text"].encode()
        expected = case["levels"][s]
        if expected is None:  # official crash: no boundary at all, so all zeros by our rule
            expected = "0" * len(data)
        assert digits(sp.levels(data)) == expected, (case["text"], strategy)


# -- docs/design.md (Worked examples), BOS and EOS columns removed ------------------------------

EXAMPLES = [
    ("Hello world, foo bar.", {"word1": "1@1"}, "000001000001100010001"),
    ("Hello world, foo bar.", {"word1": "1@1", "word2": "2@1"}, "000001000002200010002"),
    ("café 日本! 12345\nx", {"word1": "1@1"}, "000001000000111001010"),
    ("one two three four five ", {"word": "1@2"}, "000100000000010000000001"),
    ("one two three four five ", {"word1": "1@2"}, "000100010000010000100001"),
    ("Hi, 1234567 ok!!!!", {"pretok": ""}, "101110010011001001"),
    ("Hi, 1234567 ok!!!!", {"punct": ""}, "001011001000001001"),
    ("a  b c d e f ", {"word": "2@1"}, "0000001000100"),  # a double space breaks a chain
    (" \n-", {"word1": "1@1", "word2": "2@1"}, "202"),
    ("😀", {"word1": "1@1"}, "0001"),  # the boundary sits on the last UTF-8 byte
]


@pytest.mark.parametrize(("text", "strategy", "expected"), EXAMPLES)
def test_worked_examples(text, strategy, expected):
    assert digits(splitter(strategy).levels(text.encode())) == expected


def test_dict_order_is_the_level():
    text = b"Hello world, foo bar."
    assert digits(splitter({"word1": "1", "punct": ""}).levels(text)) == "000001000002100010002"
    assert digits(splitter({"punct": "", "word1": "1"}).levels(text)) == "000002000002200020002"


# -- differential tests against plain finditer -----------------------------------------------------

PIECES = [" ", "  ", "\n", "\r", "\r\n", "\t", " \n", "\u3000", "\x85", "\xa0", "\x1c", "\x00"]
PIECES += ["1", "123", "4567", "١٢", "²", "Ⅻ", "a", "word", "Zé", "ß", "x" * 17]
PIECES += [".", ",", "!!!!", "-", "(", '"', "'s", "#", "日本", "中文字", "カタ", "😀", "👍🏽"]
PIECES += ["\u0301", "नमस्ते", "\u093f", "مرحبا", "\u200d"]
MIXED = st.lists(st.sampled_from(PIECES), max_size=25).map("".join)


@pytest.mark.parametrize("strategy", ORACLE_STRATEGIES, ids=str)
@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=40) | MIXED)
def test_matches_finditer_oracle(strategy, text):
    np.testing.assert_array_equal(
        splitter(strategy).levels(text.encode()), oracle_levels(strategy, text)
    )


@pytest.mark.parametrize("strategy", ORACLE_STRATEGIES[1:5], ids=str)
@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=40) | MIXED.map(str.encode).map(lambda b: b[::-1]))
def test_invalid_utf8_runs_are_separate_texts(strategy, data):
    got = splitter(strategy).levels(data)
    assert got.dtype == np.uint8 and len(got) == len(data)
    np.testing.assert_array_equal(got, oracle_bytes(strategy, data))


def test_invalid_bytes_get_zero_and_cut_the_text():
    sp = splitter({"word1": "1@1"})
    # 0xFF ends the text "a b" (b is followed by no space there); " c d" is a text of its own.
    assert digits(sp.levels(b"a b\xff c d")) == "01000010"
    assert digits(sp.levels(b"\xe6\x97 x \xf0\x9f\x98")) == "00001000"  # truncated chars: 0
    assert digits(sp.levels(b"!!\x00\x00")) == "1001"  # NUL is a symbol, like any control char


# -- prefix stability (docs/design.md, Prefix stability) -------------------------------------------


@pytest.mark.parametrize("strategy", WORD_STRATEGIES, ids=str)
@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=30) | MIXED)
def test_word_prefix_stable_except_blank_before_newline(strategy, text):
    sp = splitter(strategy)
    full = sp.levels(text.encode())
    last_byte = np.cumsum([len(c.encode()) for c in text]) - 1
    for n in range(len(text) + 1):
        head = sp.levels(text[:n].encode())
        for j in np.flatnonzero(head != full[: len(head)]):
            i = int(np.searchsorted(last_byte, j))
            assert last_byte[i] == j, "only a codepoint's last byte carries a level"
            assert text[i] not in "\r\n" and regex.match(r"\s", text[i]), (text, n, i)
            assert regex.match(r"\s*[\r\n]", text, pos=i), (text, n, i)
            assert head[j] < full[j]


def test_prefix_stability_flags_and_counterexamples():
    assert splitter({"word1": "1@1", "word2": "2@1"}).prefix_stable
    pretok, punct = splitter({"pretok": ""}), splitter({"punct": ""})
    assert not pretok.prefix_stable and not punct.prefix_stable
    assert digits(pretok.levels(b"a  ")) == "110" and digits(pretok.levels(b"a  b"))[:3] == "111"
    assert digits(punct.levels(b"123")) == "100" and digits(punct.levels(b"1234"))[:3] == "110"
    word = splitter({"word1": "1@1"})
    assert digits(word.levels(b" ")) == "0" and digits(word.levels(b" \n-")) == "101"


# -- long and pathological input: linear time, exact results ---------------------------------------

BIG = 5_000_000


def test_five_megabyte_single_lines():
    idx = np.arange(BIG)
    for strategy in ({"word1": "1@1", "word2": "2@1"}, {"pretok": ""}, {"punct": ""}):
        sp = splitter(strategy)
        blanks = sp.levels(b" " * (BIG - 1) + b"\n")  # one \s*[\r\n] match at the start
        assert blanks[0] == len(strategy) and not blanks[1:].any()
        assert sp.levels(bytes(range(256)) * (BIG // 256)).shape == (BIG // 256 * 256,)
        assert sp.levels(b"\xff" * BIG).sum() == 0
    assert not splitter({"word1": "1@1"}).levels(b"a" * BIG).any()
    word = splitter({"word1": "1@1", "word2": "2@1"}).levels(b"1" * BIG)
    np.testing.assert_array_equal(word, np.where(idx % 3 == 0, 2, 0))
    punct = splitter({"punct": ""}).levels(b"1" * BIG)
    np.testing.assert_array_equal(punct, ((BIG - idx) % 3 == 0) | (idx == 0))
    pretok = splitter({"pretok": ""}).levels(b"a" * BIG)
    np.testing.assert_array_equal(pretok, idx % 16 == 0)
    chain = splitter({"word": "3@2"}).levels(b"ab " * (BIG // 3))
    np.testing.assert_array_equal(chain, idx[: len(chain)] % 18 == 8)  # every other 3-word group


def test_input_types():
    sp = splitter({"word1": "1@1"})
    assert sp.levels(b"").shape == (0,)
    assert digits(sp.levels(bytearray(b"a b"))) == digits(sp.levels(memoryview(b"a b"))) == "010"
    with pytest.raises(TypeError, match="bytes"):
        sp.levels("a b")


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ({"punc": ""}, "'punc'.*did you mean 'punct'"),
        ({"word1": "1@1", "chars": "1"}, "'chars'.*unknown prefix"),
        ({"word1": "0@1"}, "'word1'.*N=0"),
        ({"word2": "two"}, "'word2'.*integer"),
        ({"word": "2"}, "'word'.*needs '@M'"),
        ({"word": "1@0"}, "'word'.*>= 1"),
        ({"word": "1@x"}, "'word'.*integers"),
        ({}, "non-empty"),
        ({1: "1@1"}, "keys must be strings"),
    ],
)
def test_validation_names_the_key(strategy, message):
    with pytest.raises(ValueError, match=message):
        Splitter(strategy)


def test_official_prefixes_and_ignored_moduli():
    assert Splitter({"words": "1", "pretokenize": "x", "punctuation": ""}).num_stages == 3
    with pytest.warns(UserWarning, match="'word1'.*@2.*ignored"):
        sp = Splitter({"word1": "1@2"})
    assert digits(sp.levels(b"a b c ")) == "010101"  # @2 ignored, as officially
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Splitter({"word1": "1@1", "word2": "2@1"})  # the shipped configs: @1 changes nothing


def test_custom_strategy():
    register_strategy("capital", start=r"\p{Lu}", end=r"[.!?]\s")
    sp = Splitter({"word1": "1@1", "capital2": ""})
    text = "Hi there. Bye! ok"
    caps = {0, 10}  # H, B
    ends = {9, 14}  # the spaces after '.' and '!' (last char of each end match)
    words = {2, 9, 14}
    punct = {8, 13}
    expected = [2 if i in caps | ends else 1 if i in words | punct else 0 for i in range(17)]
    assert sp.levels(text.encode()).tolist() == expected
    assert not sp.prefix_stable and sp.num_stages == 2
    assert digits(Splitter({"capital": ""}).levels(b"A\xffB")) == "101"
    copy = pickle.loads(pickle.dumps(sp))  # workers get the patterns, not a registry lookup
    assert copy.levels(text.encode()).tolist() == expected
    for bad in ("word", "wordy", "pun", ""):
        with pytest.raises(ValueError, match="collides|empty"):
            register_strategy(bad, start="x")
    with pytest.raises(ValueError, match="start or an end"):
        register_strategy("nothing", start=None)


# -- levels_batch: many documents per call (docs/design.md, Splitting) -----------------------------

register_strategy("sentence", start=r"^|\p{Lu}", end=r"[.!?]\s|\S$")  # empty and $ matches
BATCH_STRATEGIES = ORACLE_STRATEGIES + [
    {"word": "2@2-3"},
    {"sentence": ""},
    {"word1": "1@1", "sentence2": "", "punct3": "", "pretok4": ""},
    {"script1": "1@1", "script2": "2@1 han=3"},
]
RUNS = [b" " * 40, b" " * 30 + b"\n", b"\n" * 5, b"\r\n\t ", b"9" * 17, b"\x00" * 4, b"!" * 7]
NASTY = [b"\xe6\x97", b"\xa5", b"\xf0\x9f", b"\x98\x80", b"\xed\xa0\x80", b"\xff", b"\xc3"]
DOC = (
    st.binary(max_size=30)
    | MIXED.map(str.encode)
    | MIXED.map(str.encode).map(lambda b: b[:-1])  # often ends mid-codepoint
    | st.lists(st.sampled_from(RUNS + NASTY + [b"a b ", b"Ab. ", b"12"]), max_size=6).map(b"".join)
)


def per_document(sp: Splitter, docs: list[bytes]) -> np.ndarray:
    return np.concatenate([sp.levels(d) for d in docs] + [np.zeros(0, np.uint8)])


@pytest.mark.parametrize("strategy", BATCH_STRATEGIES, ids=str)
@settings(max_examples=50, deadline=None)
@given(docs=st.lists(DOC, max_size=8))
def test_batch_equals_per_document(strategy, docs):
    sp = splitter(strategy)
    got = sp.levels_batch(b"".join(docs), np.array([len(d) for d in docs], np.int64))
    assert got.dtype == np.uint8 and got.shape == (sum(map(len, docs)),)
    np.testing.assert_array_equal(got, per_document(sp, docs))
    if not regex.search("sentence|script", str(strategy)):  # and the finditer oracle, per document
        oracle = [oracle_bytes(strategy, d) for d in docs if d]
        np.testing.assert_array_equal(got, np.concatenate(oracle) if oracle else got[:0])


def test_batch_runs_restart_at_each_document():
    """Pairs whose concatenation splits differently: each half must keep its own levels."""
    word2 = splitter({"word1": "1@1", "word2": "2@1"})
    every_other = splitter({"word": "1@2"})
    pretok, punct = splitter({"pretok": ""}), splitter({"punct": ""})
    cases = [
        (word2, [b"a  ", b"\nb"], "010" + "20"),  # joined, \s*[\r\n] would start at the blanks
        (word2, [b"12", b"345"], "20" + "200"),  # joined: 123|45
        (word2, [b"a b", b" c "], "010" + "001"),  # joined: 'b ' would be a 2-word chain end
        (every_other, [b"a b c ", b"d e "], "010001" + "0100"),  # the @M counter restarts
        (punct, [b"12", b"34"], "10" + "10"),  # joined: thousands from the right, 1|234
        (pretok, [b"a  ", b"b"], "110" + "1"),  # a blank run ending its text keeps its last char
        (word2, [b"\xe6\x97", b"\xa5 x "], "00" + "0001"),  # no codepoint across documents
    ]
    for sp, docs, expected in cases:
        got = sp.levels_batch(b"".join(docs), np.array([len(d) for d in docs]))
        assert digits(got) == expected == digits(per_document(sp, docs)), docs
        assert digits(sp.levels(b"".join(docs))) != expected, docs  # the pair does interact


def test_batch_on_the_shipped_corpus_across_groups():
    """Megabytes in one call (several internal groups), a document larger than a group, empty
    and broken documents; all languages of the shipped corpus."""
    path = Path(__file__).parents[1] / "experiments" / "data" / "quickstart.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"].encode() for line in f]
    docs = docs[:300] + [b"".join(docs[300:380]), b"", b""] + docs[380:] + [b"\xe6\x97" * 3]
    docs = [d[: len(d) - i % 3] for i, d in enumerate(docs)]  # cut some codepoints in half
    assert sum(map(len, docs)) > 3_000_000 and max(map(len, docs)) > 300_000
    lengths = np.array([len(d) for d in docs], np.uint32)
    sp = splitter({"word": "1@2-3", "punct": "", "script3": "2@1 han=3"})  # all built-in rules
    np.testing.assert_array_equal(sp.levels_batch(b"".join(docs), lengths), per_document(sp, docs))


def test_batch_input_checks():
    sp = splitter({"word1": "1@1"})
    assert sp.levels_batch(b"", np.zeros(0, np.int64)).shape == (0,)
    assert digits(sp.levels_batch(b"", [0, 0])) == ""
    assert digits(sp.levels_batch(bytearray(b"a bc d "), [3, 4])) == "010" + "0101"
    assert digits(sp.levels_batch(memoryview(b"a bc d "), np.array([7]))) == "0100101"
    for lengths in ([3, 3], [8, -1], [[7]], [3.5, 3.5], [True] * 7):
        with pytest.raises(ValueError, match=r"levels_batch: lengths .* len\(data\)=7"):
            sp.levels_batch(b"a bc d ", np.array(lengths))
    with pytest.raises(TypeError, match="bytes"):
        sp.levels_batch("a b", [3])


# -- script: word rules plus chunks inside scripts without spaces (docs/design.md, Splitting) -----

# Families by Script_Extensions (scx), restated here as data for the naive reference.
SCRIPT_FAMILIES = {"han": "Hani", "kana": "Hira Kana", "thai": "Thai", "lao": "Laoo"}
SCRIPT_FAMILIES |= {"khmer": "Khmr", "myanmar": "Mymr", "tibetan": "Tibt"}
SCRIPT_DEFAULTS = {"han": 2, "kana": 3, "thai": 4, "lao": 4, "khmer": 4, "myanmar": 4, "tibetan": 4}


def naive_script_levels(strategy: dict[str, str], text: str) -> np.ndarray:
    """Word oracle (plain finditer) plus a left-to-right walk over family runs (valid text)."""
    per_char = [0] * len(text)
    for stage, (key, value) in enumerate(strategy.items()):
        head, *options = value.split()
        chars = SCRIPT_DEFAULTS | {k: int(v) for k, v in (o.split("=") for o in options)}
        hits = oracle_offsets(key.replace("script", "word"), head, text)
        run_family, count = None, 0
        for i, ch in enumerate(text):
            family = None
            if regex.match(r"[\p{L}\p{M}]", ch):
                scripts = (SCRIPT_FAMILIES[f].split() for f in SCRIPT_FAMILIES)
                family = next(
                    (
                        f
                        for f, ss in zip(SCRIPT_FAMILIES, scripts)
                        if any(regex.match(rf"\p{{scx={s}}}", ch) for s in ss)
                    ),
                    None,
                )
            if family != run_family:
                run_family, count = family, 0
            if family is None or regex.match(r"\p{M}", ch):
                continue
            if chars[family] and count % chars[family] == 0:
                hits.append(i)
            count += 1
        for o in hits:
            per_char[o] = max(per_char[o], stage + 1)
    out = []
    for char, level in zip(text, per_char):
        out += [0] * (len(char.encode()) - 1) + [level]
    return np.array(out, np.uint8)


def per_char_digits(levels: np.ndarray, text: str) -> str:
    """The level of each character's last byte (the other bytes must be 0)."""
    last = np.cumsum([len(c.encode()) for c in text]) - 1
    assert not np.delete(levels, last).any()
    return digits(levels[last])


SCRIPT1 = {"script1": "1@1"}
SCRIPT2 = {"script1": "1@1", "script2": "2@1 han=4 kana=0"}
SCRIPT_EXAMPLES = [
    # Chinese: 2-character chunks, cut again by punctuation (a word start)
    ("北京是中国的首都，也是一座古城。", SCRIPT1, "1010101011010101"),
    # Japanese with Latin: han and kana runs apart (は|日本語|のテキストを), no chunk in Latin
    ("AU-Netは日本語のテキストをbytesで読む。", SCRIPT1, "0010001101100100000001111"),
    ("AU-Netは日本語のテキストをbytesで読む。", SCRIPT2, "0020001201100100000001212"),
    ("コーヒー", SCRIPT1, "1001"),  # ー (script Common) stays in its katakana word
    # Thai: 4 letters a chunk, combining marks not counted (the word rule marks them, officially)
    ("ภาษาไทยเป็นภาษาที่สวยงาม", SCRIPT1, "100010001100010010010001"),
    ("ภาษาไทยเป็นภาษาที่สวยงาม", {"script1": "1@1 thai=0"}, "000000000100000010000000"),
    ("مرحبا بالعالم", SCRIPT1, "0000010000000"),  # Arabic has spaces: the word rules alone
    ("😀👍🏽 ok", SCRIPT1, "100100"),  # emoji are symbols: word rules alone
    ("中文 text 中文字 ", {"script": "1@2 han=1"}, "111000001111"),  # @M on the exact key
]


@pytest.mark.parametrize(("text", "strategy", "expected"), SCRIPT_EXAMPLES)
def test_script_golden_examples(text, strategy, expected):
    got = splitter(strategy).levels(text.encode())
    assert per_char_digits(got, text) == expected
    np.testing.assert_array_equal(got, naive_script_levels(strategy, text))
    word = {k.replace("script", "word"): v.split()[0] for k, v in strategy.items()}
    assert (got >= splitter(word).levels(text.encode())).all()  # the word rules, plus chunks


SCRIPT_PIECES = ["北京", "中文字", "語", "々", "〇", "の", "ひらがな", "カタカナ", "ー", "\u3099"]
SCRIPT_PIECES += ["ภาษา", "ที่", "\u0e31", "ລາວ", "ខ្មែរ", "မြန်မာ", "བོད་", "ꦗꦮ", "한국어", "ｶﾀ"]
SCRIPT_PIECES += [" ", "  ", "\n", "1", "２", "。", "，", "!", "a", "word", "😀", "مرحبا", "\u0301"]
SCRIPT_TEXT = st.lists(st.sampled_from(SCRIPT_PIECES), max_size=20).map("".join)
SCRIPT_STRATEGIES = [SCRIPT1, SCRIPT2, {"script": "2@2-3 han=1 thai=2 kana=5"}]


@pytest.mark.parametrize("strategy", SCRIPT_STRATEGIES, ids=str)
@settings(max_examples=100, deadline=None)
@given(text=SCRIPT_TEXT)
def test_script_matches_naive_reference(strategy, text):
    np.testing.assert_array_equal(
        splitter(strategy).levels(text.encode()), naive_script_levels(strategy, text)
    )


@pytest.mark.parametrize("strategy", SCRIPT_STRATEGIES, ids=str)
@settings(max_examples=40, deadline=None)
@given(text=SCRIPT_TEXT | st.text(max_size=20))
def test_script_prefix_stable_except_blank_before_newline(strategy, text):
    sp = splitter(strategy)
    assert sp.prefix_stable
    data = text.encode()
    full = sp.levels(data)
    last_byte = np.cumsum([len(c.encode()) for c in text]) - 1
    for n in range(len(data) + 1):  # every byte prefix, as generation feeds them
        head = sp.levels(data[:n])
        for j in np.flatnonzero(head != full[:n]):
            i = int(np.searchsorted(last_byte, j))
            assert last_byte[i] == j, "only a codepoint's last byte carries a level"
            assert text[i] not in "\r\n" and regex.match(r"\s", text[i]), (text, n, i)
            assert regex.match(r"\s*[\r\n]", text, pos=i), (text, n, i)
            assert head[j] < full[j]


@pytest.mark.parametrize("strategy", SCRIPT_STRATEGIES, ids=str)
@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=30)
    | st.tuples(SCRIPT_TEXT, st.binary(max_size=4)).map(
        lambda p: p[0].encode()[: len(p[0].encode()) - len(p[1])] + p[1]
    )
)
def test_script_one_level_per_byte(strategy, data):
    sp = splitter(strategy)
    full = sp.levels(data)
    assert full.dtype == np.uint8 and full.shape == (len(data),)
    got = sp.levels_batch(data + data[::-1], np.array([len(data), len(data)]))  # batched alike
    np.testing.assert_array_equal(got, np.concatenate([full, sp.levels(data[::-1])]))


def test_script_long_runs_exact():
    han = "中" * 400_000  # 1.2 MB of Han in one run: run arithmetic, no backtracking
    idx = np.arange(len(han.encode()))
    sp = splitter({"script1": "1@1", "script2": "2@1 han=8"})
    want = np.where(idx % 24 == 2, 2, np.where(idx % 6 == 2, 1, 0))
    np.testing.assert_array_equal(sp.levels(han.encode()), want)
    thai = "ก\u0e48" * 300_000  # letters with tone marks: marks are word-rule symbols, not counted
    got = splitter({"script1": "1@1 thai=5"}).levels(thai.encode())
    per_char = np.zeros(600_000, np.uint8)
    per_char[1::2] = 1
    per_char[0::10] = 1
    np.testing.assert_array_equal(got[2::3], per_char)
    assert not got[0::3].any() and not got[1::3].any()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1@1 zh=2", "'script1'.*'zh=2' is not 'family=N'"),
        ("1@1 han", "'script1'.*'han' is not 'family=N'"),
        ("1@1 han=x", "'script1'.*'han=x'.*integer >= 0"),
        ("1@1 han=-1", "'script1'.*integer >= 0"),
        ("0@1", "'script1'.*N=0"),
        ("", "'script1'.*'N@M'"),
    ],
)
def test_script_validation_names_the_key(value, message):
    with pytest.raises(ValueError, match=message):
        Splitter({"script1": value})
    with pytest.raises(ValueError, match="'word1'.*takes no options"):
        Splitter({"word1": "1@1 han=2"})
    with pytest.raises(ValueError, match="'script'.*needs '@M'"):
        Splitter({"script": "2"})
