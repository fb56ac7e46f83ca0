"""General-RL claim (report §4.4, Table 22): general RL makes the fused model follow instructions,
formats and tools better without costing thinking-mode reasoning.

One row per role that ran general RL, from the fused model (the stage's parent) and the general-RL model:

* ThinkFollow (`evals.thinking.think_follow`, the scale's `[evals.fusion]` settings) must rise;
* IFEval prompt-level strict on held-out instruction-following queries (`evals.instruction_following`,
  `[evals.general_rl]` sizes) must rise;
* tool-call success (held-out tool tasks: at least one call and every call ran; the stage's own
  evaluation at step 0 and at the end, `eval.json`) must rise;
* thinking-mode reasoning accuracy (`evals.thinking.accuracy_by_mode`) must stay within
  `reasoning_drop_max` of the fused model's (the report: AIME'24 81.9 -> 81.4).

Also reported: IFEval instruction-level and loose, the held-out reward of every task before and after
(the reward model's and the judge's tasks among them), and the counted no-reward outcomes. Plots:
per-task training reward curves and held-out before/after bars (`claims/general_rl_<role>.png`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ... import plotting
from ...config import ConfigError
from ...files import write_json_atomic
from ...lineage import LINEAGE_FILE
from ...models.qwen3 import Qwen3
from ...tokenizer import Tokenizer
from ...train.metrics import MetricsLog
from ..instruction_following import evaluate_ifeval, heldout_ifeval_queries
from ..thinking import ThinkingEvalConfig, accuracy_by_mode, pinned_settings, think_follow
from .fusion import eval_config
from .row import ClaimRow
from .settings import claim_settings
from .significance import clearly_above

STAGE = "general-rl"
PARENT = "fusion"


def _ifeval_settings(plan) -> tuple[int, int]:
    raw = plan.eval_settings("general_rl")
    unknown = sorted(set(raw) - {"ifeval_n", "ifeval_max_new_tokens"})
    if unknown:
        raise ConfigError(f"evals.general_rl: unknown key(s) {unknown}; valid: ifeval_n, ifeval_max_new_tokens")
    return int(raw.get("ifeval_n", 48)), int(raw.get("ifeval_max_new_tokens", 96))


def _fusion_claim_result(plan, model_dir: Path, cfg: ThinkingEvalConfig) -> dict[str, Any] | None:
    """The fusion claim's measurement of `model_dir` (claims/fusion.json), when it was made on this
    checkpoint with these settings: the same figures, not measured twice."""
    path = Path(plan.root) / "claims" / "fusion.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved.get("checkpoint") != str(model_dir) or saved.get("settings") != json.loads(
            json.dumps(pinned_settings(cfg))):
        return None
    return saved


def measure(model_dir: Path, cfg: ThinkingEvalConfig, ifeval_n: int, ifeval_max_new: int, say,
            known: Mapping[str, Any] | None = None, device: str = "cpu") -> dict[str, Any]:
    """ThinkFollow, reasoning accuracy by mode and IFEval of one checkpoint, run on `device` (`known`: the
    fusion claim's ThinkFollow and accuracy of this checkpoint at these settings)."""
    model, tokenizer = Qwen3.from_pretrained(model_dir, device=device), Tokenizer.load(model_dir)
    t0 = time.perf_counter()
    follow = known["thinkfollow"] if known else think_follow(model, tokenizer, cfg)
    modes = known["accuracy_by_mode"] if known else accuracy_by_mode(model, tokenizer, cfg)
    ifeval = evaluate_ifeval(model, tokenizer, heldout_ifeval_queries(ifeval_n, seed=cfg.seed),
                             max_new_tokens=ifeval_max_new, seed=cfg.seed + 31)
    say(f"claims: {model_dir.parent.name}/{model_dir.name}: ThinkFollow {follow['thinkfollow']:.1%}, IFEval prompt "
        f"strict {ifeval['prompt_strict']:.1%}, thinking accuracy {modes['thinking']['accuracy']:.1%} "
        f"({time.perf_counter() - t0:.0f}s)")
    return {"checkpoint": str(model_dir), "thinkfollow": {k: follow[k] for k in ("thinkfollow", "n", "by_kind",
                                                                                  "by_expected", "failures")},
            "accuracy_by_mode": {m: {k: v for k, v in modes[m].items() if k != "by_family_difficulty"}
                                 for m in ("thinking", "non_thinking")},
            "ifeval": ifeval}


def plot_general_rl(records: Sequence[Mapping[str, Any]], ev: Mapping[str, Any], path: Path, title: str) -> str:
    """Per-task training reward (5-step means) and held-out reward per task before/after."""
    steps = [r for r in records if "reward" in r and r.get("step", 0) > 0]
    tasks = sorted({k.split("/", 1)[1] for r in steps for k in r if k.startswith("reward/")})
    with plotting.figure(path, nrows=1, ncols=3, figsize=(18, 4.8), title=title) as (fig, axes):
        ax = axes[0, 0]
        for task in tasks:
            pts = [(r["step"], r[f"reward/{task}"]) for r in steps
                   if isinstance(r.get(f"reward/{task}"), (int, float)) and not math.isnan(r[f"reward/{task}"])]
            if len(pts) >= 2:
                window = 5
                xs = [p[0] for p in pts][window - 1:] if len(pts) >= window else [pts[-1][0]]
                ys = ([sum(p[1] for p in pts[i - window + 1:i + 1]) / window for i in range(window - 1, len(pts))]
                      if len(pts) >= window else [sum(p[1] for p in pts) / len(pts)])
                ax.plot(xs, ys, lw=1, label=task)
        ax.set_title("training reward per task (5-sample means)")
        ax.set_xlabel("step")
        ax.legend(fontsize=5, ncol=2)
        ax = axes[0, 1]
        before, after = ev.get("before", {}), ev.get("after", {})
        names = sorted(k.split("/", 1)[1] for k in after if k.startswith("reward/"))
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [before.get(f"reward/{n}") or 0 for n in names], 0.4, label="fusion (step 0)")
        ax.bar([x + 0.2 for x in xs], [after.get(f"reward/{n}") or 0 for n in names], 0.4, label="general RL")
        ax.set_xticks(list(xs), names, rotation=75, fontsize=6)
        ax.set_title("held-out reward per task")
        ax.legend(fontsize=7)
        ax = axes[0, 2]
        keys = [("follow", "mode follow"), ("tool_success", "tool-call success"), ("reward", "mean reward")]
        ax.bar([i - 0.2 for i in range(len(keys))], [before.get(k) or 0 for k, _ in keys], 0.4, label="fusion")
        ax.bar([i + 0.2 for i in range(len(keys))], [after.get(k) or 0 for k, _ in keys], 0.4, label="general RL")
        ax.set_xticks(range(len(keys)), [label for _, label in keys], fontsize=8)
        ax.set_title("held-out (stage evaluation)")
        ax.legend(fontsize=7)
    return str(path)


