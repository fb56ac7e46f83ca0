"""The Qwen3 chat template: render, parse, soft switches, budget directive and loss masks.

`render` reproduces the released Qwen3 chat template (April 2025) in plain Python; the same rules
are written as a jinja template (`CHAT_TEMPLATE`, shipped as `chat_template.jinja` and saved into
`tokenizer_config.json`), and the tests check that transformers' `apply_chat_template` with it
gives the same text as `render`. The rules:

1. With `tools`, the chat opens with one system turn: the first system message's content (if any)
   + "\\n\\n", then the "# Tools" block listing each tool as JSON (`json.dumps(tool,
   ensure_ascii=False)`, as transformers' `tojson` filter writes it) and the tool-call format.
   Without tools, a first system message is rendered as it is; there is no default system prompt.
2. User turns, and system turns other than the first message: `<|im_start|>{role}\\n{content}<|im_end|>\\n`.
3. The current query is the last user message whose content is not wrapped as
   `<tool_response>...</tool_response>` (if there is none: the last message).
4. An assistant turn's reasoning is its `reasoning_content` field, or else is split out of its
   content around `</think>`. Turns after the current query render
   `<think>\\n{reasoning}\\n</think>\\n\\n{content}` when they have reasoning or are the last
   message (so a final answer without reasoning gets an empty think block); every other turn
   renders its content only: reasoning of turns before the current query is dropped.
5. Tool calls follow the content as `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`
   blocks separated by "\\n" (no "\\n" before the first one when the content is empty); string
   arguments are written as they are, other arguments as JSON. The `{"type": "function",
   "function": {...}}` form is unwrapped.
6. Consecutive `tool` messages become one user turn of `\\n<tool_response>\\n{content}\\n</tool_response>`.
7. The generation prompt is `<|im_start|>assistant\\n`, followed by an empty think block when
   `enable_thinking` is False. `/think` and `/no_think` are not read by the template.

Message fields are read as transformers hands them to a template: a field whose value is None is
absent, and the reasoning may also be given as `thinking` or `reasoning`. Where the released
template fails (a missing or None content) we render an empty string, as the later hub revision
of the template does; other non-string contents, unknown roles and tool calls without a string
name or without arguments raise a ValueError naming the message.
"""
from __future__ import annotations

import functools
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = [
    "CHAT_TEMPLATE",
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
    "wants_thinking",
]

CHAT_TEMPLATE: str = resources.files("qwen3repro").joinpath("chat_template.jinja").read_text(encoding="utf-8")

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

ROLES = ("system", "user", "assistant", "tool")
# Names under which transformers accepts a message's reasoning, in the order it reads them.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)
EMPTY_THINK = "<think>\n\n</think>\n\n"


