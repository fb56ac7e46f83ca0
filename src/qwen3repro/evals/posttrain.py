"""Claims of the reasoning post-training stages: Filtering (cold start, report §4.1) and GRPO (§4.2).

**Filtering.** The filtered cold start and its control (same pool, generator, sizes and steps,
trained on candidates drawn without the response filter) answer the same held-out queries
(`coldstart.pipeline.heldout_queries`: the task families' evaluation partition, never in any pool)
in thinking mode with pinned sampling. Each output is scored by the verifier (malformed output is
wrong) and run through the same six defect detectors that filtered the training data. The claim
holds when the filtered model is both more accurate and less defective.

**GRPO.** Read from the reasoning-RL stage's own `eval.json` (held-out pass@1/pass@k at step 0,
i.e. the cold-start model, and at the end) and its per-step entropy: pass@1 must rise by at least
`CLAIM_PASS1_GAIN` with entropy never below `CLAIM_ENTROPY_FLOOR` of its first value (entropy as a
mean over `ENTROPY_WINDOW` consecutive steps: one step's batch is too noisy to read a trend from).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..generate import SamplingParams, generate
from ..stages.common import write_json_atomic
from ..progress import format_duration
from ..train.metrics import MetricsLog

# Sampling of the Filtering evaluation: the report's recommended thinking-mode settings
# (Qwen3 model cards: temperature 0.6, top-p 0.95, top-k 20), one sample per query, seeded.
FILTERING_SAMPLING = SamplingParams(temperature=0.6, top_p=0.95, top_k=20)
FILTERING_SEED = 1234


def _complete(model_dir: Path, queries: Sequence, *, max_new_tokens: int, seed: int,
              batch_size: int = 32) -> list[str]:
    """One thinking-mode completion per query (chat template, generation prompt), decoded."""
    from ..models.qwen3 import Qwen3
    from ..rl.rollout import prompt_ids
    from ..tokenizer import Tokenizer

    model = Qwen3.from_pretrained(model_dir).eval()
    tok = Tokenizer.load(model_dir)
    stop = [tok.token_to_id("<|im_end|>"), tok.endoftext_id]
    generator = torch.Generator().manual_seed(seed)
    texts: list[str] = []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start:start + batch_size]
        outs = generate(model, [prompt_ids(tok, q) for q in chunk], FILTERING_SAMPLING, max_new_tokens=max_new_tokens,
                        stop_token_ids=stop, tokenizer=tok, generator=generator)
        texts.extend(tok.decode(o.token_ids) for o in outs)
    return texts


def measure_filtering(dirs: Mapping[str, Path], coldstart_table: Mapping[str, Any], *, n_per_cell: int,
                      max_new_tokens: int, seed: int = FILTERING_SEED) -> dict[str, Any]:
    """Accuracy and defect rates of each cold-start model's own outputs on held-out queries."""
    from ..coldstart.pipeline import ColdStartConfig, evaluate_outputs, heldout_queries
    from ..coldstart.filters import ResponseFilter
    from ..coldstart.pool import build_pool
    from ..data.world import build_world

    cs = ColdStartConfig.from_dict(coldstart_table)
    pool = build_pool(n_queries=1, n_validation=cs.n_validation, distractor_rate=0.0, seed=cs.seed,
                      families=cs.families or None, world_seed=cs.world_seed)
    detectors = ResponseFilter(cs.filter_thresholds(), validation=pool.validation, world=build_world(cs.world_seed))
    queries = heldout_queries(n_per_cell=n_per_cell, seed=seed, families=cs.families or None)
    results: dict[str, Any] = {}
    for name, d in dirs.items():
        texts = _complete(d, queries, max_new_tokens=max_new_tokens, seed=seed)
        res = evaluate_outputs(texts, queries, detectors)
        res["examples"] = [{"question": q.question, "output": t} for q, t in list(zip(queries, texts))[:3]]
        results[name] = res
    results["settings"] = {"sampling": FILTERING_SAMPLING.__dict__, "seed": seed, "max_new_tokens": max_new_tokens,
                           "queries": len(queries), "n_per_cell": n_per_cell, "mode": "thinking (chat template)",
                           "heldout": "data.tasks.is_heldout (evaluation partition)"}
    return results


