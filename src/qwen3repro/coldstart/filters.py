"""Query and response filters of the long-CoT cold start (Qwen3 report §4.1).

Query filter (before generation): drop queries that are not easily verifiable — no verifier, or
several sub-questions in one — and queries a reference model answers correctly *without* chain of
thought (too easy to teach reasoning). It also drops queries whose problem (question and reference
solution) overlaps a reserved validation item as much as a copied response would: otherwise even a
clean response to them is "too similar to validation items". Each rejection is counted under its
reason.

Response filter (after generation, for queries with positive Pass@N): six detectors, one per
defect kind of §4.1, each reading only the response text (and the query's reference and the
reserved validation set), never the generator's labels:

1. ``wrong_answer`` — the final answer (the ``Answer:`` line of the summary, else its last line)
   fails the query's verifier; malformed output (no ``</think>``, broken tool-call JSON, an empty
   answer) counts as wrong;
2. ``repetition`` — the share of repeated token n-grams in the response exceeds a threshold, or
   a block of lines is written again and again back to back (a loop; in a long trace a short loop
   dilutes the n-gram share, while a correct trace's legitimately similar steps never loop);
3. ``guesswork`` — fewer reasoning steps (lines that compute: ``=`` or ``>``) than a set share
   of the reference trace's steps, i.e. too little reasoning for the problem's difficulty;
4. ``inconsistency`` — the answer the thinking concludes ("so the answer is X") differs from the
   summary's final answer;
5. ``language_mixing`` — a line of the response is in one of the synthetic languages
   (`World.language_shares`) while the query is not in that language;
6. ``validation_copy`` — a reserved validation item's token n-grams are contained in the response
   above a threshold.

`detector_metrics` scores the detectors against injected labels (precision and recall per kind).
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..chat import parse
from ..config import ConfigError
from ..config_fields import Positive, checked_fields
from ..data import tasks
from ..data.queries import NO_VERIFIER, Query
from ..data.world import World, build_world
from ..rewards import RewardResult, get_reward
from .reasoner import (ANSWER_PREFIX, CHECK_PREFIX, CONCLUSION, DEFECTS, GUESSWORK, INCONSISTENCY,
                       LANGUAGE_MIXING, REPETITION, VALIDATION_COPY, WRONG_ANSWER, wrong_value)

# Query-filter rejection reasons, in the order they are checked (NO_VERIFIER is shared with RL selection).
MULTIPLE_SUBQUESTIONS = "multiple_subquestions"
NEAR_VALIDATION = "near_validation"
ANSWERED_WITHOUT_COT = "answered_without_cot"
QUERY_REJECT_REASONS = (NO_VERIFIER, MULTIPLE_SUBQUESTIONS, NEAR_VALIDATION, ANSWERED_WITHOUT_COT)


@dataclass(frozen=True)
class FilterThresholds:
    """Detector thresholds (recipes/cold-start.toml documents the choices)."""

    repetition_ngram: Positive = 8
    repetition_max_ratio: float = 0.3
    """Flag when more than this share of the response's token n-grams repeat an earlier one ..."""
    repetition_max_loops: Positive = 3
    """... or when a block of up to `repetition_max_block` lines occurs this many times in a row."""
    repetition_max_block: Positive = 8
    guess_min_step_ratio: float = 0.5
    """Flag when the thinking has fewer reasoning steps than this share of the reference trace's."""
    mixing_min_words: Positive = 2
    """A line counts as written in a language when it has at least this many words ..."""
    mixing_min_share: float = 0.5
    """... and at least this share of them are words of the synthetic languages' lexicons."""
    similarity_ngram: Positive = 8
    similarity_max_containment: float = 0.5
    """Flag when more than this share of a validation item's token n-grams occur in the response."""
    max_subquestions: Positive = 1

    def __post_init__(self) -> None:
        for name in ("repetition_ngram", "repetition_max_loops", "repetition_max_block", "similarity_ngram",
                     "mixing_min_words",
                     "max_subquestions"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"filter threshold {name} must be an integer >= 1")
        for name in ("repetition_max_ratio", "guess_min_step_ratio", "mixing_min_share", "similarity_max_containment"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ConfigError(f"filter threshold {name} must be in [0, 1]")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "FilterThresholds") -> "FilterThresholds":
        return cls(**checked_fields(cls, d, where))


# ============================================================================ reading a response
_TOKEN = re.compile(r"\w+|[^\w\s]")
_STEP = re.compile(r"[=>]")
_ARITH_QUESTION = re.compile(r"[\d)]\s*=\s*(?:$|\n|(?=[A-Z]))", re.MULTILINE)


def tokens(text: str) -> list[str]:
    """Words, numbers and single punctuation marks (the unit of the n-gram detectors)."""
    return _TOKEN.findall(text)


def ngrams(toks: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]


