"""Filtering claim (report §4.1): SFT on the filtered cold-start set beats SFT on the unfiltered one.

The filtered cold start and its control (`cold-start-unfiltered`: same pool, generator, sizes and
steps, trained on candidates drawn without the response filter) answer the same held-out queries
(`evals.posttrain.measure_filtering`). The claim holds when the filtered model is both more
accurate and less defective, each by more than the significance threshold. Measured for every
role that ran the control.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from ...lineage import LINEAGE_FILE
from ...progress import format_duration
from ...files import write_json_atomic
from ..posttrain import measure_filtering, plot_filtering
from .row import ClaimRow
from .settings import claim_settings
from .significance import clearly_above


def filtering_verdict(filtered: Mapping[str, Any], unfiltered: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """(reproduced, what falls short) for the Filtering claim from each model's `evaluate_outputs`.

    Both differences must exceed the significance threshold (`clearly_above`): at a few percent
    accuracy on ~100 queries one item either way is noise.
    """
    f, u = filtered, unfiltered
    n_f, n_u = int(f["n"]), int(u["n"])
    z = claim_settings().significance.standard_errors
    better_acc = clearly_above(f["accuracy"], n_f, u["accuracy"], n_u, z)
    fewer_defects = clearly_above(1 - f["any_defect_rate"], n_f, 1 - u["any_defect_rate"], n_u, z)
    parts = []
    if not better_acc:
        parts.append(f"the filtered model is not more accurate by more than {z:g} standard errors")
    if not fewer_defects:
        parts.append(f"its outputs are not less defective by more than {z:g} standard errors")
    return better_acc and fewer_defects, parts


def claim_filtering(plan, say: Callable[[str], None]) -> list[ClaimRow]:
    rows = []
    settings = plan.eval_settings("filtering")
    for role in plan.roles_with("cold-start-unfiltered"):
        if not plan.has(role, "cold-start"):
            rows.append(ClaimRow("filtering", "Filtering the cold-start data helps", "-", "not measured", None,
                                 f"{role} has a cold-start control but no cold-start stage", role=role))
            continue
        dirs = {"filtered": plan.stage_dir(role, "cold-start"),
                "unfiltered": plan.stage_dir(role, "cold-start-unfiltered")}
        if not all((d / LINEAGE_FILE).exists() for d in dirs.values()):
            rows.append(ClaimRow("filtering", "Filtering the cold-start data helps", "-", "not measured", None,
                                 f"missing cold-start checkpoints for {role} (both cold-start and its control)",
                                 role=role))
            continue
        t0 = time.perf_counter()
        node = plan.node(f"{role}/cold-start")
        res = measure_filtering(dirs, node.config.coldstart, n_per_cell=int(settings.get("n_per_cell", 4)),
                                max_new_tokens=int(settings.get("max_new_tokens", 256)), device=plan.device)
        out = plan.root / "claims"
        write_json_atomic(out / f"filtering_{role}.json", res)
        f, u = res["filtered"], res["unfiltered"]
        say(f"claims: {role} cold start held-out accuracy filtered {f['accuracy']:.3f} vs unfiltered "
            f"{u['accuracy']:.3f}, any defect {f['any_defect_rate']:.3f} vs {u['any_defect_rate']:.3f} "
            f"(n={f['n']}, {format_duration(time.perf_counter() - t0)})")
        reproduced, parts = filtering_verdict(f, u)
        diagnosis = ""
        if not reproduced:
            if f["accuracy"] == 0 and u["accuracy"] == 0:
                parts.append("both models solve nothing: the cold start is too short for this model to learn the "
                             "traces, so the data difference cannot show")
            diagnosis = "; ".join(parts)
        plot = plot_filtering(res, out / f"filtering_{role}.png")
        rows.append(ClaimRow(
            name="filtering",
            claim="SFT on the filtered cold-start set beats the unfiltered set (same steps) in held-out accuracy "
                  "and in the defect rates of its own outputs",
            report_figure="§4.1: query and response filtering of QwQ-32B candidates (no ablation figure published)",
            measured=(f"accuracy {f['accuracy']:.1%} vs {u['accuracy']:.1%}; outputs with any defect "
                      f"{f['any_defect_rate']:.1%} vs {u['any_defect_rate']:.1%} (n={f['n']} held-out queries)"),
            reproduced=reproduced, diagnosis=diagnosis, plots=[plot],
            details={"filtered": {k: v for k, v in f.items() if k != "examples"},
                     "unfiltered": {k: v for k, v in u.items() if k != "examples"}, "settings": res["settings"]},
            role=role,
        ))
    return rows


__all__ = ["claim_filtering", "filtering_verdict"]
