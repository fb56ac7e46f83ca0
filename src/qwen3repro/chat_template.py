"""The Qwen3 chat template: `render` in plain Python and `CHAT_TEMPLATE` in jinja, the same rules.

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
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "CHAT_TEMPLATE",
    "EMPTY_THINK",
    "export_jinja",
    "render",
    "render_jinja",
    "render_pieces",
    "tojson",
    "tools_system_content",
]

CHAT_TEMPLATE: str = resources.files("qwen3repro").joinpath("chat_template.jinja").read_text(encoding="utf-8")

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


def tools_system_content(tools: Sequence[Mapping], system: str | None = None) -> str:
    """The content of the system turn the template opens a chat with when it offers `tools` (after a first
    system message's own content, when there is one). A chat whose first message is a system message with
    this content renders exactly as the same chat rendered with `tools`, which lets chat data that only
    holds messages (SFT records) carry a tool-use conversation."""
    text = (system + "\n\n" if system is not None else "") + TOOLS_PREAMBLE
    text += "".join("\n" + tojson(tool) for tool in tools)
    return text + TOOLS_POSTAMBLE.removesuffix("<|im_end|>\n")


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
        system = _content(first, 0) if first["role"] == "system" else None
        prompt("<|im_start|>system\n" + tools_system_content(tools, system) + "<|im_end|>\n")
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
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=1)
def _compiled_template():
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
