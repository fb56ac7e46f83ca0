"""The tool environment: named outcomes for every bad call, the bounded calculator, lookup and
search over the synthetic world, schemas as the chat template lists them, and result truncation."""
from __future__ import annotations

import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen3repro.chat import parse, render
from qwen3repro.data.world import PERSON_ATTRIBUTES, build_world
from qwen3repro.data.english import fact_sentence
from qwen3repro.tokenizer import train_tokenizer
from qwen3repro.tools import (
    TOOL_OUTCOMES,
    TRUNCATION_MARKER,
    Bm25Index,
    Tool,
    ToolEnvironment,
    ToolLimits,
    ToolResult,
    default_tools,

    evaluate,
    truncate_tool_response,
    world_corpus,
)
from qwen3repro.tools.calculator import MAX_EXPRESSION_CHARS, MAX_MAGNITUDE


@pytest.fixture(scope="module")
def world():
    return build_world(0)


@pytest.fixture(scope="module")
def env(world):
    return ToolEnvironment(default_tools(world))


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(1, 7))) for _ in range(300)]
    words += ["(truncated)", "...", "Error", "\n"]
    return train_tokenizer([" ".join(rng.choice(words) for _ in range(40)) for _ in range(200)], 450)


def call(tool, **arguments):
    return {"name": tool, "arguments": arguments}


# ------------------------------------------------------------------------------------ schemas


def test_schemas_are_what_the_template_lists(env):
    assert env.names == ("calculator", "lookup", "search")
    schemas = env.schemas()
    assert [s["function"]["name"] for s in schemas] == ["calculator", "lookup", "search"]
    assert all(s["type"] == "function" and s["function"]["parameters"]["type"] == "object" for s in schemas)
    text = render([{"role": "user", "content": "hi"}], tools=schemas, add_generation_prompt=True)
    for schema in schemas:
        assert json.dumps(schema, ensure_ascii=False) in text
    assert env.schemas(["search"]) == [schemas[2]]
    with pytest.raises(ValueError, match="unknown tool"):
        env.schemas(["nope"])


def test_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="max_calls"):
        ToolLimits(max_calls=0)
    with pytest.raises(ValueError, match="max_turns"):
        ToolLimits(max_turns=1.5)
    with pytest.raises(ValueError, match="max_response_tokens"):
        ToolLimits(max_response_tokens=True)
    with pytest.raises(ValueError, match="unique"):
        ToolEnvironment(default_tools() + default_tools()[:1])
    with pytest.raises(ValueError, match="outcome"):
        ToolResult("x", "fine")


# ------------------------------------------------------------------------- bad calls, named


def _raising(**_):
    raise RuntimeError("boom")


class _BadStr:
    def __str__(self):
        raise ValueError("no text")


EXTRA = [
    Tool("raiser", "raises", {"type": "object", "properties": {}}, _raising),
    Tool("number", "returns an int", {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
         lambda n: n * 2),
    Tool("unprintable", "returns an object whose str fails", {"type": "object", "properties": {}}, lambda: _BadStr()),
]


@pytest.mark.parametrize("bad, outcome, says", [
    ("not a dict", "invalid_call", "invalid tool call"),
    ({"arguments": {}}, "invalid_call", "invalid tool call"),
    ({"name": 3, "arguments": {}}, "invalid_call", "invalid tool call"),
    ({"name": "calculator"}, "invalid_call", "invalid tool call"),
    (call("rm_rf"), "unknown_tool", "unknown tool 'rm_rf'"),
    ({"name": "x" * 5000, "arguments": {}}, "unknown_tool", "..."),
    ({"name": "calculator", "arguments": "1+1"}, "bad_arguments", "must be a JSON object"),
    ({"name": "calculator", "arguments": ["1+1"]}, "bad_arguments", "must be a JSON object"),
    (call("calculator"), "bad_arguments", "missing required argument(s) 'expression'"),
    (call("lookup", name="Renren"), "bad_arguments", "'attribute'"),
    (call("calculator", expression="1", extra=2), "bad_arguments", "unknown argument(s) 'extra'"),
    (call("calculator", expression=12), "bad_arguments", "type string"),
    (call("number", n=True), "bad_arguments", "type integer"),
    (call("number", n=2.5), "bad_arguments", "type integer"),
    (call("raiser"), "tool_error", "RuntimeError: boom"),
    (call("unprintable"), "tool_error", "ValueError: no text"),
    (call("lookup", name="Nobody", attribute="job"), "tool_error", "unknown person 'Nobody'"),
    (call("lookup", name="Renren", attribute="shoe size"), "tool_error", "unknown attribute 'shoe size'"),
])
def test_every_bad_call_is_a_named_outcome(world, bad, outcome, says):
    env = ToolEnvironment(default_tools(world) + EXTRA)
    result = env.execute(bad)
    assert result.outcome == outcome
    assert says in result.content
    assert len(result.content) < 300  # the model's input is not echoed back at length


def test_non_string_results_are_stringified(env):
    env = ToolEnvironment(EXTRA)
    assert env.execute(call("number", n=21)) == ToolResult("42", "ok")


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=10),
       st.sampled_from(["calculator", "lookup", "search", "other", ""]))
