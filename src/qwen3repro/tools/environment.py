"""The tool environment: tools the model may call, the limits of one trajectory, and `execute`.

Qwen3's general RL trains agent ability with "multi-turn rollouts with real environment feedback"
(Qwen3 report §4.4). The environment is what answers the calls: a model's call is a dict
`{"name": str, "arguments": ...}` as `chat.parse` returns it, and `ToolEnvironment.execute` turns
it into a `ToolResult` — the text the model reads back and a named outcome. Nothing the model writes
makes `execute` raise: every failure is one of `TOOL_OUTCOMES`, so a rollout never dies on a bad
call and a reward can count good and bad calls.

A tool signals a failure of its own (an unknown person, a division by zero) by raising; the
environment answers "Error: <message>" with outcome "tool_error". `ToolError` is the exception for
failures whose message is meant for the model; any other exception's type name is shown as well.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "TOOL_OUTCOMES",
    "Tool",
    "ToolEnvironment",
    "ToolError",
    "ToolLimits",
    "ToolResult",
    "call_cap_result",
    "invalid_call_result",
]

# "ok": the tool ran and answered; "invalid_call": the <tool_call> block is not a JSON object with a
# string name and arguments; "unknown_tool": no tool of that name; "bad_arguments": the arguments
# are not an object, miss a required key, carry an unknown key or a value of the wrong JSON type;
# "tool_error": the tool raised; "call_cap": the trajectory's call budget was spent, the call did not run.
TOOL_OUTCOMES = ("ok", "invalid_call", "unknown_tool", "bad_arguments", "tool_error", "call_cap")

# JSON-schema type name -> the Python types `json.loads` gives for it. bool is an int subclass in
# Python, so it is excluded from "integer" and "number" explicitly in `_type_ok`.
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


class ToolError(Exception):
    """A tool's failure whose message is written for the model (shown as "Error: <message>")."""


