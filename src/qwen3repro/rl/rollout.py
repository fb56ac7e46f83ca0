"""GRPO rollouts: prompts, G samples per query, rewards, dynamic sampling, batches, log-probs.

One generation step of the reasoning-RL stage (Qwen3 report §4.2):

1. Take the next queries from a `QueryStream` (a seeded reshuffle of the selected queries per
   epoch, with a cursor that checkpoints as one integer).
2. Render each as a single user turn with the chat template in thinking mode
   (`add_generation_prompt=True`, thinking enabled): the model writes ``<think>…</think>`` and then
   its answer, and ``<|im_end|>`` ends the turn.
3. Sample G completions per query with `generate` (KV-cached, one seeded `torch.Generator`) at the
   rollout temperature with no top-k/top-p filtering, so the sampler draws exactly from the policy
   whose log-probs the loss uses (π_old = the sampling distribution; `generate` returns log
   softmax(logits / T) of each sampled token).
4. Score every completion with its query's verifier from `qwen3repro.rewards`. A reward of None
   (an infrastructure failure, not the model's fault) becomes NaN: ignored by the group statistics,
   advantage 0, never scored as 0.
5. Dynamic sampling (DAPO; verl's ``filter_groups`` with ``metric=acc``): a group whose
   *accuracy* (score ≥ 0.5, not any shaped reward) is the same for all its valid samples — all
   right or all wrong — has zero advantages and teaches nothing, so it is dropped and the batch is
   refilled with fresh queries, for up to `max_rounds` generation rounds. The share of such
   groups among all generated groups is logged every step (it falls as the policy sharpens).
6. Group-normalised advantages (`losses.group_advantages`), broadcast to every token.

`RolloutBatch` holds prompt + completion as one left-aligned-at-the-completion tensor: prompts are
left-padded to a common width P, completions start at column P and are right-padded, so
`policy_logprobs` reads the completion log-probs of all rows from logits[:, P−1 : P+T−1] in one
forward (attention mask and position ids make padded rows compute what they would alone).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..chat import render
from ..data.queries import Query
from ..generate import SamplingParams, generate
from ..losses import group_advantages
from ..rewards import REWARDS, RewardResult
from .entropy import token_entropy

# A sample counts as correct when its verifier score reaches this (the task verifiers give 0 or 1;
# partial-credit verifiers count as correct only from half credit up).
ACCURACY_THRESHOLD = 0.5


ScoreFn = Callable[[Query, str, Sequence[int]], RewardResult]


def verifier_score(query: Query, text: str, token_ids: Sequence[int]) -> RewardResult:
    """Score a completion with the query's registered verifier; a crash is "no reward" (None)."""
    fn = REWARDS.get(query.verifier or "")
    if fn is None:
        return RewardResult(None, f"no verifier {query.verifier!r}")
    try:
        return fn(text, **query.reference)
    except Exception as exc:  # a verifier bug is an infrastructure failure, not a wrong answer
        return RewardResult(None, f"verifier error: {type(exc).__name__}: {exc}")


def prompt_ids(tokenizer, query: Query) -> list[int]:
    """The query as a one-turn chat in thinking mode, ending with the assistant header."""
    text = render([{"role": "user", "content": query.question}], add_generation_prompt=True, enable_thinking=True)
    return tokenizer.encode(text)


class QueryStream:
    """Endless stream over a query list, reshuffled each epoch by (seed, epoch); the cursor is the
    number of queries handed out, so `state_dict()` is one integer and resuming is exact."""

    def __init__(self, queries: Sequence[Query], seed: int = 0) -> None:
        if not queries:
            raise ValueError("no queries to train on")
        self.queries = list(queries)
        self.seed = seed
        self.cursor = 0
        self._epoch, self._order = -1, []

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            order = list(range(len(self.queries)))
            random.Random(f"query-stream|{self.seed}|{epoch}").shuffle(order)
            self._epoch, self._order = epoch, order
        return self._order

    def take(self, n: int) -> list[Query]:
        out = []
        for _ in range(n):
            epoch, pos = divmod(self.cursor, len(self.queries))
            out.append(self.queries[self._order_of(epoch)[pos]])
            self.cursor += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.cursor = int(state["cursor"])


