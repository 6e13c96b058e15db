"""Consolidated checkpoints: ``config.json`` + ``model.safetensors`` in one directory.

This is what training writes at the end and what generation, evaluation and the official-format
converter read. Loading never unpickles: safetensors holds tensors only, and the config is JSON.
A plain ``.pt`` state dict is accepted too, loaded with ``weights_only=True``.

``config.json`` records the SHA-256 of the weights file, checked before the weights are used:
safetensors validates its header but not the tensor bytes, so flipped or truncated data would
otherwise load and generate silently. ``verify=False`` skips the check (it reads the whole file
once, ~1 s per GB); a checkpoint written before the digest existed loads unchecked.

A BPE model (docs/design.md, BPE baseline) is useless without the exact tokenizer it was trained
with, so ``tokenizer.json`` is written next to the weights and its SHA-256 recorded in
``config.json`` (``tokenizer_sha256``); it is checked on every load (the file is small, so
``verify=False`` does not skip it). Byte checkpoints have neither.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aunet.config import AUNetConfig, ConfigError, check_tokenizer
from aunet.model import AUNet

if TYPE_CHECKING:
    from aunet.tokenizer import BPETokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "aunet-consolidated-v1"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not match its config; the message names the path."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MB chunks (weights can be larger than memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_pretrained(
    model: AUNet | dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    config: AUNetConfig | None = None,
    metadata: dict[str, Any] | None = None,
    tokenizer: BPETokenizer | None = None,
) -> Path:
    """Write ``out_dir/config.json`` and ``out_dir/model.safetensors`` (atomically per file), and
    for a BPE model ``out_dir/tokenizer.json``, which must match the config's vocabulary."""
    from safetensors.torch import save_file

    if isinstance(model, AUNet):
        config = config or model.config
        state = model.state_dict()
    else:
        state = model
    if config is None:
        raise ValueError("save_pretrained needs the config when given a bare state dict")
    check_tokenizer(config, tokenizer, "save_pretrained: tokenizer")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with tempfile.NamedTemporaryFile(dir=out, suffix=".tmp", delete=False) as f:
        tmp = f.name
    save_file(tensors, tmp, metadata={"format": FORMAT})
    digest = file_sha256(tmp)
    os.replace(tmp, out / WEIGHTS_FILE)
    payload = {
        "format": FORMAT,
        "model": config.to_dict(),
        "metadata": metadata or {},
        "weights_sha256": digest,
    }
    if tokenizer is not None:
        (out / (TOKENIZER_FILE + ".tmp")).write_text(tokenizer.to_json(), encoding="utf-8")
        payload["tokenizer_sha256"] = file_sha256(out / (TOKENIZER_FILE + ".tmp"))
        os.replace(out / (TOKENIZER_FILE + ".tmp"), out / TOKENIZER_FILE)
    else:  # a byte model written over a BPE checkpoint must not leave its tokenizer behind
        (out / TOKENIZER_FILE).unlink(missing_ok=True)
    (out / (CONFIG_FILE + ".tmp")).write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(out / (CONFIG_FILE + ".tmp"), out / CONFIG_FILE)
    return out


def read_config(path: str | os.PathLike) -> tuple[AUNetConfig, dict[str, Any]]:
    """(config, metadata) of a checkpoint directory."""
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing (not an AU-Net checkpoint directory)")
    try:
        payload = json.loads(cfg_path.read_text())
        return AUNetConfig.from_dict(payload["model"]), payload.get("metadata", {})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: corrupt config ({e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``.pt``/``.pth`` state dict (weights_only)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: missing weights file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or truncated file
        raise CheckpointError(f"{p}: cannot read weights ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{p}: expected a state dict, got {type(sd).__name__}")
    return sd


def check_state_dict(model: AUNet, state: dict[str, torch.Tensor], where: str) -> None:
    """Raise CheckpointError listing missing/unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(own[k].shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if shapes:
            parts.append(f"shape mismatches {shapes}")
        raise CheckpointError(f"{where}: weights do not match the config: " + "; ".join(parts))


def verify_weights(path: str | os.PathLike) -> None:
    """Raise CheckpointError unless the weights' SHA-256 is the one ``config.json`` records."""
    weights = Path(path) / WEIGHTS_FILE
    try:
        expected = json.loads((Path(path) / CONFIG_FILE).read_text()).get("weights_sha256")
    except (OSError, ValueError, AttributeError):
        expected = None  # read_config reports a missing or corrupt config
    if expected is None or not weights.is_file():
        return
    actual = file_sha256(weights)
    if actual != expected:
        raise CheckpointError(
            f"{weights}: SHA-256 {actual[:16]}... does not match {expected[:16]}... recorded in "
            f"{CONFIG_FILE}: the weights are corrupt or were changed"
        )


def load_tokenizer(path: str | os.PathLike) -> BPETokenizer | None:
    """The tokenizer of a checkpoint directory, after checking its SHA-256 against the one
    ``config.json`` records; None for a byte checkpoint. CheckpointError names the bad file."""
    from aunet.tokenizer import BPETokenizer

    config, _ = read_config(path)
    cfg_path, tok_path = Path(path) / CONFIG_FILE, Path(path) / TOKENIZER_FILE
    expected = json.loads(cfg_path.read_text()).get("tokenizer_sha256")
    if expected is None:
        if not config.is_bytes:
            raise CheckpointError(
                f"{cfg_path}: a token model (vocab_size {config.vocab_size}) without "
                f"tokenizer_sha256: the checkpoint has no verified {TOKENIZER_FILE}"
            )
        return None
    if not tok_path.is_file():
        raise CheckpointError(f"{tok_path}: missing (recorded in {CONFIG_FILE})")
    actual = file_sha256(tok_path)
    if actual != expected:
        raise CheckpointError(
            f"{tok_path}: SHA-256 {actual[:16]}... does not match {expected[:16]}... recorded "
            f"in {CONFIG_FILE}: the tokenizer is corrupt or was changed"
        )
    try:
        tokenizer = BPETokenizer.load(tok_path)
        check_tokenizer(config, tokenizer, str(tok_path))
    except ValueError as e:
        raise CheckpointError(str(e) if str(tok_path) in str(e) else f"{tok_path}: {e}") from None
    return tokenizer


def load_pretrained(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", *, verify: bool = True
) -> AUNet:
    """Build the model from a checkpoint directory and load its weights (strictly), after checking
    the weights' digest unless ``verify=False``. A BPE checkpoint's tokenizer is verified too
    (``load_tokenizer``), so that weights are never used with a tokenizer they were not saved
    with."""
    config, _ = read_config(path)
    weights = Path(path) / WEIGHTS_FILE
    load_tokenizer(path)
    if verify:
        verify_weights(path)
    state = load_state_dict(weights)
    model = AUNet(config)
    check_state_dict(model, state, str(weights))
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()
