"""English sentences about the synthetic world: what general RL's tasks ask, retrieve and answer.

Pre-training states the world's facts in its five invented languages (`World.render_fact`); the
general-RL tasks (`general_tasks`) ask about them in English, as a user would, and need the same facts
as English text: in retrieval passages, in the reference answers a judge compares against, in
demonstrated tool results and answers. One module writes them, so every task words a fact the same way.
"""
from __future__ import annotations

import re

from .world import PERSON_ATTRIBUTES, Entity, World

__all__ = ["ATTRIBUTE_WORDS", "attribute_question", "city_passage", "fact_sentence", "parse_attribute_question",
           "person_passage", "residents", "talk_about"]

# How a question names each attribute of a person ("the home city of Tamor").
ATTRIBUTE_WORDS = {"home": "home city", "job": "job", "pet": "pet", "color": "favourite color", "age": "age"}
_ATTRIBUTE_OF = re.compile(r"the (" + "|".join(ATTRIBUTE_WORDS.values()) + r") of ([A-Z][a-z]+)")
_ATTRIBUTE_BY_WORD = {word: attribute for attribute, word in ATTRIBUTE_WORDS.items()}


def fact_sentence(person: Entity, attribute: str) -> str:
    """One short sentence stating one attribute of a person ("Tamor works as a farmer.")."""
    value = person.attr(attribute)
    sentences = {
        "home": f"{person.name} lives in {value}.",
        "job": f"{person.name} works as a {value}.",
        "pet": f"{person.name} has a {value}.",
        "color": f"{person.name} likes the color {value}.",
        "age": f"{person.name} is {value} years old.",
    }
    return sentences[attribute]


def person_passage(person: Entity) -> str:
    """Everything known about a person, one sentence per attribute."""
    return " ".join(fact_sentence(person, attribute) for attribute in PERSON_ATTRIBUTES)


def residents(world: World, city: str) -> list[str]:
    """The names of the people whose home is `city`, in the world's order."""
    return [p.name for p in world.people if p.attr("home") == city]


def city_passage(world: World, city: str) -> str:
    """Who lives in a city."""
    names = residents(world, city)
    if not names:
        return f"{city} is a city. Nobody we know lives in {city}."
    return f"{city} is a city. The people who live in {city} are {_listing(names)}."


def _listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# Two sentences with plenty of common English words around a fact: language identification (the
# IFEval case checks run langdetect) recognises English in the upper- and lower-cased forms of all
# 1,500 facts of each of the worlds 0-7, where the bare short sentence is sometimes taken for German.
_TALK = {
    "home": "{name} lives in the city of {value}, and that is where you can find them at home most of the time.",
    "job": "{name} works as a {value}, which is the kind of work that they have always wanted to do with their life.",
    "pet": "{name} has a {value} as a pet, and they take good care of it every single day of the week.",
    "color": ("{name} likes the color {value} more than any other color, and they would choose it for almost "
              "everything."),
    "age": "{name} is {value} years old, which is the age they will be until their next birthday comes around.",
}
_TALK_END = " I hope that this short answer about them is helpful to you."


def talk_about(person: Entity, attribute: str) -> str:
    """A short, chatty English answer about one attribute of a person (two sentences, with commas)."""
    return _TALK[attribute].format(name=person.name, value=person.attr(attribute)) + _TALK_END


def attribute_question(attribute: str, name: str) -> str:
    """The phrase that asks for an attribute: "the home city of Tamor"."""
    return f"the {ATTRIBUTE_WORDS[attribute]} of {name}"


def parse_attribute_question(text: str) -> tuple[str, str]:
    """(attribute, person name) of the first `attribute_question` phrase in `text`; ValueError if none."""
    m = _ATTRIBUTE_OF.search(text)
    if not m:
        raise ValueError(f"no 'the <attribute> of <name>' phrase in {text[:80]!r}")
    return _ATTRIBUTE_BY_WORD[m.group(1)], m.group(2)
