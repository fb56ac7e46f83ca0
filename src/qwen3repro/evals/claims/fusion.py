"""Thinking-mode fusion claims (report §4.3, Table 22; Tables 11-12), two rows from one fused model:

* **thinkfollow** — after fusion the model follows /think and /no_think (the last flag wins) in
  held-out multi-turn chats, ThinkFollow >= `thinkfollow_min`;
* **thinking_vs_non_thinking** — thinking mode beats non-thinking mode on the hard held-out items
  by more than the significance threshold.

Sizes come from the scale's `[evals.fusion]` table (`evals.thinking.ThinkingEvalConfig`), the
thresholds and report figures from `[fusion]` of `evals/claims.toml`. The fused model is the one of
the table's `role`, default the first role that ran fusion.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

from ...lineage import LINEAGE_FILE
from ...models.qwen3 import Qwen3
from ...files import write_json_atomic
from ...tokenizer import Tokenizer
from ..thinking import ThinkingEvalConfig, accuracy_by_mode, pinned_settings, plot_fusion, think_follow
from .row import ClaimRow
from .settings import claim_settings
from .significance import clearly_above

STAGE = "fusion"


def eval_config(plan, table: str) -> ThinkingEvalConfig | None:
    """The scale's `[evals.<table>]` settings with the evaluated role resolved; None when no role
    ran fusion."""
    cfg = ThinkingEvalConfig.from_dict(plan.eval_settings(table))
    if cfg.role:
        return cfg
    roles = plan.roles_with(STAGE)
    return dataclasses.replace(cfg, role=roles[0]) if roles else None


def load_fused(plan, cfg: ThinkingEvalConfig) -> tuple[Any, Any, Any]:
    """(model on the run's device, tokenizer, checkpoint dir) of the fused model, or (None, None, why not)."""
    if not plan.has(cfg.role, STAGE):
        return None, None, f"no {cfg.role}/{STAGE} stage in this pipeline"
    out = Path(plan.stage_dir(cfg.role, STAGE))
    if not (out / LINEAGE_FILE).exists():
        return None, None, f"missing checkpoint {out}"
    return Qwen3.from_pretrained(out, device=plan.device), Tokenizer.load(out), out


def pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


def claim_fusion(plan, say: Callable[[str], None]) -> list[ClaimRow]:
    """ThinkFollow >= the threshold, and thinking beats non-thinking on hard held-out problems."""
    figures = claim_settings().fusion
    cfg = eval_config(plan, "fusion")
    if cfg is None:
        return []
    model, tokenizer, where = load_fused(plan, cfg)
    if model is None:
        return [ClaimRow("thinkfollow", "fused model follows /think and /no_think", "-", "not measured", None, where,
                         role=cfg.role),
                ClaimRow("thinking_vs_non_thinking", "thinking beats non-thinking on hard problems", "-",
                         "not measured", None, where, role=cfg.role)]
    t0 = time.perf_counter()
    follow = think_follow(model, tokenizer, cfg)
    say(f"claims: ThinkFollow {follow['thinkfollow']:.1%} (n={follow['n']}, {time.perf_counter() - t0:.0f}s)")
    t1 = time.perf_counter()
    modes = accuracy_by_mode(model, tokenizer, cfg)
    say(f"claims: accuracy thinking {modes['thinking']['accuracy']:.1%} vs non-thinking "
        f"{modes['non_thinking']['accuracy']:.1%} (n={modes['thinking']['n']}, {time.perf_counter() - t1:.0f}s)")
    result = {"checkpoint": str(where), "thinkfollow": follow, "accuracy_by_mode": modes,
              "settings": pinned_settings(cfg),
              "report": {"thinkfollow_stage3": figures.report_thinkfollow_stage3,
                         "thinkfollow_stage4": figures.report_thinkfollow_stage4,
                         "claim_threshold": figures.thinkfollow_min},
              "seconds": round(time.perf_counter() - t0, 1)}
    path = Path(plan.root) / "claims" / "fusion.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    plot = str(plot_fusion(follow, modes, path.with_suffix(".png"), threshold=figures.thinkfollow_min))
    tf = follow["thinkfollow"]
    by_kind = ", ".join(f"{k} {v:.0%}" for k, v in follow["by_kind"].items() if v is not None)
    think_hard = modes["thinking"]["by_relative_difficulty"]["hard"]
    plain_hard = modes["non_thinking"]["by_relative_difficulty"]["hard"]
    follow_ok = tf >= figures.thinkfollow_min
    n_hard = modes["thinking"]["n_by_relative_difficulty"]["hard"]
    z = claim_settings().significance.standard_errors
    hard_ok = (think_hard is not None and plain_hard is not None
               and clearly_above(think_hard, n_hard, plain_hard, n_hard, z))
    diag_hard = ""
    if not hard_ok:
        diag_hard = (f"thinking did not beat non-thinking on the hard items by more than {z:g} standard errors"
                     if think_hard is not None else "no hard items evaluated")
    threshold = f"{figures.thinkfollow_min:.0%}"
    return [
        ClaimRow(
            name="thinkfollow",
            claim="After thinking-mode fusion the model follows /think and /no_think (last flag wins) in multi-turn chats",
            report_figure=f"ThinkFollow {figures.report_thinkfollow_stage3} after Stage 3, "
                          f"{figures.report_thinkfollow_stage4} after Stage 4 (Table 22, Qwen3-32B); "
                          f"claim: >= {threshold}",
            measured=f"ThinkFollow {tf:.1%} on {follow['n']} held-out 2-3 turn chats ({by_kind}; thinking "
                     f"{follow['by_expected']['think']:.0%}, non-thinking {follow['by_expected']['no_think']:.0%})",
            reproduced=follow_ok,
            diagnosis="" if follow_ok else (f"below {threshold}; failures in {path.name} show the malformed or "
                                            "wrong-mode turns"),
            plots=[plot],
            details={"thinkfollow": tf, "by_kind": follow["by_kind"], "by_expected": follow["by_expected"],
                     "result": str(path)},
            role=cfg.role),
        ClaimRow(
            name="thinking_vs_non_thinking",
            claim="Thinking mode beats non-thinking mode on hard problems (one fused model, two modes)",
            report_figure=f"AIME'24 {figures.report_aime24_thinking} thinking vs {figures.report_aime24_non_thinking} "
                          "non-thinking (Qwen3-235B-A22B, Tables 11-12)",
            measured=f"held-out hard items: thinking {pct(think_hard)} vs non-thinking {pct(plain_hard)}; all: "
                     f"{modes['thinking']['accuracy']:.1%} vs {modes['non_thinking']['accuracy']:.1%} "
                     f"(n={modes['thinking']['n']})",
            reproduced=hard_ok,
            diagnosis=diag_hard,
            plots=[plot],
            details={"thinking": modes["thinking"]["by_relative_difficulty"],
                     "non_thinking": modes["non_thinking"]["by_relative_difficulty"], "result": str(path)},
            role=cfg.role),
    ]


__all__ = ["claim_fusion", "eval_config", "load_fused"]
