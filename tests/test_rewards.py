"""Rewards: the registry, math-verify answers, exact task answers, format rewards, and the code
reward's code extraction (the sandbox and its harness: tests/security/)."""
from __future__ import annotations

import threading

import pytest

from qwen3repro.data import tasks
from qwen3repro.rewards import REWARDS, RewardResult, answer_text, get_reward, register
from qwen3repro.rewards.code import SandboxLimits, code_reward, extract_code
from qwen3repro.rewards.format import think_format_reward, think_mode_reward
from qwen3repro.rewards.math import math_reward
from qwen3repro.rewards.tasks import task_reward

LIMITS = SandboxLimits(cpu_seconds=1, wall_seconds=3.0, memory_bytes=256 * 2**20, max_processes=16,
                       max_output_bytes=8192)


def wrap(answer: str, reasoning: str = "let me think") -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>"


# ------------------------------------------------------------------------------------ registry
def test_registry():
    assert {"math", "code", "task", "think_format", "think_mode"} <= set(REWARDS)
    assert get_reward("math") is math_reward and get_reward("code") is code_reward
    with pytest.raises(KeyError, match="registered"):
        get_reward("nope")
    with pytest.raises(ValueError):
        register("math")(lambda completion: RewardResult(1.0))
    assert float(RewardResult(None)) != float(RewardResult(None))  # NaN: "no reward"


# ---------------------------------------------------------------------------------------- math
@pytest.mark.parametrize(
    "gold, answer, score",
    [
        ("$\\frac12$", "\\boxed{0.5}", 1.0),
        ("\\frac{1}{2}", "The answer is $\\frac12$.", 1.0),
        ("0.5", "\\boxed{\\frac{1}{2}}", 1.0),
        ("$\\{1, 2\\}$", "$\\{2, 1\\}$", 1.0),
        ("579", "579", 1.0),
        ("579", "\\boxed{578}", 0.0),
        ("$x^2+2x+1$", "$(x+1)^2$", 1.0),
    ],
)
def test_math_reward(gold, answer, score):
    assert math_reward(wrap(answer), gold).score == score


def test_math_reward_off_the_main_thread():
    out = []
    thread = threading.Thread(target=lambda: out.append(math_reward(wrap("\\boxed{0.5}"), "$\\frac12$")))
    thread.start()
    thread.join()
    assert out[0].score == 1.0


def test_math_unparseable_gold_is_no_reward():
    assert math_reward(wrap("1"), "").score is None


# ----------------------------------------------------------------------------------- tasks
def test_task_reward_exact_answers():
    for family in tasks.FAMILIES:
        item = tasks.generate(family, seed=1, difficulty=tasks.FAMILIES[family].min_difficulty)
        assert task_reward(wrap(item.answer, tasks.render_trace(item)), item).score == 1.0
        assert task_reward(wrap(item.answer + "."), item.to_dict()).score == 1.0
        assert task_reward(wrap("wrong " + item.answer), item).score == 0.0
    assert task_reward(wrap(" 0042 "), "42").score == 1.0


# ------------------------------------------------------------------------- malformed outputs
MALFORMED = [
    "<think>\nI never stop thinking 42",  # no </think>: no answer
    "<think>\nhmm\n</think>\n\n",  # empty answer
    "<think>\nhmm\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {bad json</tool_call><|im_end|>",
    "<think>\nhmm\n</think>\n\n<tool_call>\n{\"name\": \"f\"",  # unclosed tool call
    "",
    "<|im_end|>",
    "</think></think><think>",
    "\x00\udcff garbage \\boxed{",
]


@pytest.mark.parametrize("completion", MALFORMED)
def test_malformed_outputs_score_wrong(completion):
    assert math_reward(completion, "42").score == 0.0
    assert task_reward(completion, "42").score == 0.0
    assert code_reward(completion, "assert f() == 1", LIMITS).score == 0.0
    assert think_format_reward(completion).score == 0.0
    assert think_mode_reward(completion, thinking=True).score == 0.0
    assert isinstance(answer_text(completion), str)


def test_non_string_completion_scores_wrong():
    assert math_reward(None, "1").score == 0.0
    assert task_reward(12, "12").score == 0.0
    assert think_format_reward(None).score == 0.0


# ------------------------------------------------------------------------------------- format
def test_format_rewards():
    assert think_format_reward(wrap("42")).score == 1.0
    assert think_format_reward("\nreasoning\n</think>\n\n42", prefilled_think=True).score == 1.0
    assert think_format_reward("<think>a</think><think>b</think>42").score == 0.0
    assert think_format_reward("42").score == 0.0
    assert think_mode_reward(wrap("42"), thinking=True).score == 1.0
    assert think_mode_reward("<think>\n\n</think>\n\n42", thinking=False).score == 1.0
    assert think_mode_reward("42<|im_end|>", thinking=False).score == 1.0  # the prompt pre-filled the block
    assert think_mode_reward(wrap("42"), thinking=False).score == 0.0
    assert think_mode_reward("<think>\n\n</think>\n\n42", thinking=True).score == 0.0


def test_code_that_does_not_compile_scores_zero():
    assert code_reward(wrap("```python\ndef f(:\n```"), "assert True", LIMITS).score == 0.0
    assert extract_code("a\n```python\nx = 1\n```\nb\n```py\ny = 2\n```") == "y = 2"
    assert extract_code("x = 1") == "x = 1"


def test_budget_forced_answer_after_the_reports_directive_is_scored():
    """The verbatim directive leaves "." right after </think>; the answer after it still counts."""
    from qwen3repro.chat import STOP_THINKING_DIRECTIVE
    from qwen3repro.rewards import answer_text, get_reward

    completion = "<think>\n3+4+0=7, write 7 carry 0" + "\n\n" + STOP_THINKING_DIRECTIVE + "123<|im_end|>"
    assert answer_text(completion) == "123"
    assert get_reward("task")(completion, "123").score == 1.0
    assert get_reward("task")(completion, "124").score == 0.0
    assert answer_text("<think>\n\n</think>\n\n.5<|im_end|>") == ".5"  # a leading "." of an answer stays
