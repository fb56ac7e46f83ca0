"""Verifiable rewards behind one registry.

Every reward is a function `reward(completion: str, **reference) -> RewardResult`, where
`completion` is the assistant's generated text (`<think>...</think>` answer, possibly cut or
malformed) and the keyword arguments carry the reference (a math answer, code tests, a task item).
`RewardResult.score` is a float, or None when the reward could not be computed for reasons that are
not the model's fault (the sandbox could not start, a verifier crashed, the reference itself does
not parse): "no reward", which a trainer must ignore (TRL turns None into NaN and leaves it out of
the group statistics; `losses.group_advantages` does the same), never 0. Malformed model output —
no `</think>`, an empty answer, broken tool-call JSON, code that does not parse — is the model's
fault and scores as wrong (0.0), without raising.

Registered names: "math" (math-verify), "code" (sandboxed execution of tests), "task" (exact
answers of the synthetic families of `qwen3repro.data.tasks`), "think_format" (well-formed think
block), "think_mode" (the think block follows the requested mode).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
    from ..chat import parse

    if not isinstance(completion, str):
        return ""
    content = parse(completion)["content"]
    # The report's stop-thinking directive ends "</think>.\n\n" (chat.STOP_THINKING_DIRECTIVE): a
    # budget-forced answer starts with that stray full stop on a line of its own, which is not part of
    # the answer (an answer such as ".5" is left alone).
    if "</think>" in completion and content.startswith(".") and content[1:2] in ("\n", ""):
        content = content[1:]
    return content.strip()


# Register the built-in rewards (each module registers itself on import).
from . import code as code  # noqa: E402
from . import format as format  # noqa: E402,A001
from . import math as math  # noqa: E402
from . import tasks as tasks  # noqa: E402
