"""The models a condition runs, and what running them costs (for the progress line).

A checkpoint is loaded once; each condition and length regime gets its own module (RoPE
frequencies and the DCA switch are fixed when a `Qwen3` is constructed) whose parameters are the
checkpoint's tensors, not copies. Work is counted in estimated forward FLOPs, so the ETA accounts
for long items costing quadratically more than short ones.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from ...config import ModelConfig
from ...models.qwen3 import Qwen3
from ...perf import matmul_parameters
from ...progress import Progress
from ...tokenizer import Tokenizer
from .settings import LongContextSettings, condition_config

# Seconds between two progress lines (a line also marks the end of each length and condition).
PROGRESS_EVERY_S = 5.0
PROGRESS_NAME = "[longcontext]"


class ModelSource(Protocol):
    """Builds the model of one checkpoint under a (condition-specific) configuration."""

    config: ModelConfig

    def build(self, config: ModelConfig) -> nn.Module: ...


class CheckpointModels:
    """A checkpoint loaded once (on `device`); `build(config)` gives a model with that config and the same
    weights, on the same device. `model`: the checkpoint already loaded (on any device and dtype), instead
    of loading it here."""

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32, *,
                 model: Qwen3 | None = None, device: str | torch.device = "cpu") -> None:
        self.path = Path(path)
        loaded = model if model is not None else Qwen3.from_pretrained(self.path, device=device, dtype=dtype)
        self.base = loaded.eval()
        self.config: ModelConfig = self.base.config
        self._built: list[tuple[ModelConfig, nn.Module]] = [(self.config, self.base)]

    def build(self, config: ModelConfig) -> nn.Module:
        """The model for `config`, built once per distinct configuration and then reused."""
        for known, model in self._built:
            if known == config:
                return model
        with torch.device("meta"):
            model = Qwen3(config)
        model.load_state_dict(self.base.state_dict(), strict=True, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        self._built.append((config, model.eval()))
        return model


def model_source(model: str | os.PathLike | ModelSource, device: str | torch.device = "cpu") -> ModelSource:
    """A checkpoint directory loaded on `device`, or a `ModelSource` as it is (its models keep their device)."""
    return CheckpointModels(model, device=device) if isinstance(model, (str, os.PathLike)) else model


def load_tokenizer(tokenizer: Tokenizer | str | os.PathLike) -> Tokenizer:
    return tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)


class ConditionModels:
    """One built model per distinct configuration (i.e. per condition and length regime)."""

    def __init__(self, source: ModelSource, condition: str, settings: LongContextSettings) -> None:
        self.source, self.condition, self.settings = source, condition, settings
        self._config: ModelConfig | None = None
        self._model: nn.Module | None = None

    def get(self, length: int) -> tuple[nn.Module, ModelConfig]:
        config = condition_config(self.source.config, self.condition, length, self.settings)
        if self._model is None or config != self._config:
            self._model, self._config = self.source.build(config), config
        return self._model, config


def config_record(config: ModelConfig) -> dict[str, Any]:
    """The position settings a configuration ran with (for the result file)."""
    return {
        "rope_theta": config.rope_theta,
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
        "dual_chunk_attention_config": (
            dict(config.dual_chunk_attention_config) if config.dual_chunk_attention_config else None
        ),
    }


# ------------------------------------------------------------------------------------ cost and progress
def forward_flops(config: ModelConfig, tokens: int) -> float:
    """FLOPs of a causal forward over `tokens` tokens: 2 × matmul parameters per token, plus
    scores and values (2 × layers × heads × head_dim × tokens² for the causal half)."""
    attention = 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * tokens**2
    return 2 * matmul_parameters(config) * tokens + attention


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def flops_progress(total_flops: float) -> Progress:
    """The project's progress line, counting work in FLOPs (the line shows the share done)."""
    return Progress(total_flops, name=PROGRESS_NAME, count=False)


def report_progress(progress: Progress, log: Callable[[str], None] | None, label: str, *, force: bool = False) -> None:
    """Log the progress line at most every PROGRESS_EVERY_S seconds, and whenever `force`."""
    due = progress.due(PROGRESS_EVERY_S)
    if log is not None and (due or force):
        log(progress.line(label))


__all__ = ["CheckpointModels", "ConditionModels", "ModelSource", "config_record", "flops_progress", "forward_flops",
           "load_tokenizer", "model_source", "report_progress", "stderr_log"]
