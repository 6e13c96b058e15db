"""Train (or find) the spec's BPE tokenizer on the training split: the BPE baseline's vocabulary.

``python -m pipelines.tokenizer experiment.yaml [variant=NAME] [a.b=v | --set a.b=v] [--force]``

Prints the tokenizer's path (stdout), vocabulary size, sha256 and bytes per token on the train
and val splits (stderr). Without ``variant=``: the spec's own tokenizer, else that of every
variant that sets one (``variants: {bpe: {tokenizer.vocab_size: 4096, ...}}``).
``pipelines.preprocess`` calls the same ``ensure_tokenizer`` before it packs token-id shards, so
a tokenizer trained here is the one the dataset uses (docs/data.md, Token-id datasets).

- Training documents: the training split only, assigned exactly as preprocessing assigns them
  (``entropy_fit.split_documents``: same split hash, same ``data.max_documents`` cut), at most
  ``FIT_BYTES`` of them, so validation text never shapes the vocabulary.
- Location: ``tokenizer.path`` when the spec names a file; else
  ``<storage_path>/datasets/tokenizers/<name>-<hash>/tokenizer.json``, the hash over what the
  training documents and the merges depend on (input contents, split settings, vocab size,
  pattern): specs that differ in model or packing settings share it, and an existing file is
  reused, never retrained.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any

from aunet.tokenizer import BPETokenizer
from pipelines import corpus, entropy_fit, storage
from pipelines.paths import join_path
from pipelines.schema import SpecError
from pipelines.spec import spec_hash

FIT_BYTES = 256 << 20  # HF trains at ~0.5 MB/s per core here; beyond this the merges barely move
MEASURE_BYTES = 32 << 20  # text per split the CLI measures bytes/token on
BLOCK_BYTES = 2 << 20
TOKENIZER_CODE_VERSION = 1  # bumped if training writes other merges for the same settings
FILE = "tokenizer.json"


def tokenizer_path(spec: Any) -> str:
    """Where the spec's tokenizer lives (a local path or a ``pyarrow.fs`` URI)."""
    if spec.tokenizer is None:
        raise SpecError("tokenizer: the spec has no tokenizer section (bytes need none)")
    if spec.tokenizer.path is not None:
        return spec.tokenizer.path
    d = spec.data
    blob = {
        "sources": [
            {
                "path": corpus.source_digests(s.path),
                **{k: getattr(s, k) for k in ("weight", "format", "text_field", "id_field")},
            }
            for s in d.sources
        ],
        **{k: getattr(d, k) for k in ("val_fraction", "seed", "max_documents", "unit_bytes")},
        "tokenizer": spec.tokenizer_identity(),
        "fit_bytes": FIT_BYTES,
        "code": TOKENIZER_CODE_VERSION,
    }
    leaf = f"{spec.name}-{spec_hash(blob)}"
    return join_path(spec.resources.storage_path, "datasets", "tokenizers", leaf, FILE)


