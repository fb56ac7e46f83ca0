"""Reference answers matched after normalisation: the rule reward of general RL's short-answer tasks.

Knowledge recall, retrieval-augmented answers, multilingual facts and translations, and the final
answer of a tool-use trajectory all have one reference string. The reward "answer_match" reads only
the final answer (`answer_text`: the content after the think block, tool-call blocks removed). A
multi-turn caller passes the model's last turn, never the tool responses, so a string the tool
returned cannot satisfy the match (a known pitfall of rewarding whole decoded trajectories).

Both sides are normalised as the synthetic families are (`data.tasks.normalize_answer`: integers
without signs, zeros or separators; other text lower-cased with a trailing full stop ignored), with
runs of whitespace collapsed. `match="exact"` needs the normalised answer to equal the reference;
`match="contains"` needs the reference to occur in the answer as whole words (not inside another
word or number: "12" is not in "123").
"""
from __future__ import annotations

import re

from ..data.tasks import normalize_answer
from .registry import RewardResult, answer_text, register

__all__ = ["MATCH_MODES", "answer_match_reward", "normalized"]

MATCH_MODES = ("exact", "contains")


def normalized(text: str) -> str:
    """`normalize_answer` with runs of whitespace collapsed to one space."""
    return " ".join(normalize_answer(text).split())


@register("answer_match")
def answer_match_reward(completion: str, answer: str, match: str = "exact") -> RewardResult:
    """1.0 when the final answer equals (or, with `match="contains"`, contains) `answer` after normalisation."""
    if not isinstance(answer, str) or not normalized(answer):
        return RewardResult(None, f"bad answer_match reference: empty or non-string answer {answer!r}")
    if match not in MATCH_MODES:
        return RewardResult(None, f"bad answer_match reference: match {match!r} is not one of {MATCH_MODES}")
    text = answer_text(completion)
    if not text:
        return RewardResult(0.0, "empty answer")
    reference = normalized(answer)
    if match == "exact":
        ok = normalized(text) == reference
    else:
        ok = re.search(rf"(?<!\w){re.escape(reference)}(?!\w)", " ".join(text.lower().split())) is not None
    return RewardResult(1.0 if ok else 0.0, "matches the reference" if ok else "does not match the reference")
