"""Verifiable rewards behind one registry.

Every reward is a function `reward(completion: str, **reference) -> RewardResult`, where
`completion` is the assistant's generated text (`<think>...</think>` answer, possibly cut or
malformed) and the keyword arguments carry the reference (a math answer, code tests, a task item).
`RewardResult.score` is a float, or None when the reward could not be computed for reasons that are
not the model's fault (the sandbox could not start, a verifier crashed, the reference itself does
not parse): "no reward", which a trainer must ignore (TRL turns None into NaN and leaves it out of
the group statistics; `losses.group_advantages` does the same), never 0. Malformed model output —
no `</think>`, an empty answer, broken tool-call JSON, code that does not parse — is the model's
fault and scores as wrong (0.0), without raising.

Registered names: "math" (math-verify), "code" (sandboxed execution of tests), "task" (exact
answers of the synthetic families of `qwen3repro.data.tasks`), "think_format" (well-formed think
block), "think_mode" (the think block follows the requested mode), "format" (format adherence: a
well-formed think block in the requested mode and one final answer; see `format`), "answer_match"
(the final answer equals or contains a reference string after normalisation; see `answer_match`),
"judge" (a judge model scores the answer against a reference answer over an OpenAI-compatible API;
see `judge`), "ifeval" (IFEval's instruction-following checks from lm-eval; see `ifeval`),
"reward_model" (a Bradley–Terry reward model scores the completion to its prompt; see `reward_model`).
"""
from __future__ import annotations

# Importing the reward modules registers their rewards, so `REWARDS` is complete once the package is.
from . import answer_match as answer_match
from . import code as code
from . import format as format  # noqa: A001
from . import ifeval as ifeval
from . import judge as judge
from . import math as math
from . import reward_model as reward_model
from . import tasks as tasks
from .ifeval import instruction_following
from .registry import REWARDS, RewardResult, answer_text, get_reward, register

__all__ = ["RewardResult", "REWARDS", "register", "get_reward", "answer_text", "instruction_following"]
