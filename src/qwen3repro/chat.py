"""Chats in the Qwen3 format: rendering, parsing model output, soft switches, the thinking-budget
directive, and the assistant-only loss mask.

The rendering rules (`render`, `render_pieces`, `CHAT_TEMPLATE`, ...) are defined in `chat_template`,
below the tokenizer, which saves and applies the template; they belong to this module's interface too,
so that a chat is rendered, parsed and masked through one module. The loss mask needs the tokenizer,
which is why the rendering cannot be defined here.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

from .chat_template import (CHAT_TEMPLATE, EMPTY_THINK, export_jinja, render, render_jinja, render_pieces,
                            tojson, tools_system_content)
from .tokenizer import Tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "EMPTY_THINK",
    "STOP_THINKING_DIRECTIVE",
    "BUDGET_SENTENCE",
    "TEMPLATE_STOP_THINKING",
    "export_jinja",
    "parse",
    "render",
    "render_jinja",
    "render_pieces",
    "thinking_flag",
    "tokenize_conversation",
    "tojson",
    "tools_system_content",
    "wants_thinking",
]

# Inserted when the thinking budget runs out, verbatim as printed in the Qwen3 Technical Report
# (arXiv 2505.09388, §4.3 "Thinking budget", p. 11), including the "." after </think>.
STOP_THINKING_DIRECTIVE = (
    "Considering the limited time by the user, I have to give the solution based on the thinking "
    "directly now.\n</think>.\n\n"
)
# The directive's sentence alone, and the form the chat template can render (no "." after
# </think>), which is what Qwen's own client recipe appends and what the fusion set trains.
BUDGET_SENTENCE = STOP_THINKING_DIRECTIVE.split("\n</think>")[0]
TEMPLATE_STOP_THINKING = "\n\n" + BUDGET_SENTENCE + "\n</think>\n\n"


# --------------------------------------------------------------------------------------------
# Parsing model output
# --------------------------------------------------------------------------------------------

END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")
ASSISTANT_HEADER = "<|im_start|>assistant\n"
_TOOL_CALL_OPEN, _TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def _parse_tool_call(raw: str) -> tuple[dict | None, str | None]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; deep nesting recurses
        return None, f"invalid JSON: {exc}"
    if not isinstance(value, dict):
        return None, f"expected a JSON object, got {type(value).__name__}"
    if not isinstance(value.get("name"), str):
        return None, "missing or non-string 'name'"
    if "arguments" not in value:
        return None, "missing 'arguments'"
    return {"name": value["name"], "arguments": value["arguments"]}, None


def parse(text: str) -> dict:
    """Split an assistant's output into reasoning, content and tool calls.

    Returns `{"reasoning_content": str, "content": str, "tool_calls": [{"name", "arguments"}],
    "errors": [{"error": str, "text": str}]}`:

    * the text is cut at the first `<|im_end|>` or `<|endoftext|>`; a leading
      `<|im_start|>assistant\\n` is removed;
    * reasoning and content are split as the template splits a content string: with `</think>`,
      the reasoning is what precedes the first `</think>` (after the last `<think>` in it, if any,
      so an output that starts directly with reasoning because the prompt already held `<think>\\n`
      works) with newlines stripped at both ends, and the content is what follows the last
      `</think>` with leading newlines stripped; with `<think>` but no `</think>` (cut by a
      budget or the length limit) everything after the last `<think>` is reasoning and the content is
      empty; with neither, all of it is content;
    * `<tool_call>...</tool_call>` blocks in the content holding a JSON object with a string
      `name` and an `arguments` field become tool calls (arguments as parsed JSON); the template's
      "\\n" separators around the blocks are removed. A block that is not such an object, or a
      `<tool_call>` never closed, is not a tool call: it is removed from the content and recorded
      in `errors` with its raw text. Nothing raises on malformed output.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse expects a str, got {type(text).__name__}")
    cuts = [text.find(token) for token in END_OF_TURN_TOKENS if token in text]
    if cuts:
        text = text[: min(cuts)]
    if text.startswith(ASSISTANT_HEADER):
        text = text[len(ASSISTANT_HEADER):]

    if "</think>" in text:
        parts = text.split("</think>")
        reasoning = parts[0].split("<think>")[-1].strip("\n")
        content = parts[-1].lstrip("\n")
    elif "<think>" in text:
        reasoning = text.split("<think>")[-1].strip("\n")
        content = ""
    else:
        reasoning, content = "", text

    tool_calls: list[dict] = []
    errors: list[dict] = []
    segments: list[str] = []  # the content outside the tool-call blocks
    # One left-to-right scan with str.find: a block is an opening tag and the first closing tag after
    # it. A lazy regex would search the rest of the text for a closing tag from every unclosed
    # opening tag, which is quadratic in the length of the output.
    position = 0
    while (start := content.find(_TOOL_CALL_OPEN, position)) >= 0:
        end = content.find(_TOOL_CALL_CLOSE, start + len(_TOOL_CALL_OPEN))
        if end < 0:
            break
        segments.append(content[position:start])
        position = end + len(_TOOL_CALL_CLOSE)
        call, error = _parse_tool_call(content[start + len(_TOOL_CALL_OPEN): end])
        if call is not None:
            tool_calls.append(call)
        else:
            errors.append({"error": f"tool call: {error}", "text": content[start:position]})
    if start >= 0:  # the first opening tag left is never closed, and neither is any after it
        errors.append({"error": "tool call: <tool_call> is never closed", "text": content[start:]})
        segments.append(content[position:start])  # the text before it, like any text before a block
        position = len(content)
    segments.append(content[position:])
    if len(segments) > 1:
        # Undo the template's separators: one "\n" before each block after the content.
        first = segments[0][:-1] if segments[0].endswith("\n") else segments[0]
        middle = [s[1:] if s.startswith("\n") else s for s in segments[1:-1]]
        content = first + "".join(middle) + segments[-1]
    return {"reasoning_content": reasoning, "content": content, "tool_calls": tool_calls, "errors": errors}


