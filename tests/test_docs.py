"""Citations stay inside the repository and never dangle.

Comments, docstrings, user-visible strings and documentation cite ``docs/*.md`` (optionally with a
section: ``docs/design.md (Pooling)``, ``docs/flops.md, Scaling laws``) or the paper. A citation
of a numbered section of a document that does not ship with the code, or of such a document by
name, points a maintainer at nothing; so does a ``docs/`` file or section that does not exist.
The section sign followed by a number is refused everywhere (cite the paper as "arXiv
2506.14761, Section N"). The patterns, and the planted citations of the control test, are
assembled from pieces so that this file does not match them itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("aunet", "pipelines", "tests", "docs", "experiments", "platform")
SCANNED_FILES = ("README.md", "cluster.yaml")
SKIPPED_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}

SECTION_SIGN = chr(0xA7)
OUTSIDE_DOCUMENTS = ("aunet" + "-spec", "platform" + "-notes", "style" + ".md")
OUTSIDE = re.compile(
    "|".join([re.escape(SECTION_SIGN) + r"\s*\d", *map(re.escape, OUTSIDE_DOCUMENTS)]),
    re.IGNORECASE,
)
# A docs page path, then optionally a section name after ", ", " (" or ": " (a backtick may close
# the path first). Only capitalised names are checked: a path followed by ": see below" is prose.
DOC_CITATION = re.compile(r"\bdocs/([\w.-]+\.md)`?(?:(?:, | \(|: )([A-Z][^,;:)`\n]*))?")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


def text_files() -> list[Path]:
    """Every non-binary file of the scanned folders and top-level files."""
    paths = [ROOT / name for name in SCANNED_FILES if (ROOT / name).is_file()]
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            rel = path.relative_to(ROOT)
            if path.is_file() and not SKIPPED_DIRS & set(rel.parts):
                paths.append(path)
    out = []
    for path in paths:
        head = path.read_bytes()[:8192]
        if b"\0" not in head:
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            out.append(path)
    return out


def headings(doc: Path) -> list[str]:
    """Markdown headings of ``doc``, without the leading #s and backticks."""
    out = []
    in_code = False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            out.append(line.lstrip("#").strip().replace("`", ""))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def outside_citations(text: str) -> list[str]:
    """Lines of ``text`` that cite a section or name of a document outside the repository."""
    return [line.strip() for line in text.splitlines() if OUTSIDE.search(line)]


def dangling_doc_citations(text: str, docs_dir: Path) -> list[str]:
    """``docs/<file>.md`` citations whose file, or cited section, does not exist."""
    bad = []
    for m in DOC_CITATION.finditer(text):
        doc = docs_dir / m.group(1)
        if not doc.is_file():
            bad.append(f"docs/{m.group(1)}: no such file")
            continue
        section = " ".join((m.group(2) or "").split())
        if section and not any(h.lower().startswith(section.lower()) for h in headings(doc)):
            bad.append(f"docs/{m.group(1)}: no section starting with {section!r}")
    return bad


def dangling_links(doc: Path) -> list[str]:
    """Relative Markdown links of a docs page whose file or ``#anchor`` does not exist."""
    bad = []
    for target in MD_LINK.findall(doc.read_text(encoding="utf-8")):
        if "://" in target:
            continue
        name, _, anchor = target.partition("#")
        linked = doc.parent / name if name else doc
        if not linked.is_file():
            bad.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in map(slug, headings(linked)):
            bad.append(f"{target}: no such section")
    return bad


def test_no_citation_of_outside_documents() -> None:
    found = []
    for path in text_files():
        for line in outside_citations(path.read_text(encoding="utf-8")):
            found.append(f"{path.relative_to(ROOT)}: {line}")
    assert not found, "cite docs/*.md or the paper instead:\n" + "\n".join(found)


def test_doc_citations_resolve() -> None:
    found = []
    for path in text_files():
        for problem in dangling_doc_citations(path.read_text(encoding="utf-8"), ROOT / "docs"):
            found.append(f"{path.relative_to(ROOT)}: {problem}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("doc", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_docs_links_resolve(doc: Path) -> None:
    assert dangling_links(doc) == []


def test_docs_index_lists_every_page() -> None:
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    listed = {name for name in MD_LINK.findall(index) if not name.startswith("#")}
    assert pages == listed


def test_scan_covers_the_cited_places() -> None:
    rel = {p.relative_to(ROOT).as_posix() for p in text_files()}
    for expected in (
        "README.md",
        "cluster.yaml",
        "aunet/flops.py",
        "pipelines/report.py",
        "tests/fixtures/README.md",
        "tests/benchmarks/splitting.py",
        "experiments/scaling/paper.yaml",
        "docs/design.md",
        Path(__file__).relative_to(ROOT).as_posix(),
    ):
        assert expected in rel
    assert "experiments/data/quickstart.jsonl.gz" not in rel  # binary: skipped


def test_checkers_flag_planted_lines(tmp_path: Path) -> None:
    """Controls: each kind of bad citation is caught, and good ones pass."""
    sign = SECTION_SIGN
    planted = [
        f"# follows the official packer (spec {sign}2.7)",
        "core ports rely on token auth (" + OUTSIDE_DOCUMENTS[1] + f" {sign}6)",
        "see " + OUTSIDE_DOCUMENTS[0] + ".md for the decisions",
        "failing far from its cause (" + OUTSIDE_DOCUMENTS[2] + " rule 2)",
        f"(paper {sign} 4.1)",
    ]
    assert outside_citations("\n".join(planted)) == planted
    good = "(docs/design.md, Pooling) and the paper (arXiv 2506.14761, Section 3); Rule 2 of X"
    assert outside_citations(good) == []

    d = "do" + "cs/"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\n\n## Pooling rules\n\n```\n# Not a heading\n```\n")
    cited = (
        f"({d}a.md, Pooling) (`{d}a.md` (Pooling rules)) {d}a.md: see below\n"
        f"{d}nowhere.md and ({d}a.md, Upsampling) and {d}a.md (Not a heading)"
    )
    assert dangling_doc_citations(cited, docs) == [
        f"{d}nowhere.md: no such file",
        f"{d}a.md: no section starting with 'Upsampling'",
        f"{d}a.md: no section starting with 'Not a heading'",
    ]
    (docs / "b.md").write_text("[ok](a.md#pooling-rules) [x](a.md#nothing) [y](c.md) [z](#b)\n")
    assert dangling_links(docs / "b.md") == [
        "a.md#nothing: no such section",
        "c.md: no such file",
        "#b: no such section",
    ]
