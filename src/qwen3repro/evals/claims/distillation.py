"""Strong-to-weak distillation claims (Qwen3 report §4.5, Table 21), from the student role's stages:

* **onpolicy_vs_rl** — from one off-policy distilled student (`distill`), on-policy distillation
  (`onpolicy-distill`) reaches at least the held-out pass@1 of GRPO (`distill-grpo`) with at most
  `onpolicy_flops_share_max` of its training FLOPs, and pass@k gains more under distillation than
  under GRPO; compute-matched continued off-policy SFT (`distill-more`) is the control. Every arm and
  the starting checkpoint are measured here on the same held-out items with the same sampling (the
  on-policy stage's eval settings: `stages.grpo.eval_queries`), against the FLOPs of each arm's
  `compute.json` and its wall time. A MoE student distilled off-policy (`moe-student/distill`) is
  measured alongside. Table 21's shape is written to `claims/table21.md`, the accuracy-per-FLOP plot
  next to it.
* **distilled_modes** — the distilled student (after on-policy distillation) keeps the thinking switch:
  ThinkFollow >= `thinkfollow_min` and thinking beats non-thinking on hard held-out items; its thinking
  budget curve is measured too (sizes: the scale's `[evals.fusion]` and `[evals.thinking_budget]`).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from ... import plotting
from ...files import write_json_atomic
from ...lineage import LINEAGE_FILE
from ...models.qwen3 import Qwen3
from ...stages.grpo import eval_queries
from ...tokenizer import Tokenizer
from ...train.compute import COMPUTE_FILE
from ..pass_at_k import evaluate_pass_at_k
from ..thinking import ThinkingEvalConfig, accuracy_by_mode, budget_curve, plot_budget, think_follow
from .fusion import pct
from .row import ClaimRow
from .settings import claim_settings
from .significance import clearly_above

ROLE = "student"
MOE_ROLE = "moe-student"
START, RL, ONPOLICY, SFT_MORE = "distill", "distill-grpo", "onpolicy-distill", "distill-more"
ARMS = {START: "off-policy distillation", RL: "+ RL (GRPO, rule reward)",
        ONPOLICY: "+ on-policy distillation", SFT_MORE: "+ off-policy SFT, compute-matched to on-policy"}


def _complete(plan, role: str, stage: str) -> Path | None:
    if not plan.has(role, stage):
        return None
    out = Path(plan.stage_dir(role, stage))
    return out if (out / LINEAGE_FILE).exists() else None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def measure_arms(plan, say: Callable[[str], None]) -> dict[str, Any] | None:
    """Held-out pass@1 / pass@k, FLOPs and wall time of every arm that ran (None without the on-policy stage)."""
    onpolicy = _complete(plan, ROLE, ONPOLICY)
    if onpolicy is None:
        return None
    cfg = plan.node(f"{ROLE}/{ONPOLICY}").config
    heldout = eval_queries(cfg)
    k = cfg.eval_k
    arms: dict[str, Any] = {}
    for role, stage in ((ROLE, START), (ROLE, RL), (ROLE, ONPOLICY), (ROLE, SFT_MORE), (MOE_ROLE, START)):
        where = _complete(plan, role, stage)
        if where is None:
            continue
        t0 = time.perf_counter()
        model, tokenizer = Qwen3.from_pretrained(where, device=plan.device), Tokenizer.load(where)
        res = evaluate_pass_at_k(model, tokenizer, heldout, k=k, sampling=cfg.eval_sampling,
                                 max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed + 7919)
        compute = _read_json(where / COMPUTE_FILE)
        timing = _read_json(where / "timing.json")
        key = f"{role}/{stage}"
        arms[key] = {"checkpoint": str(where), "label": ARMS[stage] if role == ROLE else "MoE student, off-policy",
                     "pass@1": res["pass@1"], f"pass@{k}": res[f"pass@{k}"], "flops": compute.get("flops"),
                     "compute": compute, "seconds": timing.get("seconds"),
                     "curve": _curve(where / "metrics.jsonl", k)}
        say(f"claims: {key} pass@1 {res['pass@1']:.3f} pass@{k} {res[f'pass@{k}']:.3f} "
            f"({time.perf_counter() - t0:.0f}s)")
    return {"k": k, "n_items": len(heldout), "families": list(cfg.eval_families or cfg.families),
            "sampling": dataclasses.asdict(cfg.eval_sampling), "max_new_tokens": cfg.eval_max_new_tokens,
            "arms": arms}


def _curve(metrics: Path, k: int) -> list[dict[str, float]]:
    """(FLOPs, pass@1, pass@k) at each step a stage evaluated (RL and on-policy log both)."""
    if not metrics.exists():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [{"flops": r["flops"], "pass@1": r["eval/pass@1"], f"pass@{k}": r[f"eval/pass@{k}"]}
            for r in rows if "eval/pass@1" in r and "flops" in r]


def _flops(arm: Mapping[str, Any]) -> str:
    return f"{arm['flops']:.3g}" if arm.get("flops") is not None else "-"


def table21(result: Mapping[str, Any]) -> str:
    """The arms as the report's Table 21 lays them out (accuracy, pass@k in parentheses, compute)."""
    k = result["k"]
    lines = [f"| method | held-out pass@1 (pass@{k}) | training FLOPs | wall time |", "|---|---|---|---|"]
    for key, arm in result["arms"].items():
        flops = _flops(arm)
        secs = f"{arm['seconds'] / 60:.1f} min" if arm.get("seconds") is not None else "-"
        lines.append(f"| {arm['label']} (`{key}`) | {arm['pass@1']:.1%} ({arm[f'pass@{k}']:.1%}) | {flops} | {secs} |")
    return "\n".join(lines)