# --------------------------------------------------------------------------------------------
# Soft switches /think and /no_think
# --------------------------------------------------------------------------------------------

# A flag is "/think" or "/no_think" as a word of its own: not glued to a preceding letter, digit,
# "_" or "/" (so paths such as "a/think" or "//think" are not flags) nor followed by one
# ("/thinking" is not a flag).
_FLAG = re.compile(r"(?<![\w/])/(no_think|think)(?!\w)")


def thinking_flag(messages: Sequence[Mapping]) -> str | None:
    """The last soft switch in the chat: "think", "no_think" or None if there is none.

    User and system messages are scanned in order, and each one from start to end; the last flag
    found wins, so a message holding both flags follows the one written last, and a later turn
    overrides an earlier one (Qwen3 TR §4.3: "the response follows the last flag encountered").
    """
    flag = None
    for message in messages:
        if not isinstance(message, Mapping) or message.get("role") not in ("user", "system"):
            continue
        content = message.get("content")
        if isinstance(content, str):
            for match in _FLAG.finditer(content):
                flag = match.group(1)
    return flag


def wants_thinking(messages: Sequence[Mapping], enable_thinking: bool = True) -> bool:
    """Whether the next assistant turn should think.

    `enable_thinking=False` always wins (the template pre-fills an empty think block, whatever
    the user writes); otherwise the last soft switch decides, and thinking is the default.
    """
    if enable_thinking is False:
        return False
    return thinking_flag(messages) != "no_think"


# --------------------------------------------------------------------------------------------
# Assistant-only loss mask
# --------------------------------------------------------------------------------------------


def tokenize_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping],
    tools: Sequence[Mapping] | None = None,
    enable_thinking: bool = True,
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat and a 0/1 loss mask that is 1 on what the assistant produces.

    `input_ids` is exactly `tokenizer.encode(render(messages, tools))`. A token has loss 1 when
    it starts inside an assistant turn's body: everything after `<|im_start|>assistant\\n` up to
    and including that turn's `<|im_end|>`; system, user and tool tokens, the assistant header
    and the newline after `<|im_end|>` have loss 0.

    Every assistant turn is trained as the template renders it: turns before the last user query
    lose their reasoning (it is not in the rendered text), so they are trained on their content
    and tool calls only; turns after it carry their think block (an empty one for a final turn
    without reasoning). A turn's body normally begins with `<think>` or plain text, so each token
    lies on one side of the header; if a body begins with whitespace that merges with the header's
    newline into one token, that token starts in the header and gets loss 0.

    An assistant message with `"train": False` is context only: it is rendered as usual and its
    tokens get loss 0 (multi-turn SFT data uses this for earlier turns, whose reasoning the template
    drops, so the model is not taught to answer a fresh query without a think block).

    `tokenizer` is a `qwen3repro.tokenizer.Tokenizer` (a transformers fast tokenizer is wrapped).
    """
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_hf(tokenizer)
    pieces = render_pieces(messages, tools, add_generation_prompt=False, enable_thinking=enable_thinking)
    # render_pieces gives exactly one trained piece per assistant message, in order.
    context_only = [m.get("train") is False for m in messages if m.get("role") == "assistant"]
    spans: list[tuple[int, int]] = []
    position = 0
    body = 0
    for text, trained in pieces:
        if trained:
            if not context_only[body]:
                spans.append((position, position + len(text)))
            body += 1
        position += len(text)
    input_ids, offsets = tokenizer.encode_with_offsets("".join(text for text, _ in pieces))
    loss_mask = []
    span = 0
    for start, _end in offsets:
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        loss_mask.append(int(span < len(spans) and spans[span][0] <= start))
    return input_ids, loss_mask
