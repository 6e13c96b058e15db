"""AU-Net: autoregressive U-Nets over raw bytes (pure PyTorch; no Ray or MLflow imports)."""

from aunet.config import BOS_ID, EOS_ID, VOCAB_SIZE, AUNetConfig, ConfigError

__all__ = ["BOS_ID", "EOS_ID", "VOCAB_SIZE", "AUNetConfig", "ConfigError"]
