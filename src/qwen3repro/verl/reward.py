"""Our reward registry behind verl's custom reward function: one `compute_score` for every data source.

verl 0.9.1 is pointed at it with `reward.custom_reward_function.path=<this file's module path>` and
`.name=compute_score`. Its reward managers call

    compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...[, reward_router_address=...])

with `solution_str` the whole decoded response (special tokens skipped), which after a multi-turn tool
rollout holds the tool responses too. The reward reads only the model's final turn, never a tool response:

* the text is split into the model's turns at the tool turns that verl's tool agent loop appends
  (`user\\n<tool_response>…</tool_response>` up to the next `assistant\\n` header, with or without the
  `<|im_start|>`/`<|im_end|>` markers); a text cut inside a tool turn ends with the turn before it;
* the final turn goes to the registered reward (`rewards.REWARDS[name](final turn, **reference)`), which
  reads its answer after the think block (`rewards.answer_text`), as our stages do with `Trajectory.final_text`.

Dispatch (data_source "qwen3repro/<kind>/<task>", written by `qwen3repro.verl.data`; the ground truth is
that module's JSON: the reward's name and its keyword arguments):

    reasoning/<family>   "task" (exact answer of the family), as reasoning RL's `verifier_score`
    distill/<family>     "task": on-policy distillation trains on the teacher's log-probs, not on this
                         reward; it is the accuracy verl logs (and validates pass@1 on)
    general/<task>       the task's reward ("task", "answer_match", "code", "ifeval", "format", "judge",
                         "reward_model") shaped as general RL's `Scorer.score`: the format gate (0 unless the
                         final turn follows the requested mode), minus the malformed-call penalty per malformed
                         `<tool_call>`, else plus the valid-call bonus when the prompt offered tools and every
                         call verl answered ran

Model-based rewards at full scale:

* judge: an OpenAI-compatible server, `$QWEN3REPRO_JUDGE_BASE_URL` (e.g. a `vllm serve
  Qwen/Qwen2.5-72B-Instruct` at `http://host:8000/v1`), else the `judge_base_url` keyword (verl's
  `reward.custom_reward_function.reward_kwargs`), else the row's `extra_info.judge.base_url`, else verl's reward
  router (`reward_router_address`, when verl serves the judge itself). The model name is
  `$QWEN3REPRO_JUDGE_MODEL`, else `judge_model`, else the row's. Without any of these, a judged row raises `RewardConfigError`:
  a run whose judge tasks would all score 0 is a configuration error, not a reward.
* reward model (Bradley–Terry, reference-free): verl 0.9.1 has no client for a served scalar reward model in a
  custom reward function, so our own scorer is loaded from `$QWEN3REPRO_REWARD_MODEL_DIR` (a reward-model
  stage's output folder) in each reward worker; without it a reward-model row raises `RewardConfigError`.

"No reward". Our rewards return None when the reward could not be computed (a judge timeout, an unparseable
judge answer, a sandbox that did not start, a reference that does not parse); our trainers leave such a sample
out of its group. verl cannot: its reward is a number per sample (NaN would poison the whole group's
advantages), and its own reward managers give 0.0 when scoring fails (`NaiveRewardManager`'s timeout). So a
no-reward sample scores 0.0 here too, flagged `no_reward = 1.0` in the returned fields and counted by reason
in `no_reward_counts()`, so the rate shows in verl's reward metrics.

Returned: a dict with the same keys for every data source (verl stacks each key over the batch from the first
sample's keys): "score" (the reward), "acc" (1.0 when the task reward reaches 0.5, what dynamic sampling
filters on: `filter_groups.metric=acc`), "task_score" (the reward before general RL's shaping), "no_reward",
"followed_mode", "tool_calls", "tool_calls_ok", "malformed_calls", "ifeval_loose" (the fraction of IFEval
instructions followed under lm-eval's loose test; None for other tasks) and "reason".
"""
from __future__ import annotations

import inspect
import json
import os
import re
import threading
from collections import Counter
from functools import lru_cache
from typing import Any, Mapping

