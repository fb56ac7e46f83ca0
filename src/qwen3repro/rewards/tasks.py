"""Exact answers for the synthetic task families (`qwen3repro.data.tasks`: add, mul, expr, code,
order): the content after the think block must equal the reference after
`tasks.normalize_answer` (integers without signs, zeros or separators; names lower-cased; a
trailing full stop ignored). A missing or empty answer scores 0.
"""
from __future__ import annotations

from ..data import tasks as _tasks
from .registry import RewardResult, answer_text, register

__all__ = ["task_reward"]


@register("task")
def task_reward(completion: str, item: "_tasks.TaskItem | dict | str") -> RewardResult:
    """1.0 for an exact (normalised) answer to `item` (a TaskItem, its dict, or the answer string)."""
    if isinstance(item, dict):
        try:
            item = _tasks.TaskItem.from_dict(item)
        except (KeyError, TypeError, ValueError) as exc:
            return RewardResult(None, f"bad reference item: {exc}")
    reference = item.answer if isinstance(item, _tasks.TaskItem) else item
    if not isinstance(reference, str) or not reference.strip():
        return RewardResult(None, "the reference answer is empty")
    text = answer_text(completion)
    if not text:
        return RewardResult(0.0, "empty answer")
    correct = _tasks.check_answer(reference, text)
    return RewardResult(1.0 if correct else 0.0, "correct" if correct else "wrong answer")
