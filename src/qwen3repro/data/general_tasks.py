"""General RL's task mixture: thirty tasks over the synthetic world, each with its own reward.

The Qwen3 report's fourth post-training stage trains on "over 20 distinct tasks, each with customized
scoring criteria" (§4.4), for instruction following, format following (the /think and /no_think
switches, the think tags), preference alignment, agent ability (tool use) and specialised scenarios
such as retrieval-augmented generation, with rewards of three kinds (`REWARD_KINDS`): rules, a judge
model comparing with a reference answer, and a reward model without a reference.

`GENERAL_TASKS` holds the tiny-scale tasks. Each `GeneralTask` draws a `Query` (`generate(rng, world)`)
whose `verifier` is the task's reward, a name registered in `qwen3repro.rewards`, and whose `reference`
holds that reward's keyword arguments as JSON-serialisable values; a tool-use query names the tools its
prompt offers. Tasks with a rule reward can also `demonstrate` a query: a reference conversation in the
chat format that the reward scores 1.0, usable as SFT data. Demonstrations answer in the non-thinking
form (the user turn ends with /no_think, each assistant turn opens with an empty think block), except
where the task itself asks for thinking; a tool-use demonstration holds the assistant's tool call, a
tool message with a result of the kind the tool returns, and the final answer. `thinking_demonstration`
gives the thinking form of the same conversation (a short reasoning in each think block, the same
answers and calls). The caller renders the tools' schemas into the system prompt
(`chat.render(messages, tools=...)`). Every demonstration is rebuilt from the query's question and
reference and the world, so a stored query can be demonstrated.

Held-out partition. `sample_queries` draws tasks by weight and keeps only the items of the requested
partition (`tasks.is_heldout` of the query's uid), so training never sees a held-out item. A uid is
`tasks.item_uid(task name, question)`, except that a query derived from something already partitioned
keeps that thing's partition: a family task's query is the family item's own uid (as in reasoning RL),
and a query about a fact of a person or about a translated sentence takes the first eight hex digits,
the ones `is_heldout` reads, from the fact's or the sentence's id (`fact_uid`; `synthetic.frame_uid`,
which the fusion stage holds translations out by). So a fact held out of one task is held out of all.

Rewards are looked up when a query is sampled, not when the table is built: the "reward_model" reward
belongs to the reward-model stage, and a mixture that includes its tasks before it is registered fails
with "task <name>: no reward 'reward_model' registered".
"""
from __future__ import annotations

import functools
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..chat import EMPTY_THINK
from ..rewards import REWARDS
from . import tasks
from .code_specs import draw_spec, solve
from .english import (ATTRIBUTE_WORDS, attribute_question, city_passage, fact_sentence, parse_attribute_question,
                      person_passage, residents)
from .instruction_tasks import choose_instructions, compliant_answer, draw_kwargs, instruction_question
from ..tools import ToolEnvironment, default_tools
from .queries import Query
from .synthetic import frame_uid
from .world import PERSON_ATTRIBUTES, Entity, World, build_world

__all__ = ["REWARD_KINDS", "TOOL_NAMES", "GeneralTask", "GENERAL_TASKS", "default_weights", "fact_uid",
           "sample_queries", "sample_task_queries", "demonstrations", "check_rewards", "thinking_demonstration",
           "tool_environment"]

REWARD_KINDS = ("rule", "judge", "reward_model")
# The tools a query may offer: the names of the tool environment's built-in tools.
TOOL_NAMES = ("calculator", "lookup", "search")
# Draws of one task before giving up on finding an item of the requested partition (it holds 10% or 90%).
MAX_TRIES = 10_000


@dataclass(frozen=True)
class GeneralTask:
    """One task of the mixture: how to draw a query, how it is rewarded, and its default share."""

    name: str
    domain: str
    kind: str
    reward: str
    weight: float
    tools: tuple[str, ...]
    generate: Callable[[random.Random, World], Query]
    demonstrate: Callable[[Query, World], list[dict]] | None

    def __post_init__(self) -> None:
        where = f"general task {self.name!r}"
        if self.kind not in REWARD_KINDS:
            raise ValueError(f"{where}: kind {self.kind!r} is not one of {REWARD_KINDS}")
        if self.kind in ("judge", "reward_model") and self.reward != self.kind:
            raise ValueError(f"{where}: a {self.kind} task is scored by the reward {self.kind!r}, not {self.reward!r}")
        if self.kind == "rule" and self.reward in ("judge", "reward_model"):
            raise ValueError(f"{where}: a rule task cannot be scored by the model-based reward {self.reward!r}")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"{where}: weight must be a finite number >= 0, got {self.weight!r}")
        unknown = set(self.tools) - set(TOOL_NAMES)
        if unknown:
            raise ValueError(f"{where}: unknown tools {sorted(unknown)}; known: {TOOL_NAMES}")