def final_answer(content: str) -> str:
    """The answer of a summary: after the last ``Answer:``, else its last non-empty line."""
    lines = [line.strip() for line in content.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(ANSWER_PREFIX.strip()):
            return line[len(ANSWER_PREFIX.strip()):].strip()
    return lines[-1] if lines else ""


def thinking_answer(reasoning: str) -> str | None:
    """What the thinking concludes (its last "so the answer is X"), or None."""
    found = None
    for line in reasoning.splitlines():
        idx = line.find(CONCLUSION)
        if idx >= 0:
            found = line[idx + len(CONCLUSION):].strip()
    return found


def reasoning_steps(reasoning: str) -> int:
    """Lines of the thinking that compute something (``=`` or ``>``), not counting the conclusion
    and self-check lines."""
    return sum(1 for line in reasoning.splitlines()
               if _STEP.search(line) and CONCLUSION not in line and not line.startswith(CHECK_PREFIX))


def count_subquestions(question: str) -> int:
    """Question marks plus arithmetic questions ("...=" at a line end) in a query."""
    return question.count("?") + len(_ARITH_QUESTION.findall(question))


def score_answer(answer_text: str, query: Query) -> RewardResult:
    """The query's verifier on a bare final answer (None score: no verifier or a verifier failure)."""
    if query.verifier is None:
        return RewardResult(None, "no verifier")
    if not answer_text.strip():
        return RewardResult(0.0, "empty answer")
    try:
        return get_reward(query.verifier)(answer_text, **query.reference)
    except Exception as exc:  # noqa: BLE001 - a verifier crash is not the response's fault
        return RewardResult(None, f"verifier failed: {type(exc).__name__}: {exc}")


def score_response(text: str, query: Query) -> RewardResult:
    """Score a full assistant output. Malformed output scores 0 and never raises: no ``</think>``
    (cut mid-thought), a broken tool call, an empty final answer."""
    if not isinstance(text, str) or "</think>" not in text:
        return RewardResult(0.0, "no </think>")
    parsed = parse(text)
    if parsed["errors"]:
        return RewardResult(0.0, "malformed tool call: " + parsed["errors"][0]["error"])
    return score_answer(final_answer(parsed["content"]), query)


# ============================================================================ query filter
class BoundedMentalSolver:
    """The tiny-scale no-CoT reference model: answers right exactly when a problem needs at most
    `max_steps` reasoning steps (its reference trace length), and otherwise a near miss.

    Why: the report drops queries that Qwen2.5-72B-Instruct answers without chain of thought,
    i.e. those within a strong model's one-shot ability. Our tiny pretrained models answer almost
    nothing without a trace, so using one as the reference would filter nothing; this solver
    models a reference that can do short problems in its head, so the filter removes the easiest
    items as in the report. A `ModelGenerator(enable_thinking=False).answer` can replace it.
    """

    def __init__(self, max_steps: int = 3) -> None:
        self.max_steps = max_steps

    def __call__(self, query: Query) -> str:
        if query.item is None:
            return ""
        if len(query.item.trace_steps) <= self.max_steps:
            return query.item.answer
        return wrong_value(query.item.answer, query.item, random.Random(f"mental|{query.uid}"))


def reject_reason(query: Query, reference: Callable[[Query], str] | None, thresholds: FilterThresholds,
                  detectors: "ResponseFilter | None" = None) -> str | None:
    """Why the query filter drops `query` (one of QUERY_REJECT_REASONS), or None to keep it.
    `detectors` (holding the validation set) enables the near-validation check."""
    if query.verifier is None:
        return NO_VERIFIER
    if count_subquestions(query.question) > thresholds.max_subquestions:
        return MULTIPLE_SUBQUESTIONS
    if detectors is not None and query.item is not None:
        problem = query.question + "\n" + tasks.render_trace(query.item)
        if detectors.validation_containment(problem) > thresholds.similarity_max_containment:
            return NEAR_VALIDATION
    if reference is not None:
        parsed = parse(reference(query))
        if score_answer(final_answer(parsed["content"]), query).score == 1.0:
            return ANSWERED_WITHOUT_COT
    return None


def filter_queries(queries: Sequence[Query], reference: Callable[[Query], str] | None,
                   thresholds: FilterThresholds, detectors: "ResponseFilter | None" = None,
                   ) -> tuple[list[Query], dict[str, int]]:
    """(kept queries, {reason: rejected count} with every reason present)."""
    kept, rejected = [], {r: 0 for r in QUERY_REJECT_REASONS}
    for q in queries:
        reason = reject_reason(q, reference, thresholds, detectors)
        if reason is None:
            kept.append(q)
        else:
            rejected[reason] += 1
    return kept, rejected


# ============================================================================ response filter
class ResponseFilter:
    """The six §4.1 detectors over response text. `validation` is the reserved validation set."""

    def __init__(self, thresholds: FilterThresholds | None = None, *, validation: Sequence[tasks.TaskItem] = (),
                 world: World | None = None) -> None:
        self.t = thresholds or FilterThresholds()
        self.world = world or build_world(0)
        self._lexicon = self.world.word_languages()
        n = self.t.similarity_ngram
        self._val_sizes: list[int] = []
        self._val_index: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, item in enumerate(validation):
            grams = set(ngrams(tokens(item.question + "\n" + tasks.render_trace(item)), n))
            self._val_sizes.append(len(grams))
            for g in grams:
                self._val_index[g].append(i)

    # ---------------------------------------------------------------- detectors
    def repetition_ratio(self, text: str) -> float:
        grams = ngrams(tokens(text), self.t.repetition_ngram)
        return 1.0 - len(set(grams)) / len(grams) if grams else 0.0

    def max_loop(self, text: str) -> int:
        """The most times a block of 1..repetition_max_block lines occurs back to back."""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        best = 1 if lines else 0
        for k in range(1, self.t.repetition_max_block + 1):
            for start in range(len(lines) - 2 * k + 1):
                block, copies = lines[start:start + k], 1
                while lines[start + copies * k: start + (copies + 1) * k] == block:
                    copies += 1
                best = max(best, copies)
        return best

    def is_repetitive(self, text: str) -> bool:
        return (self.repetition_ratio(text) > self.t.repetition_max_ratio
                or self.max_loop(text) >= self.t.repetition_max_loops)

    def _is_lexicon_word(self, word: str) -> bool:
        # `language_shares` also knows inflected forms (plural and past suffixes).
        return word in self._lexicon or any(v > 0 for v in self.world.language_shares(word).values())

    def _line_words(self, line: str) -> tuple[int, int]:
        """(words, words of the synthetic lexicons) in a line. A capitalised word inside a sentence
        is a person's or city's name (language-neutral) and is not counted as a lexicon word."""
        words = known = 0
        for m in re.finditer(r"[A-Za-zà-ÿ]+", line):
            words += 1
            word = m.group(0)
            before = line[: m.start()].rstrip()
            is_name = word[0].isupper() and bool(before) and before[-1] not in ".?!"
            known += (not is_name) and self._is_lexicon_word(word.lower())
        return words, known

    def foreign_languages(self, text: str) -> set[str]:
        """Languages of the lines written (mostly) in a synthetic language."""
        found = set()
        for line in text.splitlines():
            words, known = self._line_words(line)
            if words < self.t.mixing_min_words:
                continue
            if known / words >= self.t.mixing_min_share:
                shares = self.world.language_shares(line)
                found.add(max(shares, key=shares.get))
        return found

    def validation_containment(self, text: str) -> float:
        """The largest share of one validation item's n-grams found in `text`."""
        if not self._val_sizes:
            return 0.0
        hits: Counter = Counter()
        for g in set(ngrams(tokens(text), self.t.similarity_ngram)):
            for i in self._val_index.get(g, ()):
                hits[i] += 1
        return max((c / self._val_sizes[i] for i, c in hits.items() if self._val_sizes[i]), default=0.0)

    def detect(self, text: str, query: Query) -> dict[str, bool]:
        """{defect kind: flagged} for one response to `query`. Never raises on malformed text."""
        text = text if isinstance(text, str) else ""
        parsed = parse(text)
        reasoning, content = parsed["reasoning_content"], parsed["content"]
        final = final_answer(content)
        concluded = thinking_answer(reasoning)
        ref_steps = len(query.item.trace_steps) if query.item is not None else 1
        needed = max(1, math.ceil(self.t.guess_min_step_ratio * ref_steps))
        query_langs = self.foreign_languages(query.question)
        return {
            WRONG_ANSWER: score_response(text, query).score != 1.0,
            REPETITION: self.is_repetitive(reasoning + "\n" + content),
            GUESSWORK: reasoning_steps(reasoning) < needed,
            INCONSISTENCY: concluded is not None and bool(final)
            and tasks.normalize_answer(concluded) != tasks.normalize_answer(final),
            LANGUAGE_MIXING: bool(self.foreign_languages(reasoning + "\n" + content) - query_langs),
            VALIDATION_COPY: self.validation_containment(text) > self.t.similarity_max_containment,
        }


# ============================================================================ scoring detectors
def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def detector_metrics(flags: Sequence[Mapping[str, bool]], labels: Sequence[Iterable[str]],
                     kinds: Sequence[str] = DEFECTS) -> dict[str, dict[str, Any]]:
    """Per defect kind: tp, fp, fn, tn, precision = tp/(tp+fp), recall = tp/(tp+fn) (None when the
    denominator is 0), comparing each response's flags with its label set."""
    if len(flags) != len(labels):
        raise ValueError(f"{len(flags)} flag sets but {len(labels)} label sets")
    out = {}
    for kind in kinds:
        tp = fp = fn = tn = 0
        for f, lab in zip(flags, labels):
            pred, true = bool(f.get(kind)), kind in set(lab)
            tp += pred and true
            fp += pred and not true
            fn += true and not pred
            tn += not pred and not true
        out[kind] = {"tp": tp, "fp": fp, "fn": fn, "tn": tn,
                     "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn)}
    return out


__all__ = [
    "ANSWERED_WITHOUT_COT", "BoundedMentalSolver", "FilterThresholds", "MULTIPLE_SUBQUESTIONS", "NEAR_VALIDATION",
    "QUERY_REJECT_REASONS", "ResponseFilter", "count_subquestions", "detector_metrics", "filter_queries",
    "final_answer", "ngrams", "reasoning_steps", "reject_reason", "score_answer", "score_response",
    "thinking_answer", "tokens",
]
