"""The reward contract, the registry of named rewards, and the answer every answer-checking reward reads.

A reward is a function `reward(completion: str, **reference) -> RewardResult` registered under a name
(`register`); `get_reward(name)` finds it. The rewards themselves live in the sibling modules, which
register on import (the package imports them all), so this module depends on none of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..chat import parse

__all__ = ["RewardResult", "REWARDS", "register", "get_reward", "answer_text"]


@dataclass(frozen=True)
class RewardResult:
    """A reward: `score` in [0, 1] (None = no reward: an infrastructure failure), and why."""

    score: float | None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.score is not None

    def __float__(self) -> float:
        return float("nan") if self.score is None else float(self.score)


REWARDS: dict[str, Callable[..., RewardResult]] = {}


def register(name: str) -> Callable[[Callable[..., RewardResult]], Callable[..., RewardResult]]:
    """Decorator: register a reward function under `name` (a name can be registered once)."""

    def wrap(fn: Callable[..., RewardResult]) -> Callable[..., RewardResult]:
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return wrap


def get_reward(name: str) -> Callable[..., RewardResult]:
    """The reward registered under `name`; an unknown name lists the known ones."""
    try:
        return REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; registered: {', '.join(sorted(REWARDS))}") from None


def answer_text(completion: str) -> str:
    """The final answer of a completion: the content after the think block (`chat.parse`).

    A completion that opens `<think>` and never closes it has no answer (""). Never raises on
    malformed text; a non-string gives "".
    """
    if not isinstance(completion, str):
        return ""
    content = parse(completion)["content"]
    # The report's stop-thinking directive ends "</think>.\n\n" (chat.STOP_THINKING_DIRECTIVE): a
    # budget-forced answer starts with that stray full stop on a line of its own, which is not part of
    # the answer (an answer such as ".5" is left alone).
    if "</think>" in completion and content.startswith(".") and content[1:2] in ("\n", ""):
        content = content[1:]
    return content.strip()
