"""``AUModel``: load a trained AU-Net (or BPE baseline) from wherever it lives and generate bytes.

    model = AUModel.from_pretrained("path/to/checkpoint")   # or runs:/..., models:/...
    out = model.generate("The quick brown fox", max_new_bytes=64)   # str or bytes prompts
    model.score("Some text").bits_per_byte, model.bits_per_byte(["a text", b"another"])
    model.to("cuda", torch.bfloat16).save_pretrained("path/to/copy")

Sources, tried in this order:
- our consolidated directory (``config.json`` + ``model.safetensors``; never unpickled);
- an official lingua directory (``consolidated.pth`` + ``params.json``, or its ``consolidated/``);
- anything a registered resolver plugin turns into one of those: with the platform installed, an
  MLflow URI (``runs:/``, ``models:/``, ``mlflow-artifacts:/``) or an MLflow pyfunc model
  directory (``pipelines.serve.resolve_checkpoint``).

A BPE baseline's checkpoint carries its verified ``tokenizer.json`` (docs/design.md, BPE
baseline): ``AUModel.tokenizer`` holds it (None for byte models), and generation, scoring and
saving use it, so the API stays bytes in, bytes out for every model.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aunet.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    load_pretrained,
    load_tokenizer,
    read_config,
    save_pretrained,
)
from aunet.config import AUNetConfig, check_tokenizer
from aunet.evaluation import TextScore, aggregate, score_texts
from aunet.generate import generate
from aunet.model import AUNet

if TYPE_CHECKING:
    from aunet.tokenizer import BPETokenizer

# Sources this package cannot open by itself (MLflow URIs, MLflow model directories) are resolved
# by plugins registered under this entry-point group; the platform's ``pipelines.serve`` provides
# the MLflow one. That keeps ``aunet`` free of MLflow imports while ``from_pretrained`` still
# accepts ``runs:/...`` and ``models:/...`` wherever the platform is installed.
RESOLVER_GROUP = "aunet.checkpoint_sources"


def _resolvers() -> list[Callable[[str], os.PathLike | None]]:
    from importlib.metadata import entry_points

    return [ep.load() for ep in entry_points(group=RESOLVER_GROUP)]


def _lingua_dir(p: Path) -> bool:
    return any(
        (c / "consolidated.pth").is_file() and (c / "params.json").is_file()
        for c in (p, p / "consolidated")
    )


def load_model(
    source: str | os.PathLike, map_location: str | torch.device = "cpu", *, verify: bool = True
) -> AUNet:
    """An ``AUNet`` (eval mode) from any supported source; CheckpointError names what is wrong.

    ``verify=False`` skips the weights' SHA-256 check (``aunet.checkpoint.verify_weights``)."""
    return load_model_and_tokenizer(source, map_location, verify=verify)[0]


def load_model_and_tokenizer(
    source: str | os.PathLike, map_location: str | torch.device = "cpu", *, verify: bool = True
) -> tuple[AUNet, BPETokenizer | None]:
    """``load_model`` plus the checkpoint's verified tokenizer (None for a byte model)."""
    path = Path(source)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return load_pretrained(path, map_location, verify=verify), load_tokenizer(path)
    if path.is_dir() and _lingua_dir(path):
        from aunet import interop

        return interop.load_lingua_checkpoint(path, map_location=map_location), None
    for resolve in _resolvers():
        local = resolve(str(source))
        if local is not None:
            return load_model_and_tokenizer(local, map_location, verify=verify)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory, got a file")
    raise CheckpointError(
        f"{path}: not a checkpoint (expected {CONFIG_FILE} + model.safetensors, an official "
        "consolidated.pth + params.json, or an MLflow model with a checkpoint artifact)"
    )


QUANTIZATIONS = ("int8",)


