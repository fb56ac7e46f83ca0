"""qwen3repro: a reproducible, scaled-down replication of the Qwen3 training pipeline."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .config import ModelConfig
    from .models.qwen3 import Qwen3

__all__ = ["ModelConfig", "Qwen3", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy exports keep `import qwen3repro` cheap (no torch, no transformers) until they are used.
    if name == "ModelConfig":
        from .config import ModelConfig

        return ModelConfig
    if name == "Qwen3":
        from .models.qwen3 import Qwen3

        return Qwen3
    raise AttributeError(f"module 'qwen3repro' has no attribute {name!r}")
