"""Format rewards on the think block.

* "think_format": 1.0 when the completion is exactly one `<think>...</think>` block followed by the
  answer (TRL's `think_format_reward` pattern `^<think>(?!.*<think>)(.*?)</think>.*$`, with the
  answer required to be non-empty and free of malformed tool calls here). A completion whose
  prompt already ended with `<think>` (an assistant prefill) can pass `prefilled_think=True`.
* "think_mode": 1.0 when the think block follows the requested mode: `thinking=True` needs a
  non-empty reasoning, `thinking=False` the empty block `<think>\\n\\n</think>` (or none at all,
  when the prompt pre-filled it); both need an answer (or a tool call) and no malformed tool call.
* "format": format adherence as general RL rewards it (Qwen3 report §4.4: obey /think and /no_think,
  use the think tags), all of the above at once: "think_format" (one well-formed think block at the
  start, nothing after a second `<think>`, a non-empty answer, no malformed tool call) and "think_mode"
  in the mode the LAST soft switch asked for (the caller resolves the flags, `chat.wants_thinking`, and
  passes `thinking`), and exactly one final answer: a non-empty answer that is not given twice. "Twice"
  is concrete: a second `</think>` (the answer repeated after another closing tag), or an answer label
  ("Answer:", "Final answer:") opening two lines of the answer, or two `\boxed{...}`.
  A well-formed tool call beside the answer is not a format fault (the tool environment judges calls).
"""
from __future__ import annotations

import re

from ..chat import parse
from .registry import RewardResult, answer_text, register

__all__ = ["think_format_reward", "think_mode_reward", "format_reward", "second_answer"]

_THINK_FORMAT = re.compile(r"^<think>(?!.*<think>)(.*?)</think>(.*)$", re.DOTALL)
_END = ("<|im_end|>", "<|endoftext|>")
# An answer label at the start of a line: "Answer:", "Final answer:", "**Answer**:" (any case).
_ANSWER_LABEL = re.compile(r"^[ \t*#>_-]*(?:final[ \t]+)?answer[ \t*_]*:", re.IGNORECASE | re.MULTILINE)
_BOXED = "\\boxed{"


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


def second_answer(text: str) -> str | None:
    """Why `text` (one assistant turn, think block included) gives its answer twice, or None."""
    if text.count("</think>") > 1:
        return "two answers: a second </think>"
    answer = answer_text(text)
    if len(_ANSWER_LABEL.findall(answer)) > 1:
        return "two answers: the answer label appears twice"
    if answer.count(_BOXED) > 1:
        return "two answers: two \\boxed{}"
    return None


@register("format")
def format_reward(completion: str, thinking: bool, prefilled_think: bool = False) -> RewardResult:
    """1.0 when the think block is well formed, follows the requested mode, and one answer follows it."""
    if not isinstance(completion, str):
        return RewardResult(0.0, "not text")
    if not isinstance(thinking, bool):
        return RewardResult(None, f"bad format reference: thinking must be a bool, got {thinking!r}")
    text = _strip_end(completion)
    if prefilled_think:
        text = "<think>" + text
    well_formed = think_format_reward(text)
    if not well_formed.score:
        return well_formed
    mode = think_mode_reward(text, thinking)
    if not mode.score:
        return mode
    if not answer_text(text):
        return RewardResult(0.0, "empty answer")
    twice = second_answer(text)
    if twice:
        return RewardResult(0.0, twice)
    return RewardResult(1.0, "well formed, " + mode.reason)
