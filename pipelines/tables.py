"""Result tables and figures for papers: one table description, rendered as text, HTML and LaTeX;
figures saved as PNG (for the HTML page), SVG and PDF (for papers); a provenance header.

Why one module: the scaling report and the sweep summary show the same kinds of tables (values
with units, links to MLflow runs), and a table typed once cannot disagree between its terminal,
HTML and LaTeX forms. Stdlib only (matplotlib is passed in as a figure), so it is a leaf.
"""

from __future__ import annotations

import html
import math
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

FIGURE_FORMATS = ("png", "svg", "pdf")


@dataclass(frozen=True)
class Column:
    """A table column: the row key, its header (with the unit), and how a value is printed.

    ``link``: the row key holding a URL for this cell (HTML only; text and LaTeX print the value).
    """

    key: str
    header: str
    fmt: Callable[[Any], str] = str
    link: str | None = None

    def text(self, row: Mapping[str, Any]) -> str:
        v = row.get(self.key)
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "-"
        return v if isinstance(v, str) else self.fmt(v)


def sig(digits: int) -> Callable[[Any], str]:
    """``digits`` significant digits (FLOPs, bytes, learning rates)."""
    return lambda v: f"{float(v):.{digits}g}"


def fixed(decimals: int) -> Callable[[Any], str]:
    """``decimals`` decimals (bits/byte, R²)."""
    return lambda v: f"{float(v):.{decimals}f}"


def signed_pct(v: Any) -> str:
    return f"{float(v):+.2%}"


def count(v: Any) -> str:
    return f"{int(float(v)):,}"


def render_text(rows: Sequence[Mapping[str, Any]], cols: Sequence[Column]) -> str:
    cells = [[c.text(r) for c in cols] for r in rows]
    widths = [max(len(c.header), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda cs: "  ".join(x.ljust(w) for x, w in zip(cs, widths)).rstrip()  # noqa: E731
    return "\n".join(
        [line([c.header for c in cols]), line(["-" * w for w in widths])]
        + [line(row) for row in cells]
    )


def render_html(rows: Sequence[Mapping[str, Any]], cols: Sequence[Column]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c.header)}</th>" for c in cols)
    body = []
    for r in rows:
        tds = []
        for c in cols:
            text, url = esc(c.text(r)), r.get(c.link) if c.link else None
            tds.append(
                f'<td><a href="{esc(str(url))}">{text}</a></td>' if url else f"<td>{text}</td>"
            )
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def render_latex(
    rows: Sequence[Mapping[str, Any]], cols: Sequence[Column], caption: str, label: str
) -> str:
    """A ``table`` float with a booktabs ``tabular`` (``\\usepackage{booktabs}``); text columns
    left-aligned, numbers right-aligned."""
    numeric = [
        all(not isinstance(r.get(c.key), str) for r in rows if r.get(c.key) is not None)
        for c in cols
    ]
    spec = "".join("r" if n else "l" for n in numeric)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(caption)}}}",
        rf"\label{{{label}}}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(latex_escape(c.header) for c in cols) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(latex_escape(c.text(r)) for c in cols) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def save_figure(fig: Any, png: Path, dpi: int = 120) -> list[Path]:
    """``png`` and, beside it, the same figure as SVG and PDF (vector, for papers)."""
    paths = [png.with_suffix(f".{ext}") for ext in FIGURE_FORMATS]
    for p in paths:
        fig.savefig(p, dpi=dpi) if p.suffix == ".png" else fig.savefig(p)
    return paths


def git_commit() -> str | None:
    """The commit of this checkout (None outside git), and ``+dirty`` when it has local edits."""
    repo = str(Path(__file__).resolve().parent.parent)
    try:
        head = subprocess.run(
            ["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not head:
            return None
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def provenance(**fields: Any) -> dict[str, str]:
    """Date (UTC) and the report code's commit, then the caller's fields (spec file, dataset
    hash, tracking store, ...); a list of several values is joined, an empty one reads '-'."""
    out = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "report code": git_commit() or "-",
    }
    for k, v in fields.items():
        if isinstance(v, (list, tuple, set)):
            v = ", ".join(sorted(str(x) for x in v if x)) or "-"
        out[k] = str(v) if v not in (None, "") else "-"
    return out


def provenance_html(prov: Mapping[str, str]) -> str:
    items = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in prov.items()
    )
    return f"<table class='prov'>{items}</table>"


def provenance_latex(prov: Mapping[str, str]) -> str:
    return "".join(f"% {k}: {v}\n" for k, v in prov.items())


def run_link(tracking_uri: str, experiment_id: str | None, run_id: str) -> str | None:
    """The MLflow UI page of a run when the store is a tracking server; a file or database store
    has no UI address (open it with ``mlflow ui --backend-store-uri ...``)."""
    if not tracking_uri.startswith(("http://", "https://")) or not experiment_id:
        return None
    base = tracking_uri.split("@", 1)[-1] if "@" in tracking_uri.split("//", 1)[1] else None
    root = f"{tracking_uri.split('//', 1)[0]}//{base}" if base else tracking_uri
    return f"{root.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
