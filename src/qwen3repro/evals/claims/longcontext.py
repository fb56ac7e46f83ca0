"""Long-context claims (report §3.2), two rows per retrieval variant:

* **s3_abf** — S3 with ABF retrieves at the S3 length (>= `at_trained_min`) and the S2 model is far
  worse there (at least `far_worse_gap` lower);
* **yarn_dca** — at 4x the trained length S3 + YaRN + DCA keeps >= `extended_min`, while plain S3
  falls below `plain_s3_control_max`.

The suite (`evals.longcontext`) runs on one role's S2 and S3 checkpoints (`role` in the scale's
`[evals.longcontext]` table, default the first role that ran S3), resolved for that S3 stage's
sequence length; every other key of the table overrides a suite setting. Thresholds and the
report's figures: `[longcontext]` of `evals/claims.toml`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from ...lineage import LINEAGE_FILE
from ..longcontext import RESULT_FILE, LongContextSettings, run_longcontext_eval, suite_settings
from ..longcontext.plots import LOSS_FILE, accuracy_file, heatmap_file
from .row import ClaimRow
from .settings import LongContextFigures, claim_settings

CLAIM_TEXT = "YaRN + DCA give a four-fold increase in sequence length capacity during inference"


def report_figure(figures: LongContextFigures) -> str:
    return (f"{figures.report_s3_context // 1024}K -> {figures.report_inference_context // 1024}K "
            "(§3.2; RULER with YaRN x4, App. A.1.1)")


def claim_longcontext(plan, say: Callable[[str], None]) -> list[ClaimRow]:
    """Claims-table rows from the S2/S3 checkpoints of one role; results and plots go to
    `<root>/claims/longcontext/`."""
    figures = claim_settings().longcontext
    cfg = plan.eval_settings("longcontext")
    role = cfg.pop("role", None) or next(iter(plan.roles_with("s3")), None)
    if role is None:
        return []
    if not (plan.has(role, "s2") and plan.has(role, "s3")):
        return [ClaimRow("longcontext", CLAIM_TEXT, report_figure(figures), "not measured", None,
                         f"role {role} has no S2 and S3 stages in this pipeline", role=role)]
    dirs = {"S2": plan.stage_dir(role, "s2"), "S3": plan.stage_dir(role, "s3")}
    missing = [str(d) for d in dirs.values() if not (d / LINEAGE_FILE).exists()]
    if missing:
        return [ClaimRow("longcontext", CLAIM_TEXT, report_figure(figures), "not measured", None,
                         f"missing checkpoints: {', '.join(missing)}", role=role)]
    settings = suite_settings(int(plan.node(f"{role}/s3").config.seq_len), cfg, where="[evals.longcontext]")
    out = plan.root / "claims" / "longcontext"
    results = run_longcontext_eval(dirs, out, settings, tokenizer=plan.root / "tokenizer",
                                   num_threads=int(plan.settings.threads), log=say, device=plan.device)
    return [row for variant in settings.variants
            for row in variant_rows(role, variant, results, settings, out, figures)]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def variant_rows(role: str, variant: str, results: Mapping[str, Any], settings: LongContextSettings, out: Path,
                 figures: LongContextFigures) -> list[ClaimRow]:
    """The s3_abf and yarn_dca rows of one retrieval variant, from the suite's results."""
    summary = results["summary"][variant]
    lengths = settings.eval_lengths
    trained, longest = settings.trained_length, max(lengths)

    def acc(cond: str, key: str) -> float | None:
        return summary.get(cond, {}).get(key)

    every_length = "; ".join(
        f"{c}: " + ", ".join(f"{_pct(acc(c, f'at_{n}'))}@{n}" for n in lengths) for c in summary
    ) + f" (n={settings.n_per_length} per length)"
    plots = [out / accuracy_file(variant), out / heatmap_file(variant, "S3+YaRN+DCA")]
    if variant == settings.variants[0]:
        plots.append(out / LOSS_FILE)
    details = {"summary": summary, "settings": results["settings"], "result_file": str(out / RESULT_FILE)}

    s3_at, s2_at = acc("S3", "at_trained_length"), acc("S2", "at_trained_length")
    abf_ok = None
    abf_diag = []
    if s3_at is not None and s2_at is not None:
        abf_ok = s3_at >= figures.at_trained_min and s2_at <= s3_at - figures.far_worse_gap
        if s3_at < figures.at_trained_min:
            abf_diag.append(f"S3 retrieves only {_pct(s3_at)} at its trained length (< {figures.at_trained_min:.0%})")
        if s2_at > s3_at - figures.far_worse_gap:
            abf_diag.append(f"the S2 model already reaches {_pct(s2_at)} at {trained}")
    abf = ClaimRow(
        name=f"s3_abf[{role}/{variant}]",
        claim=f"S3 with ABF (base 1e4 -> 1e6) retrieves at the S3 length; the S2 model does not ({variant})",
        report_figure=f"context {figures.report_s2_context:,} -> {figures.report_s3_context:,} (§3.2)",
        measured=f"at {trained}: S3 {_pct(s3_at)}, S2 {_pct(s2_at)} (n={settings.n_per_length})",
        reproduced=abf_ok, diagnosis="; ".join(abf_diag), plots=[str(p) for p in plots if p.exists()], details=details,
        role=role,
    )

    extended, plain = acc("S3+YaRN+DCA", f"at_{longest}"), acc("S3", f"at_{longest}")
    ext_ok = None
    ext_diag = []
    if longest != int(settings.yarn_factor * trained):
        ext_diag.append(f"longest length {longest} is not {settings.yarn_factor:g}x the trained {trained}")
    if extended is not None and plain is not None:
        ext_ok = extended >= figures.extended_min and plain < figures.plain_s3_control_max
        if extended < figures.extended_min:
            ext_diag.append(f"YaRN + DCA reach {_pct(extended)} at {longest} (< {figures.extended_min:.0%})")
            yarn_only = acc("S3+YaRN", f"at_{longest}")
            if yarn_only is not None and yarn_only >= figures.extended_min:
                ext_diag.append(f"YaRN alone keeps {_pct(yarn_only)} there, so the loss comes from DCA's remapped "
                                "positions, not from retrieval itself")
            grid = results.get("retrieval", {}).get(variant, {}).get("S3+YaRN+DCA", {})
            if longest in grid.get("lengths", []):
                by_depth = grid["accuracy"][grid["lengths"].index(longest)]
                ext_diag.append(f"S3+YaRN+DCA at {longest} by needle depth (start of the context -> end): "
                                + ", ".join(_pct(a) for a in by_depth))
        if plain >= figures.plain_s3_control_max:
            ext_diag.append(f"plain S3 already reaches {_pct(plain)} at {longest} (>= "
                            f"{figures.plain_s3_control_max:.0%}): the model extrapolates on this task without "
                            "YaRN/DCA, so the control does not separate them (a model trained with ABF can "
                            "extrapolate single-needle retrieval on its own)")
    ext = ClaimRow(
        name=f"yarn_dca[{role}/{variant}]",
        claim=f"YaRN + DCA give 4x context at inference; plain S3 fails there ({variant})",
        report_figure=report_figure(figures),
        measured=every_length,
        reproduced=ext_ok, diagnosis="; ".join(ext_diag), plots=[], details={}, role=role,
    )
    return [abf, ext]


__all__ = ["CLAIM_TEXT", "claim_longcontext", "variant_rows"]
