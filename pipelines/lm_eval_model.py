"""lm-evaluation-harness adapter: the ``aunet`` model of lm-eval, scoring and generating bytes.

Importing this module registers ``AUNetLM`` under the name ``aunet`` in lm-eval's model registry
(lm-eval discovers models only by import), so the harness's own command runs through it:

    python -m pipelines.lm_eval_model run --model aunet \\
        --model_args pretrained=outputs/quickstart-aunet2/final \\
        --include_path experiments/eval/lm_eval --tasks aunet_mc_sample,aunet_gen_sample

``pretrained`` is anything ``AUModel.from_pretrained`` opens (a checkpoint directory, ``runs:/``,
``models:/``). ``python -m pipelines.evaluate`` runs the same adapter for ``kind: lm_eval`` suites
of an eval YAML and logs their metrics to MLflow (``run_tasks``; docs/design.md, Evaluation).

The three request types map onto ``aunet.evaluation`` (training forward, BOS first, levels from
the whole sequence), so the harness's numbers are the project's own:
- ``loglikelihood(context, continuation)``: ``score_continuations`` on the UTF-8 bytes; the
  context is cut from the left to fit ``max_length`` bytes with BOS;
- ``loglikelihood_rolling(text)``: ``score_texts`` (sliding windows of ``max_length`` bytes with
  ``stride``; every byte scored once);
- ``generate_until(context, gen_kwargs)``: ``aunet.generate`` over bytes: ``max_gen_toks`` counts
  bytes, the output is cut before the first of the ``until`` strings, greedy unless
  ``do_sample``.
A token model (the BPE baseline) is scored and generates through its checkpoint's tokenizer
(``AUModel.tokenizer``): the same requests, bytes in and out, ``max_length`` then counts tokens.
lm_eval is an optional dependency (``pip install -e .[eval]``); this module imports it at the top,
and ``pipelines.evaluate`` imports this module only when a suite needs it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from aunet.api import AUModel
from aunet.evaluation import score_continuations, score_texts
from aunet.model import AUNet

MODEL_NAME = "aunet"


def _batch_size(value: int | str | None, default: int = 16) -> int:
    """lm-eval passes its ``--batch_size`` through: an int, a digit string, "auto" or None."""
    if value is None or value == "auto" or str(value).startswith("auto"):
        return default
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {value!r}")
    return size


def _device(device: str | None) -> str | None:
    """The device to run on; lm-eval's default ``cuda`` on a machine without CUDA is the CPU."""
    if device in (None, "auto"):
        return None if device is None else ("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        print(
            f"lm_eval_model: device {device!r}: CUDA is not available; using the CPU",
            file=sys.stderr,
        )
        return "cpu"
    return device


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "auto":
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating-point torch dtype name, got {name!r}")
    return dtype


