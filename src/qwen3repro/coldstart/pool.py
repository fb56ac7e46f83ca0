"""The cold-start query pool: verifiable problems plus the unverifiable queries a filter must drop.

Qwen3 report §4.1: the cold-start data are "math, code, logical reasoning and general STEM
problems" with verified reference answers or code test cases; queries that are "not easily
verifiable" (several sub-questions, general text generation) are filtered out, and a validation
set is reserved before any responses are generated.

At tiny scale the verifiable queries are items of the task families (`data.tasks`: add, mul, expr
= math, code = program tracing, order = logic), drawn from the *training* partition only (the
held-out partition stays for evaluation). Mixed in at a set rate are two kinds of distractors that
a real crawl contains and that the query filter must reject:

* ``multi_question`` — two problems glued into one query, paired with the first one's reference (it
  has a verifier, but the query has no single verifiable answer);
* ``open_ended`` — a general text-generation request in one of the synthetic languages, with no
  reference answer at all.

The validation set (`Pool.validation`) is reserved *first*, from the verifiable items, so later
steps can drop responses that copy it (defect 6 of §4.1).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from ..data import tasks
from ..data.queries import Query
from ..data.world import NOUNS_ANIMAL, NOUNS_THING, World, build_world

# The distractors' kinds, which are also their `Query.domain`.
DISTRACTOR_KINDS = ("multi_question", "open_ended")


def query_kind(query: Query) -> str:
    """'math' | 'code' | 'logic' for a task item's query (its family's kind), else the distractor kind."""
    return tasks.FAMILIES[query.item.family].kind if query.item is not None else query.domain


@dataclass(frozen=True)
class Pool:
    """The reserved validation items and the candidate queries (verifiable and distractors)."""

    validation: tuple[tasks.TaskItem, ...]
    queries: tuple[Query, ...]

    def counts(self) -> dict[str, Any]:
        by_kind: dict[str, int] = {}
        for q in self.queries:
            kind = query_kind(q)
            by_kind[kind] = by_kind.get(kind, 0) + 1
        return {"validation_reserved": len(self.validation), "queries": len(self.queries),
                "queries_by_kind": dict(sorted(by_kind.items()))}


def _training_item(rng: random.Random, families: Sequence[str]) -> tasks.TaskItem:
    return tasks.sample_item(rng, heldout=False, families=tuple(families))


def _multi_question(rng: random.Random, families: Sequence[str]) -> Query:
    a, b = _training_item(rng, families), _training_item(rng, families)
    question = f"{a.question}\nAlso answer this: {b.question}"
    # Crawled data often pairs such a query with one reference answer: it has a verifier, yet no
    # single verifiable answer, so only the text check of the query filter can reject it.
    return Query(tasks.item_uid("multi", question), question, "multi_question", verifier="task",
                 reference={"item": a.to_dict()})


def _open_ended(rng: random.Random, world: World) -> Query:
    lang = rng.choice(world.languages)
    topic = rng.choice(NOUNS_ANIMAL + NOUNS_THING)
    what = rng.choice(("a short story", "a poem", "a letter", "a description"))
    question = f"Write {what} in {lang.name} about a {lang.word(topic)}."
    return Query(tasks.item_uid("open", question), question, "open_ended")


def build_pool(*, n_queries: int, n_validation: int, distractor_rate: float, seed: int = 0,
               families: Sequence[str] | None = None, world_seed: int = 0) -> Pool:
    """Reserve `n_validation` verifiable items, then draw `n_queries` queries of which a share
    `distractor_rate` (in expectation) are unverifiable distractors. No query repeats a validation
    item or another query (by uid)."""
    if not 0.0 <= distractor_rate <= 1.0:
        raise ValueError(f"distractor_rate must be in [0, 1], got {distractor_rate}")
    families = tuple(families or tasks.FAMILIES)
    rng = random.Random(f"coldstart-pool|{seed}")
    world = build_world(world_seed)
    seen: set[str] = set()
    validation: list[tasks.TaskItem] = []
    while len(validation) < n_validation:  # reserved first
        item = _training_item(rng, families)
        if item.uid not in seen:
            seen.add(item.uid)
            validation.append(item)
    queries: list[Query] = []
    while len(queries) < n_queries:
        if rng.random() < distractor_rate:
            query = _multi_question(rng, families) if rng.random() < 0.5 else _open_ended(rng, world)
        else:
            query = Query.from_task(_training_item(rng, families))
        if query.uid not in seen:
            seen.add(query.uid)
            queries.append(query)
    return Pool(tuple(validation), tuple(queries))


__all__ = ["DISTRACTOR_KINDS", "Pool", "build_pool", "query_kind"]
