"""Query–verifier selection for reasoning RL by the Qwen3 report's four criteria (§4.2).

The report chose its 3,995 RL query–verifier pairs to be (1) unused during the cold start,
(2) learnable by the cold-start model, (3) as challenging as possible, and (4) broad across
sub-domains. Here, for a pool of candidate `Query`s:

* screening, before any sampling — a candidate is dropped, with a counted reason, when it has
  **no verifier** (`verifier` None or not registered: nothing could reward it), was **used in the
  cold start** (its uid is in the cold-start set), is a **held-out** evaluation item
  (`data.tasks.is_heldout`: RL must never train on what pass@k is measured on), or is a
  **duplicate** uid;
* learnability and hardness are measured, not guessed: the cold-start model samples each
  remaining query k times (at the rollout temperature) and its pass rate is the share of correct
  samples. A query is **learnable** iff 0 < pass rate < `ceiling`: at 0 the model never finds the
  reward (no group would ever be mixed), at or above the ceiling it is already solved (too easy).
  A query whose verifier gave no reward on every sample is dropped as "no reward";
* hardest first, balanced: the learnable queries of each domain are ranked by pass rate (lowest
  first, then higher difficulty), and the domains are visited round-robin, each contributing its
  next-hardest query, until `n_select` are chosen. A domain with few learnable queries gives what
  it has and the others fill in. The learnable ones left over are counted as "easier than the cut".

The cold-start interface is only a set of query uids (`load_used_uids`: a JSON list, a JSON
object with a "uids" list, or one uid per line), so selection does not depend on how the cold
start is implemented. Every dropped candidate is counted by reason, and the pass rates are
tabulated by domain and difficulty (`SelectionResult.table`, `to_markdown`).
"""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..data.queries import NO_VERIFIER, Query
from ..data.tasks import is_heldout
from ..rewards import REWARDS
from .rollout import ACCURACY_THRESHOLD, ScoreFn, sample_groups, verifier_score

# Reasons a candidate is not selected (the keys of `SelectionResult.reasons`; NO_VERIFIER is shared with
# the cold start's query filter).
USED_IN_COLD_START = "used in cold start"
# The file a cold-start SFT stage writes into its directory: the uids of the queries it trained on.
USED_QUERIES_FILE = "used_queries.json"
HELDOUT = "held-out evaluation item"
DUPLICATE = "duplicate"
NO_REWARD = "no reward (verifier failed on every sample)"
UNLEARNABLE = "unlearnable (pass rate 0)"
TOO_EASY = "too easy (pass rate >= ceiling)"
BELOW_CUT = "easier than the cut"
REASONS = (NO_VERIFIER, USED_IN_COLD_START, HELDOUT, DUPLICATE, NO_REWARD, UNLEARNABLE, TOO_EASY, BELOW_CUT)

# The report's final RL set (§4.2): 3,995 query–verifier pairs. Our sizes are in the scale files.
REPORT_RL_QUERIES = 3995


def load_used_uids(path: str | Path | None) -> set[str]:
    """The cold start's used query uids from a file (JSON list, {"uids": [...]}, or one per line)."""
    if path is None:
        return set()
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {line.strip() for line in text.splitlines() if line.strip()}
    if isinstance(data, dict):
        data = data.get("uids", [])
    if not isinstance(data, list) or not all(isinstance(u, str) for u in data):
        raise ValueError(f"{path}: expected a JSON list of query uids (or {{'uids': [...]}})")
    return set(data)


@dataclass
class SelectionResult:
    """The selected queries, why every other candidate was dropped, and the pass-rate table."""

    selected: list[Query]
    reasons: Counter = field(default_factory=Counter)
    pass_rates: dict[str, float | None] = field(default_factory=dict)
    table: list[dict[str, Any]] = field(default_factory=list)
    n_candidates: int = 0
    k: int = 0
    ceiling: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_candidates": self.n_candidates,
            "n_selected": len(self.selected),
            "k": self.k,
            "ceiling": self.ceiling,
            "dropped": {r: self.reasons.get(r, 0) for r in REASONS},
            "by_domain_difficulty": self.table,
            "selected": [q.to_dict() for q in self.selected],
            "pass_rates": self.pass_rates,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SelectionResult":
        return cls([Query.from_dict(q) for q in d["selected"]], Counter({k: v for k, v in d["dropped"].items() if v}),
                   dict(d.get("pass_rates", {})), list(d["by_domain_difficulty"]), int(d["n_candidates"]),
                   int(d["k"]), float(d["ceiling"]))

    def drops(self) -> dict[str, int]:
        """The reasons that dropped at least one candidate, with their counts, in `REASONS` order: the same
        whether the counts were just made or read back from `to_dict`'s file."""
        return {r: self.reasons[r] for r in REASONS if self.reasons.get(r, 0)}

    def to_markdown(self) -> str:
        """The pass-rate table by domain and difficulty, then the dropped counts."""
        lines = ["| domain | difficulty | candidates | sampled | mean pass rate | learnable | selected |",
                 "|---|---|---|---|---|---|---|"]
        for row in self.table:
            rate = "–" if row["mean_pass_rate"] is None else f"{row['mean_pass_rate']:.2f}"
            lines.append(f"| {row['domain']} | {row['difficulty']} | {row['candidates']} | {row['sampled']} | "
                         f"{rate} | {row['learnable']} | {row['selected']} |")
        lines.append("")
        lines.append("dropped: " + ", ".join(f"{r} {self.reasons.get(r, 0)}" for r in REASONS))
        return "\n".join(lines)


