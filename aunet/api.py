"""``AUModel``: load a trained AU-Net from wherever it lives and generate bytes.

    model = AUModel.from_pretrained("path/to/checkpoint")   # or runs:/..., models:/...
    out = model.generate("The quick brown fox".encode(), max_new_bytes=64)

Sources, tried in this order:
- our consolidated directory (``config.json`` + ``model.safetensors``; never unpickled);
- an official lingua directory (``consolidated.pth`` + ``params.json``, or its ``consolidated/``);
- anything a registered resolver plugin turns into one of those: with the platform installed, an
  MLflow URI (``runs:/``, ``models:/``, ``mlflow-artifacts:/``) or an MLflow pyfunc model
  directory (``pipelines.serve.resolve_checkpoint``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from aunet.checkpoint import CONFIG_FILE, CheckpointError, load_pretrained
from aunet.config import AUNetConfig
from aunet.generate import generate
from aunet.model import AUNet

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
    path = Path(source)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return load_pretrained(path, map_location, verify=verify)
    if path.is_dir() and _lingua_dir(path):
        from aunet import interop

        return interop.load_lingua_checkpoint(path, map_location=map_location)
    for resolve in _resolvers():
        local = resolve(str(source))
        if local is not None:
            return load_model(local, map_location, verify=verify)
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

    Weights are stored as int8 with one scale per output channel; activations are quantized per batch at
    run time, so no calibration data is needed. Embeddings, norms, the per-position upsampling
    matrices and attention stay in float. Uses ``torch.ao.quantization.quantize_dynamic``, which
    torch 2.13 still ships; it warns that its quantized tensor dtypes are deprecated (torchao is
    the successor), a warning silenced here so that each load does not repeat it. The model is
    modified in place and put in eval mode; it can no longer be trained or saved as a checkpoint.
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
    """A loaded AU-Net ready to generate; wraps ``aunet.generate.generate``."""

    def __init__(self, model: AUNet) -> None:
        self.model = model.eval()

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
        model = load_model(source, map_location=device, verify=verify)
        return cls(quantize_int8(model) if quantize == "int8" else model)

    def generate(
        self,
        prompts: bytes | Sequence[bytes],
        max_new_bytes: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: bytes | None = None,
        seed: int | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> bytes | list[bytes]:
        """Continuation bytes for one prompt (bytes) or a list of prompts (list of bytes)."""
        return generate(
            self.model, prompts, max_new_bytes, temperature, top_k, top_p, stop, seed, on_step
        )
