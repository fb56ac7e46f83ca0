"""The copy-probe diagnoses: a claim that fails because its model cannot copy from its context says so.

Retrieval, restating operands in a trace and following a turn's flag all copy from the context.
The checkpoint each such claim rests on (`COPY_PROBED`) gets the copy probe (`evals.copying`) when
the claim did not reproduce, and the probe's sentence is appended to the diagnosis when the model
does not copy (copy gain below `[copy_probe] copy_gain_min` of `evals/claims.toml`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from ...files import write_json_atomic
from ..copying import copy_probe
from .row import ClaimRow
from .settings import claim_settings

# Claim (row name before any "[...]") -> (stage whose checkpoint it rests on, how the diagnosis names it).
COPY_PROBED = {"s2_reasoning": ("s2", "S2"), "s3_abf": ("s3", "S3"), "yarn_dca": ("s3", "S3"),
               "filtering": ("cold-start", "cold-start"), "grpo": ("cold-start", "cold-start"),
               "thinking_vs_non_thinking": ("fusion", "fused"), "thinking_budget": ("fusion", "fused")}


def copies(probe: Mapping[str, Any]) -> bool:
    """Whether a probed model copies prose from its context (its copy gain reaches the threshold)."""
    return probe["copy_gain"] >= claim_settings().copy_probe.copy_gain_min


def no_copy_diagnosis(probe: Mapping[str, Any], what: str) -> str:
    """The diagnosis sentence when `probe` says the model does not copy ('' when it does)."""
    if copies(probe):
        return ""
    lengths = probe["span_tokens"]
    gain_min = claim_settings().copy_probe.copy_gain_min
    return (f"the {what} model does not copy prose from its context: a repeated {min(lengths)}-{max(lengths)}-token "
            f"span costs {probe['second_nll']:.2f} nats/token the second time vs {probe['first_nll']:.2f} the first "
            f"(copy gain {probe['copy_gain']:.2f} < {gain_min}), which limits every task that reads operands or "
            "names back from its context, whatever the mechanism under test")


def add_copy_diagnoses(plan, rows: Sequence[ClaimRow], printer: Callable[[str], None]) -> dict[str, Any]:
    """Probe the checkpoint of every failed row in `COPY_PROBED` (once per checkpoint) and append the
    "does not copy" sentence to its diagnosis; writes `claims/copy_probe.json`. Returns the probes."""
    probes: dict[str, Any] = {}
    # A model that retrieves the pass key at its trained length copies what the retrieval rows need,
    # whatever the prose probe says: those rows' failures are the long-context mechanism's own.
    # Row names are "<claim>" or "<claim>[<role>/<variant>]" (or "<claim>[<role>]").
    names = [r.name.partition("[")[::2] for r in rows]  # (claim, "<role>/<variant>]" or "")
    retrieves = {qualifier for r, (base, qualifier) in zip(rows, names)
                 if base == "s3_abf" and qualifier and r.reproduced}
    for r, (base, qualifier) in zip(rows, names):
        if r.reproduced is not False or base not in COPY_PROBED:
            continue
        if base in ("s3_abf", "yarn_dca") and qualifier in retrieves:
            continue
        stage, label = COPY_PROBED[base]
        role = r.role or next(iter(plan.roles_with(stage)), "")
        if not role or not plan.has(role, stage):
            continue
        d = plan.stage_dir(role, stage)
        if not (d / "config.json").exists():
            continue
        key = f"{role}/{stage}"
        if key not in probes:
            probe = copy_probe(d, device=plan.device)
            probes[key] = {**probe, "copies": copies(probe)}
            printer(f"claims: copy probe {key}: first {probe['first_nll']:.2f} vs second "
                    f"{probe['second_nll']:.2f} nats/token (gain {probe['copy_gain']:.2f})")
        sentence = no_copy_diagnosis(probes[key], label)
        if sentence:
            r.diagnosis = "; ".join(x for x in (r.diagnosis, sentence) if x)
            r.details["copy_probe"] = probes[key]
    if probes:
        write_json_atomic(plan.root / "claims" / "copy_probe.json", probes)
    return probes


__all__ = ["COPY_PROBED", "add_copy_diagnoses", "copies", "no_copy_diagnosis"]
