"""Entropy split stages in preprocessing: fit the byte model on the training split and resolve
the stages' targets to thresholds, before any document is encoded (docs/design.md, Splitting:
entropy-driven boundaries).

The resolved strategy (thresholds, and the model inside each value) is what the shards are
encoded with; the manifest records it (``resolved_strategy``) with the fit report (``entropy``),
and ``dataset_spec`` hands it to training, so checkpoints, evaluation and generation use exactly
the boundaries the data was encoded with. The fit reads the documents the dataset keeps (same
split hash, same ``data.max_documents`` cut, in input order), training split only, at most
``FIT_BYTES`` of them: a deterministic sample whatever the cluster size.

``dataset_spec`` also hands training the vocabulary of a token-id dataset (the BPE baseline,
docs/data.md): ``model.vocab_size``, ``bos_id`` and ``eos_id`` come from the manifest's
``tokenizer`` entry, which the training tokenizer's size decides (a small corpus may yield fewer
merges than asked for), so a spec leaves them at the byte defaults; a spec that sets another
vocabulary than its dataset's fails in one line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from aunet.entropy import EntropyStrategyError, resolve
from pipelines import corpus
from pipelines.schema import SpecError

FIT_BYTES = 32 << 20  # the driver fits and sets thresholds at ~1.4 MB/s (4 MB: 2.9 s here)


def has_entropy(strategy: dict[str, str]) -> bool:
    return any(k.startswith("entropy") for k in strategy)


def training_documents(spec: Any, inputs: list[dict[str, Any]], block_bytes: int) -> list[bytes]:
    """The training split's documents in dataset order (work units in order, the same split hash
    and ``data.max_documents`` cut as the unit tasks), up to ``FIT_BYTES``."""
    return list(split_documents(spec, inputs, block_bytes, "train", FIT_BYTES))


def split_documents(
    spec: Any, inputs: list[dict[str, Any]], block_bytes: int, split: str, max_bytes: int
) -> Iterator[bytes]:
    """One split's documents (``"train"`` or ``"val"``) in dataset order, as the unit tasks
    assign them, until ``max_bytes`` of them or the ``data.max_documents`` cut. Also what the
    BPE tokenizer trains on (``pipelines.tokenizer``): one assignment, never two."""
    want = {"train": 0, "val": 1}[split]
    settings = {
        "seed": spec.data.seed,
        "val_fraction": spec.data.val_fraction,
        "block_bytes": block_bytes,
    }
    size = kept = 0
    cap = spec.data.max_documents
    for unit in corpus.plan_units(inputs, spec.data.unit_bytes):
        for table in corpus.unit_tables(unit, inputs, settings):
            for s, data in zip(table.column("split").to_pylist(), table.column("data").to_pylist()):
                if s < 0:
                    continue
                kept += 1
                if s == want:
                    yield data
                    size += len(data)
                if size >= max_bytes or (cap is not None and kept >= cap):
                    return


def resolve_spec(spec: Any, inputs: list[dict[str, Any]], block_bytes: int) -> tuple[Any, dict]:
    """``spec`` with its entropy stages resolved, and the fit report ({} without entropy)."""
    strategy = spec.model.split_strategy
    if not has_entropy(strategy):
        return spec, {}
    docs = training_documents(spec, inputs, block_bytes)
    if not docs:
        raise SpecError("model.strategy: the entropy model needs training documents; none kept")
    try:
        resolved, report = resolve(strategy, docs)
    except EntropyStrategyError as e:
        raise SpecError(f"model.strategy: {e}") from None
    return with_strategy(spec, resolved), report


def with_strategy(spec: Any, strategy: dict[str, str]) -> Any:
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, strategy=strategy))


def dataset_spec(spec: Any, manifest: dict[str, Any] | None) -> Any:
    """The spec a run trains with: its strategy as the dataset resolved it, and the vocabulary
    of the dataset's tokenizer (manifest); without a manifest, the spec as it is."""
    pairs = (manifest or {}).get("resolved_strategy")
    spec = with_strategy(spec, dict(pairs)) if pairs else spec
    return with_vocabulary(spec, manifest) if manifest is not None else spec


def with_vocabulary(spec: Any, manifest: dict[str, Any]) -> Any:
    """``spec`` with the model vocabulary of its dataset: the tokenizer's ids (vocab size, BOS,
    EOS) for a token-id dataset, the 258 byte ids otherwise. ``model.vocab_size`` left at the
    byte default takes the dataset's; any other value must equal it (one line naming both)."""
    from aunet.config import VOCAB_SIZE, ConfigError

    tok = manifest.get("tokenizer")
    model = spec.model
    if not tok:
        if model.vocab_size != VOCAB_SIZE:
            raise SpecError(
                f"model.vocab_size: {model.vocab_size}, but the dataset is bytes ({VOCAB_SIZE} "
                "ids; no tokenizer in its manifest.json): set tokenizer.vocab_size instead"
            )
        return spec
    try:
        want = {k: int(tok[k]) for k in ("vocab_size", "bos_id", "eos_id")}
    except (KeyError, TypeError, ValueError):
        raise SpecError(
            "tokenizer: the dataset's manifest.json names a tokenizer without integer "
            "vocab_size, bos_id and eos_id"
        ) from None
    if model.vocab_size not in (VOCAB_SIZE, want["vocab_size"]):
        raise SpecError(
            f"model.vocab_size: {model.vocab_size}, but the dataset's tokenizer has "
            f"{want['vocab_size']} ids (manifest.json); leave model.vocab_size unset to take it"
        )
    if (model.vocab_size, model.bos_id, model.eos_id) == tuple(want.values()):
        return spec
    try:
        return dataclasses.replace(spec, model=dataclasses.replace(model, **want))
    except ConfigError as e:
        raise SpecError(str(e)) from None
