"""The code reward: the model's solution against test asserts, each in its own sandbox.

The sandbox (`rewards.sandbox`) contains the program; the harness (`rewards.harness`) keeps the
solution away from its tests: the solution runs in one sandbox and answers calls to its top-level
functions with plain values, the tests run in another and call it through proxies, and the verdict
travels on a descriptor only the launcher and the tests' process hold. What the solution prints,
its exit status and its output never decide the score.

Scores: 1.0 when every assert passes; 0.0 when the solution fails to load, a test fails, or any limit
is hit; None ("no reward", ignored by the trainer) only when the sandbox itself could not start, as
bwrap reports on its own status descriptor, so that a program cannot fake an infrastructure failure.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
import warnings
from pathlib import Path

from . import harness
from .registry import RewardResult, answer_text, register
from .sandbox import (
    SandboxFile,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    containment,
    launcher_error,
    read_until,
    run_sandboxed,
    start,
)

__all__ = [
    "SandboxLimits",
    "SandboxResult",
    "code_reward",
    "containment",
    "extract_code",
    "run_sandboxed",
    "run_tests",
]

HARNESS_SOURCE = Path(harness.__file__).read_text(encoding="utf-8")
_HARNESS = "/sandbox/harness.py"


def run_tests(solution: str, tests: str, limits: SandboxLimits | None = None) -> RewardResult:
    """1.0 when `solution` loads and every assert of `tests` passes (see the module's docstring)."""
    limits = limits or SandboxLimits()
    t0 = time.monotonic()
    requests_r, requests_w = os.pipe()   # tests -> solution
    replies_r, replies_w = os.pipe()     # solution -> tests
    verdict_r, verdict_w = os.pipe()     # tests -> launcher
    solution_box = tests_box = None
    try:
        try:
            solution_box = start(
                [SandboxFile("harness.py", HARNESS_SOURCE), SandboxFile("solution.py", solution)],
                ["-I", "-S", _HARNESS, "solution", "/sandbox/solution.py", str(requests_r), str(replies_w)],
                limits, pass_fds=(requests_r, replies_w), stdin=subprocess.DEVNULL)
            tests_box = start(
                [SandboxFile("harness.py", HARNESS_SOURCE), SandboxFile("tests.py", tests)],
                ["-I", "-S", _HARNESS, "tests", "/sandbox/tests.py", str(replies_r), str(requests_w), str(verdict_w)],
                limits, pass_fds=(replies_r, requests_w, verdict_w), stdin=subprocess.DEVNULL)
        except SandboxUnavailable as exc:
            return RewardResult(None, f"sandbox failure: {exc}")
        except (OSError, subprocess.SubprocessError) as exc:
            return RewardResult(None, f"sandbox failure: could not start it: {type(exc).__name__}: {exc}")
        finally:
            for fd in (requests_r, requests_w, replies_r, replies_w, verdict_w):
                os.close(fd)  # the sandboxes hold their ends; EOF then means a side has gone
        solution_out = solution_box.proc.stdout.fileno()
        tests_out = tests_box.proc.stdout.fileno()
        streams = read_until(
            {verdict_r: 4096, tests_out: limits.max_output_bytes, solution_out: limits.max_output_bytes},
            wait_for={verdict_r}, deadline=t0 + limits.wall_seconds)
    finally:
        for box in (solution_box, tests_box):
            if box is not None:
                box.finish()
        os.close(verdict_r)
    # The tests' launcher first: the read ended when its verdict descriptor closed, so its output is whole;
    # the solution's launcher may have been killed before it wrote why it failed.
    for name, box, fd in (("tests", tests_box, tests_out), ("solution", solution_box, solution_out)):
        if not box.started:
            output = bytes(streams.data[fd]).decode("utf-8", "replace")
            return RewardResult(None, f"sandbox failure ({name}): {launcher_error(output, box.proc.returncode)}")
    if streams.over_cap == solution_out:
        return RewardResult(0.0, f"output limit ({limits.max_output_bytes} bytes) exceeded")
    if streams.timed_out:
        return RewardResult(0.0, f"wall-clock limit ({limits.wall_seconds} s) exceeded")
    try:
        verdict = json.loads(bytes(streams.data[verdict_r]))
    except ValueError:
        verdict = None
    if type(verdict) is not dict or type(verdict.get("passed")) is not bool:
        return RewardResult(0.0, "the tests ended without a verdict (a limit was hit)")
    return RewardResult(1.0 if verdict["passed"] else 0.0, str(verdict.get("reason", ""))[:300])


_FENCE = "```"
# The rest of an opening fence's line: an optional language between blanks. The quantifiers are
# possessive (*+): with plain ones, a fence followed by a long run of blanks and no newline would be
# retried at every split of the run between the two, quadratic in its length.
_FENCE_INFO = re.compile(r"[ \t]*+(?:python3?|py)?[ \t]*+\n", re.IGNORECASE)


def extract_code(text: str) -> str:
    """The last fenced code block of `text` (```python ... ```), else the whole text.

    A block runs from the line after an opening fence to the next fence; the text is read once, left
    to right, whatever it holds.
    """
    last = None
    position = 0
    while (start := text.find(_FENCE, position)) >= 0:
        info = _FENCE_INFO.match(text, start + len(_FENCE))
        if info is None:  # not an opening fence; one may start at the next backtick
            position = start + 1
            continue
        end = text.find(_FENCE, info.end())
        if end < 0:  # no closing fence, hence no later fence to open a block either
            break
        last = text[info.end():end]
        position = end + len(_FENCE)
    return (text if last is None else last).strip("\n")


@register("code")
def code_reward(completion: str, tests: str, limits: SandboxLimits | None = None) -> RewardResult:
    """Run the code of the completion's answer (its last fenced block, or the whole answer) against
    `tests` (Python asserts) in the sandbox."""
    text = answer_text(completion)
    if not text:
        return RewardResult(0.0, "empty answer")
    code = extract_code(text)
    if not code.strip():
        return RewardResult(0.0, "no code")
    try:
        with warnings.catch_warnings():  # the model's SyntaxWarnings are not the run's to print
            warnings.simplefilter("ignore")
            compile(code, "solution.py", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        return RewardResult(0.0, f"does not compile: {type(exc).__name__}: {str(exc)[:200]}")
    return run_tests(code, tests, limits)
