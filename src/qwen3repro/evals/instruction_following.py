"""IFEval-style instruction following on held-out queries: prompt- and instruction-level, strict and loose.

The queries are the held-out items of the general-RL mixture's instruction-following tasks
(`data.general_tasks`, reward "ifeval"): a request plus one or more verifiable instructions from
lm-eval's IFEval registry. Each model answers once in non-thinking mode (the template's hard switch,
at the report's non-thinking sampling settings); `rewards.instruction_following` checks every
instruction strictly and loosely (the `<think>` block stripped), and the four IFEval figures are:

* prompt-level: the share of prompts whose instructions all pass;
* instruction-level: the share of all instructions that pass.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..chat import EMPTY_THINK, render
from ..data import general_tasks
from ..data.queries import Query
from ..generate import NON_THINKING_SAMPLING, SamplingParams, generate
from ..rewards import instruction_following

IFEVAL_REWARD = "ifeval"
# The report's non-thinking sampling (T 0.7, top-p 0.8, top-k 20) without its presence penalty: words
# here are several byte-level tokens, so a penalty on every token already used would push an answer
# away from the spelling of its own words.
IFEVAL_SAMPLING = SamplingParams(temperature=NON_THINKING_SAMPLING.temperature, top_p=NON_THINKING_SAMPLING.top_p,
                                 top_k=NON_THINKING_SAMPLING.top_k)


def ifeval_tasks() -> list[str]:
    """The names of the mixture's instruction-following tasks."""
    return [name for name, task in general_tasks.GENERAL_TASKS.items() if task.reward == IFEVAL_REWARD]


def heldout_ifeval_queries(n: int, *, seed: int = 0, world=None) -> list[Query]:
    """`n` held-out queries spread evenly over the instruction-following tasks."""
    names = ifeval_tasks()
    if not names:
        raise ValueError("the task mixture has no instruction-following task")
    return general_tasks.sample_queries({name: 1.0 for name in names}, n, seed=seed, heldout=True, world=world)


def score_responses(queries: Sequence[Query], responses: Sequence[str]) -> dict[str, Any]:
    """The four IFEval figures (and counts) of `responses` to `queries`."""
    out: dict[str, Any] = {"n_prompts": len(queries)}
    for mode in ("strict", "loose"):
        per_prompt = [instruction_following(r, q.reference["instruction_id_list"], q.reference["kwargs"],
                                            strict=mode == "strict") for q, r in zip(queries, responses)]
        flat = [ok for checks in per_prompt for ok in checks]
        out[f"prompt_{mode}"] = sum(all(c) for c in per_prompt) / max(len(per_prompt), 1)
        out[f"instruction_{mode}"] = sum(flat) / max(len(flat), 1)
        out["n_instructions"] = len(flat)
    return out


@torch.no_grad()
def evaluate_ifeval(model, tokenizer, queries: Sequence[Query], *, max_new_tokens: int = 96, seed: int = 0,
                    sampling: SamplingParams = IFEVAL_SAMPLING) -> dict[str, Any]:
    """Answer every query once in non-thinking mode and score the answers (module docstring)."""
    model.eval()
    prompts = [tokenizer.encode(render([{"role": "user", "content": q.question}], add_generation_prompt=True,
                                       enable_thinking=False)) for q in queries]
    gens = generate(model, prompts, sampling, max_new_tokens=max_new_tokens, tokenizer=tokenizer, seed=seed,
                    max_batch_size=64)
    responses = [EMPTY_THINK + tokenizer.decode(g.token_ids) for g in gens]  # the template pre-fills the block
    result = score_responses(queries, responses)
    result["examples"] = [{"question": q.question, "response": r} for q, r in list(zip(queries, responses))[:6]]
    result["settings"] = {"mode": "non-thinking (enable_thinking=False)", "temperature": sampling.temperature,
                          "top_p": sampling.top_p, "top_k": sampling.top_k, "max_new_tokens": max_new_tokens,
                          "seed": seed, "heldout": "data.tasks.is_heldout"}
    return result


__all__ = ["IFEVAL_SAMPLING", "evaluate_ifeval", "heldout_ifeval_queries", "ifeval_tasks", "score_responses"]