def test_execute_never_raises(arguments, name):
    env = ToolEnvironment(default_tools(build_world(0)))
    result = env.execute({"name": name, "arguments": arguments})
    assert result.outcome in TOOL_OUTCOMES and isinstance(result.content, str)


# ---------------------------------------------------------------------------------- calculator


@pytest.mark.parametrize("expression, value", [
    ("1 + 2 * 3", "7"), ("(1 + 2) * 3", "9"), ("7 / 2", "3.5"), ("7 // 2", "3"), ("-7 % 3", "2"),
    ("2 ** 10", "1024"), ("0.1 + 0.2", "0.3"), ("-(3 - 5)", "2"), ("+4", "4"), ("2 ** -1", "0.5"),
    (" 6*7 ", "42"), ("2**332", str(2**332)), ("1.5e3 / 3", "500"),
])
def test_calculator_computes(env, expression, value):
    assert env.execute(call("calculator", expression=expression)) == ToolResult(value, "ok")


@pytest.mark.parametrize("attack, says", [
    ("9**9**9", "too large"),
    ("2**333", "too large"),
    ("(10**50)**3", "too large"),
    ("*".join(str(n) for n in range(99, 40, -1)), "too large"),  # a factorial-like chain
    ("9" * 101, "too large"),
    ("2.0 ** 100000", "too large"),
    ("1e308 * 1e308", "too large"),
    ("1 / 0", "division by zero"),
    ("5 // 0", "division by zero"),
    ("5 % 0.0", "division by zero"),
    ("0 ** -1", "division by zero"),
    ("(-8) ** 0.5", "not a real number"),
    ("__import__('os')", "unsupported syntax: Call"),
    ("__import__('os').system('true')", "unsupported syntax"),
    ("(1).__class__", "unsupported syntax: Attribute"),
    ("x + 1", "unsupported syntax: Name"),
    ("[1, 2][0]", "unsupported syntax"),
    ("lambda: 1", "unsupported syntax: Lambda"),
    ("'a' * 10", "only numbers"),
    ("True + 1", "only numbers"),
    ("1j", "only numbers"),
    ("1 < 2", "unsupported syntax: Compare"),
    ("1 if 1 else 2", "unsupported syntax"),
    ("import os", "not an arithmetic expression"),
    ("1 +", "not an arithmetic expression"),
    ("1\x00", "not an arithmetic expression"),
    ("(" * 99 + "1" + ")" * 99, None),  # the deepest nesting the length cap allows: legal and instant
    ("-" * 150 + "1", None),
    ("1+" * 120 + "1", "longer than"),
])
def test_calculator_attacks_are_tool_errors(env, attack, says):
    result = env.execute(call("calculator", expression=attack))
    if says is None:
        assert result == ToolResult("1", "ok")
        return
    assert result.outcome == "tool_error", result
    assert says in result.content


