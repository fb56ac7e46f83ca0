"""The claims in the order of the table, and the run that measures them and writes REPORT.md."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ...config import ConfigError
from ...files import write_json_atomic
from .. import report
from .budget import claim_budget
from .copy_probe import add_copy_diagnoses
from .distillation import claim_distillation, claim_distilled_modes
from .filtering import claim_filtering
from .fusion import claim_fusion
from .general_rl import claim_general_rl
from .grpo import claim_grpo
from .longcontext import claim_longcontext
from .moe import claim_moe
from .reward_model import claim_reward_model
from .row import ClaimRow
from .s2_reasoning import claim_s2_reasoning

# Name (as a scale's `claims` list names it) -> function(plan, printer) -> rows. A claim is measured
# for the roles that ran its stages; with none it gives no row.
CLAIMS: dict[str, Callable[..., list[ClaimRow]]] = {
    "s2_reasoning": claim_s2_reasoning,
    "longcontext": claim_longcontext,
    "moe_balance": claim_moe,
    "filtering": claim_filtering,
    "grpo": claim_grpo,
    "fusion": claim_fusion,
    "budget": claim_budget,
    "reward_model": claim_reward_model,
    "general_rl": claim_general_rl,
    "distillation": claim_distillation,
    "distilled_modes": claim_distilled_modes,
}


def run_claims(plan, *, printer: Callable[[str], None] = print, only: set[str] | None = None) -> list[ClaimRow]:
    """Measure the claims (all, or those in `only`), add the copy-probe diagnoses, write
    `claims/claims.json` and `REPORT.md`; returns the rows."""
    unknown = sorted(set(only or ()) - set(CLAIMS))
    if unknown:
        raise ConfigError(f"unknown claim(s) {unknown}; known: {list(CLAIMS)}")
    (plan.root / "claims").mkdir(parents=True, exist_ok=True)
    rows: list[ClaimRow] = []
    for name, fn in CLAIMS.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        printer(f"=== claim {name}")
        new = fn(plan, printer)
        for r in new:
            r.details.setdefault("seconds", time.perf_counter() - t0)
        rows.extend(new)
    add_copy_diagnoses(plan, rows, printer)
    write_json_atomic(plan.root / "claims" / "claims.json", [asdict(r) for r in rows])
    report.write_report(plan, rows)
    printer(f"report: {plan.root / 'REPORT.md'}")
    return rows


def load_rows(path: str | Path) -> list[ClaimRow]:
    """The rows of a `claims.json`."""
    return [ClaimRow(**d) for d in json.loads(Path(path).read_text())]


__all__ = ["CLAIMS", "load_rows", "run_claims"]
