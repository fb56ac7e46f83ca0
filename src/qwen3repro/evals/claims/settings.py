"""The claims' thresholds and the report's figures: `evals/claims.toml`, one table per claim.

Loaded strictly: an unknown table or key, a missing key, or a value of the wrong type is an error
naming it. The file is the one place these numbers live (each commented there with its source).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ...config import ConfigError
from .. import SETTINGS_DIR

CLAIMS_FILE = SETTINGS_DIR / "claims.toml"


@dataclass(frozen=True)
class Significance:
    standard_errors: float


@dataclass(frozen=True)
class LongContextFigures:
    at_trained_min: float
    extended_min: float
    plain_s3_control_max: float
    far_worse_gap: float
    report_s2_context: int
    report_s3_context: int
    report_inference_context: int


@dataclass(frozen=True)
class CopyProbeFigures:
    copy_gain_min: float


@dataclass(frozen=True)
class GRPOFigures:
    pass1_gain_min: float
    entropy_floor: float
    report_aime24_before: float
    report_aime24_after: float
    report_rl_steps: int


@dataclass(frozen=True)
class FusionFigures:
    thinkfollow_min: float
    report_thinkfollow_stage3: float
    report_thinkfollow_stage4: float
    report_aime24_thinking: float
    report_aime24_non_thinking: float


@dataclass(frozen=True)
class GeneralRLFigures:
    reasoning_drop_max: float
    report_thinkfollow_stage3: float
    report_thinkfollow_stage4: float
    report_aime24_stage3: float
    report_aime24_stage4: float


@dataclass(frozen=True)
class RewardModelFigures:
    pairwise_margin_min: float
    best_of_k_min: float


@dataclass(frozen=True)
class DistillationFigures:
    onpolicy_flops_share_max: float
    thinkfollow_min: float
    report_offpolicy_aime24: float
    report_offpolicy_aime24_pass64: float
    report_rl_aime24: float
    report_rl_aime24_pass64: float
    report_rl_gpu_hours: int
    report_onpolicy_aime24: float
    report_onpolicy_aime24_pass64: float
    report_onpolicy_gpu_hours: int


@dataclass(frozen=True)
class BudgetFigures:
    report_budget_curve_aime24: dict[int, float]
    """Thinking budget (tokens) -> accuracy (%), in the file's order."""
    report_aime24_non_thinking: float


@dataclass(frozen=True)
class ClaimSettings:
    significance: Significance
    longcontext: LongContextFigures
    copy_probe: CopyProbeFigures
    grpo: GRPOFigures
    fusion: FusionFigures
    thinking_budget: BudgetFigures
    general_rl: GeneralRLFigures
    reward_model: RewardModelFigures
    distillation: DistillationFigures


def _number(value: Any, kind: type, where: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"{where} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _curve(value: Any, where: str) -> dict[int, float]:
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{where} must be a non-empty table of budget = accuracy, got {value!r}")
    out = {}
    for key, acc in value.items():
        try:
            budget = int(key)
        except ValueError:
            raise ConfigError(f"{where}: budget {key!r} is not an integer") from None
        out[budget] = _number(acc, float, f"{where} {key}")
    return out


def _table(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a table, got {data!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown, missing = sorted(set(data) - set(names)), [n for n in names if n not in data]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {names}")
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name in names:
        hint = hints[name]
        if hint is int or hint is float:
            values[name] = _number(data[name], hint, f"{where} {name}")
        elif hint == dict[int, float]:
            values[name] = _curve(data[name], f"{where} {name}")
        else:  # a claim's table
            values[name] = _table(hint, data[name], f"{where} [{name}]")
    return cls(**values)


def load_claim_settings(path: str | os.PathLike = CLAIMS_FILE) -> ClaimSettings:
    """`ClaimSettings` from a TOML file, checked strictly (the error names the table and key)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read the claims' settings {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None
    return _table(ClaimSettings, data, str(path))


@functools.cache
def claim_settings() -> ClaimSettings:
    """The repository's `evals/claims.toml`, read once."""
    return load_claim_settings(CLAIMS_FILE)


__all__ = ["BudgetFigures", "CLAIMS_FILE", "ClaimSettings", "CopyProbeFigures", "DistillationFigures", "FusionFigures", "GRPOFigures",
           "GeneralRLFigures", "LongContextFigures", "RewardModelFigures", "Significance", "claim_settings",
           "load_claim_settings"]