# ----------------------------------------------------------------------------- groups
@dataclass
class Group:
    """G completions of one query with their rewards (NaN = no reward) and accuracies."""

    query: Query
    prompt: list[int]
    completions: list[list[int]]
    logprobs: list[list[float]]
    forced: list[list[bool]]
    finish_reasons: list[str]
    rewards: list[float]

    @property
    def correct(self) -> list[float]:
        """1/0 accuracy per sample (NaN where there is no reward)."""
        return [r if math.isnan(r) else float(r >= ACCURACY_THRESHOLD) for r in self.rewards]

    @property
    def n_valid(self) -> int:
        return sum(not math.isnan(r) for r in self.rewards)

    @property
    def mixed(self) -> bool:
        """At least two valid samples whose accuracies differ (the group has a learning signal)."""
        acc = [c for c in self.correct if not math.isnan(c)]
        return len(acc) >= 2 and 0 < sum(acc) < len(acc)


def sample_groups(
    model,
    tokenizer,
    queries: Sequence[Query],
    group_size: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    score_fn: ScoreFn = verifier_score,
    sampling: SamplingParams | None = None,
    max_batch_size: int | None = None,
) -> list[Group]:
    """G completions (with log-probs) per query and their scores, one group per query, in order.

    Sampling is plain sampling at `temperature` unless `sampling` is given (evaluation uses its
    pinned settings; training must sample from the policy itself, so it leaves filters off).
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not queries:
        return []
    params = sampling or SamplingParams(temperature=temperature)
    prompts = [prompt_ids(tokenizer, q) for q in queries]
    flat = [p for p in prompts for _ in range(group_size)]
    was_training = model.training
    model.eval()
    try:
        gens = generate(model, flat, params, max_new_tokens=max_new_tokens, return_logprobs=True,
                        tokenizer=tokenizer, generator=generator, max_batch_size=max_batch_size)
    finally:
        model.train(was_training)
    groups = []
    for i, (query, prompt) in enumerate(zip(queries, prompts)):
        chunk = gens[i * group_size:(i + 1) * group_size]
        rewards = []
        for g in chunk:
            result = score_fn(query, tokenizer.decode(g.token_ids), g.token_ids)
            rewards.append(float(result))  # None → NaN ("no reward")
        groups.append(Group(query, prompt, [g.token_ids for g in chunk], [g.logprobs for g in chunk],
                            [g.forced or [False] * len(g) for g in chunk], [g.finish_reason for g in chunk],
                            rewards))
    return groups


@dataclass
class RolloutStats:
    """What one generation step produced, over every group generated (kept or dropped)."""

    groups_generated: int = 0
    groups_zero_variance: int = 0  # all valid samples equally right or wrong
    groups_no_reward: int = 0  # fewer than two valid rewards (infrastructure failures)
    rounds: int = 0
    rewards: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    truncated: int = 0

    @property
    def zero_variance_share(self) -> float:
        return self.groups_zero_variance / max(self.groups_generated, 1)

    @property
    def mean_reward(self) -> float:
        valid = [r for r in self.rewards if not math.isnan(r)]
        return sum(valid) / len(valid) if valid else float("nan")

    @property
    def mean_length(self) -> float:
        return sum(self.lengths) / max(len(self.lengths), 1)


def collect_rollouts(
    model,
    tokenizer,
    stream: QueryStream,
    *,
    n_groups: int,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    dynamic_sampling: bool = True,
    max_rounds: int = 4,
    score_fn: ScoreFn = verifier_score,
) -> tuple[list[Group], RolloutStats]:
    """Generate groups until `n_groups` have a learning signal (dynamic sampling) or for one round.

    With `dynamic_sampling`, groups whose accuracy is all equal (or that have fewer than two valid
    rewards) are dropped and the shortfall is generated from the next queries, for at most
    `max_rounds` rounds; the step then trains on what it has (possibly fewer groups, possibly none).
    Without it, every group of the one round is kept (equal-reward groups get zero advantages).
    """
    stats = RolloutStats()
    kept: list[Group] = []
    while len(kept) < n_groups and stats.rounds < (max_rounds if dynamic_sampling else 1):
        stats.rounds += 1
        groups = sample_groups(model, tokenizer, stream.take(n_groups - len(kept)), group_size,
                               max_new_tokens=max_new_tokens, temperature=temperature, generator=generator,
                               score_fn=score_fn)
        for g in groups:
            stats.groups_generated += 1
            stats.rewards.extend(g.rewards)
            stats.lengths.extend(len(c) for c in g.completions)
            stats.truncated += sum(r == "length" for r in g.finish_reasons)
            if g.n_valid < 2:
                stats.groups_no_reward += 1
            elif not g.mixed:
                stats.groups_zero_variance += 1
            if g.mixed or not dynamic_sampling:
                kept.append(g)
    return kept[:n_groups], stats


# ----------------------------------------------------------------------------- batches
@dataclass
class RolloutBatch:
    """Rollouts as tensors. Row r = prompt (left-padded to `prompt_width`) + completion (right-padded).

    input_ids / attention_mask / position_ids [N, P+T]; completion_mask [N, T] (1 = a sampled
    completion token that counts in the loss); advantages, rewards [N]; sampler_logps [N, T]
    (the sampler's log-probs at the rollout temperature).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    completion_mask: torch.Tensor
    advantages: torch.Tensor
    rewards: torch.Tensor
    sampler_logps: torch.Tensor
    prompt_width: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "RolloutBatch":
        return RolloutBatch(*(getattr(self, f).to(device) for f in ("input_ids", "attention_mask", "position_ids",
                                                                     "completion_mask", "advantages", "rewards",
                                                                     "sampler_logps")), self.prompt_width)

    def select(self, rows: torch.Tensor) -> "RolloutBatch":
        """A mini-batch of rows (tensors indexed along the first dimension)."""
        rows = rows.to(self.input_ids.device)
        return RolloutBatch(self.input_ids[rows], self.attention_mask[rows], self.position_ids[rows],
                            self.completion_mask[rows], self.advantages[rows], self.rewards[rows],
                            self.sampler_logps[rows], self.prompt_width)


def build_batch(groups: Sequence[Group], *, pad_id: int, scale_rewards: str = "group") -> RolloutBatch:
    """Stack groups into a `RolloutBatch`, with group-normalised advantages (`losses.group_advantages`)."""
    if not groups:
        raise ValueError("no groups to build a batch from")
    size = len(groups[0].completions)
    if any(len(g.completions) != size for g in groups):
        raise ValueError("every group must have the same number of completions")
    rows = [(g.prompt, c, lp, f) for g in groups for c, lp, f in zip(g.completions, g.logprobs, g.forced)]
    width = max(len(p) for p, *_ in rows)
    t = max(1, max(len(c) for _, c, *_ in rows))
    n = len(rows)
    input_ids = torch.full((n, width + t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width + t), dtype=torch.bool)
    completion_mask = torch.zeros((n, t), dtype=torch.float32)
    sampler_logps = torch.zeros((n, t), dtype=torch.float32)
    for r, (prompt, comp, logps, forced) in enumerate(rows):
        input_ids[r, width - len(prompt):width] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[r, width - len(prompt):width + len(comp)] = True
        if comp:
            input_ids[r, width:width + len(comp)] = torch.tensor(comp, dtype=torch.long)
            completion_mask[r, :len(comp)] = 1.0 - torch.tensor(forced, dtype=torch.float32)
            sampler_logps[r, :len(comp)] = torch.tensor(logps, dtype=torch.float32)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32)
    advantages = group_advantages(rewards, size, scale_rewards)
    return RolloutBatch(input_ids, attention_mask, position_ids, completion_mask, advantages, rewards,
                        sampler_logps, width)


def policy_logprobs(model, batch: RolloutBatch, temperature: float = 1.0, *,
                    with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [N, T] of the completion tokens under `model` at `temperature`, and their
    per-token entropies [N, T] (same distribution), from one forward over prompt + completion.

    Differentiable unless called under no_grad. The temperature divides the logits before the
    log-softmax, for the policy, the old and the reference log-probs alike (trl PR #3029).
    """
    p, t = batch.prompt_width, batch.completion_mask.shape[1]
    padded = not bool(batch.attention_mask.all())
    out = model(batch.input_ids, position_ids=batch.position_ids,
                attention_mask=batch.attention_mask if padded else None)
    logits = out.logits[:, p - 1:p + t - 1].float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    targets = batch.input_ids[:, p:p + t]
    logps = logp_all.gather(-1, targets[..., None])[..., 0]
    entropy = token_entropy(logits, 1.0) if with_entropy else None
    return logps, entropy


__all__ = [
    "ACCURACY_THRESHOLD", "Group", "Query", "QueryStream", "RolloutBatch", "RolloutStats", "ScoreFn",
    "build_batch", "collect_rollouts", "policy_logprobs", "prompt_ids", "sample_groups", "verifier_score",
]
