"""Candidate generators for the cold start: N long-CoT responses per query.

Qwen3 report §4.1: after the validation set is reserved, QwQ-32B writes N candidate responses per
query, which the response filter then cleans. Here a generator is anything with
``generate(queries, n, seed) -> list[list[Candidate]]`` (`CandidateGenerator`):

* `SyntheticReasoner` — the tiny-scale stand-in for QwQ. Its clean response thinks with the
  verified reference trace of the item (`data.tasks`, least-significant digit first), sometimes
  with an extra self-check line or a redo (a wrong step, "wait, recheck", the right step), then
  concludes, and after ``</think>`` writes a one-line summary and ``Answer: X``. It injects the six
  defect kinds of §4.1 at configurable rates and labels each candidate with the defects it really
  has, so the detectors in `filters` (which read only the text) can be scored against the labels.
* `ModelGenerator` — a `Qwen3` checkpoint behind our engine (`qwen3repro.generate`), in thinking
  or non-thinking mode; its candidates have no labels.
* `OpenAICompatibleGenerator` — a chat-completions endpoint (vLLM, SGLang, ...) for full scale; it
  builds the HTTP request (`build_request`) and posts it with the standard library.

Summary styles (`SUMMARY_STYLES`): ``"restate"`` writes ``In short: <the trace's result line>.``
then ``Answer: X`` — the answer line the S2 reasoning corpus teaches (`data.synthetic.render_problem`);
``"answer"`` writes the bare answer, which is what the ``task`` reward (exact match of everything
after ``</think>``) accepts. The filters read the final answer from either.
"""
from __future__ import annotations

import json
import os
import random
import re
import urllib.request
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Protocol, Sequence

from ..chat import EMPTY_THINK, render
from ..config import ConfigError
from ..config_fields import checked_fields
from ..data import tasks
from ..data.queries import Query
from ..data.world import World, build_world
from ..generate import GREEDY, NON_THINKING_SAMPLING, THINKING_SAMPLING, generate

# The six defect kinds of Qwen3 report §4.1 (stage 1 response filtering), in the report's order.
WRONG_ANSWER = "wrong_answer"
REPETITION = "repetition"
GUESSWORK = "guesswork"
INCONSISTENCY = "inconsistency"
LANGUAGE_MIXING = "language_mixing"
VALIDATION_COPY = "validation_copy"
DEFECTS = (WRONG_ANSWER, REPETITION, GUESSWORK, INCONSISTENCY, LANGUAGE_MIXING, VALIDATION_COPY)

CONCLUSION = "so the answer is "
ANSWER_PREFIX = "Answer: "
SUMMARY_PREFIX = "In short: "
SUMMARY_STYLES = ("restate", "answer")
CHECK_PREFIX = "check: "
REDO_LINE = "wait, that step is wrong, redo it"
GUESS_OPENERS = ("this looks like roughly {x}", "no need to work it out, it is about {x}", "I would guess {x}")


@dataclass(frozen=True)
class Candidate:
    """One candidate response: the full assistant output (``<think>...</think>`` summary) and, for
    synthetic candidates, the set of defects injected into it (None: unknown, e.g. a model's)."""

    query_uid: str
    index: int
    text: str
    labels: frozenset[str] | None = None


class CandidateGenerator(Protocol):
    def generate(self, queries: Sequence[Query], n: int, seed: int = 0) -> list[list[Candidate]]:
        """`n` candidates for each query, in query order."""
        ...


