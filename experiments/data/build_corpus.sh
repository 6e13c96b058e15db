#!/usr/bin/env bash
# Rebuild the quickstart corpus (quickstart.jsonl.gz, quickstart_val.jsonl.gz) from Debian packages.
# Needs apt-get (Debian bookworm sources), dpkg and python3; nothing is installed on the system:
# the packages are only downloaded and unpacked into a scratch directory.
# Usage: experiments/data/build_corpus.sh [output_dir]   (default: the directory of this script)
set -euo pipefail
out=$(cd "${1:-$(dirname "$0")}" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# Pinned versions: a different version gives different bytes, so fail instead of drifting.
pkgs=(
  bible-kjv-text=4.38 bible-kjv=4.38
  debian-reference-de=2.100 debian-reference-fr=2.100
  debian-reference-ja=2.100 debian-reference-zh-cn=2.100
  maint-guide-ru=1.2.53
)
apt-get download "${pkgs[@]}"
for deb in ./*.deb; do dpkg -x "$deb" root/; done

# KJV: the `bible` program decodes its own compressed data file; -f off = one verse per line.
./root/usr/bin/bible -p root/usr/lib -f "Gen1:1-Rev22:21" </dev/null >kjv.txt

export WORK="$work" OUT="$out"
python3 - <<'EOF'
import gzip, json, os, re

work, out = os.environ["WORK"], os.environ["OUT"]
share = f"{work}/root/usr/share"

def tidy(lines):
    text = "\n".join(l.rstrip() for l in lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"

# --- KJV: one document per chapter ("Ge1:1 In the beginning ...").
chapters = {}
for line in open(f"{work}/kjv.txt", encoding="utf-8"):
    m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", line.rstrip("\n"))
    if not m:
        raise SystemExit(f"kjv.txt: unexpected line {line!r}")
    book, ch, verse, text = m.groups()
    chapters.setdefault((book, int(ch)), []).append(f"{verse} {text}")
kjv = [
    {"id": f"kjv-{b}-{c:03d}", "text": tidy([f"{b} {c}", ""] + vs), "lang": "en",
     "source": f"bible-kjv-text 4.38: King James Version, {b} {c}"}
    for (b, c), vs in chapters.items()
]

# --- Debian documentation (plain-text renderings): one document per section N.M.
# Some translations put a no-break space (U+00A0) after the number.
SUBSECTION = re.compile(r"^([0-9]+|[A-Z])\.[0-9]+\.[0-9]+\.[ \xa0]")

def sections(path, doc_id, lang, source, max_bytes=16000, min_bytes=1000):
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    # The table of contents lists "    1.1. <title>" indented; the body has it at column 0.
    first = next(l.strip() for l in lines if re.match(r"^\s+1\.1\.[ \xa0]", l))
    start = next(i for i, l in enumerate(lines) if l.rstrip().replace("\xa0", " ") == first)
    chunks, cur, prev = [], [], ""
    for line in lines[start:]:
        # Body text is indented; a column-0 line is a heading: a section or a chapter title
        # (or the wrapped tail of the heading just above it).
        heading = bool(line) and not line[0].isspace()
        tail = bool(prev) and not prev[0].isspace()
        if heading and not tail and not SUBSECTION.match(line) and cur:
            chunks.append(cur)
            cur = []
        cur.append(line)
        prev = line
    chunks.append(cur)
    # Chapter titles and short intros join the next section; long sections split at N.M.K.
    docs, carry = [], []
    for chunk in chunks:
        chunk = carry + chunk
        if len("\n".join(chunk).encode()) < min_bytes:
            carry = chunk
            continue
        carry, pieces = [], [[]]
        for line in chunk:
            if SUBSECTION.match(line) and len("\n".join(pieces[-1]).encode()) > max_bytes // 2:
                pieces.append([])
            pieces[-1].append(line)
        if len(pieces) > 1 and len("\n".join(pieces[-1]).encode()) < min_bytes:
            last = pieces.pop()
            pieces[-1] += last
        docs += pieces
    if carry:
        docs[-1] += carry
    result = []
    for i, d in enumerate(docs):
        title = next(l for l in d if l.strip()).strip()
        result.append({"id": f"{doc_id}-{i:03d}", "text": tidy(d), "lang": lang,
                       "source": f"{source}: {title}"})
    return result

ref = f"{share}/debian-reference/debian-reference"
sets = {
    "en": (kjv, 1_000_000),
    "ja": (sections(f"{ref}.ja.txt.gz", "debref-ja", "ja", "debian-reference-ja 2.100"), 700_000),
    "zh": (sections(f"{ref}.zh-cn.txt.gz", "debref-zh", "zh", "debian-reference-zh-cn 2.100"),
           700_000),
    "de": (sections(f"{ref}.de.txt.gz", "debref-de", "de", "debian-reference-de 2.100"), 450_000),
    "fr": (sections(f"{ref}.fr.txt.gz", "debref-fr", "fr", "debian-reference-fr 2.100"), 450_000),
    "ru": (sections(f"{share}/doc/maint-guide-ru/maint-guide.ru.txt.gz", "maintguide-ru", "ru",
                    "maint-guide-ru 1.2.53"), 10_000_000),
}

# Every k-th document trains (spread over the whole book); 3 other documents of 2-20 KB validate.
train, val = [], []
for lang, (docs, target) in sets.items():
    total = sum(len(d["text"].encode()) for d in docs)
    k = max(1, round(total / target))
    picked = [d for i, d in enumerate(docs) if i % k == 0] if k > 1 else list(docs)
    rest = [d for d in docs if d not in picked or k == 1]
    held = [d for d in rest if 2000 <= len(d["text"].encode()) <= 20000]
    held = [held[j * len(held) // 3] for j in range(3)]
    train += [d for d in picked if d not in held]
    val += held

for name, docs in (("quickstart.jsonl.gz", train), ("quickstart_val.jsonl.gz", val)):
    # mtime=0 and a fixed name make the gzip bytes reproducible.
    with open(f"{out}/{name}", "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        for d in docs:
            f.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
    by_lang = {}
    for d in docs:
        n, b = by_lang.get(d["lang"], (0, 0))
        by_lang[d["lang"]] = (n + 1, b + len(d["text"].encode()))
    print(name, {k: f"{n} docs / {b} bytes" for k, (n, b) in by_lang.items()})
EOF