def read_tokenizer(location: str, key: str = "tokenizer.path") -> BPETokenizer | None:
    """The tokenizer at ``location``, None when there is no file; a damaged one names the file."""
    fs, path = storage.resolve(location)
    raw = storage.read_bytes(fs, path)
    if raw is None:
        return None
    try:
        return BPETokenizer.from_json(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecError(f"{key}: {location}: {e}") from None


def ensure_tokenizer(
    spec: Any,
    inputs: list[dict[str, Any]] | None = None,
    *,
    block_bytes: int = BLOCK_BYTES,
    force: bool = False,
) -> tuple[BPETokenizer, str, bool]:
    """(tokenizer, its location, trained now?): the named or already-trained file, else trained
    on the training split and saved. ``force`` retrains a derived one (never a named file)."""
    cfg = spec.tokenizer
    location = tokenizer_path(spec)
    if cfg.path is not None:
        tok = read_tokenizer(location)
        if tok is None:
            raise FileNotFoundError(f"tokenizer.path: no such file: {location}")
        if cfg.vocab_size is not None and cfg.vocab_size != tok.vocab_size:
            raise SpecError(
                f"tokenizer.vocab_size: {cfg.vocab_size}, but {location} has {tok.vocab_size}"
            )
        if cfg.pattern != tok.pattern:
            raise SpecError(
                f"tokenizer.pattern: {cfg.pattern!r}, but {location} has {tok.pattern!r}"
            )
        return tok, location, False
    if not force:
        tok = read_tokenizer(location, "tokenizer")
        if tok is not None:
            return tok, location, False
    if inputs is None:
        inputs = corpus.resolve_inputs(spec.data.sources)
    docs = entropy_fit.split_documents(spec, inputs, block_bytes, "train", FIT_BYTES)
    tok = BPETokenizer.train(_nonempty(docs), cfg.vocab_size, pattern=cfg.pattern)
    fs, path = storage.resolve(location)
    storage.write_bytes(fs, path, tok.to_json().encode("utf-8"))
    return tok, location, True


def _nonempty(docs: Iterable[bytes]) -> Iterable[bytes]:
    """The training documents; none at all is the user's corpus problem, said as such."""
    n = 0
    for d in docs:
        n += 1
        yield d
    if n == 0:
        raise corpus.CorpusError("tokenizer: the training split holds no document to train on")


def bytes_per_token(tok: BPETokenizer, docs: Iterable[bytes], batch: int = 256) -> float | None:
    """Text bytes / text tokens over ``docs`` (no BOS/EOS): the compression the BPE achieves."""
    n_bytes = n_tokens = 0
    chunk: list[bytes] = []
    for d in [*docs, None]:
        if d is not None:
            chunk.append(d)
        if chunk and (d is None or len(chunk) >= batch):
            n_bytes += sum(len(x) for x in chunk)
            n_tokens += sum(len(ids) for ids in tok.encode_batch(chunk))
            chunk = []
    return n_bytes / n_tokens if n_tokens else None


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_main

    return run_main(_main, argv)


def _main(argv: list[str]) -> int:
    from pipelines.spec import help_text, load_spec

    ap = argparse.ArgumentParser(
        prog="python -m pipelines.tokenizer",
        description=__doc__,
        epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("spec", help="experiment YAML")
    ap.add_argument("overrides", nargs="*", help="dotted overrides a.b=value")
    ap.add_argument(
        "--set", action="append", default=[], dest="sets", metavar="A.B=V", help="override a key"
    )
    ap.add_argument("--variant", help="this entry of variants: (also variant=NAME)")
    ap.add_argument("--force", action="store_true", help="retrain even if the file exists")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    variant = args.variant
    overrides = []
    for item in [*args.overrides, *args.sets]:
        if item.startswith("variant="):
            variant = item.split("=", 1)[1]
        else:
            overrides.append(item)
    spec = load_spec(args.spec, overrides)
    if variant is not None:
        specs = [spec.with_variant(variant)]
    elif spec.tokenizer is not None:
        specs = [spec]
    else:
        specs = [spec.with_variant(v) for v in spec.variants or {}]
    specs = [s for s in specs if s.tokenizer is not None]
    if not specs:
        raise SpecError("tokenizer: the spec has no tokenizer section; set tokenizer.vocab_size")
    for s in specs:
        corpus.check_sources(s.data.sources)
    for s in specs:
        _report(s, args.force)
    return 0


def _report(spec: Any, force: bool) -> None:
    """Train (or find) one spec's tokenizer and say what it is."""
    inputs = corpus.resolve_inputs(spec.data.sources)
    tok, location, trained = ensure_tokenizer(spec, inputs, force=force)
    bpt = {
        s: bytes_per_token(
            tok, entropy_fit.split_documents(spec, inputs, BLOCK_BYTES, s, MEASURE_BYTES)
        )
        for s in ("train", "val")
    }
    shown = {s: "n/a" if v is None else f"{v:.3f}" for s, v in bpt.items()}
    print(
        f"tokenizer: {'trained' if trained else 'reused'} vocab_size {tok.vocab_size} "
        f"({tok.pattern}), sha256 {tok.sha256}, bytes/token train {shown['train']} "
        f"val {shown['val']}",
        file=sys.stderr,
    )
    print(location)


if __name__ == "__main__":
    sys.exit(main())
