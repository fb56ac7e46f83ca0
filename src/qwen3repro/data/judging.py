"""Grading conversations: the judge's side of the reference-judged general tasks, as SFT data.

General RL scores answers a rule cannot check with a judge model that compares them with a reference
answer (Qwen3 report §4.4; Qwen2.5-72B-Instruct there). At CPU scales the judge is one of our own
checkpoints behind an OpenAI-compatible server, and a tiny model that has never seen a grading request
never writes the `Score:` line, so every judged reward would be "no reward". The fusion set therefore
holds grading conversations built from the judge tasks' training queries (`data.general_tasks`, kind
"judge"): the judge's own prompt (`rewards.judge.judge_prompt`, exactly what `JudgeClient` sends) with a
response that is either the reference answer or the reference with one fact changed — another value of
the same attribute, or an age off by a few years — and a verdict ending in `Score: 10` or `Score: 0`.
Half of the responses are right. The judge runs in non-thinking mode, so the verdict follows an empty
think block.
"""
from __future__ import annotations

import random
import re
from typing import Any

from ..chat import EMPTY_THINK
from ..rewards.judge import judge_prompt
from . import general_tasks
from .world import PERSON_ATTRIBUTES, World, build_world

__all__ = ["AGREES", "DISAGREES", "corrupt", "judging_conversations"]

AGREES = "The response gives the same facts as the reference answer.\nScore: {max_score}"
DISAGREES = "The response contradicts the reference answer.\nScore: 0"
_NUMBER = re.compile(r"\b\d+\b")


def corrupt(reference: str, world: World, rng: random.Random) -> str | None:
    """`reference` with one fact changed (None when it states none this can change): a person's attribute
    value replaced by another value of that attribute, or a number moved by 1-5."""
    values: dict[str, set[str]] = {a: {p.attr(a) for p in world.people} for a in PERSON_ATTRIBUTES if a != "age"}
    present = [(a, v) for a, vs in values.items() for v in sorted(vs) if re.search(rf"\b{re.escape(v)}\b", reference)]
    numbers = list(_NUMBER.finditer(reference))
    if present and (not numbers or rng.random() < 0.5):
        attribute, value = rng.choice(present)
        other = rng.choice(sorted(values[attribute] - {value}))
        return re.sub(rf"\b{re.escape(value)}\b", other, reference, count=1)
    if numbers:
        m = rng.choice(numbers)
        shifted = int(m.group()) + rng.choice([-1, 1]) * rng.randint(1, 5)
        return reference[:m.start()] + str(abs(shifted)) + reference[m.end():]
    return None


def judging_conversations(n: int, *, seed: int, world: World | None = None,
                          max_score: int = 10) -> list[dict[str, Any]]:
    """`n` grading conversations as records {"messages", "meta"} (module docstring)."""
    world = world if world is not None else build_world()
    judged = {name: 1.0 for name, task in general_tasks.GENERAL_TASKS.items() if task.kind == "judge"}
    rng = random.Random(f"judging|{seed}")
    out = []
    for name, query, _ in general_tasks.demonstrations(judged, n, seed=seed, world=world):
        reference = query.reference["reference"]
        wrong = corrupt(reference, world, rng) if rng.random() < 0.5 else None
        response = wrong if wrong is not None else reference
        verdict = (DISAGREES if wrong is not None else AGREES).format(max_score=max_score)
        messages = [{"role": "user", "content": judge_prompt(query.question, reference, response, max_score)},
                    {"role": "assistant", "content": EMPTY_THINK + verdict}]
        out.append({"messages": messages, "meta": {"kind": "judging", "task": name, "agrees": wrong is None}})
    return out
