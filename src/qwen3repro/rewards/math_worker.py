"""The math comparison, in a process that `rewards.math` kills when it runs past its time.

math-verify bounds its own work with `signal.alarm`, which works on the main thread only, and even
there cannot stop a long computation inside one C call (a big integer power holds the interpreter
until it returns). Only killing the process bounds every case, so the comparison runs here, with
math-verify's own timeouts switched off.

Run as a script (`python -P math_worker.py`: `-P` keeps this directory, whose `math.py` and
`code.py` would hide the standard modules, off `sys.path`). It imports math-verify and nothing of
this package, so it starts in about a second. It speaks JSON, one object a line:

* on start it writes `{"ready": true}`;
* for each request `{"gold": str, "answer": str, "cpu_seconds": int}` read from stdin it writes
  `{"gold_parsed": true}` once the gold answer has parsed, then `{"score": float | null, "reason": str}`;
* it ends at the end of its input.

Each request also gets a CPU-time limit (RLIMIT_CPU; the kernel kills the process past it), so a
pathological expression ends even if the process that started this one dies without killing it.
"""
from __future__ import annotations

import json
import logging
import resource
import sys
from typing import BinaryIO, Callable

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

# The model's answer: a \boxed{} answer preferred, then any LaTeX or plain expression.
ANSWER_EXTRACTION = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def compare(gold: str, answer: str, on_gold_parsed: Callable[[], None] = lambda: None) -> tuple[float | None, str]:
    """(score, reason) for `answer` against `gold`, without a time limit: 1.0 equal, 0.0 not or not
    parsed, None when the gold answer does not parse or math-verify fails (not the model's fault)."""
    try:
        gold_parsed = parse(gold, parsing_timeout=None, raise_on_error=False)
    except Exception as exc:  # noqa: BLE001 - a verifier crash is not the model's fault
        return None, f"gold answer: math-verify failed: {type(exc).__name__}: {exc}"
    if not gold_parsed:
        return None, f"gold answer {gold!r} does not parse"
    on_gold_parsed()
    if not answer:
        return 0.0, "empty answer"
    try:
        predicted = parse(answer, extraction_config=ANSWER_EXTRACTION, parsing_timeout=None, raise_on_error=False)
    except Exception as exc:  # noqa: BLE001 - unparseable model output is the model's fault
        return 0.0, f"answer does not parse: {type(exc).__name__}"
    if not predicted:
        return 0.0, "no answer found"
    try:
        correct = verify(gold_parsed, predicted, timeout_seconds=None, raise_on_error=False)
    except Exception as exc:  # noqa: BLE001
        return None, f"math-verify failed: {type(exc).__name__}: {exc}"
    return (1.0, "correct") if correct else (0.0, "wrong answer")


def _limit_cpu(seconds: int) -> None:
    """Let the process use `seconds` more CPU seconds (the limit counts from its start)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(usage.ru_utime + usage.ru_stime) + 1 + seconds
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """Answer each request line of `requests` on `replies` until the input ends."""

    def write(message: dict) -> None:
        replies.write(json.dumps(message).encode("ascii") + b"\n")
        replies.flush()

    write({"ready": True})
    for line in requests:
        request = json.loads(line)
        _limit_cpu(int(request["cpu_seconds"]))
        score, reason = compare(request["gold"], request["answer"], lambda: write({"gold_parsed": True}))
        write({"score": score, "reason": reason})


if __name__ == "__main__":
    # A process killed at the CPU limit leaves no core file.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # math-verify warns that its timeouts are off: here the process is the timeout.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    serve(sys.stdin.buffer, sys.stdout.buffer)
