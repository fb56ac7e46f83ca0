"""A bounded arithmetic evaluator for the `calculator` tool: `ast` walking, never eval/exec.

The model writes the expression, so nothing in it may run code or exhaust the machine: only number
literals, parentheses, unary +/- and the binary operators + - * / // % ** are accepted (names,
calls, attributes, subscripts, strings, comparisons are refused); the expression's length is
capped; every literal and every intermediate result must stay within `MAX_MAGNITUDE`, and a power
whose result would exceed it is refused *before* it is computed (`9**9**9` would otherwise take
minutes and gigabytes). Failures raise `ToolError` with a message for the model.
"""
from __future__ import annotations

import ast
import math
import operator

from .environment import ToolError

__all__ = ["MAX_EXPRESSION_CHARS", "MAX_MAGNITUDE", "evaluate", "format_number"]

# Long enough for any arithmetic a task asks for, short enough that parsing is instant and nesting
# cannot reach the parser's recursion limit.
MAX_EXPRESSION_CHARS = 200
# Results beyond 10^100 are refused: integers that large are a few dozen machine words, so every
# operation on values within the bound is instant, and floats reach 1.8e308 before overflowing.
MAX_MAGNITUDE = 10**100
_MAX_DIGITS = 100

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _checked(value: int | float) -> int | float:
    if isinstance(value, complex):
        raise ToolError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("the result is too large")
    if abs(value) > MAX_MAGNITUDE:
        raise ToolError("the result is too large (more than 100 digits)")
    return value


def _power(base: int | float, exponent: int | float) -> int | float:
    # Refuse before computing: log10|base| * exponent bounds the number of digits of the result.
    if exponent > 0 and abs(base) > 1 and exponent * math.log10(abs(base)) > _MAX_DIGITS:
        raise ToolError("the result is too large (more than 100 digits)")
    return base**exponent


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ToolError(f"only numbers are allowed, got {type(node.value).__name__} {node.value!r:.20}")
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _checked(_power(left, right))
        return _checked(_BINARY[type(node.op)](left, right))
    raise ToolError(f"unsupported syntax: {type(node).__name__} (use numbers, + - * / // % ** and parentheses)")


def format_number(value: int | float) -> str:
    """An int as it is; a float with 12 significant digits (0.1 + 0.2 reads 0.3, 7 / 2 reads 3.5)."""
    if isinstance(value, int):
        return str(value)
    text = f"{value:.12g}"
    return "0" if text == "-0" else text


def evaluate(expression: str) -> str:
    """The value of an arithmetic expression as text; raises `ToolError` for anything else."""
    if not isinstance(expression, str):
        raise ToolError(f"the expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        raise ToolError(f"not an arithmetic expression: {type(exc).__name__}") from None
    try:
        return format_number(_eval(tree))
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except (OverflowError, RecursionError):
        raise ToolError("the result is too large") from None