def screen(candidates: Iterable[Query], used_uids: Iterable[str] = ()) -> tuple[list[Query], Counter, dict[str, str]]:
    """Criteria that need no model: verifier present, unused in the cold start, not held out, unique.

    Returns (eligible queries, counted reasons, {uid: reason} for the dropped ones).
    """
    used = set(used_uids)
    seen: set[str] = set()
    eligible, reasons, why = [], Counter(), {}
    for q in candidates:
        if not q.verifier or q.verifier not in REWARDS:
            reason = NO_VERIFIER
        elif q.uid in used:
            reason = USED_IN_COLD_START
        elif is_heldout(q.uid):
            reason = HELDOUT
        elif q.uid in seen:
            reason = DUPLICATE
        else:
            seen.add(q.uid)
            eligible.append(q)
            continue
        reasons[reason] += 1
        why.setdefault(q.uid, reason)
    return eligible, reasons, why


@torch.no_grad()
def measure_pass_rates(model, tokenizer, queries: Sequence[Query], k: int, *, max_new_tokens: int,
                       temperature: float = 1.0, seed: int = 0, score_fn: ScoreFn = verifier_score,
                       queries_per_batch: int = 16) -> dict[str, float | None]:
    """Pass rate of each query over k samples of `model` (None when no sample got a reward)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(int(seed))
    rates: dict[str, float | None] = {}
    for start in range(0, len(queries), queries_per_batch):
        chunk = queries[start:start + queries_per_batch]
        for g in sample_groups(model, tokenizer, chunk, k, max_new_tokens=max_new_tokens, temperature=temperature,
                               generator=generator, score_fn=score_fn):
            valid = [r for r in g.rewards if not math.isnan(r)]
            rates[g.query.uid] = (sum(r >= ACCURACY_THRESHOLD for r in valid) / len(valid)) if valid else None
    return rates


def choose(eligible: Sequence[Query], pass_rates: dict[str, float | None], *, n_select: int,
           ceiling: float) -> tuple[list[Query], Counter]:
    """Learnable (0 < rate < ceiling), hardest first within each domain, domains round-robin."""
    reasons: Counter = Counter()
    by_domain: dict[str, list[Query]] = defaultdict(list)
    for q in eligible:
        rate = pass_rates.get(q.uid)
        if rate is None:
            reasons[NO_REWARD] += 1
        elif rate <= 0.0:
            reasons[UNLEARNABLE] += 1
        elif rate >= ceiling:
            reasons[TOO_EASY] += 1
        else:
            by_domain[q.domain].append(q)
    for qs in by_domain.values():
        qs.sort(key=lambda q: (pass_rates[q.uid], -q.difficulty, q.uid))
    selected: list[Query] = []
    depth = 0
    while len(selected) < n_select and any(depth < len(qs) for qs in by_domain.values()):
        for domain in sorted(by_domain):
            if depth < len(by_domain[domain]) and len(selected) < n_select:
                selected.append(by_domain[domain][depth])
        depth += 1
    reasons[BELOW_CUT] += sum(len(qs) for qs in by_domain.values()) - len(selected)
    return selected, reasons


def pass_rate_table(candidates: Sequence[Query], pass_rates: dict[str, float | None], selected: Sequence[Query],
                    ceiling: float) -> list[dict[str, Any]]:
    """Rows {domain, difficulty, candidates, sampled, mean_pass_rate, learnable, selected}."""
    chosen = {q.uid for q in selected}
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    for q in candidates:
        row = cells.setdefault((q.domain, q.difficulty), {"domain": q.domain, "difficulty": q.difficulty,
                                                          "candidates": 0, "sampled": 0, "learnable": 0,
                                                          "selected": 0, "_rates": []})
        row["candidates"] += 1
        rate = pass_rates.get(q.uid)
        if rate is not None:
            row["sampled"] += 1
            row["_rates"].append(rate)
            row["learnable"] += int(0.0 < rate < ceiling)
        row["selected"] += int(q.uid in chosen)
    rows = []
    for key in sorted(cells):
        row = cells[key]
        rates = row.pop("_rates")
        row["mean_pass_rate"] = sum(rates) / len(rates) if rates else None
        rows.append(row)
    return rows


def select_queries(candidates: Sequence[Query], model, tokenizer, *, n_select: int, k: int = 8,
                   ceiling: float = 1.0, used_uids: Iterable[str] = (), max_new_tokens: int = 128,
                   temperature: float = 1.0, seed: int = 0, score_fn: ScoreFn = verifier_score) -> SelectionResult:
    """Screen, measure pass rates with the cold-start `model` (k samples each), then choose."""
    if k < 1 or n_select < 1:
        raise ValueError(f"k and n_select must be >= 1, got k={k}, n_select={n_select}")
    if not 0.0 < ceiling <= 1.0:
        raise ValueError(f"ceiling must be in (0, 1], got {ceiling}")
    candidates = list(candidates)
    eligible, reasons, _ = screen(candidates, used_uids)
    rates = measure_pass_rates(model, tokenizer, eligible, k, max_new_tokens=max_new_tokens, temperature=temperature,
                               seed=seed, score_fn=score_fn)
    selected, more = choose(eligible, rates, n_select=n_select, ceiling=ceiling)
    reasons.update(more)
    return SelectionResult(selected, reasons, rates, pass_rate_table(candidates, rates, selected, ceiling),
                           len(candidates), k, ceiling)


__all__ = [
    "REASONS", "USED_IN_COLD_START", "HELDOUT", "DUPLICATE", "NO_REWARD", "UNLEARNABLE", "TOO_EASY",
    "BELOW_CUT", "SelectionResult", "choose", "load_used_uids", "measure_pass_rates", "pass_rate_table", "screen",
    "select_queries",
]