@register_model(MODEL_NAME)
class AUNetLM(LM):
    """An AU-Net as an lm-eval ``LM``: strings in, UTF-8 bytes to the model, strings out."""

    def __init__(
        self,
        pretrained: str | AUModel | AUNet,
        batch_size: int | str | None = 16,
        max_length: int | None = None,
        stride: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        verify: bool = True,
        tokenizer: Any = None,
        **unused: Any,
    ) -> None:
        """``max_length``: bytes per scored window (default: the checkpoint's training
        ``seq_len``); ``stride``: rolling-window step (default ``max_length // 2``); ``device``:
        lm-eval's ``--device`` (its default ``cuda`` falls back to the CPU on a machine without
        one, with a message); ``dtype``: a floating-point torch dtype name (``bfloat16``);
        lm-eval's ``max_batch_size`` and other harness-wide arguments are accepted and ignored;
        ``tokenizer``: a bare token model's ``BPETokenizer`` (an ``AUModel`` carries its own)."""
        super().__init__()
        device = _device(device)
        if isinstance(pretrained, AUModel):
            self.aumodel = pretrained
        elif isinstance(pretrained, AUNet):
            self.aumodel = AUModel(pretrained)
        else:
            self.aumodel = AUModel.from_pretrained(str(pretrained), device or "cpu", verify=verify)
        if tokenizer is not None:
            self.aumodel.tokenizer = tokenizer
        if device is not None or dtype is not None:
            self.aumodel.to(device, _dtype(dtype))
        self.batch_size = _batch_size(batch_size)
        self.max_length = self.aumodel.scoring_context(max_length)
        if self.max_length < 2:
            raise ValueError(f"max_length: expected >= 2 (BOS and one byte), got {max_length}")
        self.stride = stride

    @property
    def device(self) -> Any:
        return self.aumodel.device

    @property
    def tokenizer(self) -> Any:
        """The model's ``BPETokenizer``, None for a byte model."""
        return getattr(self.aumodel, "tokenizer", None)

    # ---------------------------------------------------------------------------- requests
    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(summed log-probability in nats, greedy?) of each continuation given its context."""
        pairs = [(ctx.encode("utf-8"), cont.encode("utf-8")) for ctx, cont in _args(requests)]
        scores = score_continuations(
            self.aumodel.model, pairs, self.batch_size, self.max_length, tokenizer=self.tokenizer
        )
        out = [(s.loglik, s.greedy) for s in scores]
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        """Log-probability (nats) of each whole text after BOS, windows of ``max_length``."""
        docs = [text.encode("utf-8") for (text,) in _args(requests)]
        scores = score_texts(
            self.aumodel.model,
            docs,
            self.max_length,
            self.stride,
            self.batch_size,
            tokenizer=self.tokenizer,
        )
        out = [-s.nats for s in scores]
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return out

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Generated text of each request; requests with equal settings are batched."""
        from lm_eval.models.utils import normalize_gen_kwargs

        groups: dict[tuple, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(_args(requests)):
            kw = normalize_gen_kwargs(dict(gen_kwargs), default_max_gen_toks=256)
            until = tuple(u.encode("utf-8") for u in kw["until"] if u)
            sampled = bool(kw.get("do_sample"))
            key = (
                until,
                int(kw["max_gen_toks"]),
                float(kw.get("temperature", 1.0)) if sampled else 0.0,
                kw.get("top_k") if sampled else None,
                kw.get("top_p") if sampled else None,
            )
            groups.setdefault(key, []).append(i)
        out = [""] * len(requests)
        contexts = [ctx for ctx, _ in _args(requests)]
        for key, members in groups.items():
            until, max_new, temperature, top_k, top_p = key
            if max_new >= self.max_length - 1:
                raise ValueError(
                    f"max_gen_toks: {max_new} bytes leave no room for a prompt in the "
                    f"{self.max_length}-byte context (set max_length or the task's max_gen_toks)"
                )
            keep = self.max_length - 1 - max_new  # prompt bytes after BOS
            for start in range(0, len(members), self.batch_size):
                idx = members[start : start + self.batch_size]
                prompts = [contexts[i].encode("utf-8")[-keep:] for i in idx]
                gens = self.aumodel.generate(
                    prompts,
                    max_new_bytes=max_new,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    stop=until[0] if len(until) == 1 else None,
                )
                for i, g in zip(idx, gens):
                    out[i] = _cut_at_stops(g, until).decode("utf-8", errors="replace")
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def _args(requests: Sequence[Any]) -> list[tuple]:
    return [req.args for req in requests]


def _cut_at_stops(text: bytes, stops: Sequence[bytes]) -> bytes:
    """``text`` up to (without) the earliest occurrence of any stop sequence."""
    cut = len(text)
    for s in stops:
        at = text.find(s)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


# ---------------------------------------------------------------------------------- suites
def run_tasks(
    model: AUModel | AUNet,
    tasks: Sequence[str],
    include_path: str,
    *,
    max_length: int,
    batch_size: int = 16,
    stride: int | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    seed: int = 0,
    tokenizer: Any = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Run lm-eval tasks (defined under ``include_path``) on a loaded model through lm-eval's own
    evaluator -> (``{"<task>/<metric>": value}``, lm-eval's whole results dict).

    Metric names drop lm-eval's default filter ``none`` (``acc,none`` -> ``acc``) and keep any
    other (``exact_match,strict-match`` -> ``exact_match/strict-match``); values lm-eval does not
    compute (its "N/A" standard errors) are left out.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = AUNetLM(
        model, batch_size=batch_size, max_length=max_length, stride=stride, tokenizer=tokenizer
    )
    manager = TaskManager(include_path=include_path, include_defaults=False)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        have = ", ".join(sorted(manager.all_tasks)) or "none"
        raise ValueError(f"{include_path}: no lm-eval task {missing[0]!r} (have {have})")
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=True,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=0,
    )
    return flatten_results(results["results"]), results


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's ``results`` (task -> ``"metric,filter"`` -> value) as flat metric names."""
    out: dict[str, float] = {}
    for task, row in results.items():
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            if not filt or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # "alias", "N/A" standard errors and the like
            name = metric if filt == "none" else f"{metric}/{filt}"
            out[f"{task}/{name}"] = float(value)
    return out


if __name__ == "__main__":
    # The harness's own command line, with the ``aunet`` model registered by the import above.
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "python -m pipelines.lm_eval_model"
    cli_evaluate()
