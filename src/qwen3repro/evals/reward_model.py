"""Is the reward model useful? RewardBench's measures and two baselines it must beat, and best-of-N
reranking of the policy's own samples against the rule reward.

* `pairwise_accuracy`: the share of pairs whose chosen response scores above the rejected one (50% by
  chance); `best_of_k_accuracy`: the share of best-of-k sets whose chosen response scores above every
  rejected one (25% by chance at k = 4). A tie counts as a random tie-break would (1/2 of a pair,
  1/m of a set whose top score m responses share), so a constant scorer scores chance. Both by domain
  and in all (`by_domain`).
* Baselines, fitted on the training pairs only: `LengthBaseline` (prefer the longer response, or the
  shorter, whichever sign fits the training pairs better) and `BagOfWordsBaseline` (a logistic
  regression on the difference of the two responses' token counts: the Bradley–Terry model with a
  linear reward over token counts, fitted full-batch with L-BFGS and an L2 penalty). The preference set
  is length-balanced and its pairs differ in one span, so length scores chance by design; the bag of
  words shows how much a model can get from which tokens appear, without reading them in order.
* `best_of_n_rerank`: the policy samples n responses to each of some held-out add/mul queries (thinking
  mode, at its own temperature); the rule reward of (a) a random pick (the mean over all samples),
  (b) the reward model's top pick and (c) the best sample (the oracle). A useful reward model lifts
  (b) above (a) toward (c).
* `policy_pairs`: training pairs of the same kind, from training-partition queries: a right and a wrong
  sample of the policy to one query, as the rule reward labels them.

A scorer here is any `score_fn(items) -> scores` over (prompt, response) pairs:
`RewardModelScorer.score_many`, or a fitted baseline's `score_many`.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .. import plotting
from ..data import tasks
from ..data.preferences import BestOfKSet, PreferencePair
from ..data.queries import Query
from ..rl.rollout import sample_groups, verifier_score
from ..tokenizer import Tokenizer

__all__ = ["ScoreFn", "LengthBaseline", "BagOfWordsBaseline", "pairwise_accuracy", "best_of_k_accuracy",
           "by_domain", "rule_task_queries", "best_of_n_rerank", "policy_pairs", "plot_pairwise_accuracy",
           "RERANK_FAMILIES"]

ScoreFn = Callable[[Sequence[tuple[str, str]]], list[float]]
"""Scores of (prompt, response) pairs, in order."""

RERANK_FAMILIES = ("add", "mul")
BOW_L2 = 1e-3
"""The bag-of-words regression's L2 penalty (per pair, on the mean log loss)."""
BOW_STEPS = 200
"""L-BFGS iterations of the bag-of-words fit (full batch; it converges well before)."""


# ----------------------------------------------------------------------------- accuracy
def _tie_credit(chosen: float, rejected: Sequence[float]) -> float:
    """1 when `chosen` beats every rejected score, 1/m when it ties m−1 of them at the top, else 0."""
    top = max(rejected)
    if chosen > top:
        return 1.0
    if chosen < top:
        return 0.0
    return 1.0 / (1 + sum(r == top for r in rejected))


def pairwise_accuracy(score_fn: ScoreFn, pairs: Sequence[PreferencePair]) -> dict[str, float]:
    """{"accuracy", "margin" (mean chosen − rejected score), "n"} over `pairs`."""
    if not pairs:
        return {"accuracy": math.nan, "margin": math.nan, "n": 0}
    scores = score_fn([(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)])
    credit = [_tie_credit(scores[2 * i], [scores[2 * i + 1]]) for i in range(len(pairs))]
    margins = [scores[2 * i] - scores[2 * i + 1] for i in range(len(pairs))]
    return {"accuracy": sum(credit) / len(pairs), "margin": sum(margins) / len(pairs), "n": len(pairs)}


def best_of_k_accuracy(score_fn: ScoreFn, sets: Sequence[BestOfKSet]) -> dict[str, float]:
    """{"accuracy", "n"}: the share of sets whose chosen response outscores every rejected one."""
    if not sets:
        return {"accuracy": math.nan, "n": 0}
    items = [(s.prompt, r) for s in sets for r in (s.chosen, *s.rejected)]
    scores = score_fn(items)
    credit, at = [], 0
    for s in sets:
        k = 1 + len(s.rejected)
        credit.append(_tie_credit(scores[at], scores[at + 1:at + k]))
        at += k
    return {"accuracy": sum(credit) / len(sets), "n": len(sets)}


