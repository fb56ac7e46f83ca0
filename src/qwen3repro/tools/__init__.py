"""Tool use for general RL (Qwen3 report §4.4, agent ability): an environment that answers the
model's tool calls, the built-in tools over the synthetic world, and multi-turn rollouts.

    env = ToolEnvironment(default_tools(world), ToolLimits(max_turns=3, max_calls=4))
    prompt = tokenizer.encode(chat.render(messages, tools=env.schemas(), add_generation_prompt=True))
    trajectories = tool_rollouts(model, tokenizer, [prompt], env, sampling=params, max_new_tokens=128)
    trajectories[0].final_text, .loss_mask, .logprobs, .calls, .finish_reason

Rooms, each with a docstring on what it holds and why:

    environment.py  Tool, ToolLimits, ToolResult, ToolEnvironment.execute and its named outcomes
    calculator.py   the bounded arithmetic evaluator behind the calculator tool (ast, no eval)
    retrieval.py    BM25 over a list of passages, standard library only
    builtin.py      calculator, lookup and search; the world's facts in English; world_corpus
    rollout.py      tool-response spans, Trajectory and tool_rollouts (token concatenation, masks, caps)
"""
from __future__ import annotations

from .builtin import SEARCH_TOP_K, default_tools, world_corpus
from .calculator import evaluate
from .environment import (
    TOOL_OUTCOMES,
    Tool,
    ToolEnvironment,
    ToolError,
    ToolLimits,
    ToolResult,
    call_cap_result,
    invalid_call_result,
)
from .retrieval import Bm25Index
from .rollout import (
    FINISH_REASONS,
    TRUNCATION_MARKER,
    Trajectory,
    tool_calls_in_order,
    tool_response_ids,
    tool_response_text,
    tool_rollouts,
    truncate_tool_response,
)

__all__ = [
    "FINISH_REASONS",
    "SEARCH_TOP_K",
    "TOOL_OUTCOMES",
    "TRUNCATION_MARKER",
    "Bm25Index",
    "Tool",
    "ToolEnvironment",
    "ToolError",
    "ToolLimits",
    "ToolResult",
    "Trajectory",
    "call_cap_result",
    "default_tools",
    "evaluate",
    "invalid_call_result",
    "tool_calls_in_order",
    "tool_response_ids",
    "tool_response_text",
    "tool_rollouts",
    "truncate_tool_response",
    "world_corpus",
]