def plot_per_flop(result: Mapping[str, Any], path: Path) -> str:
    """Held-out pass@1 against cumulative training FLOPs: the RL and on-policy curves (their own evals)
    from the shared start, and the final point of every arm (this claim's evals)."""
    k = result["k"]
    arms = result["arms"]
    start = arms.get(f"{ROLE}/{START}")
    with plotting.figure(path, ncols=2, figsize=(11, 4), title="Table 21 at this scale: accuracy per FLOP") as (fig, axes):
        for ax, metric in zip(axes[0], ("pass@1", f"pass@{k}")):
            for key, arm in arms.items():
                if arm["curve"]:
                    line, = ax.plot([max(c["flops"], 1) for c in arm["curve"]], [100 * c[metric] for c in arm["curve"]],
                                    marker=".", alpha=0.6, label=f"{arm['label']} (stage evals)")
                    color = line.get_color()
                else:
                    color = None
                if arm.get("flops"):
                    ax.scatter([arm["flops"]], [100 * arm[metric]], marker="o", s=40, color=color,
                               label=None if arm["curve"] else arm["label"])
            if start is not None:
                ax.axhline(100 * start[metric], color="grey", ls="--", lw=0.8, label="off-policy start")
            ax.set_xscale("log")
            ax.set_xlabel("training FLOPs after the off-policy checkpoint")
            ax.set_ylabel(f"held-out {metric} (%)")
            ax.legend(fontsize=7)
    return str(path)


def claim_distillation(plan, say: Callable[[str], None]) -> list[ClaimRow]:
    figures = claim_settings().distillation
    result = measure_arms(plan, say)
    if result is None:
        return []
    root = Path(plan.root) / "claims"
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "distillation.json", result)
    table = table21(result)
    (root / "table21.md").write_text(table + "\n")
    plot = plot_per_flop(result, root / "distillation.png")
    k, arms = result["k"], result["arms"]
    start, rl, onp, sft = (arms.get(f"{ROLE}/{s}") for s in (START, RL, ONPOLICY, SFT_MORE))
    report = (f"Qwen3-8B from one off-policy checkpoint (Table 21): AIME'24 {figures.report_offpolicy_aime24} "
              f"({figures.report_offpolicy_aime24_pass64}) -> RL {figures.report_rl_aime24} "
              f"({figures.report_rl_aime24_pass64}) at {figures.report_rl_gpu_hours:,} GPU-h, on-policy "
              f"{figures.report_onpolicy_aime24} ({figures.report_onpolicy_aime24_pass64}) at "
              f"{figures.report_onpolicy_gpu_hours:,} GPU-h; claim: on-policy >= RL pass@1 at <= "
              f"{figures.onpolicy_flops_share_max:.0%} of its FLOPs, pass@k gains more")
    if start is None or rl is None or onp is None:
        missing = [s for s, a in ((START, start), (RL, rl), (ONPOLICY, onp)) if a is None]
        return [ClaimRow("onpolicy_vs_rl", "On-policy distillation beats RL per FLOP", report, "not measured", None,
                         f"missing stages {missing}", role=ROLE)]
    pk = f"pass@{k}"
    share = onp["flops"] / rl["flops"] if rl.get("flops") else None
    per_flop = onp["pass@1"] >= rl["pass@1"] and share is not None and share <= figures.onpolicy_flops_share_max
    passk_gain_onp, passk_gain_rl = onp[pk] - start[pk], rl[pk] - start[pk]
    passk = passk_gain_onp > passk_gain_rl and passk_gain_onp > 0
    rl_skipped = _read_json(Path(rl["checkpoint"]) / "eval.json").get("skipped")
    share_text = f"{share:.1%} of RL's" if share is not None else "RL spent none"
    measured = (f"held-out pass@1 ({pk}), n={result['n_items']}: off-policy {pct(start['pass@1'])} ({pct(start[pk])}); "
                f"+RL {pct(rl['pass@1'])} ({pct(rl[pk])}) at {_flops(rl)} FLOPs"
                + (" (skipped: no learnable query)" if rl_skipped else "")
                + f"; +on-policy {pct(onp['pass@1'])} ({pct(onp[pk])}) at {_flops(onp)} FLOPs ({share_text})"
                + (f"; +SFT compute-matched {pct(sft['pass@1'])} ({pct(sft[pk])})" if sft else "")
                + (f"; MoE student off-policy {pct(arms[f'{MOE_ROLE}/{START}']['pass@1'])}"
                   if f"{MOE_ROLE}/{START}" in arms else ""))
    why = []
    if onp["pass@1"] < rl["pass@1"]:
        why.append(f"on-policy pass@1 {pct(onp['pass@1'])} is below RL's {pct(rl['pass@1'])}")
    if share is None or share > figures.onpolicy_flops_share_max:
        why.append(f"on-policy used {share:.1%} of RL's FLOPs" if share is not None
                   else "RL spent no FLOPs to compare with (skipped or not counted)")
    if not passk:
        why.append(f"{pk} gain on-policy {passk_gain_onp:+.1%} vs RL {passk_gain_rl:+.1%}")
    return [ClaimRow(
        name="onpolicy_vs_rl",
        claim="On-policy distillation beats RL per FLOP from one off-policy distilled student, and raises pass@k",
        report_figure=report, measured=measured, reproduced=per_flop and passk, diagnosis="; ".join(why),
        plots=[plot], details={"result": str(root / "distillation.json"), "table": str(root / "table21.md"),
                               "flops_share": share},
        role=ROLE, table=table)]