def by_domain(measure: Callable[[ScoreFn, Sequence[Any]], dict[str, float]], score_fn: ScoreFn,
              records: Sequence[Any]) -> dict[str, dict[str, float]]:
    """`measure` over all `records` ("all") and over each domain's records."""
    groups: dict[str, list[Any]] = defaultdict(list)
    for r in records:
        groups[r.domain].append(r)
    return {"all": measure(score_fn, records), **{d: measure(score_fn, groups[d]) for d in sorted(groups)}}


# ----------------------------------------------------------------------------- baselines
class LengthBaseline:
    """Score = sign × the response's length in characters; the sign is the one that ranks more training
    pairs right (+1, prefer the longer, on a tie)."""

    def __init__(self, sign: int = 1) -> None:
        self.sign = sign

    @classmethod
    def fit(cls, pairs: Sequence[PreferencePair]) -> "LengthBaseline":
        longer = sum(len(p.chosen) > len(p.rejected) for p in pairs)
        shorter = sum(len(p.chosen) < len(p.rejected) for p in pairs)
        return cls(1 if longer >= shorter else -1)

    def score_many(self, items: Sequence[tuple[str, str]]) -> list[float]:
        return [float(self.sign * len(response)) for _, response in items]


class BagOfWordsBaseline:
    """A linear reward w · counts(response tokens), fitted as a Bradley–Terry (logistic) regression on the
    training pairs' count differences counts(chosen) − counts(rejected); see the module docstring."""

    def __init__(self, tokenizer: Tokenizer, weights: torch.Tensor | None = None) -> None:
        self.tokenizer = tokenizer
        self.weights = weights if weights is not None else torch.zeros(tokenizer.vocab_size)

    def counts(self, responses: Sequence[str]) -> torch.Tensor:
        """Token counts [N, vocab] of each response."""
        out = torch.zeros(len(responses), self.tokenizer.vocab_size)
        for i, text in enumerate(responses):
            ids = torch.tensor(self.tokenizer.encode(text), dtype=torch.long)
            if len(ids):
                out[i] = torch.bincount(ids, minlength=self.tokenizer.vocab_size)[: self.tokenizer.vocab_size].float()
        return out

    @classmethod
    def fit(cls, tokenizer: Tokenizer, pairs: Sequence[PreferencePair], *, l2: float = BOW_L2,
            steps: int = BOW_STEPS) -> "BagOfWordsBaseline":
        model = cls(tokenizer)
        if not pairs:
            return model
        diff = model.counts([p.chosen for p in pairs]) - model.counts([p.rejected for p in pairs])
        weights = torch.zeros(diff.shape[1], requires_grad=True)
        optimizer = torch.optim.LBFGS([weights], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = -torch.nn.functional.logsigmoid(diff @ weights).mean() + l2 * weights.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        model.weights = weights.detach()
        return model

    def score_many(self, items: Sequence[tuple[str, str]]) -> list[float]:
        if not items:
            return []
        return (self.counts([response for _, response in items]) @ self.weights).tolist()


# ----------------------------------------------------------------------------- best-of-N reranking
SPLITS = ("heldout", "train")


def rule_task_queries(n: int, seed: int, families: Sequence[str] = RERANK_FAMILIES, *,
                      split: str = "heldout") -> list[Query]:
    """`n` rule-checkable queries (checked by the "task" reward) of the task world's `split`: "heldout"
    (what reranking is evaluated on) or "train" (the policy pairs the reward model trains on)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"reward-model-rerank|{seed}" if split == "heldout" else f"reward-model-policy-pairs|{seed}")
    return [Query.from_task(tasks.sample_item(rng, heldout=split == "heldout", families=tuple(families)))
            for _ in range(n)]


def policy_pairs(policy, tokenizer: Tokenizer, queries: Sequence[Query], n: int, *, max_new_tokens: int,
                 seed: int, pairs_per_query: int, temperature: float = 1.0) -> tuple[list[PreferencePair], dict]:
    """Preference pairs from the policy's own samples, labelled by the rule reward: `n` samples per query
    (sampled as `best_of_n_rerank` samples), and for a query with both a right (reward 1) and a wrong
    (reward 0) sample, up to `pairs_per_query` pairs of distinct right and wrong texts (domain "policy").
    The synthetic preference set differs from what the policy writes (its templates, its lengths, its
    mistakes); pairs of the policy's own samples are what reranking them needs. Returns (pairs, counts)."""
    generator = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    groups = sample_groups(policy, tokenizer, queries, n, max_new_tokens=max_new_tokens, temperature=temperature,
                           generator=generator, score_fn=verifier_score)
    pairs: list[PreferencePair] = []
    mixed = 0
    for g in groups:
        right, wrong = [], []
        for ids, reward in zip(g.completions, g.rewards):
            text = tokenizer.decode(ids)
            side = right if reward == 1.0 else wrong if reward == 0.0 else None
            if side is not None and text not in side:
                side.append(text)
        mixed += bool(right and wrong)
        for chosen, rejected in list(zip(right, wrong))[:pairs_per_query]:
            pairs.append(PreferencePair(g.query.question, chosen, rejected, "policy", "policy samples", "train",
                                        g.query.uid, dict(g.query.reference)))
    counts = {"queries": len(queries), "samples_per_query": n, "queries_with_right_and_wrong": mixed,
              "pairs": len(pairs), "chosen_longer_share": (sum(len(p.chosen) > len(p.rejected) for p in pairs)
                                                           / len(pairs) if pairs else None)}
    return pairs, counts


def best_of_n_rerank(policy, tokenizer: Tokenizer, scorer, queries: Sequence[Query], n: int, *,
                     max_new_tokens: int, seed: int, temperature: float = 1.0) -> dict[str, Any]:
    """Rule reward of a random pick, the reward model's pick and the oracle's among `n` policy samples
    per query (module docstring). Samples without a rule reward (None) are left out of every pick; a
    query with none left is counted in "queries_without_reward"."""
    if n < 1:
        raise ValueError(f"best_of_n_rerank: n must be >= 1, got {n}")
    generator = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    groups = sample_groups(policy, tokenizer, queries, n, max_new_tokens=max_new_tokens, temperature=temperature,
                           generator=generator, score_fn=verifier_score)
    texts = [[tokenizer.decode(ids) for ids in g.completions] for g in groups]
    flat = scorer.score_many([(g.query.question, t) for g, ts in zip(groups, texts) for t in ts])
    random_pick, rm_pick, oracle, skipped = [], [], [], 0
    for i, g in enumerate(groups):
        scores = flat[i * n:(i + 1) * n]
        valid = [j for j, r in enumerate(g.rewards) if not math.isnan(r)]
        if not valid:
            skipped += 1
            continue
        random_pick.append(sum(g.rewards[j] for j in valid) / len(valid))
        rm_pick.append(g.rewards[max(valid, key=lambda j: scores[j])])
        oracle.append(max(g.rewards[j] for j in valid))

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else math.nan

    result = {"n": n, "queries": len(queries), "queries_without_reward": skipped,
              "random": mean(random_pick), "reward_model": mean(rm_pick), "oracle": mean(oracle),
              "families": sorted({q.domain for q in queries}), "temperature": temperature,
              "max_new_tokens": max_new_tokens, "seed": seed, "template": "chat template, thinking mode"}
    result["gain"] = result["reward_model"] - result["random"]
    return result


# ----------------------------------------------------------------------------- plot
def plot_pairwise_accuracy(results: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]],
                           path: str | Path) -> str:
    """Bars of pairwise accuracy per domain for each scorer, one panel per split.

    `results[scorer][split][domain]["accuracy"]` (as `by_domain` gives per split)."""
    scorers = list(results)
    splits = list(next(iter(results.values()))) if scorers else []
    with plotting.figure(path, ncols=max(1, len(splits)), title="Reward model: pairwise accuracy") as (_, axes):
        for ax, split in zip(axes[0], splits):
            domains = list(results[scorers[0]][split])
            width = 0.8 / len(scorers)
            for k, name in enumerate(scorers):
                values = [results[name][split][d]["accuracy"] for d in domains]
                ax.bar([i + (k - (len(scorers) - 1) / 2) * width for i in range(len(domains))], values, width,
                       label=name)
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
            ax.set_xticks(range(len(domains)))
            ax.set_xticklabels(domains, rotation=30)
            ax.set_ylim(0, 1)
            ax.set_title(split)
            ax.set_ylabel("pairwise accuracy")
        axes[0, 0].legend()
    return str(path)
