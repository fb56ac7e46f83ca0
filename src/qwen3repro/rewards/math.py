"""Math answers checked with `math-verify` (symbolic equivalence: 1/2 = 0.5 = \\frac12, {1,2} = {2,1}).

The gold answer is parsed with math-verify's defaults (LaTeX and plain expressions); the model's
answer (the content after its think block) with a `\\boxed{}` answer preferred, then any LaTeX or
plain expression. `verify(gold, answer)` is asymmetric: gold first. math-verify bounds its work with
`signal.alarm`, which only works in the main thread; elsewhere (a thread pool of reward workers)
the timeouts are switched off (None), as TRL does.

An answer that does not parse, an empty answer or a completion without `</think>` scores 0; a gold
answer that does not parse (a data problem) or a verifier crash gives no reward (None).
"""
from __future__ import annotations

import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from .registry import RewardResult, answer_text, register

__all__ = ["math_reward", "TIMEOUT_SECONDS"]

TIMEOUT_SECONDS = 5


def _timeouts() -> int | None:
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


@register("math")
def math_reward(completion: str, answer: str) -> RewardResult:
    """1.0 if the completion's final answer equals `answer` (gold) mathematically, else 0.0."""
    timeout = _timeouts()
    try:
        gold = parse(str(answer), parsing_timeout=timeout, raise_on_error=False)
    except Exception as exc:  # noqa: BLE001 - a verifier crash is not the model's fault
        return RewardResult(None, f"gold answer: math-verify failed: {type(exc).__name__}: {exc}")
    if not gold:
        return RewardResult(None, f"gold answer {answer!r} does not parse")
    text = answer_text(completion)
    if not text:
        return RewardResult(0.0, "empty answer")
    try:
        predicted = parse(
            text,
            extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
            parsing_timeout=timeout,
            raise_on_error=False,
        )
    except Exception as exc:  # noqa: BLE001 - unparseable model output is the model's fault
        return RewardResult(0.0, f"answer does not parse: {type(exc).__name__}")
    if not predicted:
        return RewardResult(0.0, "no answer found")
    try:
        correct = verify(gold, predicted, timeout_seconds=timeout, raise_on_error=False)
    except Exception as exc:  # noqa: BLE001
        return RewardResult(None, f"math-verify failed: {type(exc).__name__}: {exc}")
    return RewardResult(1.0 if correct else 0.0, "correct" if correct else "wrong answer")
