"""Reading adversarial model output: `chat.parse`, `answer_text` and `extract_code` at 10 KB, 100 KB
and 1 MB.

Each input is built to make a backtracking or lazy regex rescan the text: thousands of opening tags
that are never closed, tags nested a thousand deep, a code fence followed by blanks that never reach
a newline, and fences whose closing one never comes. Every scan reads the text once, so the time
grows linearly with the size (tests/security/test_output_parsing.py checks the results on 1 MB).

Run with `make bench`.
"""
from __future__ import annotations

import pytest

from qwen3repro.chat import parse
from qwen3repro.rewards import answer_text
from qwen3repro.rewards.code import extract_code

pytestmark = pytest.mark.bench

SIZES = {"10KB": 10**4, "100KB": 10**5, "1MB": 10**6}


def repeat(unit: str, size: int) -> str:
    return unit * max(1, size // len(unit))


CASES = {
    "parse, unclosed <tool_call>": (parse, lambda n: repeat("<tool_call>", n)),
    "parse, nested <tool_call>": (parse, lambda n: repeat("<tool_call>" * 1000 + "{}</tool_call>\n", n)),
    "parse, unclosed <think> and <tool_call>": (
        parse, lambda n: repeat("<think>", n // 2) + "r</think>" + repeat("x<tool_call>", n // 2)),
    "answer_text, unclosed <tool_call> after the answer": (
        answer_text, lambda n: "<think>\nr\n</think>\n\n42" + repeat("<tool_call>{", n)),
    "extract_code, a fence then blanks": (extract_code, lambda n: "```" + " " * n),
    "extract_code, fences with long blank runs": (
        extract_code, lambda n: repeat("```" + " " * 1000 + "py" + "\t" * 1000 + "x", n)),
    "extract_code, an unclosed fence": (extract_code, lambda n: "```python\n" + repeat("print(1)\n``", n)),
}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", CASES)
def test_bench_parse_adversarial(benchmark, case, size):
    function, build = CASES[case]
    text = build(SIZES[size])
    benchmark.group = case
    benchmark(function, text)
