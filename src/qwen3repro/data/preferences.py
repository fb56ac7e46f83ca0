"""A synthetic preference set whose labels come from checkers we own: the data of the Bradley–Terry
reward model (Qwen3 report §4.4, general RL: a reward model without a reference answer).

Every pair is a user prompt and two assistant responses (think block included); the chosen one passes
its domain's checker and the rejected one fails it, and `build_preferences` verifies both with the
checker before it keeps a pair, so a label is a checker's verdict, never an assumption:

* "math": the exact answer of an add/mul/expr item (`data.tasks`) against a near miss (off by one,
  sign, two adjacent digits swapped); checked by the "task" reward. Templates whose think block shows
  the result carry the near miss there too, so the rejected response is consistent with itself and
  only arithmetic tells them apart.
* "instruction": one sentence about a person of the synthetic world that satisfies one IFEval
  constraint against the same sentence violating it (`INSTRUCTIONS`); checked by the "ifeval" reward
  (lm-eval's own checks), whose description of the constraint is the prompt's instruction.
* "format": a well-formed think block and one answer against a malformed response (no `</think>`, a
  second think block and answer, an empty answer, the reasoning without its tags); checked by
  "think_format". Both answers are right: only the format decides.
* "fact": a true sentence about a person of `data.world` (`World.render_fact`, in a synthetic
  language, the phrasing thinking-mode fusion trains) against the sentence with a wrong value of the
  attribute; checked by `fact_reward`. The writing tasks of general RL are scored by this model.

Controls (so that only the decisive span explains a label):

* identical prefixes: the two responses share the prompt, the template and, where the domain
  allows, every character before the decisive span (the answer, the violating word, the wrong value);
* length balance: in each domain exactly half of the pairs (the odd one out at random) have the
  chosen response longer. Neutral filler sentences (`FILLERS`) go into the think block of the side
  that must be longer, until it is strictly longer; the filler sits on the chosen side in half the
  pairs, so neither length nor the filler predicts the label;
* order: the reward model scores each response alone, so no position is visible to it; the rejected
  responses of a best-of-k set are shuffled.

Splits. "train" takes prompts of the training partition (`data.tasks.is_heldout` false on the
prompt's uid) and training templates; "heldout_prompts" takes held-out prompts with training
templates (new questions, familiar phrasing); "heldout_templates" takes training-partition prompts
with the templates reserved for evaluation (`Template.heldout`: new prompt and response phrasing,
never trained on). Everything is a pure function of (n, seed, split, domains).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..rewards.ifeval import ifeval_reward, lm_eval_ifeval
from ..rewards.format import think_format_reward
from ..rewards.registry import RewardResult, answer_text
from ..rewards.tasks import task_reward
from . import tasks
from .world import COLORS, JOBS, NOUNS_ANIMAL, PERSON_ATTRIBUTES, Entity, World, build_world

__all__ = ["PREFERENCE_DOMAINS", "SPLITS", "BEST_OF", "FILLERS", "INSTRUCTIONS", "TEMPLATES", "Template",
           "PreferencePair", "BestOfKSet", "build_preferences", "best_of_k_sets", "response_passes",
           "fact_reward", "templates_of"]

PREFERENCE_DOMAINS = ("math", "instruction", "format", "fact")
SPLITS = ("train", "heldout_prompts", "heldout_templates")
BEST_OF = 4
"""RewardBench's best-of-4: one chosen response against three rejected ones (25% by chance)."""

WORLD_SEED = 0
"""The world whose people the instruction and fact prompts are about (the pipeline's world)."""

MATH_FAMILIES = ("add", "mul", "expr")
FORMAT_FAMILIES = ("add", "mul")
# Short items keep a pair within a tiny model's context: a worked add/mul item at difficulty 4 or an
# expr chain of 2 operations renders in ~150 characters of think block.
MAX_DIFFICULTY = {"add": 4, "mul": 4, "expr": 2}

FILLERS = ("Let me check this once more.", "I am sure about this.", "That settles it.",
           "Nothing else is needed here.")
"""Neutral think-block sentences that make one response longer without changing its verdict."""

MAX_TRIES = 200
"""Fresh prompts drawn for one pair before giving up (a checker that disagrees with the design)."""