from ..evals.thinking import follows_mode
from ..rewards import REWARDS, RewardResult
from ..rewards import judge as judge_module
from ..rewards.ifeval import instruction_following
from ..rewards.reward_model import RewardModelScorer
from ..tools.rollout import tool_calls_in_order
from .data import split_data_source

__all__ = ["compute_score", "model_turns", "tool_responses", "no_reward_counts", "reset_no_reward_counts",
           "RewardConfigError", "judge_stats", "FIELDS", "JUDGE_URL_ENV", "JUDGE_MODEL_ENV", "REWARD_MODEL_DIR_ENV"]

JUDGE_URL_ENV = "QWEN3REPRO_JUDGE_BASE_URL"
JUDGE_MODEL_ENV = "QWEN3REPRO_JUDGE_MODEL"
REWARD_MODEL_DIR_ENV = "QWEN3REPRO_REWARD_MODEL_DIR"

FIELDS = ("score", "acc", "task_score", "no_reward", "followed_mode", "tool_calls", "tool_calls_ok",
          "malformed_calls", "ifeval_loose", "reason")
# As rl.rollout.ACCURACY_THRESHOLD: a sample is correct from half credit up.
ACCURACY_THRESHOLD = 0.5
# How a tool response that reports a failed call begins: our tool environment answers every failure
# "Error: ..." (`tools.environment`), and verl's tool agent loop answers an unknown tool, arguments that are
# not JSON and a tool that raised with these sentences.
FAILED_CALL_PREFIXES = ("Error", "Unknown function", "Invalid JSON in arguments")


class RewardConfigError(RuntimeError):
    """A row's reward needs something this process was not given (a judge server, a reward model)."""


# ----------------------------------------------------------------------------- turns
_OPEN, _CLOSE = "<tool_response>", "</tool_response>"
# What precedes a tool turn's first <tool_response>: the model turn's end, then the user header.
_USER_HEADER = re.compile(r"(?:<\|im_end\|>)?\n?(?:<\|im_start\|>)?user\n$")
# What follows a tool turn's last </tool_response>: the end of the user turn, then the assistant header.
_ASSISTANT_HEADER = re.compile(r"(?:<\|im_end\|>)?\n?(?:<\|im_start\|>)?assistant\n")
_NEXT_BLOCK = re.compile(r"\n?<tool_response>")


def _split(text: str) -> tuple[list[str], list[str]]:
    """(the model's turns, the tool responses' contents) of a decoded multi-turn response."""
    turns: list[str] = []
    responses: list[str] = []
    position = 0
    while True:
        start = text.find(_OPEN, position)
        if start < 0:
            turns.append(text[position:])
            return turns, responses
        turn = text[position:start]
        turns.append(_USER_HEADER.sub("", turn))
        # One tool turn: consecutive <tool_response> blocks (one per call of the turn).
        cursor = start
        while True:
            end = text.find(_CLOSE, cursor + len(_OPEN))
            if end < 0:  # cut inside a tool response: no model turn follows
                return turns, responses
            responses.append(text[cursor + len(_OPEN):end].strip("\n"))
            cursor = end + len(_CLOSE)
            more = _NEXT_BLOCK.match(text, cursor)
            if more is None:
                break
            cursor = more.end() - len(_OPEN)
        header = _ASSISTANT_HEADER.match(text, cursor)
        if header is None:  # cut before the next assistant turn began
            return turns, responses
        position = header.end()


def model_turns(solution_str: str) -> list[str]:
    """The model's own turns of a decoded response, in order; the tool turns between them are left out."""
    return _split(solution_str)[0] if isinstance(solution_str, str) else [""]


def tool_responses(solution_str: str) -> list[str]:
    """The contents of the tool responses in a decoded response, in order."""
    return _split(solution_str)[1] if isinstance(solution_str, str) else []


# ----------------------------------------------------------------------------- no-reward accounting
_COUNTS_LOCK = threading.Lock()
_NO_REWARD: Counter[str] = Counter()