@dataclass(frozen=True)
class _Draft:
    """What a task's draw gives: the question, the reward's arguments, and what the uid derives from."""

    question: str
    reference: dict[str, Any]
    difficulty: int | None = None
    uid: str | None = None  # the query's uid as it is (a family item's)
    partition: str | None = None  # the id whose partition the query keeps


def fact_uid(person: str, attribute: str) -> str:
    """The id of one fact of a person: every query about the fact falls in its partition."""
    return tasks.item_uid("fact", f"{person}|{attribute}")


def _generate(name: str, domain: str, reward: str, tools: tuple[str, ...],
              draw: Callable[[random.Random, World], _Draft], rng: random.Random, world: World) -> Query:
    draft = draw(rng, world)
    uid = draft.uid or tasks.item_uid(name, draft.question)
    if draft.partition is not None:
        uid = draft.partition[:8] + uid[8:]
    return Query(uid, draft.question, domain, draft.difficulty, reward, draft.reference, tools=tools)


def _task(name: str, domain: str, kind: str, reward: str, weight: float,
          draw: Callable[[random.Random, World], _Draft],
          demonstrate: Callable[[Query, World], list[dict]] | None, tools: tuple[str, ...] = ()) -> GeneralTask:
    return GeneralTask(name, domain, kind, reward, weight, tools,
                       functools.partial(_generate, name, domain, reward, tools, draw), demonstrate)


# ----------------------------------------------------------------------------- demonstrations
def _user(question: str) -> dict:
    return {"role": "user", "content": f"{question} /no_think"}


def _answer(text: str) -> dict:
    return {"role": "assistant", "content": EMPTY_THINK + text}


def _direct(answer_of: Callable[[Query, World], str]) -> Callable[[Query, World], list[dict]]:
    """A demonstration that answers in one non-thinking turn with `answer_of(query, world)`."""
    return functools.partial(_direct_demo, answer_of)


def _direct_demo(answer_of: Callable[[Query, World], str], query: Query, world: World) -> list[dict]:
    return [_user(query.question), _answer(answer_of(query, world))]


_TOOL_ENVIRONMENTS: dict[int, tuple[World, ToolEnvironment]] = {}


def tool_environment(world: World) -> ToolEnvironment:
    """The built-in tools over `world`, built once per world (the search index is the costly part)."""
    held = _TOOL_ENVIRONMENTS.get(id(world))
    if held is None or held[0] is not world:
        held = _TOOL_ENVIRONMENTS[id(world)] = (world, ToolEnvironment(default_tools(world)))
    return held[1]


def _tool_demo(query: Query, call: dict, world: World, answer: str) -> list[dict]:
    """The call, the tool environment's own answer to it (what a rollout would see), and the final answer."""
    result = tool_environment(world).execute(call)
    if result.outcome != "ok":
        raise ValueError(f"task demonstration: the tool answered {call} with {result.outcome}: {result.content}")
    return [_user(query.question), {"role": "assistant", "content": EMPTY_THINK, "tool_calls": [call]},
            {"role": "tool", "content": result.content}, _answer(answer)]


def _reference_answer(query: Query, world: World) -> str:
    return query.reference["answer"]


def _item_answer(query: Query, world: World) -> str:
    return query.reference["item"]["answer"]


def _judge_reference(query: Query, world: World) -> str:
    return query.reference["reference"]


def _fact(rng: random.Random, world: World) -> tuple[Entity, str]:
    return rng.choice(world.people), rng.choice(PERSON_ATTRIBUTES)


def _asked_fact(question: str, world: World) -> tuple[Entity, str]:
    attribute, name = parse_attribute_question(question)
    return world.entity(name), attribute


# ----------------------------------------------------------------------------- reasoning tasks
def _family(family: str, rng: random.Random, world: World) -> _Draft:
    fam = tasks.FAMILIES[family]
    item = fam.generate(rng.getrandbits(48), rng.randint(fam.min_difficulty, fam.max_difficulty))
    return _Draft(item.question, {"item": item.to_dict()}, item.difficulty, uid=item.uid)