# ----------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class Template:
    """One phrasing of a domain's prompt and response. `prompt`, `think` and `answer` are format strings
    over the domain's fields (`answer` only where the domain writes sentences); `think` "" is an empty
    think block (non-thinking mode). `heldout` templates appear in the "heldout_templates" split only."""

    name: str
    prompt: str
    think: str
    answer: str = ""
    heldout: bool = False


TEMPLATES: dict[str, tuple[Template, ...]] = {
    "math": (
        Template("math:trace", "{question}", "{trace}"),
        Template("math:brief", "Compute {expression}.", "I work out {expression} digit by digit."),
        Template("math:direct", "{question}", ""),
        Template("math:ask", "What is {expression}?", "The digits give the result.\n{result_line}", heldout=True),
    ),
    "instruction": (
        Template("instruction:lives", "Write one sentence about {name}. {instruction}", "",
                 "{name} lives in {home} and works as a {job}."),
        Template("instruction:keeps", "Tell me about {name} in one sentence. {instruction}",
                 "One sentence about {name}.", "{name} is a {job} who keeps a {pet}."),
        Template("instruction:likes", "{instruction} Write a sentence about {name}.", "",
                 "{name} likes {color} things and lives in {home}."),
        Template("instruction:owns", "Describe {name} in a single sentence. {instruction}",
                 "I describe {name} and follow the instruction.", "{name} owns a {pet} and likes the color {color}.",
                 heldout=True),
    ),
    "format": (
        Template("format:trace", "{question}", "{trace}"),
        Template("format:brief", "Compute {expression}.", "I work it out step by step."),
        Template("format:solve", "Please solve {expression}.", "Solving {expression}.\n{result_line}", heldout=True),
    ),
    "fact": (
        Template("fact:state", "In {language}, state the {attribute} of {name}.", ""),
        Template("fact:ask", "What is the {attribute} of {name}? Answer in {language}.",
                 "I recall what I know about {name}."),
        Template("fact:say", "Say in {language} what the {attribute} of {name} is.", "The question is about {name}.",
                 heldout=True),
    ),
}


def templates_of(domain: str, split: str) -> tuple[Template, ...]:
    """The templates a split draws from: the held-out ones for "heldout_templates", the others otherwise."""
    return tuple(t for t in TEMPLATES[domain] if t.heldout == (split == "heldout_templates"))


def respond(think: str, answer: str) -> str:
    """An assistant response as the chat template renders one: `<think>\\n{think}\\n</think>\\n\\n{answer}`
    (the empty block `<think>\\n\\n</think>\\n\\n` when there is no reasoning)."""
    return f"<think>\n{think}\n</think>\n\n{answer}" if think else f"<think>\n\n</think>\n\n{answer}"


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class PreferencePair:
    """A user prompt and two assistant responses (think block included): `chosen` passes the domain's
    checker and `rejected` fails it. `uid` is the prompt's id (the held-out partition is
    `data.tasks.is_heldout(uid)`); `reference` holds the checker's keyword arguments."""

    prompt: str
    chosen: str
    rejected: str
    domain: str
    template: str
    split: str
    uid: str = ""
    reference: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class BestOfKSet:
    """A prompt with one chosen response and k−1 rejected ones (shuffled), as RewardBench's best-of-4."""

    prompt: str
    chosen: str
    rejected: tuple[str, ...]
    domain: str
    template: str
    split: str
    uid: str = ""
    reference: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class _Draft:
    """A prompt with its chosen response and the rejected variants a domain can make of it."""

    prompt: str
    chosen: str
    rejected: tuple[str, ...]
    template: str
    uid: str
    reference: Mapping[str, Any]


# ----------------------------------------------------------------------------- checkers
def fact_reward(completion: str, person: str, attribute: str, language: str,
                world_seed: int = WORLD_SEED) -> RewardResult:
    """1.0 when the answer is exactly the world's sentence stating `person`'s `attribute` in `language`."""
    world = build_world(world_seed)
    try:
        truth = world.render_fact(language, world.entity(person), attribute)
    except KeyError as exc:
        return RewardResult(None, f"bad fact reference: {exc}")
    text = answer_text(completion)
    if not text:
        return RewardResult(0.0, "empty answer")
    return RewardResult(1.0, "true") if text == truth else RewardResult(0.0, "not the world's fact")


