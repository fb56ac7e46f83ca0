"""Rewards: the registry, math-verify answers, exact task answers, format rewards, and the code
sandbox (time, memory, process, network and output limits; early exits; infrastructure failures)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from qwen3repro.data import tasks
from qwen3repro.rewards import REWARDS, RewardResult, answer_text, get_reward, register
from qwen3repro.rewards.code import (
    SandboxLimits,
    code_reward,
    containment,
    extract_code,
    network_isolation,
    run_sandboxed,
    run_tests,
)
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


# ------------------------------------------------------------------------------------ sandbox
ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def test_correct_solution_scores_one():
    assert run_tests(ADD, ADD_TESTS, LIMITS).score == 1.0
    completion = wrap("Here:\n```python\n" + ADD + "```\n")
    assert code_reward(completion, ADD_TESTS, LIMITS).score == 1.0


def test_wrong_solution_scores_zero():
    r = run_tests("def add(a, b):\n    return a - b\n", ADD_TESTS, LIMITS)
    assert r.score == 0.0 and "AssertionError" in r.reason


def test_infinite_loop_is_killed_within_its_limit():
    t0 = time.monotonic()
    r = run_tests("while True:\n    pass\n", "assert True", LIMITS)
    assert r.score == 0.0
    assert time.monotonic() - t0 < LIMITS.wall_seconds + 1.5
    # A loop that sleeps uses no CPU: the wall-clock limit kills it.
    t0 = time.monotonic()
    r = run_tests("import time\nwhile True:\n    time.sleep(1)\n", "assert True", LIMITS)
    assert r.score == 0.0 and "wall-clock" in r.reason
    assert time.monotonic() - t0 < LIMITS.wall_seconds + 1.5


def test_memory_bomb_fails():
    r = run_tests("x = bytearray(2**30)\n", "assert True", LIMITS)
    assert r.score == 0.0 and "MemoryError" in r.reason
    r = run_tests("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", "assert True", LIMITS)
    assert r.score == 0.0


def _sessions(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid and fields[0] != "Z":  # session id (field 6); zombies are dead
                    pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def test_fork_bomb_is_contained():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t0 = time.monotonic()
    harness = f"{code}\nprint('unreachable')\n"
    res = run_sandboxed(harness, limits=LIMITS)
    assert time.monotonic() - t0 < LIMITS.wall_seconds + 2.0
    assert res.infra_error is None
    deadline = time.monotonic() + 2.0
    while _sessions(res.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sessions(res.pid) == []  # nothing of it survives
    assert run_tests(code, "assert True", LIMITS).score == 0.0
    assert "processes" in containment()


def test_network_is_blocked():
    mechanism = network_isolation()
    if shutil.which("unshare") is not None and os.geteuid() == 0:
        assert mechanism == "unshare -n"
    if mechanism == "none":
        pytest.skip("no network namespaces on this machine: the sandbox runs with the host network "
                    "(documented fallback)")
    assert mechanism in ("unshare -n", "unshare -rn") and containment()["network"] == mechanism
    # A server on the host's loopback: reachable from here, not from inside the sandbox.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # control: the host can connect
        probe = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        r = run_tests(probe, "assert True", LIMITS)
        assert r.score == 0.0 and ("OSError" in r.reason or "Error" in r.reason)
        r = run_tests("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n", "assert True", LIMITS)
        assert r.score == 0.0
    finally:
        server.close()


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"])
def test_exit_before_the_asserts_scores_zero(exit_call):
    r = run_tests(ADD + exit_call + "\n", "assert add(1, 2) == 4\n", LIMITS)
    assert r.score == 0.0


def test_printing_a_guessed_sentinel_does_not_pass():
    r = run_tests("print('QWEN3REPRO-TESTS-PASSED-' + '0' * 32)\nimport os\nos._exit(0)\n", "assert True", LIMITS)
    assert r.score == 0.0


def test_huge_output_is_cut():
    res = run_sandboxed("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", limits=LIMITS)
    assert res.output_truncated and len(res.output.encode()) <= LIMITS.max_output_bytes
    r = run_tests(ADD + "print('y' * 10**6)\n", ADD_TESTS, LIMITS)
    assert r.score == 0.0 and "output" in r.reason


def test_clean_environment_and_working_directory():
    os.environ["QWEN3REPRO_SECRET_FOR_TEST"] = "s3cret"
    try:
        r = run_tests(
            "import os\nENV = dict(os.environ)\nCWD = os.getcwd()\n",
            "assert 'QWEN3REPRO_SECRET_FOR_TEST' not in ENV\nassert 'qwen3repro-sandbox-' in CWD\n",
            LIMITS,
        )
    finally:
        del os.environ["QWEN3REPRO_SECRET_FOR_TEST"]
    assert r.score == 1.0


def test_infrastructure_failure_is_no_reward(monkeypatch):
    r = run_tests(ADD, ADD_TESTS, SandboxLimits(python="/nonexistent/python"))
    assert r.score is None and "sandbox" in r.reason

    def broken(*args, **kwargs):
        raise OSError("no more processes")

    monkeypatch.setattr(subprocess, "Popen", broken)
    r = code_reward(wrap("```python\n" + ADD + "```"), ADD_TESTS, LIMITS)
    assert r.score is None


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