_THINGS = ("apples", "books", "coins", "cups", "flowers", "goats", "stones", "keys", "letters", "baskets")


def _word_problem(rng: random.Random, world: World) -> _Draft:
    """A one- or two-step story problem about a person of the world; the answer is an integer."""
    a, b = rng.sample(world.people, 2)
    thing = rng.choice(_THINGS)
    form = rng.randrange(5)
    if form == 0:
        x, y = rng.randint(2, 40), rng.randint(2, 40)
        story, answer, steps = (f"{a.name} has {x} {thing} and buys {y} more. "
                                f"How many {thing} does {a.name} have now?", x + y, 1)
    elif form == 1:
        x = rng.randint(5, 60)
        y = rng.randint(1, x - 1)
        story, answer, steps = (f"{a.name} has {x} {thing} and gives {y} of them to {b.name}. "
                                f"How many {thing} does {a.name} have left?", x - y, 1)
    elif form == 2:
        x, y = rng.randint(2, 9), rng.randint(2, 12)
        story, answer, steps = (f"{a.name} has {x} boxes with {y} {thing} in each box. "
                                f"How many {thing} does {a.name} have in all?", x * y, 1)
    elif form == 3:
        x, y = rng.randint(5, 40), rng.randint(2, 30)
        z = rng.randint(1, x + y - 1)
        story, answer, steps = (f"{a.name} has {x} {thing}, buys {y} more and then gives {z} to {b.name}. "
                                f"How many {thing} does {a.name} have left?", x + y - z, 2)
    else:
        share, friends = rng.randint(2, 12), rng.randint(2, 6)
        story, answer, steps = (f"{a.name} shares {share * friends} {thing} equally among {friends} friends. "
                                f"How many {thing} does each friend get?", share, 1)
    return _Draft(f"{story} Answer with the number only.", {"answer": str(answer)}, steps)


def _code_write(rng: random.Random, world: World) -> _Draft:
    request, tests = draw_spec(rng)
    return _Draft(f"{request} Answer with the code in one ```python block.", {"tests": tests})


def _code_solution(query: Query, world: World) -> str:
    return f"```python\n{solve(query.question)}```"


# ----------------------------------------------------------------------------- instruction following
def _instructions(fixed: tuple[str, ...], rng: random.Random, world: World) -> _Draft:
    """One fact to talk about, with the instructions `fixed` (or two or three drawn, when empty)."""
    person, attribute = _fact(rng, world)
    ids = list(fixed) or choose_instructions(rng, rng.randint(2, 3))
    kwargs = draw_kwargs(rng, person, attribute, ids)
    return _Draft(instruction_question(person, attribute, ids, kwargs),
                  {"instruction_id_list": ids, "kwargs": kwargs}, len(ids))


def _compliant(query: Query, world: World) -> str:
    person, attribute = _asked_fact(query.question, world)
    return compliant_answer(person, attribute, list(query.reference["instruction_id_list"]),
                            [dict(k) for k in query.reference["kwargs"]])


# ----------------------------------------------------------------------------- format following
def _short_question(attribute: str, name: str) -> str:
    return f"What is {attribute_question(attribute, name)}? Answer with the {ATTRIBUTE_WORDS[attribute]} only."


def _flagged(thinking: bool, rng: random.Random, world: World) -> _Draft:
    """A short question whose soft switches ask for `thinking`: the last flag decides (thinking is the
    default, so a thinking question may carry none); earlier flags, of either kind, come before it."""
    person, attribute = _fact(rng, world)
    wanted, other = ("/think", "/no_think") if thinking else ("/no_think", "/think")
    before = rng.choice(([], [other], [wanted], [wanted, other]))
    after = [] if thinking and rng.random() < 0.25 else ([other] if rng.random() < 0.3 else []) + [wanted]
    if not after and before:
        before = []  # with no closing flag the earlier ones would decide
    question = " ".join(before + [_short_question(attribute, person.name)] + after)
    return _Draft(question, {"thinking": thinking}, partition=fact_uid(person.name, attribute))


