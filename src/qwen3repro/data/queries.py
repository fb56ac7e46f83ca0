"""Queries: a question and the verifier that checks an answer to it (Qwen3 report §4.1-§4.2).

The long-CoT cold start filters a pool of queries and generates responses to the ones it keeps; reasoning
RL selects query–verifier pairs and samples rollouts for them. Both handle the same `Query`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .tasks import TaskItem

__all__ = ["NO_VERIFIER", "Query"]

# The counted reason for dropping a query that nothing can reward: the cold start's query filter and
# RL selection both count it, and selection.json stores the counts under this key.
NO_VERIFIER = "no verifier"


@dataclass(frozen=True)
class Query:
    """One query–verifier pair.

    `verifier` names a reward registered in `qwen3repro.rewards` and `reference` holds its keyword
    arguments (for "task": ``{"item": TaskItem.to_dict()}``); a query without a verifier is dropped and
    counted as `NO_VERIFIER`. `domain` and `difficulty` are what RL selection balances and the reports
    tabulate: the task family ("add", "code", ...) and difficulty of a task item, or, for a cold-start
    distractor, its kind ("multi_question", "open_ended") and None.

    `item` is the task item the query poses, whose reference trace the cold start's synthetic reasoner,
    no-CoT solver and detectors read; it is None for a query that poses no single item (a distractor's
    `reference` may still hold one: a two-question query paired with the first question's answer).

    `tools` names the tools the prompt offers ("calculator", "lookup", "search"; general RL's tool-use
    tasks); a query without tools is answered in one turn.
    """

    uid: str
    question: str
    domain: str
    difficulty: int | None = None
    verifier: str | None = None
    reference: Mapping[str, Any] = field(default_factory=dict)
    item: TaskItem | None = None
    tools: tuple[str, ...] = ()

    @classmethod
    def from_task(cls, item: TaskItem, verifier: str | None = "task") -> "Query":
        """The query that poses `item`, checked by the "task" reward (or by `verifier`)."""
        return cls(item.uid, item.question, item.family, item.difficulty, verifier, {"item": item.to_dict()}, item)

    def to_dict(self) -> dict[str, Any]:
        """The query as selection.json stores it; the item is left out (the reference holds what the
        verifier needs), and so are the tools when there are none, so a query without tools is stored
        (and hashed) as it is without the field."""
        d = {"uid": self.uid, "question": self.question, "domain": self.domain, "difficulty": self.difficulty,
             "verifier": self.verifier, "reference": dict(self.reference)}
        if self.tools:
            d["tools"] = list(self.tools)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Query":
        difficulty = None if d["difficulty"] is None else int(d["difficulty"])
        tools = d.get("tools", ())
        if isinstance(tools, str) or not all(isinstance(name, str) for name in tools):
            raise ValueError(f"query {d['uid']}: 'tools' must be a list of tool names, got {tools!r}")
        return cls(d["uid"], d["question"], d["domain"], difficulty, d.get("verifier"), dict(d.get("reference", {})),
                   tools=tuple(tools))
