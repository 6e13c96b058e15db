"""The MLflow layer's model half: a trained AU-Net as an MLflow pyfunc model, so that
``mlflow models serve -m <uri>`` serves it.

    uri = log_generation_model("runs/ckpt")                 # in the active run, or a new one
    mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"prompt": ["The quick"]}),
                                          params={"max_new_bytes": 32, "temperature": 0.0})

The model holds no weights of its own: the consolidated checkpoint directory is logged as the
artifact ``checkpoint`` and loaded with ``AUModel.from_pretrained`` in ``load_context``
(safetensors, never unpickled). ``code_paths`` ships the ``aunet`` and ``pipelines`` packages
with the model, so a serving environment needs only the pip requirements.

Input: a DataFrame with a string column ``prompt`` and optional per-row ``max_new_bytes`` /
``temperature`` columns; the same settings, and ``top_k``, ``top_p``, ``seed``, ``stop``, can be
given as ``params`` for the whole request. Output: one string per prompt, the continuation decoded
as UTF-8 with errors="replace".

Two MLflow traps shape this module: the signature is explicit, because one inferred from a dict
example is ``Array(string)`` and then rejects DataFrames; and the model is logged with ``name=``,
not the deprecated ``artifact_path=``. It is apart from ``pipelines.tracking`` because it needs
pandas and the model at import time, which the training loop's tracker does not.
``pipelines.serve`` re-exports ``AUNetGenerationModel`` and ``log_generation_model``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from aunet.api import AUModel
from aunet.checkpoint import read_config

REPO = Path(__file__).resolve().parent.parent
DEFAULTS = {"max_new_bytes": 128, "temperature": 1.0}
CHECKPOINT_ARTIFACT = "checkpoint"  # artifact name the checkpoint is logged under
SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec("long", "max_new_bytes", required=False),
            ColSpec("double", "temperature", required=False),
        ]
    ),
    outputs=Schema([ColSpec("string")]),
    params=ParamSchema(
        [
            ParamSpec("max_new_bytes", "long", DEFAULTS["max_new_bytes"]),
            ParamSpec("temperature", "double", DEFAULTS["temperature"]),
            ParamSpec("top_k", "long", 0),  # 0 = off
            ParamSpec("top_p", "double", 1.0),
            ParamSpec("seed", "long", -1),  # -1 = fresh randomness
            ParamSpec("stop", "string", ""),  # "" = none
        ]
    ),
)


class AUNetGenerationModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: prompts in, continuations out (see the module docstring)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.model = AUModel.from_pretrained(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> list[str]:
        if not isinstance(model_input, pd.DataFrame) or "prompt" not in model_input:
            raise ValueError("model input: expected a DataFrame with a string column 'prompt'")
        p = _params(params)
        prompts = [str(x).encode("utf-8") for x in model_input["prompt"]]
        n = len(prompts)
        per_row = {
            key: [_cell(model_input, key, i, p[key]) for i in range(n)]
            for key in ("max_new_bytes", "temperature")
        }
        out: list[str] = [""] * n
        groups: dict[tuple[int, float], list[int]] = {}
        for i in range(n):  # one batched generate call per distinct (max_new_bytes, temperature)
            key = (int(per_row["max_new_bytes"][i]), float(per_row["temperature"][i]))
            groups.setdefault(key, []).append(i)
        for (max_new, temperature), rows in groups.items():
            texts = self.model.generate(
                [prompts[i] for i in rows],
                max_new_bytes=max_new,
                temperature=temperature,
                top_k=p["top_k"] or None,
                top_p=p["top_p"] if p["top_p"] < 1 else None,
                stop=p["stop"].encode("utf-8") or None,
                seed=None if p["seed"] < 0 else p["seed"],
            )
            for i, t in zip(rows, texts):
                out[i] = t.decode("utf-8", errors="replace")
        return out


def _params(params: dict[str, Any] | None) -> dict[str, Any]:
    p = {spec.name: spec.default for spec in SIGNATURE.params.params}
    p.update({k: v for k, v in (params or {}).items() if v is not None})
    return p


def _cell(df: pd.DataFrame, key: str, i: int, default: Any) -> Any:
    """A per-row setting, or the request-wide one where the column is absent or empty."""
    if key not in df:
        return default
    v = df[key].iloc[i]
    return default if v is None or (isinstance(v, float) and math.isnan(v)) else v


def model_name_for(run_name: str) -> str:
    """A logged model's name from its run's: MLflow refuses ``/ : . % " '`` in model names, and
    run names hold dotted sweep labels (``train.lr=0.003``)."""
    return re.sub(r"[/:.%\"']", "-", run_name) or "aunet_generator"


def log_generation_model(
    checkpoint_dir: str | os.PathLike,
    run_id: str | None = None,
    name: str = "aunet_generator",
    registered_model_name: str | None = None,
    linked_metrics: Sequence[Any] = (),
) -> str:
    """Log ``checkpoint_dir`` as a servable pyfunc model in ``run_id`` (default: the active run, or
    a new one) and return its model URI: ``models:/<name>/<version>`` when registered under
    ``registered_model_name`` (the MLflow model registry), else ``models:/m-...``.

    ``linked_metrics`` (``mlflow.entities.Metric``, as the run logged them) are logged again with
    the new model's id, so the model page shows them (an MLflow 3 LoggedModel's metrics). The
    same key, step, value and timestamp make the run's copy an exact duplicate, which the store
    keeps once: the run's charts gain no point.
    """
    ckpt = Path(checkpoint_dir)
    read_config(ckpt)  # fail before logging anything: CheckpointError names the path
    import torch

    kwargs = dict(
        name=name,
        python_model=AUNetGenerationModel(),
        artifacts={CHECKPOINT_ARTIFACT: str(ckpt)},
        code_paths=[str(REPO / "aunet"), str(REPO / "pipelines")],
        signature=SIGNATURE,
        input_example=pd.DataFrame({"prompt": ["The quick brown fox"]}),
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            "numpy",
            "regex",
            "safetensors",
            "pandas",
        ],
        registered_model_name=registered_model_name,
    )
    active = mlflow.active_run()
    if active is not None and run_id in (None, active.info.run_id):
        info = mlflow.pyfunc.log_model(**kwargs)
        _link(active.info.run_id, info.model_id, linked_metrics)
        return _model_uri(info, registered_model_name)
    run_name = None if run_id else "generation-model"
    with mlflow.start_run(run_id=run_id, run_name=run_name, nested=active is not None) as run:
        info = mlflow.pyfunc.log_model(**kwargs)
        _link(run.info.run_id, info.model_id, linked_metrics)
        return _model_uri(info, registered_model_name)


def _link(run_id: str, model_id: str, metrics: Sequence[Any]) -> None:
    client = mlflow.MlflowClient()
    for m in metrics:
        client.log_metric(run_id, m.key, m.value, m.timestamp, m.step, model_id=model_id)


def _model_uri(info: Any, registered_model_name: str | None) -> str:
    """``models:/<name>/<version>`` when the model was registered, else the logged model's URI."""
    version = getattr(info, "registered_model_version", None)
    if registered_model_name and version is not None:
        return f"models:/{registered_model_name}/{version}"
    return info.model_uri
