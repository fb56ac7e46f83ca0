"""The long-context suite's settings: the pinned suite file, the four conditions, and the model
configuration each condition evaluates an input length with.

The suite file (`evals/longcontext.toml`) states no length of any stage: every length is a multiple
of the trained (S3) length, which comes from the S3 stage being evaluated. `suite_settings(trained
length, overrides)` resolves the suite for one S3 model into `LongContextSettings`, the absolute
settings a run uses and pins in its result file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from ...config import ConfigError, ModelConfig, strict_fields
from ...data.synthetic import WORLD_SEED
from .. import SETTINGS_DIR

CONDITION_NAMES = ("S2", "S3", "S3+YaRN", "S3+YaRN+DCA")
VARIANTS = ("passkey", "order")

# Report §3.2 / RULER setting (App. A.1.1): YaRN with factor 4 = the "four-fold increase".
YARN_FACTOR = 4.0
# Evaluated lengths as multiples of the trained length: 1/8 ... 4x (4x = the report's claim).
LENGTH_FACTORS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
# ChunkLlama's defaults (`replace_with_chunkllama` in HKUNLP/ChunkLlama; An et al. 2024, arXiv 2402.17463):
# chunk_size = 3/4 of the pre-training length, local window = 1/16.
DCA_CHUNK_FRACTION = 3 / 4
DCA_LOCAL_FRACTION = 1 / 16
# Retrieval items per (length, variant): at 40, one item moves a cell by 2.5 points.
N_PER_LENGTH = 40
# Retrieval depth bins: fifths, 8 items each at 40 per length, enough to show where DCA misses (the needles
# nearest the question at tiny scale, docs/LOG.md).
DEPTH_BINS = 5
# Loss documents: 16 documents of 4x the trained length (≈ 131k scored tokens at 2,048), per bucket
# of 256 positions.
LOSS_LENGTH_FACTOR = 4.0
LOSS_DOCS = 16
LOSS_BUCKET = 256
# Prompt tokens per batch: 16 × 256 ... 1 × 4,096; above it a batch would need a padding mask at
# lengths where attention dominates (a masked SDPA is ~3× slower than the causal fast path on CPU).
MAX_BATCH_TOKENS = 4096
# Greedy decoding stops after the answer's own token count plus this many tokens, or earlier once
# every row's first word is complete (followed by a space or punctuation).
EXTRA_NEW_TOKENS = 1

DEFAULT_SUITE = SETTINGS_DIR / "longcontext.toml"
# Settings in tokens: resolved from the trained length, so a suite file never states them (an
# override from a scale file or the command line may).
ABSOLUTE_KEYS = ("trained_length", "lengths", "loss_length", "dca_chunk_size", "dca_local_size")


# ------------------------------------------------------------------------------------ conditions
@dataclass(frozen=True)
class Condition:
    """One evaluated condition: which checkpoint, and what is switched on at inference."""

    name: str
    checkpoint: str  # "S2" or "S3": key of the checkpoints mapping
    yarn: bool
    dca: bool
    description: str


CONDITIONS: dict[str, Condition] = {
    "S2": Condition("S2", "S2", False, False, "the S2 checkpoint as is"),
    "S3": Condition("S3", "S3", False, False, "the S3 checkpoint as is (ABF only)"),
    "S3+YaRN": Condition("S3+YaRN", "S3", True, False, "S3 with static YaRN (factor 4)"),
    "S3+YaRN+DCA": Condition("S3+YaRN+DCA", "S3", True, True, "S3 with YaRN (factor 4) and dual chunk attention"),
}


# ------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class LongContextSettings:
    """Everything that defines a long-context evaluation of one S3 model; pinned in the result file.

    Lengths are multiples of `trained_length` unless given in tokens: `lengths`, `loss_length`,
    `dca_chunk_size` and `dca_local_size` win over their factor when set (non-empty / non-zero).
    The defaults are the pinned suite's (`evals/longcontext.toml` states the same values).
    """

    # The S3 training length: YaRN's original_max_position_embeddings and every factor's reference.
    trained_length: int = 0
    # Evaluated lengths (tokens, prompt + answer) as multiples of trained_length ...
    length_factors: tuple[float, ...] = LENGTH_FACTORS
    # ... or in tokens (empty: from length_factors).
    lengths: tuple[int, ...] = ()
    # Retrieval items per (length, variant), same items for every condition (>= 40 for a claim).
    n_per_length: int = N_PER_LENGTH
    # Target-needle depths, cycled over the items; empty: spread evenly, (j + 0.5) / n_per_length.
    depths: tuple[float, ...] = ()
    # Depth bins of the reported grid (equal-width bins of [0, 1]).
    depth_bins: int = DEPTH_BINS
    variants: tuple[str, ...] = VARIANTS
    conditions: tuple[str, ...] = CONDITION_NAMES
    yarn_factor: float = YARN_FACTOR
    # Apply YaRN only to lengths > trained_length (the model is rebuilt per length regime).
    yarn_only_beyond_trained: bool = True
    # DCA sizes as fractions of trained_length (rounded down), or in tokens (0: from the fraction).
    dca_chunk_fraction: float = DCA_CHUNK_FRACTION
    dca_local_fraction: float = DCA_LOCAL_FRACTION
    dca_chunk_size: int = 0
    dca_local_size: int = 0
    # Apply DCA only to lengths > trained_length (default: at every length of its condition).
    dca_only_beyond_trained: bool = False
    # Evaluate the S2 checkpoint (the baseline before ABF) only up to trained_length: the claims read it
    # there, and beyond it S2 retrieved nothing in every tiny run (0% at 2x and 4x) while its passkeys at
    # 4x cost as much as S3's.
    s2_up_to_trained: bool = False
    # Data: item seed and the synthetic world (must be the world the models were trained on).
    seed: int = 0
    world_seed: int = WORLD_SEED
    # Loss by position: documents of loss_length_factor × trained_length tokens (or loss_length
    # tokens when set), mean NLL per loss_bucket positions.
    loss_length_factor: float = LOSS_LENGTH_FACTOR
    loss_length: int = 0
    loss_docs: int = LOSS_DOCS
    loss_bucket: int = LOSS_BUCKET
    max_batch_tokens: int = MAX_BATCH_TOKENS

    def __post_init__(self) -> None:
        errors = []
        for f in dataclasses.fields(self):  # suite files are hand-written: check the types first
            value, default = getattr(self, f.name), f.default
            if isinstance(default, tuple):
                if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                    errors.append(f"{f.name} must be a list, got {value!r}")
                else:
                    object.__setattr__(self, f.name, tuple(value))
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    errors.append(f"{f.name} must be true or false, got {value!r}")
            elif isinstance(default, int):
                if not isinstance(value, int) or isinstance(value, bool):
                    errors.append(f"{f.name} must be an integer, got {value!r}")
            elif isinstance(default, float):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    errors.append(f"{f.name} must be a number, got {value!r}")
                else:
                    object.__setattr__(self, f.name, float(value))
        if not errors:
            if any(not isinstance(x, int) or isinstance(x, bool) for x in self.lengths):
                errors.append(f"lengths must be integers, got {list(self.lengths)}")
            for name in ("length_factors", "depths"):
                if any(not isinstance(x, (int, float)) or isinstance(x, bool) for x in getattr(self, name)):
                    errors.append(f"{name} must be numbers, got {list(getattr(self, name))}")
        if errors:
            raise ConfigError("long-context settings: " + "; ".join(errors))
        object.__setattr__(self, "lengths", tuple(sorted(set(self.lengths))))
        object.__setattr__(self, "length_factors", tuple(sorted({float(x) for x in self.length_factors})))
        if self.trained_length <= 0:
            errors.append(f"trained_length must be a positive number of tokens (the S3 length), got "
                          f"{self.trained_length}")
        elif not self.eval_lengths or min(self.eval_lengths) <= 0:
            errors.append(f"lengths must be positive, got {list(self.eval_lengths)} (length_factors "
                          f"{list(self.length_factors)} of trained_length {self.trained_length})")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            errors.append(f"depths must lie in [0, 1], got {list(self.depths)}")
        for name in ("n_per_length", "depth_bins", "loss_docs", "loss_bucket", "max_batch_tokens"):
            if getattr(self, name) <= 0:
                errors.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("loss_length", "dca_chunk_size", "dca_local_size"):
            if getattr(self, name) < 0:
                errors.append(f"{name} must be >= 0 (0: from its factor), got {getattr(self, name)}")
        if self.trained_length > 0 and self.loss_tokens <= 0:
            errors.append(f"loss_length_factor must be positive, got {self.loss_length_factor}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            errors.append(f"variants must be a non-empty subset of {list(VARIANTS)}, got {list(self.variants)}")
        unknown = [c for c in self.conditions if c not in CONDITIONS]
        if unknown or not self.conditions:
            errors.append(f"conditions must be a non-empty subset of {list(CONDITIONS)}, got {list(self.conditions)}")
        if self.yarn_factor < 1:
            errors.append(f"yarn_factor must be >= 1, got {self.yarn_factor}")
        if errors:
            raise ConfigError("long-context settings: " + "; ".join(errors))
        chunk, local = self.dca_sizes
        if not 0 <= local < chunk < self.trained_length:
            raise ConfigError(
                f"long-context settings: DCA needs 0 <= local_size < chunk_size < trained_length, got "
                f"chunk_size={chunk}, local_size={local}, trained_length={self.trained_length}"
            )

    # -------------------------------------------------------------- derived
    @property
    def eval_lengths(self) -> tuple[int, ...]:
        """The evaluated lengths in tokens: `lengths`, else each factor × trained_length (rounded)."""
        if self.lengths:
            return self.lengths
        return tuple(sorted({round(f * self.trained_length) for f in self.length_factors}))

    @property
    def loss_tokens(self) -> int:
        """Length of the loss-by-position documents: `loss_length`, else factor × trained_length."""
        return self.loss_length or round(self.loss_length_factor * self.trained_length)

    @property
    def dca_sizes(self) -> tuple[int, int]:
        """(chunk_size, local_size): the sizes given, else the fractions of trained_length, rounded down
        (as ChunkLlama computes them)."""
        chunk = self.dca_chunk_size or int(self.trained_length * self.dca_chunk_fraction)
        local = self.dca_local_size or int(self.trained_length * self.dca_local_fraction)
        return chunk, local

    def yarn_scaling(self) -> dict[str, Any]:
        return {"rope_type": "yarn", "factor": self.yarn_factor, "original_max_position_embeddings": self.trained_length}

    def dca_config(self) -> dict[str, int]:
        chunk, local = self.dca_sizes
        # original_max_position_embeddings turns on vLLM's dynamic (YaRN-form) key temperature.
        return {"chunk_size": chunk, "local_size": local, "original_max_position_embeddings": self.trained_length}

    def replace(self, **changes: Any) -> "LongContextSettings":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def resolved(self) -> dict[str, Any]:
        """The settings with every length in tokens, plus each condition's inference-time overrides."""
        d = self.to_dict()
        d["lengths"] = list(self.eval_lengths)
        d["loss_length"] = self.loss_tokens
        d["dca_chunk_size"], d["dca_local_size"] = self.dca_sizes
        d["depths"] = list(self.depths) or "evenly spread: (j + 0.5) / n_per_length"
        d["decoding"] = {
            "strategy": "greedy",
            "max_new_tokens": f"tokens of ' <target>.' + {EXTRA_NEW_TOKENS}",
            "stop": "every row's first word complete",
            "dtype": "float32",
        }
        d["condition_overrides"] = {name: condition_overrides(name, self) for name in self.conditions}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "long-context settings") -> "LongContextSettings":
        """Strict: an unknown key is an error that names it."""
        return cls(**strict_fields(cls, d, where))


