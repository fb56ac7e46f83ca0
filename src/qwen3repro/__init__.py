"""qwen3repro: a reproducible, scaled-down replication of the Qwen3 training pipeline."""

__version__ = "0.1.0"
