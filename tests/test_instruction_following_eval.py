"""IFEval figures of the general-RL claim: prompt-level and instruction-level, strict and loose, over the
mixture's held-out instruction-following queries."""
from __future__ import annotations

from qwen3repro.data.queries import Query
from qwen3repro.data.tasks import is_heldout
from qwen3repro.evals.instruction_following import heldout_ifeval_queries, ifeval_tasks, score_responses


def _query(ids, kwargs):
    return Query("u", "Describe the city.", "if", None, "ifeval", {"instruction_id_list": ids, "kwargs": kwargs})


def test_prompt_level_needs_every_instruction_and_instruction_level_counts_each():
    two = _query(["change_case:english_lowercase", "punctuation:no_comma"], [{}, {}])
    one = _query(["punctuation:no_comma"], [{}])
    responses = ["<think>\n\n</think>\n\nthe city is old, and quiet.",  # lowercase yes, no comma no
                 "<think>\nA, B\n</think>\n\nThe city is old and quiet."]   # the think block is not checked
    out = score_responses([two, one], responses)
    assert out["prompt_strict"] == 0.5 and out["instruction_strict"] == 2 / 3
    assert out["n_prompts"] == 2 and out["n_instructions"] == 3
    assert out["prompt_loose"] >= out["prompt_strict"] and out["instruction_loose"] >= out["instruction_strict"]


def test_heldout_queries_are_instruction_following_and_held_out():
    queries = heldout_ifeval_queries(24, seed=0)
    assert len(queries) == 24 and all(q.verifier == "ifeval" and is_heldout(q.uid) for q in queries)
    assert len(ifeval_tasks()) >= 10
