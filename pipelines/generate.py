"""Generate a continuation from a trained AU-Net.

    python -m pipelines.generate <checkpoint dir | runs:/... | models:/...> --prompt "Once upon"
        [--max-new-bytes N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop STR]
        [--echo-prompt] [--tracking-uri URI]

Prints the continuation (UTF-8, invalid bytes replaced) on stdout, after the prompt with
``--echo-prompt`` (the bytes are decoded together, so a character split between prompt and
continuation prints whole). A progress bar goes to stderr,
only when stderr is a terminal and the generation is long enough to be worth one. An MLflow URI
is read from ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``./mlruns.db`` if it exists
(``pipelines.serve.store_for``); a checkpoint that cannot be found or read is one line
``error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

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
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--tracking-uri", default=None, help="MLflow store of a runs:/ or models:/ source"
    )
    return ap


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
    bar = None
    if sys.stderr.isatty() and args.max_new_bytes >= PROGRESS_MIN_BYTES:
        from tqdm import tqdm

        bar = tqdm(total=args.max_new_bytes, unit="B", file=sys.stderr, leave=False)
    try:
        out = model.generate(
            args.prompt.encode("utf-8"),
            max_new_bytes=args.max_new_bytes,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            stop=args.stop.encode("utf-8") if args.stop else None,
            seed=args.seed,
            on_step=(lambda k: bar.update(k - bar.n)) if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    shown = args.prompt.encode("utf-8") + out if args.echo_prompt else out
    print(shown.decode("utf-8", errors="replace"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