def tojson(value: Any) -> str:
    """JSON as the chat template's `tojson` filter writes it in transformers (no HTML escaping)."""
    return json.dumps(value, ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _field(message: Mapping, key: str) -> Any:
    """A message field, None when absent (transformers drops None-valued fields)."""
    return message.get(key)


def _content(message: Mapping, index: int) -> str:
    content = _field(message, "content")
    if content is None:
        return ""
    if not isinstance(content, str):
        raise ValueError(f"message {index}: content must be a string, got {type(content).__name__}")
    return content


def _reasoning(message: Mapping, index: int) -> str | None:
    for key in REASONING_FIELDS:
        value = _field(message, key)
        if value is not None:
            if not isinstance(value, str):
                raise ValueError(f"message {index}: {key} must be a string, got {type(value).__name__}")
            return value
    return None


def _is_tool_response(text: str) -> bool:
    return text.startswith("<tool_response>") and text.endswith("</tool_response>")


def _last_query_index(messages: Sequence[Mapping]) -> int:
    """Index of the last user message that is not a wrapped tool response (else the last index)."""
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message["role"] == "user":
            text = message.get("content")
            text = text if isinstance(text, str) else ""
            if not _is_tool_response(text):
                return index
    return len(messages) - 1


def _split_reasoning(content: str) -> tuple[str, str]:
    """(reasoning, content) split out of a content string around `</think>`, as the template does."""
    if "</think>" not in content:
        return "", content
    parts = content.split("</think>")
    reasoning = parts[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, parts[-1].lstrip("\n")


def _tool_call_text(call: Any, index: int) -> str:
    if isinstance(call, Mapping) and call.get("function"):
        call = call["function"]
    if not isinstance(call, Mapping) or not isinstance(call.get("name"), str) or call.get("arguments") is None:
        raise ValueError(f"message {index}: a tool call needs a string 'name' and 'arguments', got {call!r}")
    arguments = call["arguments"]
    arguments = arguments if isinstance(arguments, str) else tojson(arguments)
    return '<tool_call>\n{"name": "' + call["name"] + '", "arguments": ' + arguments + "}\n</tool_call>"


def _check_messages(messages: Sequence[Mapping]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError("the chat needs at least one message")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {index} must be a dict, got {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise ValueError(f"message {index}: unknown role {message.get('role')!r} (expected one of {ROLES})")


def render_pieces(
    messages: Sequence[Mapping],
    tools: Sequence[Mapping] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
) -> list[tuple[str, bool]]:
    """The rendered chat as (text, produced_by_assistant) pieces; `render` joins the texts.

    Each assistant turn gives three pieces: its header `<|im_start|>assistant\\n` (False), its
    body through `<|im_end|>` (True) and the newline after it (False). Everything else is False.
    """
    _check_messages(messages)
    if not isinstance(enable_thinking, bool):
        raise ValueError(f"enable_thinking must be a bool, got {enable_thinking!r}")
    pieces: list[tuple[str, bool]] = []

    def prompt(text: str) -> None:
        pieces.append((text, False))

    # 1. The opening system turn.
    first = messages[0]
    if tools:
        if isinstance(tools, Mapping) or not all(isinstance(tool, Mapping) for tool in tools):
            raise ValueError("tools must be a list of JSON-schema dicts")
        header = "<|im_start|>system\n"
        if first["role"] == "system":
            header += _content(first, 0) + "\n\n"
        header += TOOLS_PREAMBLE
        for tool in tools:
            header += "\n" + tojson(tool)
        prompt(header + TOOLS_POSTAMBLE)
    elif first["role"] == "system":
        prompt("<|im_start|>system\n" + _content(first, 0) + "<|im_end|>\n")

    last_query = _last_query_index(messages)
    last = len(messages) - 1
    for index, message in enumerate(messages):
        role = message["role"]
        content = _content(message, index)
        if role == "system":
            if index > 0:
                prompt("<|im_start|>system\n" + content + "<|im_end|>\n")
        elif role == "user":
            prompt("<|im_start|>user\n" + content + "<|im_end|>\n")
        elif role == "assistant":
            reasoning = _reasoning(message, index)
            if reasoning is None:
                reasoning, content = _split_reasoning(content)
            if index > last_query and (index == last or reasoning):
                body = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
            else:
                body = content
            for call_index, call in enumerate(message.get("tool_calls") or []):
                if content or call_index > 0:
                    body += "\n"
                body += _tool_call_text(call, index)
            prompt("<|im_start|>assistant\n")
            pieces.append((body + "<|im_end|>", True))
            prompt("\n")
        else:  # tool: consecutive tool messages share one user turn
            text = ""
            if index == 0 or messages[index - 1]["role"] != "tool":
                text += "<|im_start|>user"
            text += "\n<tool_response>\n" + content + "\n</tool_response>"
            if index == last or messages[index + 1]["role"] != "tool":
                text += "<|im_end|>\n"
            prompt(text)

    if add_generation_prompt:
        prompt("<|im_start|>assistant\n" + ("" if enable_thinking else EMPTY_THINK))
    return pieces


def render(
    messages: Sequence[Mapping],
    tools: Sequence[Mapping] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
) -> str:
    """The chat as the Qwen3 chat template renders it (see the module docstring for the rules)."""
    return "".join(text for text, _ in render_pieces(messages, tools, add_generation_prompt, enable_thinking))


def export_jinja(path: str | Path) -> Path:
    """Write the jinja chat template to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CHAT_TEMPLATE, encoding="utf-8")
    return path


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=1)
def _compiled_template():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(CHAT_TEMPLATE)


def render_jinja(
    messages: Sequence[Mapping],
    tools: Sequence[Mapping] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
) -> str:
    """Render `CHAT_TEMPLATE` with jinja2 set up as transformers sets it up (no transformers needed).

    The messages are passed as they are: unlike `render` and transformers, None-valued fields are
    not dropped and reasoning is read from `reasoning_content` only.
    """
    return _compiled_template().render(
        messages=list(messages), tools=tools, add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
    )


# --------------------------------------------------------------------------------------------
# Parsing model output
# --------------------------------------------------------------------------------------------

END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")
ASSISTANT_HEADER = "<|im_start|>assistant\n"
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


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
    position = 0
    for match in _TOOL_CALL.finditer(content):
        segments.append(content[position: match.start()])
        position = match.end()
        call, error = _parse_tool_call(match.group(1))
        if call is not None:
            tool_calls.append(call)
        else:
            errors.append({"error": f"tool call: {error}", "text": match.group(0)})
    rest = content[position:]
    if "<tool_call>" in rest:
        start = rest.index("<tool_call>")
        errors.append({"error": "tool call: <tool_call> is never closed", "text": rest[start:]})
        segments.append(rest[:start])  # the text before it, like any text before a block
        rest = ""
    segments.append(rest)
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
    from qwen3repro.tokenizer import Tokenizer

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
