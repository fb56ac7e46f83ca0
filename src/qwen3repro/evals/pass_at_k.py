"""Held-out pass@1 and pass@k of a policy: k sampled completions per query, scored by its verifier.

Reasoning RL measures its policy with this every few steps (`stages.grpo`); the GRPO claim reads
the numbers the stage logged. `measure_pass_at_k` is the same measurement on any generation backend
(`evals.backends`: a Hugging Face checkpoint through transformers or vLLM, `evals.hf_checkpoint`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..generate import SamplingParams
from ..rl.rollout import ACCURACY_THRESHOLD, Query, ScoreFn, sample_groups, verifier_score
from .backends import GenerationBackend

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
    scored: list[tuple[str, list[float]]] = []
    for start in range(0, len(queries), QUERIES_PER_BATCH):
        for g in sample_groups(model, tokenizer, queries[start:start + QUERIES_PER_BATCH], k,
                               max_new_tokens=max_new_tokens, generator=generator, score_fn=score_fn,
                               sampling=sampling):
            scored.append((g.query.domain, g.rewards))
    return summarize(scored, k)


def summarize(scored: Sequence[tuple[str, Sequence[float]]], k: int) -> dict[str, float]:
    """pass@1 and pass@k, overall and pass@1 per domain, from each query's (domain, k rewards);
    NaN ("no reward") counts as not correct."""
    per: dict[str, list[tuple[float, float]]] = {}
    results = []
    for domain, rewards in scored:
        correct = sum(not math.isnan(r) and r >= ACCURACY_THRESHOLD for r in rewards)
        row = (correct / k, pass_at_k(k, correct, k))
        results.append(row)
        per.setdefault(domain, []).append(row)
    mean = lambda rows, i: sum(r[i] for r in rows) / max(len(rows), 1)  # noqa: E731
    out = {"pass@1": mean(results, 0), f"pass@{k}": mean(results, 1)}
    for fam, rows in sorted(per.items()):
        out[f"pass@1/{fam}"] = mean(rows, 0)
    return out


def measure_pass_at_k(backend: GenerationBackend, queries: Sequence[Query], *, k: int, sampling: SamplingParams,
                      max_new_tokens: int, seed: int, score_fn: ScoreFn = verifier_score,
                      instruction: str = "") -> dict[str, float]:
    """`evaluate_pass_at_k` on a generation backend: k samples per query in thinking mode (a one-turn
    chat of the question, `instruction` appended), each scored by `score_fn`."""
    scored: list[tuple[str, list[float]]] = []
    for start in range(0, len(queries), QUERIES_PER_BATCH):
        chunk = queries[start:start + QUERIES_PER_BATCH]
        chats = [[{"role": "user", "content": q.question + instruction}] for q in chunk]
        groups = backend.generate(chats, max_new_tokens=max_new_tokens, n=k, sampling=sampling, seed=seed + start)
        for q, samples in zip(chunk, groups):
            scored.append((q.domain, [float(score_fn(q, s.text, s.token_ids)) for s in samples]))  # None -> NaN
    return summarize(scored, k)


__all__ = ["evaluate_pass_at_k", "measure_pass_at_k", "pass_at_k", "summarize"]
