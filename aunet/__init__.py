"""AU-Net: autoregressive U-Nets over raw bytes (pure PyTorch; no Ray or MLflow imports)."""

from aunet.api import AUModel
from aunet.config import BOS_ID, EOS_ID, VOCAB_SIZE, AUNetConfig, ConfigError
from aunet.model import AUNet
from aunet.splitting import Splitter

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
