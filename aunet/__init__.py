"""AU-Net: autoregressive U-Nets over raw bytes (pure PyTorch; no Ray or MLflow imports).

The names below are imported on first use (PEP 562), so ``aunet.splitting`` and
``aunet.packing`` load without torch: preprocessing workers stay light (torch costs ~1 s a process).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AUModel": "aunet.api",
    "BOS_ID": "aunet.config",
    "EOS_ID": "aunet.config",
    "VOCAB_SIZE": "aunet.config",
    "AUNet": "aunet.model",
    "AUNetConfig": "aunet.config",
    "ConfigError": "aunet.config",
    "Splitter": "aunet.splitting",
}
__all__ = [
    "AUModel",
    "BOS_ID",
    "EOS_ID",
    "VOCAB_SIZE",
    "AUNet",
    "AUNetConfig",
    "ConfigError",
    "Splitter",
]

if TYPE_CHECKING:
    from aunet.api import AUModel
    from aunet.config import BOS_ID, EOS_ID, VOCAB_SIZE, AUNetConfig, ConfigError
    from aunet.model import AUNet
    from aunet.splitting import Splitter


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aunet' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
