"""Instruction-following tasks over the synthetic world, checked by IFEval's rules.

The Qwen3 report's general RL rewards instruction following with rules (§4.4). Each query here asks
for a short English answer about one fact of a person ("Tell me about the job of Tamor.") and adds one
or more IFEval instructions, worded by lm-eval's own `build_description(**kwargs)` (as the IFEval data
are), so the "ifeval" reward checks exactly the instructions the prompt states. The instructions are
the IFEval ids that make sense for a two-sentence answer (`INSTRUCTION_IDS`); their arguments are
drawn here and always given in full (the reward refuses a missing one, which lm-eval would draw at
random).

A query's demonstration (`compliant_answer`) is `english.talk_about` transformed to follow every
instruction: content changes first (commas removed, keywords added), then the wrappers (title, end
phrase, quotation marks), then the case, since a case instruction checks the whole response. A word
count is drawn last, from the length of that final text. The answer is a pure function of the
person, the attribute and the instructions' arguments, so it can be rebuilt from a stored query.
"""
from __future__ import annotations

import random
import re
from typing import Any

from ..rewards.ifeval import lm_eval_ifeval
from .english import attribute_question, talk_about
from .world import Entity

__all__ = ["INSTRUCTION_IDS", "CONFLICTS", "compliant_answer", "describe", "draw_kwargs", "instruction_question"]

INSTRUCTION_IDS = (
    "change_case:english_lowercase",
    "change_case:english_capital",
    "punctuation:no_comma",
    "startend:end_checker",
    "startend:quotation",
    "keywords:existence",
    "keywords:forbidden_words",
    "detectable_format:title",
    "length_constraints:number_words",
)
# Pairs no answer can follow together (an answer wrapped in quotation marks ends with one, not with
# the end phrase).
CONFLICTS = frozenset({
    frozenset({"change_case:english_lowercase", "change_case:english_capital"}),
    frozenset({"startend:quotation", "startend:end_checker"}),
})

# End phrases of the IFEval data.
END_PHRASES = ("Is there anything else I can help with?", "Any other questions?",
               "Let me know if you have additional questions.")
KEYWORDS = ("garden", "morning", "friendly", "village", "sunny", "gentle", "music", "river")
# Words no `talk_about` answer, end phrase, keyword sentence or title holds.
FORBIDDEN = ("really", "basically", "actually", "certainly", "truly", "honestly", "literally", "definitely")
WORD_RELATIONS = ("less than", "at least")

_WORD = re.compile(r"\w+")  # how lm-eval counts words (NLTK's RegexpTokenizer(r"\w+"))
_CASE = ("change_case:english_lowercase", "change_case:english_capital")


def _compatible(chosen: list[str], candidate: str) -> bool:
    return all(frozenset({candidate, other}) not in CONFLICTS for other in chosen)


def choose_instructions(rng: random.Random, k: int) -> list[str]:
    """`k` compatible instruction ids in `INSTRUCTION_IDS` order, the word count possibly among them."""
    chosen: list[str] = []
    for iid in rng.sample(INSTRUCTION_IDS, len(INSTRUCTION_IDS)):
        if len(chosen) < k and _compatible(chosen, iid):
            chosen.append(iid)
    return sorted(chosen, key=INSTRUCTION_IDS.index)


def compliant_answer(person: Entity, attribute: str, instruction_ids: list[str], kwargs: list[dict]) -> str:
    """The answer about `person`'s `attribute` that follows every instruction (see the module docstring)."""
    args = dict(zip(instruction_ids, kwargs))
    text = talk_about(person, attribute)
    if "punctuation:no_comma" in args:
        text = text.replace(",", "")
    if "keywords:existence" in args:
        words = args["keywords:existence"]["keywords"]
        text += f" The words {' and '.join(words)} come to mind when I think of them."
    if "detectable_format:title" in args:
        text = f"<<About {person.name}>>\n{text}"
    if "startend:end_checker" in args:
        text += " " + args["startend:end_checker"]["end_phrase"]
    if "startend:quotation" in args:
        text = f'"{text}"'
    if "change_case:english_lowercase" in args:
        text = text.lower()
    if "change_case:english_capital" in args:
        text = text.upper()
    return text


def draw_kwargs(rng: random.Random, person: Entity, attribute: str, instruction_ids: list[str]) -> list[dict]:
    """Arguments for each instruction (all of them given), drawn so that `compliant_answer` follows them."""
    kwargs: dict[str, dict[str, Any]] = {}
    for iid in instruction_ids:
        if iid == "startend:end_checker":
            kwargs[iid] = {"end_phrase": rng.choice(END_PHRASES)}
        elif iid == "keywords:existence":
            kwargs[iid] = {"keywords": rng.sample(KEYWORDS, 2)}
        elif iid == "keywords:forbidden_words":
            kwargs[iid] = {"forbidden_words": rng.sample(FORBIDDEN, 2)}
        else:
            kwargs[iid] = {}
    if "length_constraints:number_words" in kwargs:
        n_words = len(_WORD.findall(compliant_answer(person, attribute, list(kwargs), list(kwargs.values()))))
        relation = rng.choice(WORD_RELATIONS)
        bound = n_words + rng.randint(1, 10) if relation == "less than" else max(1, n_words - rng.randint(0, 5))
        kwargs["length_constraints:number_words"] = {"num_words": bound, "relation": relation}
    return [kwargs[iid] for iid in instruction_ids]


def describe(instruction_id: str, kwargs: dict) -> str:
    """The instruction as IFEval's data word it: lm-eval's `build_description(**kwargs)`."""
    checker = lm_eval_ifeval().registry.INSTRUCTION_DICT[instruction_id](instruction_id)
    return checker.build_description(**kwargs)


def instruction_question(person: Entity, attribute: str, instruction_ids: list[str], kwargs: list[dict]) -> str:
    """"Tell me about the <attribute> of <name>." followed by each instruction's description."""
    descriptions = " ".join(describe(iid, k) for iid, k in zip(instruction_ids, kwargs))
    return f"Tell me about {attribute_question(attribute, person.name)}. {descriptions}"