_CHECKERS: dict[str, Callable[..., RewardResult]] = {
    "math": task_reward,
    "instruction": functools.partial(ifeval_reward, binary=True),
    "format": think_format_reward,
    "fact": fact_reward,
}


def response_passes(domain: str, response: str, reference: Mapping[str, Any]) -> bool:
    """The domain checker's verdict on `response` (a score of 1.0); "no reward" is an error here, since
    the reference was made by this module."""
    result = _CHECKERS[domain](response, **reference)
    if result.score is None:
        raise ValueError(f"preferences: the {domain} checker gave no reward ({result.reason}) for {reference!r}")
    return result.score == 1.0


# ----------------------------------------------------------------------------- prompts
def _wants(uid: str, split: str) -> bool:
    return tasks.is_heldout(uid) == (split == "heldout_prompts")


def _task_item(rng: random.Random, families: Sequence[str], split: str) -> tasks.TaskItem:
    for _ in range(10_000):
        fam = tasks.FAMILIES[rng.choice(list(families))]
        item = fam.generate(rng.getrandbits(48), rng.randint(fam.min_difficulty, MAX_DIFFICULTY[fam.name]))
        if _wants(item.uid, split):
            return item
    raise RuntimeError(f"preferences: no {split} item of {families} in 10,000 draws")


def _item_fields(item: tasks.TaskItem, answer: str) -> dict[str, str]:
    """The template fields of an item whose (possibly wrong) result is `answer`: the think block's
    last line states that result, the digit steps before it stay the item's own."""
    lhs = item.trace_steps[-1].rsplit("=", 1)[0]
    result_line = f"{lhs}={answer}"
    return {"question": item.question, "expression": item.question.rstrip("="), "result_line": result_line,
            "trace": "\n".join([*item.trace_steps[:-1], result_line])}


def near_misses(answer: str, rng: random.Random) -> list[str]:
    """Wrong answers one slip away from `answer` (an integer): off by one, the sign flipped, two
    adjacent different digits swapped; then further off-by-n values, so there are always three."""
    value = int(answer)
    out = [str(value + rng.choice((-1, 1)))]
    if value != 0:
        out.append(str(-value))
    digits = str(abs(value))
    swaps = [i for i in range(len(digits) - 1) if digits[i] != digits[i + 1] and not (i == 0 and digits[1] == "0")]
    if swaps:
        i = rng.choice(swaps)
        swapped = digits[:i] + digits[i + 1] + digits[i] + digits[i + 2:]
        out.append(("-" if value < 0 else "") + swapped)
    for delta in (2, 10, -2, -10, 3):
        out.append(str(value + delta))
    unique = [w for w in dict.fromkeys(out) if tasks.normalize_answer(w) != tasks.normalize_answer(answer)]
    head, tail = unique[:3], unique[3:]
    rng.shuffle(head)
    return head + tail


def _math(rng: random.Random, template: Template, split: str) -> _Draft:
    item = _task_item(rng, MATH_FAMILIES, split)

    def response(answer: str) -> str:
        fields = _item_fields(item, answer)
        return respond(template.think.format(**fields), answer)

    wrong = near_misses(item.answer, rng)[:BEST_OF - 1]
    return _Draft(template.prompt.format(**_item_fields(item, item.answer)), response(item.answer),
                  tuple(response(w) for w in wrong), template.name, item.uid, {"item": item.to_dict()})


def _format(rng: random.Random, template: Template, split: str) -> _Draft:
    item = _task_item(rng, FORMAT_FAMILIES, split)
    fields = _item_fields(item, item.answer)
    think, answer = template.think.format(**fields), item.answer
    malformed = {
        "missing_close": f"<think>\n{think}\n\n{answer}",
        "two_answers": f"{respond(think, answer)}\n{respond('', answer)}",
        "empty_answer": respond(think, ""),
        "no_think_block": f"{think}\n\n{answer}",
    }
    kinds = list(malformed)
    rng.shuffle(kinds)
    return _Draft(template.prompt.format(**fields), respond(think, answer),
                  tuple(malformed[k] for k in kinds[:BEST_OF - 1]), template.name, item.uid, {})


def _person_fields(person: Entity) -> dict[str, str]:
    return {"name": person.name, **dict(person.attributes)}