# ------------------------------------------------------------------------------------ the suite file
def load_suite(path: str | os.PathLike = DEFAULT_SUITE) -> dict[str, Any]:
    """The settings a suite file (TOML, or JSON by extension) pins, checked strictly: an unknown key,
    or a length in tokens (the suite states multiples of the trained length), is an error naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read suite file {path}: {e}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot parse ({e})") from None
    strict_fields(LongContextSettings, data, str(path))
    absolute = [k for k in ABSOLUTE_KEYS if k in data]
    if absolute:
        raise ConfigError(f"{path}: {absolute} are lengths in tokens of one stage; a suite states them relative to "
                          "the trained length (length_factors, loss_length_factor, dca_chunk_fraction, "
                          "dca_local_fraction)")
    return data


def suite_settings(trained_length: int, overrides: Mapping[str, Any] | None = None, *,
                   suite: str | os.PathLike | None = DEFAULT_SUITE, where: str = "overrides") -> LongContextSettings:
    """The suite resolved for an S3 model trained at `trained_length`, with `overrides` (any setting,
    lengths in tokens included; strict). `suite=None` starts from the code defaults."""
    pinned = load_suite(suite) if suite is not None else {}
    overrides = dict(overrides or {})
    strict_fields(LongContextSettings, overrides, where)
    return LongContextSettings.from_dict({**pinned, "trained_length": int(trained_length), **overrides}, where=where)


# ------------------------------------------------------------------------------------ conditions
def beyond_trained(length: int, settings: LongContextSettings) -> bool:
    return length > settings.trained_length


def condition_config(base: ModelConfig, condition: str, length: int, settings: LongContextSettings) -> ModelConfig:
    """The model configuration `condition` evaluates inputs of nominal `length` with.

    YaRN (max_position_embeddings raised to factor × original, as Qwen's docs set it) when the
    condition has it and either `yarn_only_beyond_trained` is off or length > trained_length; DCA
    likewise with `dca_only_beyond_trained`. S2 and S3 return `base` unchanged.
    """
    cond = condition_named(condition)
    changes: dict[str, Any] = {}
    long = beyond_trained(length, settings)
    if cond.yarn and (long or not settings.yarn_only_beyond_trained):
        changes["rope_scaling"] = settings.yarn_scaling()
        changes["max_position_embeddings"] = max(
            base.max_position_embeddings, int(settings.yarn_factor * settings.trained_length)
        )
    if cond.dca and (long or not settings.dca_only_beyond_trained):
        changes["dual_chunk_attention_config"] = settings.dca_config()
    return base.replace(**changes) if changes else base


def condition_overrides(condition: str, settings: LongContextSettings) -> dict[str, Any]:
    """What a condition changes at inference, within and beyond the trained length (for the record)."""
    cond = condition_named(condition)
    out: dict[str, Any] = {"checkpoint": cond.checkpoint, "description": cond.description}
    for regime, length in (("within_trained", settings.trained_length), ("beyond_trained", settings.trained_length + 1)):
        yarn = cond.yarn and (beyond_trained(length, settings) or not settings.yarn_only_beyond_trained)
        dca = cond.dca and (beyond_trained(length, settings) or not settings.dca_only_beyond_trained)
        out[regime] = {
            "rope_scaling": settings.yarn_scaling() if yarn else None,
            "dual_chunk_attention_config": settings.dca_config() if dca else None,
        }
    return out


def condition_named(name: str) -> Condition:
    try:
        return CONDITIONS[name]
    except KeyError:
        raise ConfigError(f"unknown condition {name!r}; known: {', '.join(CONDITIONS)}") from None


__all__ = ["ABSOLUTE_KEYS", "CONDITIONS", "CONDITION_NAMES", "Condition", "DEFAULT_SUITE", "EXTRA_NEW_TOKENS",
           "LongContextSettings", "VARIANTS", "beyond_trained", "condition_config", "condition_named",
           "condition_overrides", "load_suite", "suite_settings"]
