"""`REPORT.md`: the claims table, the stages that ran, and plots (PNG, matplotlib's Agg backend).

The report is rebuilt from files on disk (`claims/*.json`, each stage's `metrics.jsonl`,
`eval.json` and `lineage.json`), so it can be regenerated without rerunning anything.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from .. import plotting
from ..lineage import read_lineage
from ..perf import describe_machine
from ..train.metrics import MetricsLog


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    return MetricsLog(os.fspath(path)).read()


def loss_curves(nodes: Sequence[Any]) -> dict[str, list[tuple[str, list[float], list[float]]]]:
    """Per role, each stage's (name, cumulative tokens, training loss): a stage's curve starts where
    its parent stage's (the node's `parent`) ended. `nodes` come parents first."""
    curves: dict[str, list[tuple[str, list[float], list[float]]]] = {}
    end: dict[str, float] = {}  # node key -> tokens at its last logged step
    for node in nodes:
        role, stage = node.key.split("/")[0], node.key.split("/")[-1]
        rows = read_metrics(node.out_dir / "metrics.jsonl")
        curves.setdefault(role, [])
        if not rows:
            continue
        base = end.get(node.parent.key, 0) if node.parent is not None else 0
        xs = [base + r.get("tokens_seen", 0) for r in rows]
        curves[role].append((stage, xs, [r["loss"] for r in rows]))
        end[node.key] = xs[-1]
    return curves


def plot_loss_curves(nodes: Sequence[Any], out: Path) -> str | None:
    """Training loss of every stage against cumulative tokens (`loss_curves`), one panel per role."""
    curves = loss_curves(nodes)
    if not curves:
        return None
    with plotting.figure(out, ncols=len(curves), figsize=(6 * len(curves), 4)) as (fig, axes):
        for ax, (role, stages) in zip(axes[0], curves.items()):
            for stage, xs, ys in stages:
                ax.plot(xs, ys, label=stage, linestyle="--" if "control" in stage else "-")
            ax.set_title(f"{role}: training loss by stage")
            ax.set_xlabel("tokens")
            ax.set_ylabel("loss")
            if ax.lines:
                ax.legend()
    return str(out)


def _rel(path: str, root: Path) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def _reuse_lines(plan) -> list[str]:
    """What this scale took from another one: stages copied (same lineage) and claims left to it."""
    settings = plan.settings
    if not settings.reuse:
        return []
    other = plan.root.parent / settings.reuse
    copied = []
    for n in plan.nodes:
        mine, theirs = read_lineage(n.out_dir), read_lineage(other / n.out_dir.relative_to(plan.root))
        if mine is not None and theirs is not None and mine.complete and mine.hash == theirs.hash:
            copied.append(f"`{n.key}`")
    lines = []
    if copied:
        lines += ["", f"Same configs and parents as the `{settings.reuse}` scale, so copied from its run, not "
                      f"retrained: {', '.join(copied)}."]
    if settings.claims:
        lines += ["", f"Claims measured at this scale: {', '.join(settings.claims)}. The others read only "
                      f"stages copied from `{settings.reuse}`: see its REPORT.md."]
    return lines


def write_report(plan, rows: Iterable) -> Path:
    root: Path = plan.root
    rows = list(rows)
    loss_plot = plot_loss_curves([n for n in plan.nodes if n.kind == "pretrain"], root / "plots" / "loss_curves.png")
    pipeline = {}
    if (root / "pipeline.json").exists():
        pipeline = json.loads((root / "pipeline.json").read_text())

    lines = [f"# qwen3repro — {plan.scale} scale report", ""]
    lines.append(f"Every number below was measured by `qwen3repro pipeline {plan.scale}` (`make {plan.scale}-pipeline`) "
                 "on this scale's checkpoints; the settings of each measurement are pinned in the JSON file next "
                 "to it under `claims/`.")
    machine = getattr(plan, "machine", None)
    if machine:
        lines += ["", f"Machine: {describe_machine(machine)}; device {getattr(plan, 'device', 'cpu')} (times and "
                      "floating-point figures belong to them; each stage's own are in its `timing.json` and in "
                      "`pipeline.json`)."]
    lines += _reuse_lines(plan)
    lines += ["", "## Claims", "", "| claim | report | measured here | reproduced |", "|---|---|---|---|"]
    for r in rows:
        verdict = "not measured" if r.reproduced is None else ("**yes**" if r.reproduced else "**no**")
        lines.append(f"| {r.claim} | {r.report_figure} | {r.measured} | {verdict} |")
    diagnoses = [r for r in rows if r.diagnosis]
    if diagnoses:
        lines += ["", "### Diagnoses", ""]
        lines += [f"- **{r.name}**: {r.diagnosis}" for r in diagnoses]
    tables = [r for r in rows if r.table]
    if tables:
        lines += ["", "## Tables"]
        for r in tables:
            lines += ["", f"**{r.name}**", "", r.table]
    lines += ["", "## Stages", "", "| stage | steps | tokens | final loss | held-out loss | time |", "|---|---|---|---|---|---|"]
    for n in plan.nodes:
        if n.kind == "tokenizer":
            continue
        ev = {}
        if (n.out_dir / "eval.json").exists():
            ev = json.loads((n.out_dir / "eval.json").read_text())
        if not ev:
            lines.append(f"| {n.key} | - | - | - | - | - |")
            continue
        # Pretraining's held-out loss is over every token; SFT's (cold start, fusion) over assistant
        # tokens; GRPO has no loss to compare (its figures are the claims' pass@1 and entropy).
        heldout = ev.get("heldout_loss", ev.get("heldout_assistant_loss"))
        steps = (getattr(n.config, "steps", None) or dict(getattr(n.config, "sft", {}) or {}).get("steps")
                 or ev.get("steps", "-"))  # fusion keeps its SFT settings in `sft`
        tokens, secs = ev.get("tokens_seen"), ev.get("elapsed_s")
        lines.append(f"| {n.key} | {steps} | {f'{tokens:,}' if tokens is not None else '-'} | "
                     f"{_fmt(ev.get('final_loss'))} | {_fmt(heldout)} | {f'{secs:.0f} s' if secs is not None else '-'} |")
    if pipeline.get("total_seconds"):
        lines += ["", f"Total pipeline wall time: {pipeline['total_seconds'] / 60:.1f} minutes."]
    lines += ["", "## Plots", ""]
    if loss_plot:
        lines.append(f"![loss curves]({_rel(loss_plot, root)})")
    for r in rows:
        for p in r.plots:
            lines.append(f"\n**{r.name}**\n\n![{r.name}]({_rel(p, root)})")
    out = root / "REPORT.md"
    tmp = out.with_name(".REPORT.md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out)
    return out
