"""Evaluate a trained AU-Net on the suites of an eval YAML and log every number to MLflow.

``python -m pipelines.evaluate <checkpoint dir | MLflow run id | runs:/ URI> <eval.yaml>
[a.b=v | --set a.b=v ...] [--run-id ID] [--new-run] [--no-mlflow] [--tasks a,b] [--output f.json]``

Metrics are named ``eval/<task>/<metric>`` (per group: ``eval/<task>/<group>/<metric>``) and are
logged at the checkpoint's training step into the training run the checkpoint came from (its
metadata, else the run whose ``aunet.run_key`` is the checkpoint's run directory, else
``--run-id``), so evaluation curves sit next to the loss curves; otherwise into a new run of the
eval config's experiment. ``evaluate(model, cfg)`` is the same evaluation without any I/O to MLflow,
for training to call (periodically or at the end).

Scoring uses ``aunet.evaluation`` (training forward, docs/design.md): sliding-window bits/byte with
the training context, byte log-likelihoods for choices, greedy generation for character tasks.
A token model (the BPE baseline) is scored through its checkpoint's tokenizer, so every variant
reports bits per byte: token NLL over the document's bytes, choices by their bytes, generations
decoded to bytes (docs/design.md, BPE baseline).
``kind: lm_eval`` suites run lm-evaluation-harness tasks through the ``aunet`` adapter
(``pipelines.lm_eval_model``, imported only then), which scores with the same functions.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from aunet.evaluation import (
    ChoiceItem,
    aggregate,
    make_char_tasks,
    score_char_tasks,
    score_choices,
    score_texts,
)
from aunet.model import AUNet
from pipelines import tracking
from pipelines.eval_config import EvalConfig, TaskConfig, load_eval_config
from pipelines.eval_tasks import (
    PartialItem,
    TaskDataError,
    load_choice_items,
    make_cloze,
    read_texts,
    read_words,
)
from pipelines.paths import absolute_tracking_uri, redact
from pipelines.runtime import check_tracking_reachable
from pipelines.spec import SpecError

if TYPE_CHECKING:
    from aunet.tokenizer import BPETokenizer

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
Tokenizer = Optional["BPETokenizer"]  # a token model's tokenizer; None: the model reads bytes


# ---------------------------------------------------------------------------------- suites
def _choice_hits(
    model: AUNet, items: list, bs: int, max_len: int, tok: Tokenizer = None
) -> dict[str, list[bool]]:
    """Per item: is the argmax of the log-likelihoods (and of their per-character means) gold?"""
    if isinstance(items[0], PartialItem):  # the options change the context: compare contexts
        flat = [ChoiceItem(c, (it.continuation,), 0) for it in items for c in it.contexts]
        lls = iter(score_choices(model, flat, bs, max_len, tokenizer=tok).loglik)
        hits = []
        for it in items:
            row = [next(lls)[0] for _ in it.contexts]
            hits.append(max(range(len(row)), key=row.__getitem__) == it.gold)
        return {"acc": hits}  # acc_norm is acc here: every option scores the same continuation
    res = score_choices(model, items, bs, max_len, tokenizer=tok)
    return {
        "acc": [p == it.gold for p, it in zip(res.pred, items)],
        "acc_norm": [p == it.gold for p, it in zip(res.pred_norm, items)],
    }


def _mean(hits: list[bool]) -> float:
    return sum(hits) / len(hits)


def _bpb(
    model: AUNet, t: TaskConfig, ctx: int, stride: int | None, bs: int, tok: Tokenizer = None
) -> dict[str, float]:
    docs = read_texts(t.path, t.text_field, t.group_field, t.limit)
    scores = score_texts(model, [d.encode() for d, _ in docs], ctx, stride, bs, tokenizer=tok)
    out = {"bits_per_byte": aggregate(scores).bits_per_byte}
    groups = sorted({g for _, g in docs if g is not None})
    for g in groups:
        out[f"{g}/bits_per_byte"] = aggregate(
            s for s, (_, dg) in zip(scores, docs) if dg == g
        ).bits_per_byte
    return out


def _cloze(model: AUNet, t: TaskConfig, ctx: int, bs: int, tok: Tokenizer) -> dict[str, float]:
    docs = read_texts(t.path, t.text_field, t.group_field, t.limit)
    pairs = make_cloze(docs, t.n, t.num_choices, t.seed, t.prefix_chars, t.min_chars)
    if not pairs:
        raise TaskDataError(f"{t.path}: no cloze items (need 2+ documents per group)")
    hits = _choice_hits(model, [it for _, it in pairs], bs, ctx, tok)
    out = {k: _mean(h) for k, h in hits.items()}
    groups = sorted({g for g, _ in pairs})
    for g in groups if len(groups) > 1 else ():
        for k, h in hits.items():
            out[f"{g}/{k}"] = _mean([x for x, (gg, _) in zip(h, pairs) if gg == g])
    return out


def _char(model: AUNet, t: TaskConfig, bs: int, tok: Tokenizer) -> dict[str, float]:
    from aunet.generate import generate

    words = read_words(t.path)

    def greedy(prompts: list[bytes], max_new: int) -> list[bytes]:
        out: list[bytes] = []
        for i in range(0, len(prompts), bs):
            batch = prompts[i : i + bs]
            out += generate(model, batch, max_new, temperature=0.0, stop=b"\n", tokenizer=tok)
        return out

    out = {}
    for task in t.tasks:
        examples = make_char_tasks(words, task, t.n, t.seed, t.shots)
        out[f"{task}/exact_match"] = score_char_tasks(examples, greedy)
    out["exact_match"] = sum(out.values()) / len(out)
    return out


def _lm_eval(
    model: AUNet, name: str, t: TaskConfig, ctx: int, stride: int | None, bs: int, tok: Tokenizer
) -> dict[str, float]:
    """lm-evaluation-harness tasks through the ``aunet`` adapter: ``<lm task>/<metric>``."""
    try:
        from pipelines.lm_eval_model import run_tasks  # lm_eval is optional: imported when used
    except ImportError as e:
        raise SpecError(
            f"tasks.{name}: kind lm_eval needs the lm_eval package ({e}); "
            "pip install 'lm_eval>=0.4' (the project's eval extra)"
        ) from None
    if t.path is None or not Path(t.path).is_dir():
        raise TaskDataError(f"{t.path}: tasks.{name}.path: expected a folder of lm-eval task YAMLs")
    try:
        metrics, _ = run_tasks(
            model,
            t.lm_eval_tasks,
            t.path,
            max_length=ctx,
            batch_size=bs,
            stride=stride,
            limit=t.limit,
            num_fewshot=t.num_fewshot,
            seed=t.seed,
            tokenizer=tok,
        )
    except ValueError as e:  # an unknown task name, a continuation longer than the context
        raise TaskDataError(f"tasks.{name}: {e}") from None
    return metrics


def evaluate(
    model: AUNet | Any,
    eval_cfg: EvalConfig | str | Path,
    *,
    context: int | None = None,
    tasks: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
    tokenizer: Tokenizer = None,
) -> dict[str, float]:
    """Every suite of ``eval_cfg`` on ``model`` -> ``{"eval/<task>/<metric>": value}``.

    ``tokenizer``: a token model's (``aunet.tokenizer.BPETokenizer``); default: the ``AUModel``'s
    own (``from_pretrained`` restores it with the weights), None for a byte model.

    ``context`` is the training window (``seq_len``), used when the config sets none: windows and
    choice sequences never exceed it, as the model's capacities are sized for it. The model's
    device and train/eval mode are kept (restored on return). A ``char`` suite on a model whose
    split strategy cannot generate (docs/design.md, Prefix stability) is skipped with a message.
    """
    from aunet.generate import generation_splitter

    cfg = load_eval_config(eval_cfg) if isinstance(eval_cfg, (str, Path)) else eval_cfg
    net: AUNet = getattr(model, "model", model)  # AUModel wraps the AUNet
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    ctx = cfg.context or context
    if ctx is None:
        raise SpecError(f"{cfg.name}: context: not set and not known from the checkpoint; set it")
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    unknown = [n for n in tasks or () if n not in cfg.tasks]
    if unknown:
        raise SpecError(f"{cfg.name}: tasks: no task {unknown[0]!r} (have {', '.join(cfg.tasks)})")
    was_training = net.training
    net.eval()
    metrics: dict[str, float] = {}
    try:
        for name, t in cfg.tasks.items():
            if tasks and name not in tasks:
                continue
            t0 = time.perf_counter()
            bs = cfg.batch_size
            if t.kind == "bpb":
                res = _bpb(net, t, ctx, cfg.stride, bs, tok)
            elif t.kind == "cloze":
                res = _cloze(net, t, ctx, bs, tok)
            elif t.kind == "choice":
                hub = None if t.hub is None else (t.hub.path, t.hub.name, t.hub.split)
                items = load_choice_items(t.format, t.path, hub, t.limit)
                res = {k: _mean(h) for k, h in _choice_hits(net, items, bs, ctx, tok).items()}
            elif t.kind == "lm_eval":
                res = _lm_eval(net, name, t, ctx, cfg.stride, bs, tok)
            else:
                try:
                    generation_splitter(net.config)
                except ValueError as e:
                    say(f"evaluate: {name}: skipped: {e}")
                    continue
                res = _char(net, t, bs, tok)
            res["time_s"] = time.perf_counter() - t0
            say(f"evaluate: {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()))
            metrics.update({f"eval/{name}/{k}": float(v) for k, v in res.items()})
    finally:
        net.train(was_training)
    return metrics


# ---------------------------------------------------------------------------------- sources
@dataclass
class Source:
    path: Path  # local checkpoint directory
    run_id: str | None  # the MLflow run the checkpoint belongs to, when known
    metadata: dict[str, Any]


def resolve_source(source: str, uri: str | None) -> Source:
    """A checkpoint directory, MLflow run id (its ``final`` artifact) or MLflow URI, made local."""
    from aunet.checkpoint import CONFIG_FILE, CheckpointError, read_config
    from pipelines.serve import download_mlflow, is_mlflow_uri

    run_id = None
    if is_mlflow_uri(source) or (_RUN_ID.match(source) and not Path(source).exists()):
        if uri is None:
            raise CheckpointError(f"{source}: an MLflow source needs tracking (drop --no-mlflow)")
        if source.startswith("runs:/"):
            run_id = source[len("runs:/") :].split("/")[0]
        elif not is_mlflow_uri(source):
            run_id, source = source, f"runs:/{source}/final"
        path = download_mlflow(source, tracking_uri=uri)
    else:
        path = Path(os.path.abspath(source))
    metadata = read_config(path)[1] if (path / CONFIG_FILE).is_file() else {}
    run_id = run_id or metadata.get("mlflow_run_id")
    if run_id is None and uri is not None and path.name == "final":  # <run dir>/final
        run_id = tracking.find_run_by_key(uri, os.path.normpath(str(path.parent)))
    return Source(path, run_id, metadata)


def log_to_mlflow(
    uri: str,
    cfg: EvalConfig,
    metrics: dict[str, float],
    *,
    run_id: str | None,
    step: int,
    source: str,
    params: dict[str, Any],
) -> str:
    """Log into ``run_id`` (left in its state) or a new run of the eval experiment; its id."""
    check_tracking_reachable(uri)
    if run_id is not None:
        try:
            tracking.get_run(uri, run_id)
        except Exception as e:
            print(
                f"evaluate: run {run_id} not in {uri} ({type(e).__name__}); logging to a new run",
                file=sys.stderr,
            )
            run_id = None
    new = run_id is None
    if new:
        exp_id = tracking.get_or_create_experiment(
            uri, cfg.tracking.experiment, cfg.tracking.artifact_location
        )
        name = cfg.tracking.run_name or f"{cfg.name}-{Path(source.rstrip('/')).name}"
        run_id = tracking.create_run(uri, exp_id, name, {"aunet.checkpoint": source})
        tracking.log_params(uri, run_id, params)
    else:  # params of a training run cannot change: record the eval settings as tags
        tracking.tag_run(uri, run_id, {f"eval.{cfg.name}.{k}": v for k, v in params.items()})
    tracking.log_metrics(uri, run_id, metrics, step)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{cfg.name}-step{step}.json"
        out.write_text(json.dumps({"step": step, "source": source, **params, "metrics": metrics}))
        tracking.log_artifacts(uri, run_id, [out], "eval")
    if new:
        tracking.end_run(uri, run_id)
    return run_id


# ---------------------------------------------------------------------------------- CLI
USAGE = (
    "usage: python -m pipelines.evaluate <checkpoint dir | MLflow run id | runs:/ URI> "
    "<eval.yaml> [a.b=v ...] [--set a.b=v] [--run-id ID] [--new-run] [--no-mlflow] "
    "[--tasks a,b] [--output results.json]"
)


def _parse_argv(argv: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "pos": [],
        "overrides": [],
        "run_id": None,
        "new_run": False,
        "no_mlflow": False,
        "tasks": None,
        "output": None,
    }
    valued = {"--set": "overrides", "--run-id": "run_id", "--tasks": "tasks", "--output": "output"}
    it = iter(argv)
    for arg in it:
        flag, eq, val = arg.partition("=")
        if flag in valued:
            val = val if eq else next(it, None)
            if val is None:
                raise SpecError(f"command line: {flag} needs a value ({USAGE})")
            if flag == "--set":
                opts["overrides"].append(val)
            else:
                opts[valued[flag]] = val
        elif arg in ("--new-run", "--no-mlflow"):
            opts[arg[2:].replace("-", "_")] = True
        elif arg.startswith("-"):
            raise SpecError(f"command line: unknown option {arg!r} ({USAGE})")
        elif "=" in arg and len(opts["pos"]) == 2:
            opts["overrides"].append(arg)
        else:
            opts["pos"].append(arg)
    if len(opts["pos"]) != 2:
        raise SpecError(f"command line: expected a checkpoint and an eval YAML ({USAGE})")
    return opts


HELP_FLAGS = (
    ("key=value, --set key=value", "override an eval config key (tasks.<name>.n=5)"),
    ("--run-id ID", "log into this MLflow run"),
    ("--new-run", "log into a new run of the config's experiment"),
    ("--no-mlflow", "log nothing"),
    ("--tasks a,b", "only these tasks of the config"),
    ("--output f.json", "also write the metrics here"),
    ("-h, --help", "this text"),
)


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_main

    return run_main(_main, argv)


def _main(argv: list[str]) -> int:
    from aunet.api import load_model
    from aunet.checkpoint import CONFIG_FILE, load_tokenizer
    from pipelines.eval_config import help_text
    from pipelines.schema import cli_help, wants_help

    if wants_help(argv):
        print(cli_help(__doc__ or "", HELP_FLAGS, [help_text()]), end="")
        return 0
    opts = _parse_argv(argv)
    source, cfg_path = opts["pos"]
    cfg = load_eval_config(cfg_path, opts["overrides"])
    tasks = opts["tasks"].split(",") if opts["tasks"] else None
    uri = None
    if not opts["no_mlflow"]:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri
        uri = absolute_tracking_uri(uri)
        check_tracking_reachable(uri)
    src = resolve_source(source, uri)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(src.path, map_location=device)
    ours = (src.path / CONFIG_FILE).is_file()  # an official lingua checkpoint reads bytes
    tok = load_tokenizer(src.path) if ours else None  # verified against config.json
    seq_len = (src.metadata.get("plan") or {}).get("seq_len")
    t0 = time.perf_counter()
    metrics = evaluate(model, cfg, context=seq_len, tasks=tasks, tokenizer=tok)
    wall = time.perf_counter() - t0
    step = int(src.metadata.get("step") or 0)
    print(f"{'metric':48s} {'value':>10s}")
    for k, v in metrics.items():
        print(f"{k:48s} {v:10.4f}")
    print(f"evaluate: {len(metrics)} metrics in {wall:.1f} s on {device}")
    if opts["output"]:
        Path(opts["output"]).write_text(json.dumps({"step": step, "metrics": metrics}, indent=2))
    if uri is not None:
        params = {
            "config": str(Path(cfg_path).absolute()),
            "context": cfg.context or seq_len,
            "stride": cfg.stride,
            "checkpoint": source,
        }
        run_id = None if opts["new_run"] else (opts["run_id"] or src.run_id)
        run_id = log_to_mlflow(
            uri, cfg, metrics, run_id=run_id, step=step, source=source, params=params
        )
        print(f"evaluate: logged to MLflow run {run_id} (step {step}) in {redact(uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
