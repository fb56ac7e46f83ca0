"""Rewards: the registry, math-verify answers, exact task answers, format rewards, and the code
reward's code extraction (the sandbox and its harness: tests/security/)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import warnings

import pytest

from qwen3repro.data import tasks
from qwen3repro.rewards import REWARDS, RewardResult, answer_text, get_reward, register
from qwen3repro.rewards.code import SandboxLimits, code_reward, extract_code
from qwen3repro.rewards.format import think_format_reward, think_mode_reward
from qwen3repro.rewards import math as math_module
from qwen3repro.rewards import math_worker
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
    assert math_reward(wrap(""), "").score is None  # the gold answer is checked before the answer


# Answers math-verify does not finish comparing: sympy works on a tower of powers or a huge
# factorial inside calls that no signal interrupts.
PATHOLOGICAL = ["$9^{9^{9^{9}}}$", "$(10^{10})!$"]


@pytest.mark.parametrize("answer", PATHOLOGICAL)
def test_math_reward_of_a_pathological_answer_ends_on_a_thread(answer, monkeypatch):
    monkeypatch.setattr(math_module, "TIMEOUT_SECONDS", 2)
    out = []
    thread = threading.Thread(target=lambda: out.append(math_reward(wrap(answer), "5")), daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert out[0].score == 0.0 and "timed out" in out[0].reason


@pytest.mark.parametrize("answer", PATHOLOGICAL)
def test_math_reward_of_a_pathological_answer_ends_on_the_main_thread(answer, monkeypatch):
    monkeypatch.setattr(math_module, "TIMEOUT_SECONDS", 2)
    result = math_reward(wrap(answer), "5")
    assert result.score == 0.0 and "timed out" in result.reason
    assert math_reward(wrap("\\boxed{5}"), "5").score == 1.0  # a fresh worker replaces the killed one


def test_math_reward_from_concurrent_threads():
    cases = [("\\boxed{0.5}", "$\\frac12$", 1.0), ("$(x+1)^2$", "$x^2+2x+1$", 1.0), ("\\boxed{578}", "579", 0.0)] * 2
    scores = [None] * len(cases)

    def score(i, answer, gold):
        scores[i] = math_reward(wrap(answer), gold).score

    threads = [threading.Thread(target=score, args=(i, a, g)) for i, (a, g, _) in enumerate(cases)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert scores == [expected for _, _, expected in cases]


def test_math_worker_ends_at_its_cpu_limit_without_being_killed():
    # The limit that stops a worker whose parent died before it could kill it.
    worker = subprocess.Popen([sys.executable, "-P", math_worker.__file__],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert json.loads(worker.stdout.readline()) == {"ready": True}
        request = {"gold": "5", "answer": PATHOLOGICAL[0], "cpu_seconds": 1}
        worker.stdin.write(json.dumps(request).encode() + b"\n")
        worker.stdin.flush()
        assert worker.wait(timeout=60) == -signal.SIGXCPU
    finally:
        worker.kill()
        worker.wait()


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


def test_the_models_syntax_warnings_are_not_printed_by_the_reward():
    """Compiling model-written code that only warns (`x is 1`) neither shows the warning nor fails the code."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = code_reward(wrap("```python\nx = 1\nassert (x is 1) or True\n```"), "assert x == 1", LIMITS)
    assert not [w for w in caught if issubclass(w.category, SyntaxWarning)]
    if result.score is None:
        pytest.skip(f"sandbox unavailable: {result.reason}")
    assert result.score == 1.0


def test_budget_forced_answer_after_the_reports_directive_is_scored():
    """The verbatim directive leaves "." right after </think>; the answer after it still counts."""
    from qwen3repro.chat import STOP_THINKING_DIRECTIVE
    from qwen3repro.rewards import answer_text, get_reward

    completion = "<think>\n3+4+0=7, write 7 carry 0" + "\n\n" + STOP_THINKING_DIRECTIVE + "123<|im_end|>"
    assert answer_text(completion) == "123"
    assert get_reward("task")(completion, "123").score == 1.0
    assert get_reward("task")(completion, "124").score == 0.0
    assert answer_text("<think>\n\n</think>\n\n.5<|im_end|>") == ".5"  # a leading "." of an answer stays