def claim_distilled_modes(plan, say: Callable[[str], None]) -> list[ClaimRow]:
    """ThinkFollow >= the threshold and thinking beats non-thinking on hard items, on the distilled student."""
    figures = claim_settings().distillation
    stage = ONPOLICY if plan.has(ROLE, ONPOLICY) else START
    where = _complete(plan, ROLE, stage)
    if not plan.has(ROLE, stage):
        return []
    name = "distilled_modes"
    claim = "The distilled student keeps the thinking switch (ThinkFollow) and thinks better than it answers directly"
    report = (f"the distilled Qwen3 models keep both modes (§4.5); claim: ThinkFollow >= {figures.thinkfollow_min:.0%}, "
              "thinking beats non-thinking on hard items")
    if where is None:
        return [ClaimRow(name, claim, report, "not measured", None, f"missing checkpoint {plan.stage_dir(ROLE, stage)}",
                         role=ROLE)]
    cfg = dataclasses.replace(ThinkingEvalConfig.from_dict(plan.eval_settings("fusion")), role=ROLE)
    budget_cfg = dataclasses.replace(ThinkingEvalConfig.from_dict(plan.eval_settings("thinking_budget")), role=ROLE)
    model, tokenizer = Qwen3.from_pretrained(where, device=plan.device), Tokenizer.load(where)
    t0 = time.perf_counter()
    follow = think_follow(model, tokenizer, cfg)
    modes = accuracy_by_mode(model, tokenizer, cfg)
    curve = budget_curve(model, tokenizer, budget_cfg)
    say(f"claims: distilled student ThinkFollow {follow['thinkfollow']:.1%}, thinking "
        f"{modes['thinking']['accuracy']:.1%} vs non-thinking {modes['non_thinking']['accuracy']:.1%} "
        f"({time.perf_counter() - t0:.0f}s)")
    root = Path(plan.root) / "claims"
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "distilled_modes.json", {"checkpoint": str(where), "thinkfollow": follow,
                                                      "accuracy_by_mode": modes, "budget": curve})
    plot = str(plot_budget(curve, root / "distilled_budget.png", title=f"distilled student ({stage}): accuracy vs "
                                                                       "thinking budget"))
    tf = follow["thinkfollow"]
    think_hard = modes["thinking"]["by_relative_difficulty"]["hard"]
    plain_hard = modes["non_thinking"]["by_relative_difficulty"]["hard"]
    n_hard = modes["thinking"]["n_by_relative_difficulty"]["hard"]
    z = claim_settings().significance.standard_errors
    hard_ok = think_hard is not None and plain_hard is not None and clearly_above(think_hard, n_hard, plain_hard,
                                                                                  n_hard, z)
    why = []
    if tf < figures.thinkfollow_min:
        why.append(f"ThinkFollow {tf:.1%} below {figures.thinkfollow_min:.0%}")
    if not hard_ok:
        why.append(f"thinking did not beat non-thinking on hard items by more than {z:g} standard errors")
    budgets = ", ".join(f"{r['budget']}: {r['accuracy']:.0%}" for r in curve["runs"])
    return [ClaimRow(
        name=name, claim=claim, report_figure=report,
        measured=(f"`{ROLE}/{stage}`: ThinkFollow {tf:.1%} (n={follow['n']}); hard items thinking {pct(think_hard)} vs "
                  f"non-thinking {pct(plain_hard)}, all {modes['thinking']['accuracy']:.1%} vs "
                  f"{modes['non_thinking']['accuracy']:.1%} (n={modes['thinking']['n']}); accuracy by thinking budget "
                  f"{{{budgets}}}, non-thinking {curve['non_thinking_baseline']:.0%}"),
        reproduced=tf >= figures.thinkfollow_min and hard_ok, diagnosis="; ".join(why), plots=[plot],
        details={"result": str(root / "distilled_modes.json")}, role=ROLE)]


__all__ = ["claim_distillation", "claim_distilled_modes", "measure_arms", "plot_per_flop", "table21"]
