"""Held-out pass@1 and pass@k of a policy: k sampled completions per query, scored by its verifier.

Reasoning RL measures its policy with this every few steps (`stages.grpo`); the GRPO claim reads
the numbers the stage logged.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..generate import SamplingParams
from ..rl.rollout import ACCURACY_THRESHOLD, Query, ScoreFn, sample_groups, verifier_score

# Queries sampled per batch of groups.
QUERIES_PER_BATCH = 16


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 − C(n−c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.no_grad()
def evaluate_pass_at_k(model, tokenizer, queries: Sequence[Query], *, k: int, sampling: SamplingParams,
                       max_new_tokens: int, seed: int, score_fn: ScoreFn = verifier_score) -> dict[str, float]:
    """Held-out pass@1 (mean accuracy over k samples) and pass@k, overall and per family (seeded)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(int(seed))
    per: dict[str, list[tuple[float, float]]] = {}
    results = []
    for start in range(0, len(queries), QUERIES_PER_BATCH):
        for g in sample_groups(model, tokenizer, queries[start:start + QUERIES_PER_BATCH], k,
                               max_new_tokens=max_new_tokens, generator=generator, score_fn=score_fn,
                               sampling=sampling):
            correct = sum(not math.isnan(r) and r >= ACCURACY_THRESHOLD for r in g.rewards)
            row = (correct / k, pass_at_k(k, correct, k))
            results.append(row)
            per.setdefault(g.query.domain, []).append(row)
    mean = lambda rows, i: sum(r[i] for r in rows) / max(len(rows), 1)  # noqa: E731
    out = {"pass@1": mean(results, 0), f"pass@{k}": mean(results, 1)}
    for fam, rows in sorted(per.items()):
        out[f"pass@1/{fam}"] = mean(rows, 0)
    return out


__all__ = ["evaluate_pass_at_k", "pass_at_k"]