@dataclass(frozen=True)
class Tool:
    """A function the model may call: `fn(**arguments) -> str`, described by a JSON schema.

    `parameters` is the JSON schema of the arguments object (`{"type": "object", "properties":
    {...}, "required": [...]}`); the environment checks required keys, unknown keys and each
    property's "type" before calling `fn`.
    """

    name: str
    description: str
    parameters: Mapping[str, Any]
    fn: Callable[..., str]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Tool.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.parameters, Mapping) or self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON schema of type 'object'")
        if not callable(self.fn):
            raise ValueError(f"tool {self.name!r}: fn must be callable")

    @property
    def schema(self) -> dict:
        """The tool as `chat.render(messages, tools=[...])` lists it (Qwen3's function format)."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)},
        }


@dataclass(frozen=True)
class ToolLimits:
    """Caps of one trajectory: assistant turns, tool calls, and tokens of one tool result (a longer
    result is cut in the middle with a marker; see `rollout.truncate_tool_response`)."""

    max_turns: int = 3
    max_calls: int = 4
    max_response_tokens: int = 64

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_calls", "max_response_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ToolLimits.{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class ToolResult:
    """What the model reads back for one call, and how the call went (one of `TOOL_OUTCOMES`)."""

    content: str
    outcome: str

    def __post_init__(self) -> None:
        if self.outcome not in TOOL_OUTCOMES:
            raise ValueError(f"ToolResult.outcome must be one of {TOOL_OUTCOMES}, got {self.outcome!r}")


def invalid_call_result(error: str) -> ToolResult:
    """The answer to a `<tool_call>` block that is not a valid call (`chat.parse`'s error text)."""
    return ToolResult(
        f"Error: invalid tool call ({error}). Write a JSON object: "
        '{"name": <function-name>, "arguments": <args-json-object>}.',
        "invalid_call",
    )


def call_cap_result(max_calls: int) -> ToolResult:
    """The answer to a call made after the trajectory's `max_calls` calls were spent."""
    return ToolResult(f"Error: the limit of {max_calls} tool calls is reached; this call was not run.", "call_cap")


def _type_ok(value: Any, json_type: Any) -> bool:
    types = json_type if isinstance(json_type, list) else [json_type]
    for name in types:
        python_types = _JSON_TYPES.get(name)
        if python_types is None:  # a type this check does not know: accept rather than refuse a good call
            return True
        if isinstance(value, bool) and name in ("integer", "number"):
            continue
        if name == "number" and isinstance(value, float) and not math.isfinite(value):
            continue
        if isinstance(value, python_types):
            return True
    return False


def _argument_problem(tool: Tool, arguments: Any) -> str | None:
    """Why `arguments` do not fit `tool`'s schema, or None when they do."""
    if not isinstance(arguments, dict):
        return f"arguments must be a JSON object, got {type(arguments).__name__}"
    properties = tool.parameters.get("properties") or {}
    missing = [key for key in tool.parameters.get("required") or () if key not in arguments]
    if missing:
        return f"missing required argument(s) {', '.join(map(repr, missing))}"
    unknown = [key for key in arguments if key not in properties]
    if unknown:
        return f"unknown argument(s) {', '.join(map(repr, unknown[:5]))}; expected {', '.join(properties)}"
    for key, value in arguments.items():
        json_type = properties[key].get("type") if isinstance(properties[key], Mapping) else None
        if json_type is not None and not _type_ok(value, json_type):
            return f"argument {key!r} must be of type {json_type}, got {type(value).__name__}"
    return None


def _describe(exc: BaseException) -> str:
    try:
        message = str(exc)
    except Exception:  # an exception whose __str__ fails still becomes a tool error
        message = ""
    if isinstance(exc, ToolError):
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class ToolEnvironment:
    """Runs the model's tool calls against `tools` under `limits` (see the module docstring)."""

    def __init__(self, tools: Sequence[Tool], limits: ToolLimits = ToolLimits()) -> None:
        tools = list(tools)
        if not all(isinstance(tool, Tool) for tool in tools):
            raise ValueError("ToolEnvironment takes a sequence of Tool objects")
        self._tools = {tool.name: tool for tool in tools}
        if len(self._tools) != len(tools):
            raise ValueError(f"tool names must be unique, got {[tool.name for tool in tools]}")
        if not isinstance(limits, ToolLimits):
            raise ValueError(f"limits must be a ToolLimits, got {type(limits).__name__}")
        self.limits = limits

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tools)

    def tool(self, name: str) -> Tool:
        return self._tools[name]

    def schemas(self, names: Sequence[str] | None = None) -> list[dict]:
        """The tools' schemas for `chat.render(..., tools=...)`: all of them, or those in `names`."""
        if names is None:
            return [tool.schema for tool in self._tools.values()]
        unknown = [name for name in names if name not in self._tools]
        if unknown:
            raise ValueError(f"unknown tool name(s) {unknown}; known: {list(self._tools)}")
        return [self._tools[name].schema for name in names]

    def execute(self, call: Any) -> ToolResult:
        """Run one call `{"name": str, "arguments": dict}`; never raises (see `TOOL_OUTCOMES`)."""
        if not isinstance(call, Mapping) or not isinstance(call.get("name"), str) or "arguments" not in call:
            return invalid_call_result("expected an object with a string 'name' and 'arguments'")
        tool = self._tools.get(call["name"])
        if tool is None:
            shown = call["name"] if len(call["name"]) <= 40 else call["name"][:40] + "..."
            return ToolResult(f"Error: unknown tool {shown!r}; available: {', '.join(self._tools)}.", "unknown_tool")
        problem = _argument_problem(tool, call["arguments"])
        if problem is not None:
            return ToolResult(f"Error: {tool.name}: {problem}.", "bad_arguments")
        try:
            value = tool.fn(**call["arguments"])
            content = value if isinstance(value, str) else str(value)
        except Exception as exc:  # a tool's failure is the model's feedback, never the rollout's crash
            return ToolResult(f"Error: {_describe(exc)}", "tool_error")
        return ToolResult(content, "ok")