def claim_general_rl(plan, say: Callable[[str], None]) -> list[ClaimRow]:
    figures = claim_settings().general_rl
    cfg = eval_config(plan, "fusion")
    rows = []
    for role in plan.roles_with(STAGE):
        d, parent = Path(plan.stage_dir(role, STAGE)), Path(plan.stage_dir(role, PARENT))
        claim = ("General RL raises ThinkFollow, IFEval (prompt-level strict) and tool-call success over the fused "
                 "model (each by more than the significance threshold), thinking-mode reasoning within "
                 f"{figures.reasoning_drop_max * 100:.0f} points")
        report = (f"ThinkFollow {figures.report_thinkfollow_stage3} -> {figures.report_thinkfollow_stage4}; AIME'24 "
                  f"{figures.report_aime24_stage3} -> {figures.report_aime24_stage4} (Table 22, Qwen3-32B)")
        if cfg is None or not (d / LINEAGE_FILE).exists() or not (parent / LINEAGE_FILE).exists():
            rows.append(ClaimRow("general_rl", claim, report, "not measured", None,
                                 f"missing checkpoint {d if not (d / LINEAGE_FILE).exists() else parent}", role=role))
            continue
        cfg_role = dataclasses.replace(cfg, role=role)
        ifeval_n, ifeval_max_new = _ifeval_settings(plan)
        before = measure(parent, cfg_role, ifeval_n, ifeval_max_new, say,
                         known=_fusion_claim_result(plan, parent, cfg_role), device=plan.device)
        after = measure(d, cfg_role, ifeval_n, ifeval_max_new, say, device=plan.device)
        ev = json.loads((d / "eval.json").read_text())
        records = MetricsLog(str(d / "metrics.jsonl")).read()
        tf = (before["thinkfollow"]["thinkfollow"], after["thinkfollow"]["thinkfollow"])
        ife = (before["ifeval"]["prompt_strict"], after["ifeval"]["prompt_strict"])
        tool = (ev["before"].get("tool_success"), ev["after"].get("tool_success"))
        acc = (before["accuracy_by_mode"]["thinking"]["accuracy"], after["accuracy_by_mode"]["thinking"]["accuracy"])
        z = claim_settings().significance.standard_errors
        n_tf = after["thinkfollow"]["n"]
        n_tool = ev["eval_settings"]["per_task"] * sum(1 for t in ev["tasks"] if t.startswith("tool_"))
        rises = {"ThinkFollow": (tf, n_tf), "IFEval": (ife, ifeval_n), "tool-call success": (tool, n_tool)}
        checks = {name: None not in pair and clearly_above(pair[1], n, pair[0], n, z)
                  for name, (pair, n) in rises.items()}
        checks["reasoning"] = acc[1] >= acc[0] - figures.reasoning_drop_max
        result = {"fusion": before, "general_rl": after, "stage_eval": ev, "checks": checks,
                  "settings": {"thinking": pinned_settings(cfg_role), "ifeval_n": ifeval_n,
                               "ifeval_max_new_tokens": ifeval_max_new}}
        path = Path(plan.root) / "claims" / f"general_rl_{role}.json"
        write_json_atomic(path, result)
        plot = plot_general_rl(records, ev, path.with_suffix(".png"), f"{role}: general RL")
        fmt = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
        rm_tasks = [k for k in ev["after"] if k.startswith("reward/") and "writing" in k]
        judge_tasks = [k for k in ev["after"] if k.startswith("reward/") and "judge" in k]
        extra = "".join(f"; {k[7:]} {fmt(ev['before'].get(k))} -> {fmt(ev['after'].get(k))}"
                        for k in rm_tasks + judge_tasks)
        measured = (f"ThinkFollow {fmt(tf[0])} -> {fmt(tf[1])}; IFEval prompt strict {fmt(ife[0])} -> {fmt(ife[1])} "
                    f"(instruction loose {fmt(before['ifeval']['instruction_loose'])} -> "
                    f"{fmt(after['ifeval']['instruction_loose'])}, n={ifeval_n}); tool-call success {fmt(tool[0])} -> "
                    f"{fmt(tool[1])}; thinking accuracy {fmt(acc[0])} -> {fmt(acc[1])}, non-thinking "
                    f"{fmt(before['accuracy_by_mode']['non_thinking']['accuracy'])} -> "
                    f"{fmt(after['accuracy_by_mode']['non_thinking']['accuracy'])}{extra}; {ev['steps']} steps")
        failed = [name for name, ok in checks.items() if not ok]
        why = [f"{name} did not rise by more than {z:g} standard errors ({fmt(pair[0])} -> {fmt(pair[1])}, n={n})"
               for name, (pair, n) in rises.items() if not checks[name]]
        if not checks["reasoning"]:
            why.append(f"thinking-mode accuracy fell by more than {figures.reasoning_drop_max:.0%} "
                       f"({fmt(acc[0])} -> {fmt(acc[1])})")
        rows.append(ClaimRow("general_rl", claim, report, measured, not failed, "; ".join(why), plots=[plot],
                             details={"checks": checks, "result": str(path), "counts": ev.get("counts", {}),
                                      "judge": ev.get("judge", {})}, role=role))
    return rows


__all__ = ["claim_general_rl", "measure", "plot_general_rl"]
