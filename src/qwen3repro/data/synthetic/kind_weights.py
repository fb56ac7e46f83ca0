"""Which document kinds each stage's corpus holds, and in what proportions (Qwen3 report §3.2).

"Reasoning" kinds are the STEM/code/synthetic-reasoning share the report raises in S2; the
general kinds stay in every short-context stage so that S2 does not forget them.
"""
from __future__ import annotations

from typing import Mapping

REASONING_KINDS = frozenset({"problem", "code", "arith"})
GENERAL_KINDS = frozenset({"prose", "knowledge", "parallel"})

# S1 (report §3.2 "general stage": broad web/multilingual knowledge, some code and math).
# Reasoning share 0.25.
S1_KIND_WEIGHTS: Mapping[str, float] = {
    "prose": 0.35,      # multilingual general text: language identity and modelling
    "passkey": 0.15,    # short in-context retrieval (see `short_docs.short_retrieval_range`): at 5% (75k tokens
                        # in 1.5M) a 1.9M-parameter model learned no retrieval at all, even at 128 tokens
    "knowledge": 0.18,  # entity facts (world knowledge)
    "parallel": 0.07,   # translation pairs, so later translation SFT has something to build on
    "code": 0.10,       # programs with their printed output
    "arith": 0.10,      # bare equations
    "problem": 0.05,    # a few worked problems (synthetic reasoning data exists in S1 too)
}
# S2 (report §3.2 "reasoning stage": "increasing the proportion of STEM, coding, reasoning, and
# synthetic data"). Reasoning share 0.70; the general kinds stay to avoid forgetting.
S2_KIND_WEIGHTS: Mapping[str, float] = {
    "problem": 0.55,
    "code": 0.10,
    "arith": 0.05,
    "prose": 0.13,
    "passkey": 0.05,
    "knowledge": 0.08,
    "parallel": 0.04,
}
# S3 (report §3.2 long-context stage): every document is long; most carry a long-range dependency.
S3_KIND_WEIGHTS: Mapping[str, float] = {
    "passkey": 0.50,  # single needle at a random depth (learnable in ~1M tokens at tiny scale)
    "order": 0.25,    # two needles, ask for the first or the last: needs relative order
    "long": 0.25,     # plain long text in one language, no planted dependency (keeps S3 from being all retrieval)
}
STAGE_KIND_WEIGHTS: Mapping[str, Mapping[str, float]] = {"s1": S1_KIND_WEIGHTS, "s2": S2_KIND_WEIGHTS, "s3": S3_KIND_WEIGHTS}
STAGES = tuple(STAGE_KIND_WEIGHTS)
# Stages whose documents are long-context documents, sized by the stage's length mix (`.length_mix`).
LONG_CONTEXT_STAGES = frozenset({"s3"})

# Problem families in S2 (and S1's few problems): all post-training families, arithmetic heaviest.
PROBLEM_FAMILY_WEIGHTS: Mapping[str, float] = {"add": 0.2, "mul": 0.2, "expr": 0.25, "code": 0.2, "order": 0.15}


def reasoning_share(kind_weights: Mapping[str, float]) -> float:
    """The fraction of a kind mix that is reasoning kinds."""
    return sum(w for k, w in kind_weights.items() if k in REASONING_KINDS) / sum(kind_weights.values())