@given(st.lists(st.sampled_from(list("0123456789+-*/%().e ") + ["**", "//"]), max_size=60).map("".join))
def test_calculator_never_escapes(expression):
    env = ToolEnvironment(default_tools(build_world(0))[:1])
    result = env.execute(call("calculator", expression=expression))
    assert result.outcome in ("ok", "tool_error")
    if result.outcome == "ok":
        assert abs(float(result.content)) <= MAX_MAGNITUDE


def test_calculator_limits():
    assert MAX_EXPRESSION_CHARS == 200 and MAX_MAGNITUDE == 10**100
    assert evaluate(str(10**100)) == str(10**100)


# ----------------------------------------------------------------------------- lookup, search


def test_lookup_states_each_fact_in_english(env, world):
    person = world.people[7]
    expected = {
        "home": f"{person.name} lives in {person.attr('home')}.",
        "job": f"{person.name} works as a {person.attr('job')}.",
        "pet": f"{person.name} has a {person.attr('pet')}.",
        "color": f"{person.name} likes the color {person.attr('color')}.",
        "age": f"{person.name} is {person.attr('age')} years old.",
    }
    for attribute in PERSON_ATTRIBUTES:
        assert env.execute(call("lookup", name=person.name, attribute=attribute)) == ToolResult(expected[attribute], "ok")
    # Case and surrounding spaces do not matter.
    assert env.execute(call("lookup", name=f" {person.name.upper()} ", attribute="HOME")).content == expected["home"]


def test_world_corpus(world):
    corpus = world_corpus(world)
    assert len(corpus) == len(world.people) + len(world.cities)
    for index in (0, 3, len(world.people) - 1):
        person = world.people[index]
        assert corpus[index] == " ".join(fact_sentence(person, a) for a in PERSON_ATTRIBUTES)
    assert f"{world.people[3].name} is {world.people[3].attr('age')} years old." in corpus[3]
    city_passages = corpus[len(world.people):]
    for city, passage in zip(world.cities, city_passages):
        residents = [p.name for p in world.people if p.attr("home") == city.name]
        assert passage.startswith(f"{city.name} is a city.")
        assert all(name in passage for name in residents)


def test_search_finds_the_person_and_their_city(env, world):
    person = world.people[11]
    result = env.execute(call("search", query=f"what {person.name} works as"))
    assert result.outcome == "ok"
    passages = result.content.split("\n")
    assert len(passages) == 3
    assert passages[0].startswith(f"{person.name} lives in")
    city = person.attr("home")
    top = env.execute(call("search", query=f"who lives in {city}")).content.split("\n")
    assert any(p.startswith(f"{city} is a city.") for p in top)
    assert env.execute(call("search", query="qqq zzz")) == ToolResult("No passage matches the query.", "ok")
    assert env.execute(call("search", query="")).outcome == "ok"


def test_bm25_ranks_by_rarity_and_frequency():
    index = Bm25Index(["apple apple banana", "banana cherry", "cherry durian", "apple"])
    # "durian" occurs once in the corpus, so it outweighs the common "banana".
    assert index.search("banana durian", 2)[0] == 2
    # Two occurrences beat one in a passage of the same length (saturating, but still higher).
    scores = index.scores("apple")
    assert set(scores) == {0, 3}
    assert index.search("nothing here") == []
    assert all(score > 0 for score in index.scores("banana cherry apple").values())


# ------------------------------------------------------------------------------- truncation


@given(st.integers(0, 300), st.integers(1, 40), st.integers(0, 10**6))
def test_truncation_keeps_the_ends_and_the_cap(tok, n_words, max_tokens, seed):
    rng = random.Random(seed)
    content = " ".join("".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(1, 6))) for _ in range(n_words))
    out = truncate_tool_response(tok, content, max_tokens)
    ids = tok.encode(content)
    marker = len(tok.encode(TRUNCATION_MARKER))
    if len(ids) <= max_tokens:
        assert out == content
        return
    assert TRUNCATION_MARKER in out
    assert len(tok.encode(out)) <= max(max_tokens, marker)
    head, _, tail = out.partition(TRUNCATION_MARKER)
    assert content.startswith(head) and content.endswith(tail)
    if max_tokens >= marker + 4:  # room for both ends: some of each is kept
        assert head and tail
