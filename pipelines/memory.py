"""Memory per GPU of an experiment spec, before renting the GPUs: ``aunet.memory`` on the spec.

    python -m pipelines.memory <experiment.yaml> [k=v ...] [--world N] [--batch B]

One table per model (the spec's, then each variant's): parameters, gradients, optimizer state and
activations per device for training (``train.dtype``, ``train.activation_checkpointing``, FSDP over
``resources.num_workers`` GPUs, ``train.batch_size`` / GPUs sequences, else 1), and the bf16 weights
plus key/value cache of serving one ``seq_len`` context. ``aunet.memory`` is the pure estimator;
this module only reads the YAML (``aunet`` imports no yaml). docs/performance.md (Memory).
"""

from __future__ import annotations

import argparse
import sys

from aunet.memory import format_table, inference_memory, training_memory
from pipelines.schema import apply_overrides, read_yaml_mapping
from pipelines.spec import ExperimentSpec


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pipelines.memory",
        description="Estimated memory per GPU of training and serving an experiment's models.",
    )
    ap.add_argument("spec", help="experiment YAML")
    ap.add_argument("overrides", nargs="*", help="k=v overrides, e.g. train.dtype=bfloat16")
    ap.add_argument("--world", type=int, default=None, help="GPUs (default resources.num_workers)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per GPU")
    return ap


def spec_table(spec: ExperimentSpec, world: int, batch: int | None, label: str) -> str:
    """The markdown table of one spec's model."""
    tr, T = spec.train, spec.data.seq_len
    dtype = "bfloat16" if tr.dtype in ("auto", "bfloat16") else "float32"  # auto: as on a GPU
    if batch is None:
        batch = max(1, (tr.batch_size or world) // world)
    ac = tr.activation_checkpointing
    ac = {True: "blocks", False: "none"}.get(ac, ac) if isinstance(ac, bool) else ac
    train = training_memory(spec.model, T, batch, dtype, world, ac)
    serve = inference_memory(spec.model, T, 1, "bfloat16")
    title = (
        f"{label}: training, {dtype}, FSDP x{world}, {batch} x {T} bytes per GPU, "
        f"checkpointing {ac}"
    )
    serving = format_table(serve.rows()[:1] + serve.rows()[3:], f"{label}: serving, bf16, 1 x {T}")
    return format_table(train.rows(), title) + "\n\n" + serving.replace("activations", "kv cache")


def load_any(path: str, overrides: list[str]) -> ExperimentSpec:
    """An experiment spec, or the experiment part of a sweep or study spec (a study's variants
    become the spec's; a study sets the steps, so a missing ``train.steps`` is taken as 1)."""
    raw = read_yaml_mapping(path)
    raw.pop("sweep", None)
    study = raw.pop("study", None)
    if isinstance(study, dict) and study.get("variants"):
        raw["variants"] = study["variants"]
    train = raw.get("train")
    if isinstance(train, dict) and "steps" not in train and "flop_budget" not in train:
        train["steps"] = 1
    apply_overrides(raw, overrides, path)
    return ExperimentSpec.from_dict(raw, source=path)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    spec = load_any(args.spec, args.overrides)
    world = args.world or spec.resources.num_workers
    specs = [(spec.name, spec)] + [(v, spec.with_variant(v)) for v in spec.variants or {}]
    for label, s in specs:
        print(spec_table(s, world, args.batch, label) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Bad spec or argument: one line on stderr, exit code 2 (``pipelines.cli.run_main``)."""
    from pipelines.cli import run_main

    return run_main(_main, argv, extra=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
