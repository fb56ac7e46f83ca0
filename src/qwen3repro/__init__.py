"""qwen3repro: a reproducible, scaled-down replication of the Qwen3 training pipeline."""
from __future__ import annotations

from .config import ModelConfig
from .models.qwen3 import Qwen3

__version__ = "0.1.0"

__all__ = ["ModelConfig", "Qwen3", "__version__"]
