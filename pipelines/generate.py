"""Generate a continuation from a trained AU-Net.

    python -m pipelines.generate <checkpoint dir | runs:/... | models:/...> --prompt "Once upon"
        [--max-new-bytes N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop STR]
        [--echo-prompt] [--progress | --no-progress] [--tracking-uri URI]

Prints the continuation (UTF-8, invalid bytes replaced) on stdout, after the prompt with
``--echo-prompt`` (the bytes are decoded together, so a character split between prompt and
continuation prints whole). Progress lines (``generate: 128/512 bytes (25%) | 41.2 B/s | ETA
0m09s``, every tenth of ``--max-new-bytes`` or 30 s, in the style of every pipeline's progress:
``pipelines.progress``) go to stderr with ``--progress``, and by default only when stderr is a
terminal and the generation is long enough (256 bytes) to be worth them. An MLflow URI is read
from ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``./mlflow.db`` (or an older
``./mlruns.db``) if it exists (``pipelines.serve.store_for``); a checkpoint that cannot be
found or read is one line ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

from aunet.api import AUModel

PROGRESS_MIN_BYTES = 256


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pipelines.generate", description=__doc__.splitlines()[0]
    )
    ap.add_argument("source", help="checkpoint directory, official lingua dir, or MLflow URI")
    ap.add_argument("--prompt", required=True, help="prompt text (encoded as UTF-8)")
    ap.add_argument("--max-new-bytes", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", default=None, help="stop after this string (not printed)")
    ap.add_argument("--echo-prompt", action="store_true", help="print the prompt before the text")
    ap.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress lines on stderr (default: on a terminal, for >= 256 bytes)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--tracking-uri", default=None, help="MLflow store of a runs:/ or models:/ source"
    )
    return ap


def progress_lines(
    total: int, clock: Callable[[], float] | None = None
) -> tuple[Callable[[int], None], Callable[[int], None]]:
    """``on_step(k)`` for ``generate``, printing a ``generate:`` line when one is due, and
    ``finish(n)``: the closing line when generation stopped early (EOS or ``--stop``)."""
    from pipelines.progress import Cadence, duration, eta, rate, say

    cadence = Cadence(max(1, total // 10), 30.0, clock or time.monotonic)

    def line(k: int, end: str = "") -> None:
        t = max(cadence.elapsed(), 1e-9)
        parts = [f"{k}/{total} bytes ({k / max(total, 1):.0%})", rate(k / t, "B/s")]
        parts.append(end or f"ETA {duration(eta(t, k, total))}")
        say("generate: " + " | ".join(parts), sys.stderr)

    def on_step(k: int) -> None:
        if cadence.due(k, total):
            line(k)

    def finish(n: int) -> None:
        if n < total:
            line(n, "stopped early (EOS or --stop)")

    return on_step, finish


def main(argv: list[str] | None = None) -> int:
    """Run the CLI: print the continuation; a bad source or argument is one line on stderr and
    exit code 2 (``pipelines.cli.run_main``; ``--debug`` shows the traceback)."""
    from pipelines.cli import run_main

    # ValueError: generation settings out of range (aunet.generate checks them).
    return run_main(_main, argv, extra=(ValueError,))


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.tracking_uri:  # read by the MLflow source plugin (pipelines.serve.store_for)
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    model = AUModel.from_pretrained(args.source, device=args.device)
    show = args.progress
    if show is None:
        show = sys.stderr.isatty() and args.max_new_bytes >= PROGRESS_MIN_BYTES
    on_step, finish = progress_lines(args.max_new_bytes) if show else (None, None)
    out = model.generate(
        args.prompt.encode("utf-8"),
        max_new_bytes=args.max_new_bytes,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop=args.stop.encode("utf-8") if args.stop else None,
        seed=args.seed,
        on_step=on_step,
    )
    if finish is not None:
        finish(len(out))
    shown = args.prompt.encode("utf-8") + out if args.echo_prompt else out
    print(shown.decode("utf-8", errors="replace"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
