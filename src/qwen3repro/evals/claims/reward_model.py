"""Reward-model claim (report §4.4, "reward model without reference answer"): the Bradley–Terry model
trained on checker-labelled preferences is useful, as RewardBench and rewards.md define useful:

* pairwise accuracy on **held-out templates** (phrasings never trained on) far above both baselines
  — a length-only scorer and a bag-of-words logistic regression fitted on the training pairs — by at
  least `pairwise_margin_min` and by more than the significance threshold;
* best-of-4 accuracy (one chosen against three rejected; chance 25%) at least `best_of_k_min`;
* best-of-N reranking of the fused policy's own samples raises their rule reward over a random pick.

Read from the reward-model stage's `eval.json`; the stage's plot of pairwise accuracy per domain is the
row's figure. Per-domain figures are in the row's details: a bag of words can match the model where the
deciding words are on the surface (format, instruction), so the domains show where the backbone helps.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ...lineage import LINEAGE_FILE
from .row import ClaimRow
from .settings import claim_settings
from .significance import clearly_above

STAGE = "reward-model"
SPLIT = "heldout_templates"


def claim_reward_model(plan, say: Callable[[str], None]) -> list[ClaimRow]:
    figures = claim_settings().reward_model
    rows = []
    for role in plan.roles_with(STAGE):
        d = Path(plan.stage_dir(role, STAGE))
        claim = ("The Bradley-Terry reward model beats a length-only and a bag-of-words baseline on held-out "
                 f"templates by >= {figures.pairwise_margin_min * 100:.0f} points, best-of-4 >= "
                 f"{figures.best_of_k_min:.0%}, and best-of-N reranking raises the rule reward")
        report = "reward model without reference answer (§4.4); RewardBench-style pairwise / best-of-4 accuracy"
        if not (d / LINEAGE_FILE).exists():
            rows.append(ClaimRow("reward_model", claim, report, "not measured", None, f"missing checkpoint {d}",
                                 role=role))
            continue
        ev = json.loads((d / "eval.json").read_text())
        pairwise = {name: ev["pairwise"][name][SPLIT] for name in ("reward_model", "length", "bag_of_words")}
        acc = {name: splits["all"]["accuracy"] for name, splits in pairwise.items()}
        n = pairwise["reward_model"]["all"].get("n") or ev.get("data", {}).get("n_eval_pairs") or 0
        best_of_k = ev["best_of_k"]["reward_model"][SPLIT]["all"]["accuracy"]
        bon = ev["best_of_n"]
        z = claim_settings().significance.standard_errors
        beats = {name: acc["reward_model"] - acc[name] >= figures.pairwise_margin_min
                 and clearly_above(acc["reward_model"], n, acc[name], n, z) for name in ("length", "bag_of_words")}
        checks = {"beats length": beats["length"], "beats bag of words": beats["bag_of_words"],
                  "best-of-4": best_of_k >= figures.best_of_k_min,
                  "best-of-N raises the rule reward": bon["reward_model"] > bon["random"]}
        by_domain = {dom: {name: splits[dom]["accuracy"] for name, splits in pairwise.items()}
                     for dom in pairwise["reward_model"] if dom != "all"}
        domains = "; ".join(f"{dom} {v['reward_model']:.0%} vs {v['bag_of_words']:.0%}" for dom, v in by_domain.items())
        measured = (f"held-out templates: pairwise {acc['reward_model']:.1%} vs length {acc['length']:.1%}, bag of "
                    f"words {acc['bag_of_words']:.1%} (n={n}; by domain, model vs bag of words: {domains}); best-of-4 "
                    f"{best_of_k:.1%} (chance 25%); best-of-{bon['n']} rule reward {bon['random']:.1%} random -> "
                    f"{bon['reward_model']:.1%} reranked (oracle {bon['oracle']:.1%}, {bon['queries']} queries)")
        failed = [name for name, ok in checks.items() if not ok]
        why = [f"pairwise accuracy {acc['reward_model']:.1%} vs {label} {acc[name]:.1%} "
               f"({(acc['reward_model'] - acc[name]) * 100:+.1f} points; the claim needs "
               f">= {figures.pairwise_margin_min * 100:.0f} and {z:g} standard errors)"
               for name, label in (("length", "length-only"), ("bag_of_words", "bag of words")) if not beats[name]]
        if not checks["best-of-4"]:
            why.append(f"best-of-4 {best_of_k:.1%} < {figures.best_of_k_min:.0%}")
        if not checks["best-of-N raises the rule reward"]:
            why.append(f"best-of-{bon['n']} reranking did not raise the rule reward ({bon['random']:.1%} -> "
                       f"{bon['reward_model']:.1%}; oracle {bon['oracle']:.1%})")
        plot = d / "pairwise_accuracy.png"
        rows.append(ClaimRow("reward_model", claim, report, measured, not failed, "; ".join(why),
                             plots=[str(plot)] if plot.exists() else [],
                             details={"checks": checks, "by_domain": by_domain, "best_of_n": bon,
                                      "headline": ev.get("headline", {})}, role=role))
    return rows


__all__ = ["claim_reward_model"]
