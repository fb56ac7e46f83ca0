"""Format rewards on the think block.

* "think_format": 1.0 when the completion is exactly one `<think>...</think>` block followed by the
  answer (TRL's `think_format_reward` pattern `^<think>(?!.*<think>)(.*?)</think>.*$`, with the
  answer required to be non-empty and free of malformed tool calls here). A completion whose
  prompt already ended with `<think>` (an assistant prefill) can pass `prefilled_think=True`.
* "think_mode": 1.0 when the think block follows the requested mode: `thinking=True` needs a
  non-empty reasoning, `thinking=False` the empty block `<think>\\n\\n</think>` (or none at all,
  when the prompt pre-filled it); both need an answer (or a tool call) and no malformed tool call.
"""
from __future__ import annotations

import re

from ..chat import parse
from .registry import RewardResult, register

__all__ = ["think_format_reward", "think_mode_reward"]

_THINK_FORMAT = re.compile(r"^<think>(?!.*<think>)(.*?)</think>(.*)$", re.DOTALL)
_END = ("<|im_end|>", "<|endoftext|>")


def _strip_end(text: str) -> str:
    cuts = [text.find(t) for t in _END if t in text]
    return text[: min(cuts)] if cuts else text


@register("think_format")
def think_format_reward(completion: str, prefilled_think: bool = False) -> RewardResult:
    if not isinstance(completion, str):
        return RewardResult(0.0, "not text")
    text = _strip_end(completion)
    if prefilled_think:
        text = "<think>" + text
    m = _THINK_FORMAT.match(text)
    if not m:
        return RewardResult(0.0, "no single <think>...</think> block at the start")
    if not m.group(2).strip():
        return RewardResult(0.0, "empty answer")
    if parse(text)["errors"]:
        return RewardResult(0.0, "malformed tool call")
    return RewardResult(1.0, "well formed")


@register("think_mode")
def think_mode_reward(completion: str, thinking: bool) -> RewardResult:
    if not isinstance(completion, str):
        return RewardResult(0.0, "not text")
    text = _strip_end(completion)
    parsed = parse(text)
    if not parsed["content"].strip() and not parsed["tool_calls"]:
        return RewardResult(0.0, "empty answer")
    if parsed["errors"]:
        return RewardResult(0.0, "malformed tool call")
    has_block = "</think>" in text
    if thinking:
        ok = has_block and bool(parsed["reasoning_content"].strip())
        return RewardResult(1.0 if ok else 0.0, "thinks" if ok else "expected a non-empty think block")
    ok = not parsed["reasoning_content"].strip() and text.count("<think>") <= 1
    return RewardResult(1.0 if ok else 0.0, "does not think" if ok else "expected an empty think block")