def quantize_int8(model: AUNet) -> AUNet:
    """Dynamic INT8 quantization of every ``nn.Linear`` (CPU inference; docs/serving.md, INT8).

    Weights are stored as int8 with one scale per output channel; activations are quantized per
    batch at run time, so no calibration data is needed. Embeddings, norms, the per-position
    upsampling matrices and attention stay in float. Uses ``quantize_dynamic`` from
    ``torch.ao.quantization``, which torch 2.13 still ships although it is deprecated in favour of
    torchao (its deprecation warnings are silenced here so that each load does not repeat them).
    The model is modified in place and put in eval mode; it can no longer be trained or saved.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if model.tok_embeddings.weight.device.type != "cpu":
        raise ValueError("quantize='int8': dynamic INT8 runs on CPU only; load with device='cpu'")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        spec = {torch.nn.Linear: per_channel_dynamic_qconfig}
        return quantize_dynamic(model.eval(), spec, dtype=torch.qint8, inplace=True)


class AUModel:
    """A loaded AU-Net ready to generate and score; wraps ``aunet.generate`` and
    ``aunet.evaluation``."""

    def __init__(self, model: AUNet, tokenizer: BPETokenizer | None = None) -> None:
        check_tokenizer(model.config, tokenizer, "AUModel: tokenizer")
        self.model = model.eval()
        self.tokenizer = tokenizer  # a BPE model's (None: bytes)
        # Training window (bytes) from the checkpoint's metadata: the default context of scoring.
        self.context: int | None = None

    @property
    def config(self) -> AUNetConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        device: str | torch.device = "cpu",
        *,
        verify: bool = True,
        quantize: str | None = None,
    ) -> AUModel:
        """Load a checkpoint directory or MLflow URI (see the module docstring); ``verify=False``
        skips the weights' digest check (very large files); ``quantize="int8"`` applies dynamic
        INT8 quantization to the linear layers (``quantize_int8``, CPU only)."""
        if quantize is not None and quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize: expected one of {QUANTIZATIONS} or None, got {quantize!r}")
        model, tokenizer = load_model_and_tokenizer(source, map_location=device, verify=verify)
        out = cls(quantize_int8(model) if quantize == "int8" else model, tokenizer)
        out.context = _checkpoint_context(source)
        return out

    def generate(
        self,
        prompts: str | bytes | Sequence[str | bytes],
        max_new_bytes: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: bytes | None = None,
        seed: int | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> bytes | list[bytes]:
        """Continuation bytes for one prompt or a list of prompts; text prompts are UTF-8 encoded.

        The output is bytes either way: a continuation may stop inside a UTF-8 character. A BPE
        model's prompt is tokenized and healed, its ids decoded (``aunet.generate``)."""
        prompts = _as_bytes(prompts) if isinstance(prompts, str) else prompts
        if not isinstance(prompts, (bytes, bytearray)):
            prompts = [_as_bytes(p) for p in prompts]
        return generate(
            self.model,
            prompts,
            max_new_bytes,
            temperature,
            top_k,
            top_p,
            stop,
            seed,
            on_step,
            tokenizer=self.tokenizer,
        )

    # ------------------------------------------------------------------------- scoring and saving
    def save_pretrained(
        self, directory: str | os.PathLike, metadata: dict[str, Any] | None = None
    ) -> Path:
        """Write our consolidated checkpoint (``config.json`` with the weights' SHA-256 +
        ``model.safetensors``, and a BPE model's ``tokenizer.json``) that ``from_pretrained``
        loads; the scoring context is kept in the metadata as training records it
        (``plan.seq_len``)."""
        if any(_is_quantized(m) for m in self.model.modules()):
            raise ValueError("save_pretrained: an INT8-quantized model cannot be saved")
        meta = dict(metadata or {})
        if self.context is not None:
            meta.setdefault("plan", {}).setdefault("seq_len", self.context)
        return save_pretrained(self.model, directory, metadata=meta, tokenizer=self.tokenizer)

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> AUModel:
        """Move (and/or cast the floating-point weights of) the model in place; returns self so
        that calls chain: ``AUModel.from_pretrained(p).to("cuda", torch.bfloat16)``."""
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating-point dtype, got {dtype}")
        self.model.to(device=device, dtype=dtype)
        return self

    def score(
        self,
        text: str | bytes,
        *,
        context: int | None = None,
        stride: int | None = None,
        batch_size: int = 8,
    ) -> TextScore:
        """Negative log-likelihood of one text's bytes (``nats``, ``num_bytes``, ``bits_per_byte``)
        after BOS, with the training forward over sliding windows (``aunet.evaluation``; a BPE
        model's ``context`` and ``stride`` count tokens)."""
        ctx = self.scoring_context(context)
        docs = [_as_bytes(text)]
        return score_texts(self.model, docs, ctx, stride, batch_size, self.tokenizer)[0]

    def bits_per_byte(
        self,
        texts: Sequence[str | bytes],
        *,
        context: int | None = None,
        stride: int | None = None,
        batch_size: int = 8,
    ) -> float:
        """Summed bits over summed bytes of several texts (each scored on its own, from BOS): long
        texts weigh by their bytes, as in the bits/byte of an evaluation set."""
        ctx = self.scoring_context(context)
        docs = [_as_bytes(t) for t in texts]
        scores = score_texts(self.model, docs, ctx, stride, batch_size, self.tokenizer)
        return aggregate(scores).bits_per_byte

    def scoring_context(self, context: int | None = None) -> int:
        """The window of scoring: the argument, the checkpoint's training ``seq_len``, else the
        byte stage's capacity; the model's capacities are sized for that window."""
        if context is not None:
            return context
        if self.context is not None:
            return self.context
        caps = self.config.max_seqlens
        if caps and caps[0] > 0:
            return caps[0]
        raise ValueError(
            "context: unknown for this model (no training seq_len in its checkpoint and no "
            "byte-stage capacity in its config); pass context="
        )


def _as_bytes(text: str | bytes) -> bytes:
    if isinstance(text, str):
        return text.encode("utf-8")
    if isinstance(text, (bytes, bytearray)):
        return bytes(text)
    raise TypeError(f"expected str or bytes, got {type(text).__name__}")


def _is_quantized(module: torch.nn.Module) -> bool:
    return type(module).__module__.startswith("torch.ao.nn.quantized")


def _checkpoint_context(source: str | os.PathLike) -> int | None:
    """The training ``seq_len`` recorded in a local consolidated checkpoint's metadata, if any."""
    path = Path(source)
    if not (path / CONFIG_FILE).is_file():
        return None
    seq_len = (read_config(path)[1].get("plan") or {}).get("seq_len")
    return int(seq_len) if isinstance(seq_len, int) and seq_len >= 2 else None