def _format_demo(query: Query, world: World) -> list[dict]:
    person, attribute = _asked_fact(query.question, world)
    value = person.attr(attribute)
    if query.reference["thinking"]:
        reasoning = (f"The question asks for {attribute_question(attribute, person.name)}. "
                     f"{fact_sentence(person, attribute)} So the answer is {value}.")
        content = f"<think>\n{reasoning}\n</think>\n\n{value}"
    else:
        content = EMPTY_THINK + value
    return [{"role": "user", "content": query.question}, {"role": "assistant", "content": content}]


# ----------------------------------------------------------------------------- knowledge, retrieval, tools
def _knowledge(rng: random.Random, world: World) -> _Draft:
    person, attribute = _fact(rng, world)
    return _Draft(_short_question(attribute, person.name), {"answer": person.attr(attribute)},
                  partition=fact_uid(person.name, attribute))


def _passages(rng: random.Random, world: World) -> _Draft:
    """Three people's passages in the prompt (the asked one among two others), a question about one fact."""
    people = rng.sample(world.people, 3)
    person, attribute = people[0], rng.choice(PERSON_ATTRIBUTES)
    rng.shuffle(people)
    listed = "\n".join(f"[{i + 1}] {person_passage(p)}" for i, p in enumerate(people))
    question = (f"Passages:\n{listed}\n\nUsing the passages, what is {attribute_question(attribute, person.name)}? "
                f"Answer with the {ATTRIBUTE_WORDS[attribute]} only.")
    return _Draft(question, {"answer": person.attr(attribute)}, partition=fact_uid(person.name, attribute))


def _lookup(rng: random.Random, world: World) -> _Draft:
    person, attribute = _fact(rng, world)
    question = (f"Use the lookup tool to find {attribute_question(attribute, person.name)}. "
                f"Answer with the {ATTRIBUTE_WORDS[attribute]} only.")
    return _Draft(question, {"answer": person.attr(attribute)}, partition=fact_uid(person.name, attribute))


def _lookup_demo(query: Query, world: World) -> list[dict]:
    person, attribute = _asked_fact(query.question, world)
    call = {"name": "lookup", "arguments": {"name": person.name, "attribute": attribute}}
    return _tool_demo(query, call, world, person.attr(attribute))


_COMPUTE = re.compile(r"compute (.+)\. Answer")


def _calculator(rng: random.Random, world: World) -> _Draft:
    """Products and sums too long to work in the head at tiny scale (no `data.tasks` family has them)."""
    a, b, c = rng.randint(100, 9999), rng.randint(12, 999), rng.randint(2, 99)
    form = rng.randrange(3)
    expression, value = [(f"{a} * {b}", a * b), (f"({a} + {b}) * {c}", (a + b) * c),
                         (f"{a} * {c} - {b}", a * c - b)][form]
    return _Draft(f"Use the calculator to compute {expression}. Answer with the number only.", {"answer": str(value)})


def _calculator_demo(query: Query, world: World) -> list[dict]:
    expression = _COMPUTE.search(query.question).group(1)
    answer = query.reference["answer"]
    return _tool_demo(query, {"name": "calculator", "arguments": {"expression": expression}}, world, answer)


_SEARCH = re.compile(r"Who lives in (\w+), works as a (\w+) and has a (\w+)\?")


def _matching(world: World, home: str, job: str, pet: str) -> list[Entity]:
    return [p for p in world.people if (p.attr("home"), p.attr("job"), p.attr("pet")) == (home, job, pet)]


def _search(rng: random.Random, world: World) -> _Draft:
    """Who matches three facts: a person the world holds only one of, found by searching the facts."""
    for _ in range(MAX_TRIES):
        person = rng.choice(world.people)
        home, job, pet = person.attr("home"), person.attr("job"), person.attr("pet")
        if len(_matching(world, home, job, pet)) == 1:
            question = (f"Who lives in {home}, works as a {job} and has a {pet}? "
                        f"Use the search tool, then answer with the name only.")
            return _Draft(question, {"answer": person.name})
    raise RuntimeError(f"world {world.seed}: no person is the only one with their home, job and pet")


def _search_demo(query: Query, world: World) -> list[dict]:
    home, job, pet = _SEARCH.search(query.question).groups()
    (person,) = _matching(world, home, job, pet)
    call = {"name": "search", "arguments": {"query": f"lives in {home} works as a {job} has a {pet}"}}
    return _tool_demo(query, call, world, person.name)


