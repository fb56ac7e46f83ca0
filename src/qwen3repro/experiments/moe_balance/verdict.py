"""The verdict: the claim's three parts per seed and on the mean over seeds, the flat summaries they
are read from, and a diagnosis in words naming the numbers."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


PART_NAMES = ("lower_global_imbalance", "equal_or_lower_loss", "higher_specialisation")


def claim_parts(micro: Mapping[str, Any], glob: Mapping[str, Any], loss_tolerance: float) -> dict[str, bool]:
    return {
        "lower_global_imbalance": glob["global_imbalance"]["max_over_mean"] < micro["global_imbalance"]["max_over_mean"],
        "equal_or_lower_loss": glob["heldout_loss"] <= micro["heldout_loss"] + loss_tolerance,
        "higher_specialisation": glob["specialisation"]["mutual_information"] > micro["specialisation"]["mutual_information"],
    }


SUMMARY_KEYS = {
    "heldout_loss": ("heldout_loss",),
    "train_ce_last_quarter": ("train_ce_last_quarter",),
    "global_imbalance": ("global_imbalance", "max_over_mean"),
    "global_imbalance_cv": ("global_imbalance", "cv"),
    "train_imbalance_global": ("train_imbalance_global_last_quarter",),
    "train_imbalance_micro": ("train_imbalance_micro_last_quarter",),
    "micro_imbalance": ("micro_imbalance", "max_over_mean"),
    "mutual_information": ("specialisation", "mutual_information"),
    "top_k_share": ("specialisation", "top_k_share"),
    "domain_concentration": ("specialisation", "domain_concentration"),
    "global_concentration": ("specialisation", "global_concentration"),
}


def summarise(result: Mapping[str, Any]) -> dict[str, float | None]:
    """The headline numbers of one run, flat."""
    out: dict[str, float | None] = {}
    for name, path in SUMMARY_KEYS.items():
        v: Any = result
        for p in path:
            v = v.get(p) if isinstance(v, Mapping) else None
        out[name] = None if v is None else float(v)
    return out


def mean_summary(rows: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in rows[0]:
        vals = [r[key] for r in rows if r[key] is not None]
        out[key] = float(np.mean(vals)) if vals else None
    return out


def judge(micro: Mapping[str, Any], glob: Mapping[str, Any], loss_tolerance: float,
          per_seed: Mapping[int, Mapping[str, bool]] | None = None) -> tuple[bool, dict[str, bool], str]:
    """The claim's three parts on (mean) summaries, and a diagnosis in words naming the numbers.

    micro/glob: `summarise`-style dicts (or full results; both are read through `summarise`)."""
    m = micro if "mutual_information" in micro else summarise(micro)
    g = glob if "mutual_information" in glob else summarise(glob)
    parts = {"lower_global_imbalance": g["global_imbalance"] < m["global_imbalance"],
             "equal_or_lower_loss": g["heldout_loss"] <= m["heldout_loss"] + loss_tolerance,
             "higher_specialisation": g["mutual_information"] > m["mutual_information"]}
    ok = all(parts.values())
    lines = [
        f"global imbalance (max/mean expert load of the training mixture, held out): micro {m['global_imbalance']:.3f}, "
        f"global {g['global_imbalance']:.3f} -> {'lower' if parts['lower_global_imbalance'] else 'NOT lower'} with global LBL",
        f"held-out loss (training mixture): micro {m['heldout_loss']:.4f}, global {g['heldout_loss']:.4f} "
        f"(tolerance {loss_tolerance}) -> {'equal or lower' if parts['equal_or_lower_loss'] else 'higher'} with global LBL",
        f"specialisation, I(domain; expert) in nats: micro {m['mutual_information']:.4f}, global "
        f"{g['mutual_information']:.4f} -> {'higher' if parts['higher_specialisation'] else 'NOT higher'} with global LBL",
    ]
    if m.get("top_k_share") is not None and g.get("top_k_share") is not None:
        lines.append(f"top-k share per domain (Qiu et al.'s figure): micro {m['top_k_share']:.3f}, global {g['top_k_share']:.3f}")
    if m.get("train_imbalance_global") is not None and g.get("train_imbalance_global") is not None:
        lines.append(f"during training (last quarter), max/mean of each step's global batch: micro "
                     f"{m['train_imbalance_global']:.3f}, global {g['train_imbalance_global']:.3f}; mean over its "
                     f"domain-pure micro-batches: micro {m['train_imbalance_micro']:.3f}, global {g['train_imbalance_micro']:.3f}")
    if per_seed:
        for part in PART_NAMES:
            votes = [bool(p[part]) for p in per_seed.values()]
            if len(set(votes)) > 1:
                lines.append(f"seeds disagree on {part}: holds for seed(s) "
                             f"{[sd for sd, p in per_seed.items() if p[part]]} only")
    if not ok:
        reasons = []
        if not parts["lower_global_imbalance"]:
            reasons.append("imbalance: the micro-batch loss balances every domain separately, which also balances "
                           "their mixture; the global loss only asks for the mixture, and here it ends no lower")
        if not parts["equal_or_lower_loss"]:
            reasons.append("loss: global LBL is worse by more than the tolerance")
        if not parts["higher_specialisation"]:
            reasons.append("specialisation: domains do not route more differently from each other with global LBL")
        lines.append("not reproduced: " + " | ".join(reasons))
    return ok, parts, "\n".join(lines)


__all__ = ["PART_NAMES", "SUMMARY_KEYS", "claim_parts", "summarise", "mean_summary", "judge"]