def _count_no_reward(data_source: str, reason: str) -> None:
    key = f"{data_source}: {reason.split(':')[0] if reason else 'unknown'}"
    with _COUNTS_LOCK:
        _NO_REWARD[key] += 1


def no_reward_counts() -> dict[str, int]:
    """No-reward samples scored by this process, by "data_source: reason"."""
    with _COUNTS_LOCK:
        return dict(_NO_REWARD)


def reset_no_reward_counts() -> None:
    with _COUNTS_LOCK:
        _NO_REWARD.clear()


# ----------------------------------------------------------------------------- model-based rewards
_CLIENTS_LOCK = threading.Lock()
_CLIENTS: dict[tuple, judge_module.JudgeClient] = {}


def _judge_for(extra_info: Mapping[str, Any], reward_router_address: str | None, base_url: str | None,
               model: str | None) -> judge_module.JudgeClient:
    """The judge client of this process for the row's settings: one per settings, so that its semaphore bounds
    the requests in flight and its stats count every outcome. Greedy and without thinking, as general RL's."""
    settings = dict(extra_info.get("judge") or {})
    base_url = os.environ.get(JUDGE_URL_ENV) or base_url or settings.get("base_url") or (
        f"http://{reward_router_address}/v1" if reward_router_address else "")
    if not base_url:
        raise RewardConfigError(
            f"a judged task needs a judge server: set {JUDGE_URL_ENV} or the judge_base_url reward kwarg (an "
            "OpenAI-compatible base URL such as "
            "http://judge-host:8000/v1), or enable verl's reward model so that it passes reward_router_address")
    key = (base_url, os.environ.get(JUDGE_MODEL_ENV) or model or settings.get("model") or "judge",
           int(settings.get("max_tokens", 512)), float(settings.get("timeout", 60.0)), int(settings.get("retries", 2)),
           int(settings.get("concurrency", 8)))
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            base_url, model, max_tokens, timeout, retries, concurrency = key
            _CLIENTS[key] = judge_module.JudgeClient(judge_module.JudgeSettings(
                base_url=base_url, model=model, max_tokens=max_tokens, timeout=timeout, retries=retries,
                concurrency=concurrency, enable_thinking=False))
        return _CLIENTS[key]


def judge_stats() -> dict[str, dict[str, int]]:
    """Every judge client's outcome counts in this process, by "base URL model"."""
    with _CLIENTS_LOCK:
        return {f"{c.settings.base_url} {c.settings.model}": c.stats.counts() for c in _CLIENTS.values()}


@lru_cache(maxsize=1)
def _reward_model_scorer(directory: str):

    return RewardModelScorer.load(directory)


def _reward_model_kwargs() -> dict[str, Any]:
    directory = os.environ.get(REWARD_MODEL_DIR_ENV)
    if not directory:
        raise RewardConfigError(
            f"a reward-model task needs a reward model: set {REWARD_MODEL_DIR_ENV} to a reward-model stage's "
            "output folder (verl 0.9.1 cannot call a served scalar reward model from a custom reward function), "
            "or leave the reward-model tasks (write_person, write_city) out of the data")
    return {"scorer": _reward_model_scorer(directory)}


# ----------------------------------------------------------------------------- the entry point
def _ground_truth(ground_truth: Any) -> dict[str, Any]:
    value = ground_truth
    if isinstance(value, (bytes, str)):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, Mapping) or not isinstance(value.get("reward"), str) or not isinstance(
            value.get("reference"), Mapping):
        raise ValueError(f"ground_truth is not ours: expected the JSON text qwen3repro.verl.data writes "
                         f"({{\"reward\": name, \"reference\": {{...}}}}), got {str(ground_truth)[:120]!r}")
    return dict(value)