# ----------------------------------------------------------------------------- multilingual
def _translation(rng: random.Random, world: World) -> _Draft:
    """A sentence translated between two of the world's languages (uniform pairs: the rare language is
    one side in 40% of them), held out by its meaning as the fusion stage holds translations out."""
    src, tgt = rng.sample(world.language_names, 2)
    frame = world.random_frame(rng)
    return _Draft(f"Translate from {src} to {tgt}: {world.render(src, frame)}", {"answer": world.render(tgt, frame)},
                  partition=frame_uid(frame))


def _fact_in_language(rng: random.Random, world: World) -> _Draft:
    """A fact stated in a given language, worded as the fusion stage's fact samples are."""
    person, attribute = _fact(rng, world)
    lang = rng.choice(world.language_names)
    return _Draft(f"In {lang}, state the {attribute} of {person.name}.",
                  {"answer": world.render_fact(lang, person, attribute)}, partition=fact_uid(person.name, attribute))


# ----------------------------------------------------------------------------- judged and preferred answers
def _profile(rng: random.Random, world: World) -> _Draft:
    person = rng.choice(world.people)
    question = f"Describe {person.name}: where do they live, what is their job, and what pet do they have?"
    reference = " ".join(fact_sentence(person, attribute) for attribute in ("home", "job", "pet"))
    return _Draft(question, {"question": question, "reference": reference})


def _compare_ages(rng: random.Random, world: World) -> _Draft:
    for _ in range(MAX_TRIES):
        a, b = rng.sample(world.people, 2)
        x, y = int(a.attr("age")), int(b.attr("age"))
        if x != y:
            break
    else:
        raise RuntimeError(f"world {world.seed}: everyone is the same age")
    (old, x), (young, y) = sorted(((a.name, x), (b.name, y)), key=lambda p: -p[1])
    question = f"Who is older, {a.name} or {b.name}, and by how many years?"
    reference = f"{old} is older: {old} is {x} years old and {young} is {y}, so {old} is {x - y} years older."
    return _Draft(question, {"question": question, "reference": reference})


_ABOUT_PERSON = re.compile(r"about ([A-Z][a-z]+)\.$")
_ABOUT_CITY = re.compile(r"the city of ([A-Z][a-z]+)\.$")


def _write_person(rng: random.Random, world: World) -> _Draft:
    question = f"Write one sentence about {rng.choice(world.people).name}."
    return _Draft(question, {"question": question})


def _person_sentence(query: Query, world: World) -> str:
    person = world.entity(_ABOUT_PERSON.search(query.question).group(1))
    return f"{person.name} is a {person.attr('job')} who lives in {person.attr('home')} and has a {person.attr('pet')}."


def _write_city(rng: random.Random, world: World) -> _Draft:
    question = f"Write one sentence about the city of {rng.choice(world.cities).name}."
    return _Draft(question, {"question": question})


def _city_sentence(query: Query, world: World) -> str:
    city = _ABOUT_CITY.search(query.question).group(1)
    names = residents(world, city)
    return city_passage(world, city).split(". ", 1)[1] if names else f"{city} is a quiet city of the world."


# ----------------------------------------------------------------------------- thinking-mode demonstrations
# A short final answer is restated at the end of the reasoning; a longer one (code, a constrained text) is not.
RESTATED_ANSWER_WORDS = 12
# The question's gist in a reasoning: at most this many of its words (a request with constraints: all of
# them up to REQUEST_WORDS, so the reasoning restates what the answer must meet).
GIST_WORDS = 24
REQUEST_WORDS = 60
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")


def _shortened(text: str, n_words: int) -> str:
    words = text.split()
    return " ".join(words[:n_words]) + (" ..." if len(words) > n_words else "")


def _gist(question: str) -> str:
    """The sentence of a question that asks (its last one ending in "?", else its first), shortened."""
    body = question.strip().rsplit("\n\n", 1)[-1]  # a retrieval question's passages come first
    sentences = [s for s in _SENTENCE_END.split(body) if s]
    asked = [s for s in sentences if s.endswith("?")]
    return _shortened(asked[-1] if asked else sentences[0] if sentences else body, GIST_WORDS)


def _answer_reasoning(question: str, answer: str, after_tool: str | None) -> str:
    if len(answer.split()) <= RESTATED_ANSWER_WORDS and "\n" not in answer:
        opening = (f"The {after_tool} tool has answered." if after_tool is not None
                   else f"The question asks: {_gist(question)}")
        return f"{opening} So the answer is: {answer.rstrip('.')}."
    return (f"The request: {_shortened(question.strip(), REQUEST_WORDS)} "
            f"I write a response that meets each of its requirements.")


