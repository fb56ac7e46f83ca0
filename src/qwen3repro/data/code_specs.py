"""Tiny code-writing specifications with test asserts, for the "code" reward of general RL.

Each specification is a one-line request for a Python function with a few drawn constants ("Write a
Python function `affine(x)` that returns 3 * x + 2."), the asserts that check it (run in the code
reward's sandbox), and a reference solution. The solution is rebuilt from the request's wording
(`solve`), so a stored query can be demonstrated without keeping the solution beside it.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

__all__ = ["CodeSpec", "CODE_SPECS", "draw_spec", "solve"]


@dataclass(frozen=True)
class CodeSpec:
    """A kind of request: `make(rng)` gives (request, tests); `pattern` reads the constants back from the
    request and `solution(match)` writes the reference function."""

    name: str
    make: Callable[[random.Random], tuple[str, str]]
    pattern: re.Pattern
    solution: Callable[[re.Match], str]


def _asserts(call: str, cases: list[tuple[str, object]]) -> str:
    return "\n".join(f"assert {call}({args}) == {expected!r}" for args, expected in cases) + "\n"


def _affine(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 9), rng.randint(1, 20)
    xs = rng.sample(range(-10, 30), 4)
    return (f"Write a Python function `affine(x)` that returns {a} * x + {b}.",
            _asserts("affine", [(str(x), a * x + b) for x in xs]))


def _count_letter(rng: random.Random) -> tuple[str, str]:
    letter = rng.choice("aeiorstn")
    words = ["", letter, "banana", "street", "tomato", "raisin", "notation", letter * 3 + "x" + letter]
    cases = [(repr(w), w.count(letter)) for w in rng.sample(words, 4)]
    return (f"Write a Python function `count_letter(text)` that returns how many times the letter '{letter}' "
            f"occurs in text.", _asserts("count_letter", cases))


def _clamp(rng: random.Random) -> tuple[str, str]:
    lo = rng.randint(-5, 5)
    hi = lo + rng.randint(3, 20)
    xs = [lo - rng.randint(1, 9), lo, rng.randint(lo, hi), hi, hi + rng.randint(1, 9)]
    return (f"Write a Python function `clamp(x)` that returns x limited to the range from {lo} to {hi}.",
            _asserts("clamp", [(str(x), max(lo, min(hi, x))) for x in xs]))


def _sum_above(rng: random.Random) -> tuple[str, str]:
    k = rng.randint(0, 9)
    lists = [[], [k], [k + 1, k - 1, k + 5], [rng.randint(-5, 15) for _ in range(6)]]
    return (f"Write a Python function `sum_above(values)` that returns the sum of the numbers in values that "
            f"are greater than {k}.", _asserts("sum_above", [(repr(v), sum(x for x in v if x > k)) for v in lists]))


CODE_SPECS: tuple[CodeSpec, ...] = (
    CodeSpec("affine", _affine, re.compile(r"returns (\d+) \* x \+ (\d+)\."),
             lambda m: f"def affine(x):\n    return {m[1]} * x + {m[2]}\n"),
    CodeSpec("count_letter", _count_letter, re.compile(r"the letter '(\w)' occurs"),
             lambda m: f"def count_letter(text):\n    return text.count({m[1]!r})\n"),
    CodeSpec("clamp", _clamp, re.compile(r"the range from (-?\d+) to (-?\d+)\."),
             lambda m: f"def clamp(x):\n    return max({m[1]}, min({m[2]}, x))\n"),
    CodeSpec("sum_above", _sum_above, re.compile(r"greater than (\d+)\."),
             lambda m: f"def sum_above(values):\n    return sum(v for v in values if v > {m[1]})\n"),
)


def draw_spec(rng: random.Random) -> tuple[str, str]:
    """A random request and its test asserts."""
    return rng.choice(CODE_SPECS).make(rng)


def solve(request: str) -> str:
    """The reference solution of a request made by one of `CODE_SPECS`; ValueError for any other text."""
    for spec in CODE_SPECS:
        m = spec.pattern.search(request)
        if m and f"`{spec.name}(" in request:
            return spec.solution(m)
    raise ValueError(f"not a code request of this module: {request[:80]!r}")
