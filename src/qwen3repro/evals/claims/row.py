"""One row of the claims table."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ClaimRow:
    """The report's claim, the report's figure, our measurement, and whether it reproduced (with a
    diagnosis when it did not). `reproduced` is None when the claim was not measured."""

    name: str
    claim: str
    report_figure: str
    measured: str
    reproduced: bool | None
    diagnosis: str = ""
    plots: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    role: str = ""
    """The role whose checkpoints were measured ('' when the row reads none)."""
    table: str = ""
    """A Markdown table the row's measurement fills (REPORT.md shows it under "Tables"), or ''."""


__all__ = ["ClaimRow"]