def thinking_demonstration(query: Query, messages: list[dict]) -> list[dict]:
    """A demonstration answered in thinking mode: the non-thinking conversation of `demonstrate` with the
    flag removed from its user turn (the caller flags the chat, or leaves it unflagged: thinking is the
    default) and every empty think block filled with a short reasoning: for a task item its reference
    trace (`tasks.render_trace`), before a tool call which tool answers, otherwise the question's gist and,
    when the answer is short, the answer. The final answers and tool calls are the same tokens, so the
    reward scores the two forms alike. A query whose mode is part of the task (the format tasks) has no
    other form: ValueError."""
    if "thinking" in query.reference:
        raise ValueError(f"query {query.uid}: its mode is part of the task; it has no thinking demonstration")
    out, last_tool = [], None
    for m in messages:
        m = dict(m)
        if m["role"] == "user":
            m["content"] = m["content"].removesuffix(" /no_think")
        elif m["role"] == "assistant":
            if not m["content"].startswith(EMPTY_THINK):
                raise ValueError(f"query {query.uid}: an assistant turn without the empty think block")
            answer = m["content"][len(EMPTY_THINK):]
            if m.get("tool_calls"):
                last_tool = m["tool_calls"][0]["name"]
                # Short, and no copy of the question: a tiny model that restates a long request before
                # the call garbles the call's arguments and names (seen at tiny scale).
                reasoning = f"The {last_tool} tool can answer this, so I call it."
            elif "item" in query.reference:
                reasoning = tasks.render_trace(tasks.TaskItem.from_dict(query.reference["item"]))
            else:
                reasoning = _answer_reasoning(query.question, answer, last_tool)
            m["content"] = f"<think>\n{reasoning}\n</think>\n\n{answer}"
        out.append(m)
    return out


# ----------------------------------------------------------------------------- the table
_IFEVAL_TASKS = {
    "if_lowercase": "change_case:english_lowercase",
    "if_capital": "change_case:english_capital",
    "if_no_comma": "punctuation:no_comma",
    "if_end_phrase": "startend:end_checker",
    "if_quotation": "startend:quotation",
    "if_keywords": "keywords:existence",
    "if_forbidden_words": "keywords:forbidden_words",
    "if_title": "detectable_format:title",
    "if_word_count": "length_constraints:number_words",
}

# Tiny-scale default shares (sampling normalises): each ability gets about one unit, one IFEval
# instruction half of one, and code writing a quarter, since each of its rewards runs two sandboxes.
_TASKS = [
    _task("add", "math", "rule", "task", 1.0, functools.partial(_family, "add"), _direct(_item_answer)),
    _task("mul", "math", "rule", "task", 1.0, functools.partial(_family, "mul"), _direct(_item_answer)),
    _task("expr", "math", "rule", "task", 1.0, functools.partial(_family, "expr"), _direct(_item_answer)),
    _task("word_problem", "math", "rule", "answer_match", 1.0, _word_problem, _direct(_reference_answer)),
    _task("code_trace", "code", "rule", "task", 1.0, functools.partial(_family, "code"), _direct(_item_answer)),
    _task("code_write", "code", "rule", "code", 0.25, _code_write, _direct(_code_solution)),
    _task("logic_order", "logic", "rule", "task", 1.0, functools.partial(_family, "order"), _direct(_item_answer)),
    *[_task(name, "instruction_following", "rule", "ifeval", 0.5, functools.partial(_instructions, (iid,)),
            _direct(_compliant)) for name, iid in _IFEVAL_TASKS.items()],
    _task("if_combined", "instruction_following", "rule", "ifeval", 1.0, functools.partial(_instructions, ()),
          _direct(_compliant)),
    _task("format_think", "format", "rule", "format", 1.0, functools.partial(_flagged, True), _format_demo),
    _task("format_no_think", "format", "rule", "format", 1.0, functools.partial(_flagged, False), _format_demo),
    _task("knowledge_recall", "knowledge", "rule", "answer_match", 1.0, _knowledge, _direct(_reference_answer)),
    _task("rag_passages", "rag", "rule", "answer_match", 1.0, _passages, _direct(_reference_answer)),
    _task("tool_lookup", "tool_use", "rule", "answer_match", 1.0, _lookup, _lookup_demo, ("lookup",)),
    _task("tool_calculator", "tool_use", "rule", "answer_match", 1.0, _calculator, _calculator_demo, ("calculator",)),
    _task("tool_search", "tool_use", "rule", "answer_match", 1.0, _search, _search_demo, ("search",)),
    _task("translation", "multilingual", "rule", "answer_match", 1.0, _translation, _direct(_reference_answer)),
    _task("fact_in_language", "multilingual", "rule", "answer_match", 1.0, _fact_in_language,
          _direct(_reference_answer)),
    _task("judge_profile", "open_qa", "judge", "judge", 0.5, _profile, _direct(_judge_reference)),
    _task("judge_compare_ages", "open_qa", "judge", "judge", 0.5, _compare_ages, _direct(_judge_reference)),
    _task("write_person", "writing", "reward_model", "reward_model", 0.5, _write_person, _direct(_person_sentence)),
    _task("write_city", "writing", "reward_model", "reward_model", 0.5, _write_city, _direct(_city_sentence)),
]
GENERAL_TASKS: dict[str, GeneralTask] = {task.name: task for task in _TASKS}


