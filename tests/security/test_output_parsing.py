"""Reading model output takes one pass, whatever the output holds.

`chat.parse` (and `answer_text`, which every answer-checking reward calls) and `extract_code` scan
the text left to right with `str.find`. The regexes they replace define the expected outputs: on
short random mixtures of tags, fences and text the scans must return exactly what those regexes
give. On 1 MB adversarial outputs (thousands of unclosed or nested openers, long runs of blanks)
the tests check the results, which a quadratic scan takes minutes to produce; the time itself is
measured by tests/bench/test_bench_parse.py.
"""
from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3repro.chat import _parse_tool_call, parse
from qwen3repro.rewards import answer_text
from qwen3repro.rewards.code import extract_code

MEGABYTE = 2**20


def repeat(unit: str, size: int = MEGABYTE) -> str:
    return unit * (size // len(unit))


# ---------------------------------------------------------------------- reference implementations
_REFERENCE_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def reference_parse(text: str) -> dict:
    """`chat.parse` written with a lazy regex: the expected output, quadratic on unclosed tags."""
    cuts = [text.find(token) for token in ("<|im_end|>", "<|endoftext|>") if token in text]
    if cuts:
        text = text[: min(cuts)]
    if text.startswith("<|im_start|>assistant\n"):
        text = text[len("<|im_start|>assistant\n"):]
    if "</think>" in text:
        parts = text.split("</think>")
        reasoning = parts[0].split("<think>")[-1].strip("\n")
        content = parts[-1].lstrip("\n")
    elif "<think>" in text:
        reasoning = text.split("<think>")[-1].strip("\n")
        content = ""
    else:
        reasoning, content = "", text
    tool_calls, errors, segments = [], [], []
    position = 0
    for match in _REFERENCE_TOOL_CALL.finditer(content):
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
        segments.append(rest[:start])
        rest = ""
    segments.append(rest)
    if len(segments) > 1:
        first = segments[0][:-1] if segments[0].endswith("\n") else segments[0]
        middle = [s[1:] if s.startswith("\n") else s for s in segments[1:-1]]
        content = first + "".join(middle) + segments[-1]
    return {"reasoning_content": reasoning, "content": content, "tool_calls": tool_calls, "errors": errors}


_REFERENCE_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def reference_extract_code(text: str) -> str:
    """`extract_code` written with a backtracking regex: the expected output."""
    blocks = _REFERENCE_FENCE.findall(text)
    return (blocks[-1] if blocks else text).strip("\n")


# --------------------------------------------------------------------------- equal on small inputs
# Whole tags, tags cut short or glued to one another, and the text around them.
TAG_PIECES = ["<tool_call>", "</tool_call>", "<tool_call", "/tool_call>", "<", ">", "<think>", "</think>",
              "\n", "<|im_end|>", "<|im_start|>assistant\n", '{"name": "f", "arguments": {"x": 1}}',
              '{"name": 1}', "[", "]"]
tagged_texts = st.lists(st.one_of(st.sampled_from(TAG_PIECES), st.text(max_size=4)), max_size=16).map("".join)

FENCE_PIECES = ["```", "``", "`", "```python", "```py", "```PYTHON3", "```Py3", "python", "py", "3", " ", "\t",
                "\n", "x = 1"]
fenced_texts = st.lists(st.one_of(st.sampled_from(FENCE_PIECES), st.text(max_size=3)), max_size=16).map("".join)


@settings(max_examples=500)
@given(tagged_texts)
def test_parse_equals_the_regex_reference(text):
    assert parse(text) == reference_parse(text)


@settings(max_examples=500)
@given(fenced_texts)
def test_extract_code_equals_the_regex_reference(text):
    assert extract_code(text) == reference_extract_code(text)


def test_extract_code_cases():
    assert extract_code("Use this:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1"
    assert extract_code("```py\na = 1\n```\n```Python3 \t\nb = 2\n```") == "b = 2"
    assert extract_code("````\nx\n```") == "x"  # the fence opens at the second backtick
    assert extract_code("```js\nx\n```") == "```js\nx\n```"  # another language: no block
    assert extract_code("\nplain code\n") == "plain code"


# ------------------------------------------------------------------------ 1 MB adversarial outputs
def test_parse_of_a_megabyte_of_unclosed_tool_calls():
    text = repeat("<tool_call>")
    out = parse(text)
    assert out["content"] == "" and out["tool_calls"] == []
    assert out["errors"] == [{"error": "tool call: <tool_call> is never closed", "text": text}]


def test_parse_of_a_megabyte_of_nested_tool_calls():
    # Every block opens at the first of its 1,000 opening tags and closes at the first closing tag.
    block = "<tool_call>" * 1000 + '{"name": "f", "arguments": {}}' + "</tool_call>" + "\n"
    text = "<think>\nr\n</think>\n\n" + repeat(block)
    out = parse(text)
    blocks = len(text) // len(block)
    assert out["reasoning_content"] == "r" and out["tool_calls"] == []
    assert len(out["errors"]) == blocks and all("invalid JSON" in e["error"] for e in out["errors"])
    assert out["content"] == "\n"  # the separators between blocks go, the newline after the last stays


def test_parse_of_a_megabyte_of_think_tags_and_unclosed_calls():
    calls = repeat("x<tool_call>", MEGABYTE // 2)
    out = parse(repeat("<think>", MEGABYTE // 2) + "r</think>" + calls)
    assert out["reasoning_content"] == "r" and out["content"] == "x"
    assert out["errors"] == [{"error": "tool call: <tool_call> is never closed", "text": calls[1:]}]


def test_answer_text_of_a_megabyte_of_unclosed_openers():
    assert answer_text("<think>\nr\n</think>\n\n42" + repeat("<tool_call>{")) == "42"
    assert answer_text(repeat("<think>") + "x") == ""  # still thinking: no answer


def test_extract_code_of_a_megabyte_of_adversarial_fences():
    blanks = "```" + " " * MEGABYTE  # a fence, then blanks that never reach a newline
    assert extract_code(blanks) == blanks
    spaced = repeat("```" + " " * 1000 + "py" + "\t" * 1000 + "x")
    assert extract_code(spaced) == spaced
    unclosed = "```python\n" + repeat("print(1)\n``")  # two backticks never close a block
    assert extract_code(unclosed) == unclosed.strip("\n")
    many = repeat("```py\nx = 1\n```\n")
    assert extract_code(many) == "x = 1"