def _wrong_values(world: World, person: Entity, attribute: str, rng: random.Random) -> list[str]:
    truth = person.attr(attribute)
    if attribute == "age":
        pool = [str(int(truth) + d) for d in (-11, -7, -3, -2, -1, 1, 2, 3, 7, 11)]
    else:
        pool = {"home": [c.name for c in world.cities], "job": list(JOBS), "pet": list(NOUNS_ANIMAL),
                "color": list(COLORS)}[attribute]
    wrong = [v for v in pool if v != truth]
    rng.shuffle(wrong)
    return wrong[:BEST_OF - 1]


def _fact(rng: random.Random, template: Template, split: str) -> _Draft:
    world = build_world(WORLD_SEED)
    for _ in range(10_000):
        person, attribute = rng.choice(world.people), rng.choice(PERSON_ATTRIBUTES)
        uid = tasks.item_uid("fact", f"{person.name}|{attribute}")
        if _wants(uid, split):
            break
    else:
        raise RuntimeError(f"preferences: no {split} fact in 10,000 draws")
    language = rng.choices(world.language_names, weights=world.language_weights)[0]
    fields = {"name": person.name, "attribute": attribute, "language": language}
    think = template.think.format(**fields)

    def stated(value: str) -> str:
        holder = dataclasses.replace(person, attributes=tuple(
            (k, value if k == attribute else v) for k, v in person.attributes))
        return respond(think, world.render_fact(language, holder, attribute))

    return _Draft(template.prompt.format(**fields), stated(person.attr(attribute)),
                  tuple(stated(v) for v in _wrong_values(world, person, attribute, rng)), template.name, uid,
                  {"person": person.name, "attribute": attribute, "language": language, "world_seed": WORLD_SEED})


# ---- instruction following: one IFEval constraint, satisfied or violated by one span
def _capitalised(words: list[str], index: int) -> str:
    out = list(words)
    out[index] = out[index][:1].upper() + out[index][1:]
    return " ".join(out)


