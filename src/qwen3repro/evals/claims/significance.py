"""When a difference between two measured accuracies counts: more than a few standard errors."""
from __future__ import annotations

import math

from .settings import claim_settings


def clearly_above(p1: float, n1: int, p2: float, n2: int, z: float | None = None) -> bool:
    """Whether accuracy p1 (n1 items) beats p2 (n2 items) by more than `z` pooled standard errors
    (a two-proportion test), so a claim is not decided by noise. `z` defaults to
    `evals/claims.toml`'s [significance] standard_errors."""
    if z is None:
        z = claim_settings().significance.standard_errors
    if n1 < 1 or n2 < 1:
        return False
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return p1 - p2 > z * se if se > 0 else p1 > p2


__all__ = ["clearly_above"]