# ============================================================================ synthetic reasoner
@dataclass(frozen=True)
class DefectRates:
    """Probability of each defect per candidate (at most one primary defect per candidate, so the
    rates must sum to <= 1), plus the variation of clean responses. See recipes/cold-start.toml."""

    wrong_answer: float = 0.12
    repetition: float = 0.08
    guesswork: float = 0.08
    inconsistency: float = 0.06
    language_mixing: float = 0.06
    validation_copy: float = 0.04
    hard_query: float = 0.05
    """Share of queries the reasoner always gets wrong (Pass@N = 0: sent to review, not trained)."""
    subtle: float = 0.2
    """Share of repetition, language-mixing and validation-copy defects written in a weak form that
    sits at the detectors' edges: one repeat of a block, one foreign word in an English line, half
    of a validation item's trace. What the detectors miss of these shows in their recall."""
    guess_correct: float = 0.5
    """A guess hits the right answer this often (else it is also a wrong answer)."""
    self_check: float = 0.3
    """Clean variation: a closing self-check line."""
    redo: float = 0.15
    """Clean variation: one wrong step caught and redone."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ConfigError(f"defect rate {f.name} must be in [0, 1], got {v!r}")
        if sum(getattr(self, d) for d in DEFECTS) > 1.0 + 1e-9:
            raise ConfigError("the six defect rates must sum to at most 1")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "DefectRates") -> "DefectRates":
        return cls(**checked_fields(cls, d, where))


def wrong_value(answer: str, item: tasks.TaskItem | None, rng: random.Random) -> str:
    """A plausible wrong answer: a nearby integer, or another name from the question."""
    if re.fullmatch(r"\d+", answer):
        value = int(answer)
        for _ in range(20):
            cand = value + rng.choice((-1, 1)) * rng.choice((1, 1, 2, 10, 100))
            if cand >= 0 and cand != value:
                return str(cand)
        return str(value + 1)
    names = sorted(set(re.findall(r"\b[A-Z][a-z]+\b", item.question if item else "")) - {answer, "Who"})
    return rng.choice(names) if names else answer + "x"


def _replace_tail(line: str, old: str, new: str) -> str:
    return line[: -len(old)] + new if old and line.endswith(old) else f"{line} {new}"


def summary_text(item: tasks.TaskItem, answer: str, style: str = "restate") -> str:
    """The part after ``</think>``: the trace's result line restated, then the answer line
    (``style="restate"``), or the bare answer (``style="answer"``)."""
    if style == "answer":
        return answer
    if style != "restate":
        raise ValueError(f"summary style must be one of {SUMMARY_STYLES}, got {style!r}")
    return f"{SUMMARY_PREFIX}{_replace_tail(item.trace_steps[-1], item.answer, answer)}.\n{ANSWER_PREFIX}{answer}"


def assemble(thinking_lines: Sequence[str], summary: str) -> str:
    """The assistant output as the chat template renders it after the header."""
    return "<think>\n" + "\n".join(thinking_lines) + "\n</think>\n\n" + summary


_DIGIT_RESULT = re.compile(r"^(.*=)(\d+)(, write .*)$")


class SyntheticReasoner:
    """Step-by-step thinking from the reference trace, with labelled defects at set rates.

    Deterministic in (seed, query uid, candidate index). `validation` feeds the near-copy defect,
    `world` the language-mixing defect (sentences in the synthetic languages).
    """

    def __init__(self, rates: DefectRates | None = None, *, validation: Sequence[tasks.TaskItem] = (),
                 world: World | None = None, summary_style: str = "restate") -> None:
        if summary_style not in SUMMARY_STYLES:
            raise ConfigError(f"summary_style must be one of {SUMMARY_STYLES}, got {summary_style!r}")
        self.summary_style = summary_style
        self.rates = rates or DefectRates()
        self.validation = tuple(validation)
        self.world = world or build_world(0)

    # ---------------------------------------------------------------- public
    def generate(self, queries: Sequence[Query], n: int, seed: int = 0) -> list[list[Candidate]]:
        return [[self.candidate(q, i, seed) for i in range(n)] for q in queries]

    def candidate(self, query: Query, index: int, seed: int = 0) -> Candidate:
        rng = random.Random(f"reasoner|{seed}|{query.uid}|{index}")
        if query.item is None:  # an unverifiable query: a plain reply, nothing to check
            return Candidate(query.uid, index, assemble(["the request has no single answer"], "Here is a reply."),
                             frozenset())
        hard = random.Random(f"reasoner-hard|{seed}|{query.uid}").random() < self.rates.hard_query
        defect = WRONG_ANSWER if hard else self._draw_defect(rng)
        lines, summary, labels = self._respond(query.item, defect, rng)
        return Candidate(query.uid, index, assemble(lines, summary), frozenset(labels))

    # ---------------------------------------------------------------- pieces
    def _draw_defect(self, rng: random.Random) -> str | None:
        u, acc = rng.random(), 0.0
        for name in DEFECTS:
            acc += getattr(self.rates, name)
            if u < acc:
                return name
        return None

    def _clean_lines(self, item: tasks.TaskItem, rng: random.Random) -> list[str]:
        lines = list(item.trace_steps)
        if rng.random() < self.rates.redo:
            digit_steps = [i for i, s in enumerate(lines) if _DIGIT_RESULT.match(s)]
            if digit_steps:
                i = rng.choice(digit_steps)
                m = _DIGIT_RESULT.match(lines[i])
                bad = f"{m.group(1)}{int(m.group(2)) + rng.randint(1, 3)}{m.group(3)}"
                lines[i:i] = [bad, REDO_LINE]
        if rng.random() < self.rates.self_check:
            lines.append(f"{CHECK_PREFIX}{item.trace_steps[-1]} holds")
        return lines

    def _respond(self, item: tasks.TaskItem, defect: str | None, rng: random.Random) -> tuple[list[str], str, set[str]]:
        answer = item.answer
        lines = self._clean_lines(item, rng)
        labels: set[str] = set()
        think_answer = summary_answer = answer
        if defect == WRONG_ANSWER:  # a consistent mistake: the result line, conclusion and summary agree
            wrong = wrong_value(answer, item, rng)
            last = lines.index(item.trace_steps[-1])
            lines[last] = _replace_tail(lines[last], answer, wrong)
            lines = [s for s in lines if not s.startswith(CHECK_PREFIX)]
            think_answer = summary_answer = wrong
            labels.add(WRONG_ANSWER)
        elif defect == GUESSWORK:
            guess = answer if rng.random() < self.rates.guess_correct else wrong_value(answer, item, rng)
            lines = [rng.choice(GUESS_OPENERS).format(x=guess)]
            think_answer = summary_answer = guess
            labels.add(GUESSWORK)
            if guess != answer:
                labels.add(WRONG_ANSWER)
        elif defect == REPETITION:  # a loop: a block of 2-4 steps written again and again
            subtle = rng.random() < self.rates.subtle
            size = min(len(lines), rng.randint(2, 4))
            start = rng.randrange(0, len(lines) - size + 1)
            block = lines[start:start + size]
            lines[start:start + size] = block * (2 if subtle else rng.randint(4, 7))
            labels.add(REPETITION)
        elif defect == INCONSISTENCY:
            wrong = wrong_value(answer, item, rng)
            if rng.random() < 0.5:
                think_answer = wrong  # the thinking concludes one thing, the summary another
            else:
                summary_answer = wrong
                labels.add(WRONG_ANSWER)
            labels.add(INCONSISTENCY)
        elif defect == LANGUAGE_MIXING:
            langs = rng.sample(self.world.languages, rng.randint(1, 2))
            if rng.random() < self.rates.subtle:  # one foreign word slipped into a step
                i = rng.randrange(len(lines))
                word = rng.choice(list(langs[0].lexicon.values()))
                lines[i] = f"{lines[i]} {word}"
            else:
                for _ in range(rng.randint(1, 3)):
                    sentence = self.world.render(rng.choice(langs), self.world.random_frame(rng))
                    lines.insert(rng.randrange(0, len(lines) + 1), sentence)
            labels.add(LANGUAGE_MIXING)
        elif defect == VALIDATION_COPY and self.validation:
            same = [v for v in self.validation if v.family == item.family] or list(self.validation)
            val = rng.choice(same)
            steps = list(val.trace_steps)
            if rng.random() < self.rates.subtle:
                steps = steps[: max(1, len(steps) // 2)]
            lines[0:0] = [f"this is like {val.question}", *steps, f"which gives {val.answer}"]
            labels.add(VALIDATION_COPY)
        lines.append(CONCLUSION + think_answer)
        return lines, summary_text(item, summary_answer, self.summary_style), labels


# ============================================================================ model-backed generators
@dataclass
class ModelGenerator:
    """Candidates sampled from a `Qwen3` checkpoint through `qwen3repro.generate`.

    With ``enable_thinking=False`` the chat template pre-fills an empty think block, which makes
    the same object a no-CoT reference model for the query filter (`answer`).
    """

    model: Any
    tokenizer: Any
    params: Any = None
    """`generate.SamplingParams`; default THINKING_SAMPLING (or NON_THINKING_SAMPLING without thinking)."""
    max_new_tokens: int = 256
    enable_thinking: bool = True
    max_batch_size: int = 64

    def _prompt(self, query: Query) -> list[int]:
        text = render([{"role": "user", "content": query.question}], add_generation_prompt=True,
                      enable_thinking=self.enable_thinking)
        return self.tokenizer.encode(text)

    def _params(self):
        if self.params is not None:
            return self.params
        return THINKING_SAMPLING if self.enable_thinking else NON_THINKING_SAMPLING

    def completions(self, queries: Sequence[Query], n: int, seed: int = 0, params=None) -> list[list[str]]:
        """`n` decoded completions per query (the text after the generation prompt)."""
        prompts = [self._prompt(q) for q in queries for _ in range(n)]
        outs = generate(self.model, prompts, params or self._params(), max_new_tokens=self.max_new_tokens,
                        tokenizer=self.tokenizer, seed=seed, max_batch_size=self.max_batch_size)
        prefix = "" if self.enable_thinking else EMPTY_THINK  # the pre-filled block is part of the answer
        texts = [prefix + self.tokenizer.decode(o.token_ids) for o in outs]
        return [texts[i * n:(i + 1) * n] for i in range(len(queries))]

    def generate(self, queries: Sequence[Query], n: int, seed: int = 0) -> list[list[Candidate]]:
        return [[Candidate(q.uid, i, t) for i, t in enumerate(ts)]
                for q, ts in zip(queries, self.completions(queries, n, seed))]

    def answer(self, query: Query) -> str:
        """One greedy completion (the reference-model call of the query filter)."""
        return self.completions([query], 1, params=GREEDY)[0][0]


@dataclass
class OpenAICompatibleGenerator:
    """Candidates from an OpenAI-compatible chat-completions endpoint (full scale: e.g. a QwQ-32B
    served by vLLM). The reasoning comes back as `reasoning_content` (vLLM/SGLang reasoning
    parsers) or inline in the content; either way it is returned as ``<think>...</think>`` text."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 32768
    timeout_s: float = 600.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    opener: Callable[..., Any] | None = None
    """Replaces `urllib.request.urlopen` (tests, proxies)."""

    def build_request(self, query: Query, n: int, seed: int = 0) -> urllib.request.Request:
        body = {"model": self.model, "messages": [{"role": "user", "content": query.question}], "n": n,
                "temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                "seed": seed, **self.extra_body}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(self.base_url.rstrip("/") + "/chat/completions",
                                      data=json.dumps(body).encode(), headers=headers, method="POST")

    @staticmethod
    def choice_text(choice: Mapping[str, Any]) -> str:
        message = choice.get("message") or {}
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        content = message.get("content") or ""
        return f"<think>\n{reasoning}\n</think>\n\n{content}" if reasoning else content

    def generate(self, queries: Sequence[Query], n: int, seed: int = 0) -> list[list[Candidate]]:
        opener = self.opener or urllib.request.urlopen
        out = []
        for q in queries:
            with opener(self.build_request(q, n, seed), timeout=self.timeout_s) as resp:
                payload = json.loads(resp.read())
            out.append([Candidate(q.uid, i, self.choice_text(c)) for i, c in enumerate(payload.get("choices", []))])
        return out


__all__ = [
    "ANSWER_PREFIX", "CONCLUSION", "Candidate", "CandidateGenerator", "DEFECTS", "DefectRates", "GUESSWORK",
    "INCONSISTENCY", "LANGUAGE_MIXING", "ModelGenerator", "OpenAICompatibleGenerator", "REPETITION",
    "SUMMARY_STYLES", "SyntheticReasoner", "VALIDATION_COPY", "WRONG_ANSWER", "assemble", "summary_text", "wrong_value",
]