def _lowercase(sentence: str, kwargs: Mapping[str, Any]) -> tuple[str, list[str]]:
    words = sentence.lower().split(" ")
    return " ".join(words), [_capitalised(words, i) for i in (0, len(words) // 2, len(words) - 1)]


def _no_comma(sentence: str, kwargs: Mapping[str, Any]) -> tuple[str, list[str]]:
    words = sentence.split(" ")
    return sentence, [" ".join([*words[:i], words[i] + ",", *words[i + 1:]]) for i in (0, 2, len(words) - 3)]


def _quotation(sentence: str, kwargs: Mapping[str, Any]) -> tuple[str, list[str]]:
    return f'"{sentence}"', [sentence, f'"{sentence}', f'{sentence}"']


KEYWORDS = ("happy", "quiet", "bright", "calm", "gentle", "busy")
"""Words the keyword constraints ask for or forbid; a sentence ends "... and feels <word>."."""
FEELING_VERBS = ("feels", "seems", "looks")


def _feeling(sentence: str, verb: str, word: str) -> str:
    return f"{sentence[:-1]} and {verb} {word}."


def _existence(sentence: str, kwargs: Mapping[str, Any]) -> tuple[str, list[str]]:
    keyword = kwargs["keywords"][0]
    others = [w for w in KEYWORDS if w != keyword]
    return _feeling(sentence, "feels", keyword), [_feeling(sentence, "feels", w) for w in others[:3]]


def _forbidden(sentence: str, kwargs: Mapping[str, Any]) -> tuple[str, list[str]]:
    word = kwargs["forbidden_words"][0]
    allowed = next(w for w in KEYWORDS if w != word)
    return _feeling(sentence, "feels", allowed), [_feeling(sentence, verb, word) for verb in FEELING_VERBS]


END_PHRASE = "Is there anything else I can help with?"
"""One of IFEval's end phrases."""


def _end_phrase(sentence: str, kwargs: Mapping[str, Any]) -> tuple[str, list[str]]:
    phrase = kwargs["end_phrase"]
    return f"{sentence} {phrase}", [sentence, f"{sentence} {phrase[:-1]}", f"{sentence} {phrase} Bye."]


def _title(sentence: str, kwargs: Mapping[str, Any]) -> tuple[str, list[str]]:
    name = sentence.split(" ")[0]
    return f"<<{name}>> {sentence}", [sentence, f"<{name}> {sentence}", f"{name}: {sentence}"]


@dataclass(frozen=True)
class Instruction:
    """An IFEval instruction id, how to draw its arguments, and how a sentence satisfies or violates it."""

    iid: str
    kwargs: Callable[[random.Random], dict[str, Any]]
    variants: Callable[[str, Mapping[str, Any]], tuple[str, list[str]]]


INSTRUCTIONS: tuple[Instruction, ...] = (
    Instruction("change_case:english_lowercase", lambda rng: {}, _lowercase),
    Instruction("punctuation:no_comma", lambda rng: {}, _no_comma),
    Instruction("startend:quotation", lambda rng: {}, _quotation),
    Instruction("keywords:existence", lambda rng: {"keywords": [rng.choice(KEYWORDS)]}, _existence),
    Instruction("keywords:forbidden_words", lambda rng: {"forbidden_words": [rng.choice(KEYWORDS)]}, _forbidden),
    Instruction("startend:end_checker", lambda rng: {"end_phrase": END_PHRASE}, _end_phrase),
    Instruction("detectable_format:title", lambda rng: {}, _title),
)
"""IFEval checks that make sense for a one-sentence answer about a person."""


@functools.lru_cache(maxsize=256)
def _description(iid: str, kwargs_key: str) -> str:
    """lm-eval's own wording of the instruction (what IFEval prompts say)."""
    checker = lm_eval_ifeval().registry.INSTRUCTION_DICT[iid](iid)
    return checker.build_description(**json.loads(kwargs_key))


def _instruction(rng: random.Random, template: Template, split: str) -> _Draft:
    world = build_world(WORLD_SEED)
    for _ in range(10_000):
        person, instruction = rng.choice(world.people), rng.choice(INSTRUCTIONS)
        uid = tasks.item_uid("instruction", f"{person.name}|{instruction.iid}")
        if _wants(uid, split):
            break
    else:
        raise RuntimeError(f"preferences: no {split} instruction prompt in 10,000 draws")
    kwargs = instruction.kwargs(rng)
    fields = _person_fields(person)
    description = _description(instruction.iid, _kwargs_key(kwargs))
    think = template.think.format(**fields)
    good, bad = instruction.variants(template.answer.format(**fields), kwargs)
    rng.shuffle(bad)
    return _Draft(template.prompt.format(instruction=description, **fields), respond(think, good),
                  tuple(respond(think, b) for b in bad), template.name, uid,
                  {"instruction_id_list": [instruction.iid], "kwargs": [kwargs]})


def _kwargs_key(kwargs: Mapping[str, Any]) -> str:
    return json.dumps(kwargs, sort_keys=True)


_DRAFTERS: dict[str, Callable[[random.Random, Template, str], _Draft]] = {
    "math": _math, "instruction": _instruction, "format": _format, "fact": _fact,
}


# ----------------------------------------------------------------------------- length control
def with_filler(response: str, filler: str) -> str:
    """`response` with `filler` as one more line of its think block (after the reasoning; into an empty
    block as its reasoning; at the start of an unclosed block), or as a first line when it has none."""
    opening = "<think>\n"
    close = response.find("\n</think>")
    if not response.startswith(opening):
        return f"{filler}\n{response}"
    if close < 0:
        return f"{opening}{filler}\n{response[len(opening):]}"
    body = response[len(opening):close]
    inside = f"{body}\n{filler}" if body.strip() else filler
    return f"{opening}{inside}{response[close:]}"


def lengthen(response: str, other: str, rng: random.Random) -> str:
    """`response` with filler sentences added until it is strictly longer than `other`."""
    fillers = list(FILLERS)
    rng.shuffle(fillers)
    k = 0
    while len(response) <= len(other):
        response = with_filler(response, fillers[k % len(fillers)])
        k += 1
    return response


def _balanced_flags(n: int, rng: random.Random) -> list[bool]:
    """n flags, half of them True (the odd one at random), in random order."""
    flags = [i < n // 2 for i in range(n)]
    if n % 2:
        flags[-1] = rng.random() < 0.5
    rng.shuffle(flags)
    return flags


# ----------------------------------------------------------------------------- builders
def _check_args(n: int, split: str, domains: Sequence[str]) -> tuple[str, ...]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"preferences: n must be an integer >= 0, got {n!r}")
    if split not in SPLITS:
        raise ValueError(f"preferences: unknown split {split!r}; known: {', '.join(SPLITS)}")
    domains = tuple(domains)
    unknown = [d for d in domains if d not in PREFERENCE_DOMAINS]
    if unknown or not domains:
        raise ValueError(f"preferences: domains must be a non-empty subset of {PREFERENCE_DOMAINS}, got {domains!r}")
    return domains


def _per_domain(n: int, domains: tuple[str, ...]) -> dict[str, int]:
    return {d: n // len(domains) + (i < n % len(domains)) for i, d in enumerate(domains)}


def _verified_draft(domain: str, rng: random.Random, split: str, n_rejected: int) -> _Draft:
    """A draft whose chosen response passes the checker and whose first `n_rejected` variants fail it."""
    templates = templates_of(domain, split)
    for _ in range(MAX_TRIES):
        draft = _DRAFTERS[domain](rng, rng.choice(templates), split)
        rejected = draft.rejected[:n_rejected]
        if len(rejected) == n_rejected and response_passes(domain, draft.chosen, draft.reference) and not any(
                response_passes(domain, r, draft.reference) for r in rejected):
            return dataclasses.replace(draft, rejected=rejected)
    raise RuntimeError(f"preferences: no {domain} prompt in {MAX_TRIES} tries that the checker labels as designed")


def build_preferences(n: int, *, seed: int, split: str,
                      domains: Sequence[str] = PREFERENCE_DOMAINS) -> list[PreferencePair]:
    """`n` pairs of `split`, spread evenly over `domains` (the first domains get the remainder) and
    shuffled; within each domain the chosen response is the longer one in half of the pairs."""
    domains = _check_args(n, split, domains)
    pairs: list[PreferencePair] = []
    for domain, count in _per_domain(n, domains).items():
        rng = random.Random(f"preferences|{domain}|{split}|{seed}")
        for chosen_longer in _balanced_flags(count, rng):
            draft = _verified_draft(domain, rng, split, 1)
            chosen, rejected = draft.chosen, draft.rejected[0]
            if chosen_longer:
                chosen = lengthen(chosen, rejected, rng)
            else:
                rejected = lengthen(rejected, chosen, rng)
            if not response_passes(domain, chosen, draft.reference) or response_passes(domain, rejected,
                                                                                        draft.reference):
                raise AssertionError(f"preferences: a filler changed the {domain} checker's verdict")
            pairs.append(PreferencePair(draft.prompt, chosen, rejected, domain, draft.template, split, draft.uid,
                                        draft.reference))
    random.Random(f"preferences-order|{split}|{seed}").shuffle(pairs)
    return pairs


def best_of_k_sets(n: int, *, seed: int, split: str, domains: Sequence[str] = PREFERENCE_DOMAINS,
                   k: int = BEST_OF) -> list[BestOfKSet]:
    """`n` best-of-k sets of `split` (one chosen response, k−1 distinct rejected ones, shuffled), spread
    over `domains`. One response of each set, at random, gets a filler sentence, so the longest one
    is the chosen one about 1/k of the time."""
    domains = _check_args(n, split, domains)
    if not 2 <= k <= BEST_OF:
        raise ValueError(f"preferences: k must be in 2..{BEST_OF}, got {k}")
    sets: list[BestOfKSet] = []
    for domain, count in _per_domain(n, domains).items():
        rng = random.Random(f"best-of-k|{domain}|{split}|{seed}|{k}")
        for _ in range(count):
            draft = _verified_draft(domain, rng, split, k - 1)
            responses = [draft.chosen, *draft.rejected]
            lucky = rng.randrange(k)
            responses[lucky] = with_filler(responses[lucky], rng.choice(FILLERS))
            if response_passes(domain, responses[lucky], draft.reference) != (lucky == 0):
                raise AssertionError(f"preferences: a filler changed the {domain} checker's verdict")
            rejected = responses[1:]
            rng.shuffle(rejected)
            sets.append(BestOfKSet(draft.prompt, responses[0], tuple(rejected), domain, draft.template, split,
                                   draft.uid, draft.reference))
    random.Random(f"best-of-k-order|{split}|{seed}").shuffle(sets)
    return sets