def default_weights() -> dict[str, float]:
    """Every task's default share."""
    return {name: task.weight for name, task in GENERAL_TASKS.items()}


def check_rewards(names) -> None:
    """Raise ValueError unless every named task's reward is registered."""
    for name in names:
        reward = GENERAL_TASKS[name].reward
        if reward not in REWARDS:
            raise ValueError(f"task {name}: no reward {reward!r} registered")


def _mixture(weights: Mapping[str, float]) -> tuple[list[str], list[float]]:
    unknown = sorted(set(weights) - set(GENERAL_TASKS))
    if unknown:
        raise KeyError(f"unknown general task(s) {unknown}; known: {', '.join(GENERAL_TASKS)}")
    for name, weight in weights.items():
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight of general task {name!r} must be a finite number >= 0, got {weight!r}")
    names = [name for name in GENERAL_TASKS if weights.get(name, 0) > 0]  # table order: stable draws
    if not names:
        raise ValueError("the general task weights give no task a positive share")
    return names, [float(weights[name]) for name in names]


def _draw(names: list[str], shares: list[float], n: int, seed: int, heldout: bool,
          world: World) -> list[tuple[str, Query]]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    rng = random.Random(f"general_tasks|{seed}|{'heldout' if heldout else 'train'}")
    out = []
    for _ in range(n):
        name = rng.choices(names, weights=shares)[0]
        for _ in range(MAX_TRIES):
            query = GENERAL_TASKS[name].generate(rng, world)
            if tasks.is_heldout(query.uid) == heldout:
                out.append((name, query))
                break
        else:
            raise RuntimeError(f"task {name}: no {'held-out' if heldout else 'training'} query in {MAX_TRIES} draws")
    return out


def sample_task_queries(weights: Mapping[str, float], n: int, *, seed: int, heldout: bool,
                        world: World | None = None) -> list[tuple[str, Query]]:
    """`n` (task name, query) pairs, tasks drawn by `weights` (task name -> share; sampling normalises),
    items of one partition only (see the module docstring); deterministic in its arguments. The world
    is `build_world()`'s unless given."""
    names, shares = _mixture(weights)
    check_rewards(names)
    return _draw(names, shares, n, seed, heldout, world if world is not None else build_world())


def sample_queries(weights: Mapping[str, float], n: int, *, seed: int, heldout: bool,
                   world: World | None = None) -> list[Query]:
    """`n` queries of the mixture `weights`, from one partition only (`sample_task_queries` without names)."""
    return [query for _, query in sample_task_queries(weights, n, seed=seed, heldout=heldout, world=world)]


def demonstrations(weights: Mapping[str, float], n: int, *, seed: int,
                   world: World | None = None) -> list[tuple[str, Query, list[dict]]]:
    """(task name, query, reference conversation) for `n` training queries of the mixture's tasks that
    demonstrate (SFT data: no reward is needed, so none is looked up)."""
    world = world if world is not None else build_world()
    names, shares = _mixture(weights)
    kept = [(name, share) for name, share in zip(names, shares) if GENERAL_TASKS[name].demonstrate is not None]
    if not kept:
        raise ValueError("none of the weighted general tasks demonstrates its queries")
    pairs = _draw([name for name, _ in kept], [share for _, share in kept], n, seed, False, world)
    return [(name, query, GENERAL_TASKS[name].demonstrate(query, world)) for name, query in pairs]
