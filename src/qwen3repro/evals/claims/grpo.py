"""GRPO claim (report §4.2): reasoning RL raises held-out pass@1 over the cold start without
collapsing entropy.

Read from the reasoning-RL stage's own records: `eval.json` (held-out pass@1 / pass@k at step 0,
i.e. the cold-start model, and at the end; the entropy trajectory as means over
`rl.entropy.ENTROPY_WINDOW` consecutive steps, since one step's batch is too noisy to read a trend
from) and `metrics.jsonl`, drawn as `claims/grpo_curves_<role>.png`. pass@1 must rise by at least
`pass1_gain_min` with entropy never below `entropy_floor` of its start (`[grpo]` of
`evals/claims.toml`). Measured for every role that ran reasoning RL.
"""
from __future__ import annotations

import json
from typing import Callable

from ...lineage import LINEAGE_FILE
from ...train.metrics import MetricsLog
from ..posttrain import plot_grpo_curves, plot_selection
from .row import ClaimRow
from .settings import GRPOFigures, claim_settings

STAGE = "reasoning-rl"


def report_figure(figures: GRPOFigures, *, steps: bool = True) -> str:
    text = f"AIME'24 {figures.report_aime24_before} -> {figures.report_aime24_after}"
    return f"{text} in {figures.report_rl_steps} steps (§4.2)" if steps else f"{text} (§4.2)"


def claim_grpo(plan, say: Callable[[str], None]) -> list[ClaimRow]:
    figures = claim_settings().grpo
    gain_min, floor = figures.pass1_gain_min, figures.entropy_floor
    rows = []
    for role in plan.roles_with(STAGE):
        d = plan.stage_dir(role, STAGE)
        if not (d / LINEAGE_FILE).exists():
            rows.append(ClaimRow("grpo", "GRPO raises pass@1", "-", "not measured", None,
                                 f"no reasoning-RL checkpoint for {role}", role=role))
            continue
        ev = json.loads((d / "eval.json").read_text())
        if ev.get("skipped"):
            before = ev.get("pass@1_before") or 0.0
            selection_file = d / "selection.json"
            plot = (plot_selection(json.loads(selection_file.read_text()),
                                   plan.root / "claims" / f"grpo_selection_{role}.png")
                    if selection_file.exists() else None)
            rows.append(ClaimRow(
                "grpo", f"GRPO raises held-out pass@1 by >= {gain_min * 100:.0f} points over the cold start",
                report_figure(figures),
                f"not trained: the cold-start model's held-out pass@1 is {before:.1%}; "
                f"selection dropped {ev['selection']['dropped']}", False,
                f"reasoning RL had no learnable query ({ev['skipped']}): GRPO needs groups with mixed rewards, "
                "so the cold start must solve some of the candidates", plots=[plot] if plot else [],
                details={"eval": ev}, role=role))
            continue
        records = MetricsLog(str(d / "metrics.jsonl")).read()
        before, after = ev.get("pass@1_before"), ev.get("pass@1_after")
        gain, ratio = ev.get("pass@1_gain"), ev.get("entropy_min_ratio")
        if gain is None:
            rows.append(ClaimRow("grpo", "GRPO raises pass@1", "-", "not measured", None,
                                 "the RL run logged no held-out evaluation", role=role))
            continue
        if ratio is None:  # no step had a group with mixed rewards: no update was ever made
            kept = sum(int(r.get("groups_kept", 0)) for r in records)
            rows.append(ClaimRow(
                "grpo", "GRPO raises held-out pass@1 over the cold start", report_figure(figures, steps=False),
                f"pass@1 {before:.1%} -> {after:.1%}; {kept} groups with mixed rewards in {ev['steps']} steps", False,
                "every rollout group had equal rewards (the cold-start model solves none or all of its queries), "
                "so GRPO had no advantage signal and made no update", details={"eval": ev}, role=role))
            continue
        gain_ok, entropy_ok = gain >= gain_min, ratio >= floor
        diagnosis = []
        if not gain_ok:
            diagnosis.append(f"pass@1 gain {gain:+.1%} < {gain_min:.0%}")
            if before is not None and before < 0.02:
                diagnosis.append("the cold-start model solves almost nothing, so most groups have equal rewards "
                                 "and GRPO has no signal")
        if not entropy_ok:
            diagnosis.append(f"entropy fell to {ratio:.2f} of its start")
        cfg = plan.node(f"{role}/{STAGE}").config
        plot = plot_grpo_curves(records, plan.root / "claims" / f"grpo_curves_{role}.png", entropy_floor=floor,
                                title=f"{cfg.name}: GRPO ({cfg.entropy_control} entropy control)")
        k = next((key.split("@")[1].split("_")[0] for key in ev if key.startswith("pass@") and key.endswith("_before")
                  and not key.startswith("pass@1_")), "k")
        rows.append(ClaimRow(
            name="grpo",
            claim=f"GRPO raises held-out pass@1 by >= {gain_min * 100:.0f} points over the cold start, "
                  f"entropy never below {floor:.0%} of its start",
            report_figure=report_figure(figures),
            measured=(f"pass@1 {before:.1%} -> {after:.1%} ({gain * 100:+.1f} points) in {ev['steps']} steps; "
                      f"pass@{k} {ev.get(f'pass@{k}_before', float('nan')):.1%} -> "
                      f"{ev.get(f'pass@{k}_after', float('nan')):.1%}; entropy min/start {ratio:.2f} "
                      f"({ev.get('entropy_window', 1)}-step means)"),
            reproduced=gain_ok and entropy_ok, diagnosis="; ".join(diagnosis),
            plots=[plot] if plot else [],
            details={"eval": ev, "steps_logged": len(records)},
            role=role,
        ))
    return rows


__all__ = ["claim_grpo"]
