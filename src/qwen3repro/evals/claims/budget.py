"""Thinking-budget claim (report Fig. 2): accuracy rises with the thinking budget, above the
non-thinking baseline; the budget ability emerges from thinking-mode fusion.

Sizes come from the scale's `[evals.thinking_budget]` table (`evals.thinking.ThinkingEvalConfig`),
the report's curve from `[thinking_budget]` of `evals/claims.toml`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ...chat import STOP_THINKING_DIRECTIVE
from ...files import write_json_atomic
from ..thinking import TEMPLATE_DIRECTIVE, budget_curve, pinned_settings, plot_budget
from .fusion import eval_config, load_fused
from .row import ClaimRow
from .settings import BudgetFigures, claim_settings
from .significance import clearly_above


def report_figure(figures: BudgetFigures) -> str:
    curve = figures.report_budget_curve_aime24
    low, high = min(curve), max(curve)
    return (f"AIME'24 ~{curve[low]:g} -> {curve[high]:g} for budgets {low // 1024}K -> {high // 1024}K; "
            f"non-thinking {figures.report_aime24_non_thinking:g} (Fig. 2, Qwen3-235B-A22B)")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def claim_budget(plan, say: Callable[[str], None]) -> list[ClaimRow]:
    """Accuracy rises with the thinking budget above the non-thinking baseline (Fig. 2)."""
    figures = claim_settings().thinking_budget
    cfg = eval_config(plan, "thinking_budget")
    if cfg is None:
        return []
    model, tokenizer, where = load_fused(plan, cfg)
    if model is None:
        return [ClaimRow("thinking_budget", "accuracy rises with the thinking budget", "-", "not measured", None, where,
                         role=cfg.role)]
    t0 = time.perf_counter()
    curve = budget_curve(model, tokenizer, cfg)
    root = Path(plan.root) / "claims"
    plot = plot_budget(curve, root / "thinking_budget.png")
    result = {"checkpoint": str(where), **curve,
              "settings": {**pinned_settings(cfg), "directive": cfg.directive,
                           "forced_text": TEMPLATE_DIRECTIVE if cfg.directive == "template" else STOP_THINKING_DIRECTIVE},
              "report": {"fig2_aime24": figures.report_budget_curve_aime24,
                         "non_thinking_aime24": figures.report_aime24_non_thinking},
              "seconds": round(time.perf_counter() - t0, 1)}
    write_json_atomic(root / "thinking_budget.json", result)
    runs, s1 = curve["runs"], curve["s1"]
    say(f"claims: thinking budget {[(r['budget'], round(r['accuracy'], 3)) for r in runs]}, baseline "
        f"{curve['non_thinking_baseline']:.3f}, s1 control {s1['control']}, scaling {s1['scaling']}")
    top = runs[-1]["accuracy"]
    n = curve["n"]
    z = claim_settings().significance.standard_errors
    rises = (s1["scaling"] is not None and s1["scaling"] > 0
             and clearly_above(top, n, curve["non_thinking_baseline"], n, z))
    # A staircase: nothing between budget 0 and the full trace helps. Count budgets below the
    # longest trace that beat budget 0.
    partial = [r for r in runs[1:] if r["budget"] < curve["longest_reference_trace"]]
    helped = sum(r["accuracy"] > runs[0]["accuracy"] for r in partial)
    diagnosis = "" if rises else ("accuracy did not rise with the budget above the non-thinking baseline "
                                  f"(by more than {z:g} standard errors at the largest budget)")
    if rises and partial and helped == 0:
        diagnosis = "rises only once the budget covers whole traces (a staircase): partial thinking did not help"
    curve_text = ", ".join(f"{r['budget']}: {r['accuracy']:.0%}" for r in runs)
    return [ClaimRow(
        name="thinking_budget",
        claim="Accuracy rises with the thinking budget, above the non-thinking baseline (the budget ability emerges from fusion)",
        report_figure=report_figure(figures),
        measured=f"held-out accuracy by budget {{{curve_text}}}; non-thinking {curve['non_thinking_baseline']:.0%}; "
                 f"s1 Control {s1['control']:.2f}, Scaling {_num(s1['scaling'])} pts/100 tokens "
                 f"(successive {_num(s1['scaling_successive'])}); n={curve['n']}",
        reproduced=rises,
        diagnosis=diagnosis,
        plots=[str(plot)],
        details={"s1": s1, "budgets": curve["budgets"], "accuracy": [r["accuracy"] for r in runs],
                 "baseline": curve["non_thinking_baseline"], "partial_budgets_beating_zero": helped,
                 "result": str(root / "thinking_budget.json")},
        role=cfg.role,
    )]


__all__ = ["claim_budget"]