def _plot_filtering(res: Mapping[str, Any], path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = ["filtered", "unfiltered"]
    defects = sorted(res["filtered"]["defect_rates"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.38
    labels = ["accuracy", "any defect"] + defects
    for i, name in enumerate(names):
        r = res[name]
        values = [r["accuracy"], r["any_defect_rate"]] + [r["defect_rates"][d] for d in defects]
        ax.bar([x + (i - 0.5) * width for x in range(len(labels))], values, width, label=f"cold start ({name})")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("share of held-out outputs")
    ax.set_title("Filtering claim: the cold-start models' own outputs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def filtering_verdict(filtered: Mapping[str, Any], unfiltered: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """(reproduced, what falls short) for the Filtering claim from each model's `evaluate_outputs`.

    Both differences must exceed 2 standard errors (the two-proportion test of the thinking claims,
    `thinking.clearly_above`): at a few percent accuracy on ~100 queries one item either way is noise.
    """
    from .thinking import clearly_above

    f, u = filtered, unfiltered
    n_f, n_u = int(f["n"]), int(u["n"])
    better_acc = clearly_above(f["accuracy"], n_f, u["accuracy"], n_u)
    fewer_defects = clearly_above(1 - f["any_defect_rate"], n_f, 1 - u["any_defect_rate"], n_u)
    parts = []
    if not better_acc:
        parts.append("the filtered model is not more accurate by more than 2 standard errors")
    if not fewer_defects:
        parts.append("its outputs are not less defective by more than 2 standard errors")
    return better_acc and fewer_defects, parts


def claim_filtering(plan, say) -> list:
    from .claims import ClaimRow

    rows = []
    settings = plan.scale_config.get("evals", {}).get("filtering", {})
    for role in plan.roles_with("cold-start"):
        dirs = {"filtered": plan.root / role / "cold-start", "unfiltered": plan.root / role / "cold-start-unfiltered"}
        if not all((d / "lineage.json").exists() for d in dirs.values()):
            rows.append(ClaimRow("filtering", "Filtering the cold-start data helps", "-", "not measured", None,
                                 f"missing cold-start checkpoints for {role} (both cold-start and its control)"))
            continue
        t0 = time.perf_counter()
        node = plan.node(f"{role}/cold-start")
        res = measure_filtering(dirs, node.config.coldstart, n_per_cell=int(settings.get("n_per_cell", 4)),
                                max_new_tokens=int(settings.get("max_new_tokens", 256)))
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
        plot = _plot_filtering(res, out / f"filtering_{role}.png")
        rows.append(ClaimRow(
            name="filtering",
            claim="SFT on the filtered cold-start set beats the unfiltered set (same steps) in held-out accuracy "
                  "and in the defect rates of its own outputs",
            report_figure="§4.1: query and response filtering of QwQ-32B candidates (no ablation figure published)",
            measured=(f"accuracy {f['accuracy']:.1%} vs {u['accuracy']:.1%}; outputs with any defect "
                      f"{f['any_defect_rate']:.1%} vs {u['any_defect_rate']:.1%} (n={f['n']} held-out queries)"),
            reproduced=reproduced, diagnosis=diagnosis, plots=[plot] if plot else [],
            details={"filtered": {k: v for k, v in f.items() if k != "examples"},
                     "unfiltered": {k: v for k, v in u.items() if k != "examples"}, "settings": res["settings"]},
        ))
    return rows


def plot_selection(selection: Mapping[str, Any], path: Path) -> str | None:
    """The cold-start model's pass rate on the RL candidates by sub-domain and difficulty, with the
    learnable band (0 < rate < ceiling): what query selection had to choose from."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = selection.get("by_domain_difficulty") or []
    if not rows:
        return None
    labels = [f"{r['domain']}/{r['difficulty']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows)), 3.5))
    ax.bar(range(len(rows)), [r["mean_pass_rate"] for r in rows], color="tab:blue", label="mean pass rate")
    ax.plot(range(len(rows)), [r["learnable"] / max(r["candidates"], 1) for r in rows], "o", color="tab:green",
            label="share learnable")
    ax.axhline(selection.get("ceiling", 1.0), color="tab:red", ls="--", label="ceiling (too easy above)")
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"RL query selection: cold-start pass rate (k={selection.get('k')}), "
                 f"{selection.get('n_selected', 0)}/{selection.get('n_candidates', 0)} selected")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def claim_grpo(plan, say) -> list:
    from ..stages.grpo import CLAIM_ENTROPY_FLOOR, CLAIM_PASS1_GAIN, REPORT_AIME24_AFTER, REPORT_AIME24_BEFORE, \
        REPORT_RL_STEPS
    from .claims import ClaimRow

    rows = []
    for role in plan.roles_with("cold-start"):
        d = plan.root / role / "reasoning-rl"
        if not (d / "lineage.json").exists():
            rows.append(ClaimRow("grpo", "GRPO raises pass@1", "-", "not measured", None,
                                 f"no reasoning-RL checkpoint for {role}"))
            continue
        ev = json.loads((d / "eval.json").read_text())
        if ev.get("skipped"):
            before = ev.get("pass@1_before") or 0.0
            selection_file = d / "selection.json"
            plot = (plot_selection(json.loads(selection_file.read_text()), plan.root / "claims" / f"grpo_selection_{role}.png")
                    if selection_file.exists() else None)
            rows.append(ClaimRow(
                "grpo", f"GRPO raises held-out pass@1 by >= {CLAIM_PASS1_GAIN * 100:.0f} points over the cold start",
                f"AIME'24 {REPORT_AIME24_BEFORE} -> {REPORT_AIME24_AFTER} in {REPORT_RL_STEPS} steps (§4.2)",
                f"not trained: the cold-start model's held-out pass@1 is {before:.1%}; "
                f"selection dropped {ev['selection']['dropped']}", False,
                f"reasoning RL had no learnable query ({ev['skipped']}): GRPO needs groups with mixed rewards, "
                "so the cold start must solve some of the candidates", plots=[plot] if plot else [],
                details={"eval": ev}))
            continue
        records = MetricsLog(str(d / "metrics.jsonl")).read()
        before, after = ev.get("pass@1_before"), ev.get("pass@1_after")
        gain, ratio = ev.get("pass@1_gain"), ev.get("entropy_min_ratio")
        if gain is None:
            rows.append(ClaimRow("grpo", "GRPO raises pass@1", "-", "not measured", None,
                                 "the RL run logged no held-out evaluation"))
            continue
        if ratio is None:  # no step had a group with mixed rewards: no update was ever made
            kept = sum(int(r.get("groups_kept", 0)) for r in records)
            rows.append(ClaimRow(
                "grpo", "GRPO raises held-out pass@1 over the cold start", f"AIME'24 {REPORT_AIME24_BEFORE} -> "
                f"{REPORT_AIME24_AFTER} (§4.2)", f"pass@1 {before:.1%} -> {after:.1%}; {kept} groups with mixed "
                f"rewards in {ev['steps']} steps", False,
                "every rollout group had equal rewards (the cold-start model solves none or all of its queries), "
                "so GRPO had no advantage signal and made no update", details={"eval": ev}))
            continue
        gain_ok, entropy_ok = gain >= CLAIM_PASS1_GAIN, ratio >= CLAIM_ENTROPY_FLOOR
        diagnosis = []
        if not gain_ok:
            diagnosis.append(f"pass@1 gain {gain:+.1%} < {CLAIM_PASS1_GAIN:.0%}")
            if before is not None and before < 0.02:
                diagnosis.append("the cold-start model solves almost nothing, so most groups have equal rewards "
                                 "and GRPO has no signal")
        if not entropy_ok:
            diagnosis.append(f"entropy fell to {ratio:.2f} of its start")
        plot = d / "grpo_curves.png"
        k = next((key.split("@")[1].split("_")[0] for key in ev if key.startswith("pass@") and key.endswith("_before")
                  and not key.startswith("pass@1_")), "k")
        rows.append(ClaimRow(
            name="grpo",
            claim=f"GRPO raises held-out pass@1 by >= {CLAIM_PASS1_GAIN * 100:.0f} points over the cold start, "
                  f"entropy never below {CLAIM_ENTROPY_FLOOR:.0%} of its start",
            report_figure=f"AIME'24 {REPORT_AIME24_BEFORE} -> {REPORT_AIME24_AFTER} in {REPORT_RL_STEPS} steps (§4.2)",
            measured=(f"pass@1 {before:.1%} -> {after:.1%} ({gain * 100:+.1f} points) in {ev['steps']} steps; "
                      f"pass@{k} {ev.get(f'pass@{k}_before', float('nan')):.1%} -> "
                      f"{ev.get(f'pass@{k}_after', float('nan')):.1%}; entropy min/start {ratio:.2f} ({ev.get('entropy_window', 1)}-step means)"),
            reproduced=gain_ok and entropy_ok, diagnosis="; ".join(diagnosis),
            plots=[str(plot)] if plot.exists() else [],
            details={"eval": ev, "steps_logged": len(records)},
        ))
    return rows


__all__ = ["FILTERING_SAMPLING", "claim_filtering", "claim_grpo", "measure_filtering"]
