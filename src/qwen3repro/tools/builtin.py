"""The built-in tools: `calculator`, `lookup` and `search` over the synthetic world, in English.

The world (`data.world`) gives every person a home city, job, pet, favourite colour and age; the
tools state those facts in English (the world's own languages are for the pre-training corpus), so
a task can ask about a person and a model can look the answer up instead of recalling it:

* `lookup(name, attribute)` answers one fact as a sentence ("Tamor lives in Belka.");
* `search(query)` returns the 3 best passages by BM25 over `world_corpus(world)`: one passage per
  person with all their facts, one per city listing who lives there;
* `calculator(expression)` evaluates arithmetic (`calculator.evaluate`).

Tool names are fixed ("calculator", "lookup", "search"): tasks and rewards refer to them.
"""
from __future__ import annotations

from ..data.english import fact_sentence
from ..data.world import PERSON_ATTRIBUTES, Entity, World, build_world
from .calculator import evaluate
from .environment import Tool, ToolError
from .retrieval import Bm25Index

__all__ = [
    "SEARCH_TOP_K",
    "calculator_tool",
    "default_tools",
    "lookup_tool",
    "search_tool",
    "world_corpus",
]

# Passages `search` returns: enough to hold the answer when the query names a person and a city,
# few enough to fit one tool response under the default token cap.
SEARCH_TOP_K = 3


def world_corpus(world: World) -> list[str]:
    """The search corpus: one passage per person (all their facts), then one per city (who lives there)."""
    passages = [" ".join(fact_sentence(person, a) for a in PERSON_ATTRIBUTES) for person in world.people]
    for city in world.cities:
        residents = [person.name for person in world.people if person.attr("home") == city.name]
        if residents:
            passages.append(f"{city.name} is a city. People who live in {city.name}: {', '.join(residents)}.")
        else:
            passages.append(f"{city.name} is a city. Nobody we know lives in {city.name}.")
    return passages


def calculator_tool() -> Tool:
    return Tool(
        name="calculator",
        description="Evaluate an arithmetic expression with + - * / // % ** and parentheses.",
        parameters={
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example (17 + 5) * 3"}},
            "required": ["expression"],
        },
        fn=evaluate,
    )


def lookup_tool(world: World) -> Tool:
    people = {person.name.lower(): person for person in world.people}

    def lookup(name: str, attribute: str) -> str:
        person = people.get(name.strip().lower())
        if person is None:
            raise ToolError(f"unknown person {name[:40]!r}")
        key = attribute.strip().lower()
        if key not in PERSON_ATTRIBUTES:
            raise ToolError(f"unknown attribute {attribute[:40]!r}; known: {', '.join(PERSON_ATTRIBUTES)}")
        return fact_sentence(person, key)

    return Tool(
        name="lookup",
        description="Look up one fact about a person: where they live, their job, pet, favourite color or age.",
        parameters={
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "the person's name"},
                "attribute": {"type": "string", "enum": list(PERSON_ATTRIBUTES)},
            },
            "required": ["name", "attribute"],
        },
        fn=lookup,
    )


def search_tool(world: World) -> Tool:
    corpus = world_corpus(world)
    index = Bm25Index(corpus)

    def search(query: str) -> str:
        hits = index.search(query, SEARCH_TOP_K)
        if not hits:
            return "No passage matches the query."
        return "\n".join(corpus[hit] for hit in hits)

    return Tool(
        name="search",
        description="Search passages about people and cities; returns the best matching passages.",
        parameters={
            "type": "object",
            "properties": {"query": {"type": "string", "description": "words to search for"}},
            "required": ["query"],
        },
        fn=search,
    )


def default_tools(world: World | None = None) -> list[Tool]:
    """calculator, lookup and search; the last two over `world` (default: `build_world()`)."""
    world = world if world is not None else build_world()
    return [calculator_tool(), lookup_tool(world), search_tool(world)]