def _call_reward(name: str, final: str, reference: Mapping[str, Any], thinking: bool | None, *,
                 extra_info: Mapping[str, Any], judge: dict[str, Any]) -> RewardResult:
    fn = REWARDS.get(name)
    if fn is None:
        return RewardResult(None, f"no reward function {name!r}")
    kwargs = dict(reference)
    if thinking is not None and "thinking" not in kwargs and "thinking" in inspect.signature(fn).parameters:
        kwargs["thinking"] = thinking  # general RL's Scorer passes the prompt's mode to a reward that takes it
    if name == "judge":
        kwargs["judge"] = _judge_for(extra_info, **judge)
    elif name == "reward_model":
        kwargs.update(_reward_model_kwargs())
    try:
        return fn(final, **kwargs)
    except Exception as exc:  # a reward bug is an infrastructure failure, never the policy's fault
        return RewardResult(None, f"reward error: {type(exc).__name__}: {exc}")


def _ifeval_loose(name: str, final: str, reference: Mapping[str, Any]) -> float | None:
    if name != "ifeval":
        return None

    try:
        followed = instruction_following(final, list(reference["instruction_id_list"]),
                                         [dict(k) for k in reference["kwargs"]], strict=False,
                                         prompt=reference.get("prompt", ""))
    except (ValueError, KeyError, TypeError):
        return None
    return sum(followed) / len(followed)


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: Mapping[str, Any] | None = None,
                  reward_router_address: str | None = None, judge_base_url: str | None = None,
                  judge_model: str | None = None, **_: Any) -> dict[str, Any]:
    """The reward of one verl sample (module docstring): a dict whose "score" verl uses as the reward.

    `judge_base_url` and `judge_model` come from verl's `reward.custom_reward_function.reward_kwargs` (the config
    generator sets them); other keyword arguments verl may pass are ignored.

    Raises ValueError for a data source or ground truth that `qwen3repro.verl.data` did not write, and
    `RewardConfigError` for a judged or reward-model task without its server or model."""
    kind, task = split_data_source(data_source)
    truth = _ground_truth(ground_truth)
    name, reference = truth["reward"], truth["reference"]
    extra_info = extra_info if isinstance(extra_info, Mapping) else {}
    thinking = bool(truth.get("thinking", extra_info.get("thinking", True)))

    text = solution_str if isinstance(solution_str, str) else ""
    turns, responses = _split(text)
    final = turns[-1]
    # Malformed calls in every model turn; the calls verl answered are its tool responses (verl answers only
    # well-formed calls; our own environment also answers malformed ones, with an "Error: ..." response).
    malformed = sum(error is not None for turn in turns for _, error in tool_calls_in_order(turn))
    calls = len(responses)
    ok_calls = sum(not r.lstrip().startswith(FAILED_CALL_PREFIXES) for r in responses)
    followed = follows_mode(final, thinking)

    judge = {"reward_router_address": reward_router_address, "base_url": judge_base_url, "model": judge_model}
    result = _call_reward(name, final, reference, thinking if kind == "general" else None, extra_info=extra_info,
                          judge=judge)
    fields: dict[str, Any] = {
        "task_score": result.score, "no_reward": 0.0, "followed_mode": float(followed), "tool_calls": float(calls),
        "tool_calls_ok": float(ok_calls), "malformed_calls": float(malformed),
        "ifeval_loose": _ifeval_loose(name, final, reference), "reason": str(result.reason)[:200],
    }
    if result.score is None:
        _count_no_reward(data_source, result.reason)
        fields.update(task_score=0.0, no_reward=1.0)
        return {"score": 0.0, "acc": 0.0, **fields}

    value = float(result.score)
    if kind == "general":
        # General RL's shaping, as `stages.general_rl.Scorer.score` applies it.
        shaping = truth.get("shaping") or {}
        if shaping.get("format_gate", True) and not followed:
            value = 0.0
        if malformed:
            value -= float(shaping.get("malformed_call_penalty", 0.0)) * malformed
        elif truth.get("tools") and calls and ok_calls == calls:
            value += float(shaping.get("valid_call_bonus", 0.0))
    return {"score": value, "acc": float(float(result.score) >= ACCURACY_THRESHOLD), **fields}
