"""Math answers checked with `math-verify` (symbolic equivalence: 1/2 = 0.5 = \\frac12, {1,2} = {2,1}).

The gold answer is parsed with math-verify's defaults (LaTeX and plain expressions); the model's
answer (the content after its think block) with a `\\boxed{}` answer preferred, then any LaTeX or
plain expression. `verify(gold, answer)` is asymmetric: gold first.

Time bound. A model can write an answer that math-verify never finishes comparing (`9^{9^{9^{9}}}`,
`(10^{10})!`). math-verify's own timeout uses `signal.alarm`: it works on the main thread only, and
cannot interrupt one long C call even there (a thread stuck in a big integer power holds the
interpreter, so the whole program hangs). So the comparison runs in a worker process
(`math_worker.py`) that is killed when it runs past `TIMEOUT_SECONDS` of wall-clock time, on any
thread. Workers are started on demand (the start-up is not counted in the limit), one per
concurrent caller, and reused; a killed one is replaced by the next call.

An answer that does not parse, an empty answer, a completion without `</think>`, and an answer that
cannot be compared within the time limit score 0; a gold answer that does not parse (a data
problem), a verifier crash or a worker that cannot start give no reward (None).
"""
from __future__ import annotations

import atexit
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from pathlib import Path

from .registry import RewardResult, answer_text, register

__all__ = ["math_reward", "TIMEOUT_SECONDS"]

# Wall-clock seconds for parsing both answers and comparing them; ordinary answers take milliseconds.
TIMEOUT_SECONDS = 5
# Wall-clock seconds for a worker to import math-verify and say it is ready (slow on a loaded machine).
STARTUP_SECONDS = 120

_WORKER_SCRIPT = Path(__file__).with_name("math_worker.py")


class _Worker:
    """One comparison process, spoken to in JSON lines (the protocol is in math_worker.py)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-P", str(_WORKER_SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True
        )
        self._unread = bytearray()

    def send(self, message: dict) -> None:
        self.process.stdin.write(json.dumps(message).encode("ascii") + b"\n")
        self.process.stdin.flush()

    def receive(self, deadline: float) -> dict:
        """The next message; TimeoutError at `deadline` (time.monotonic), EOFError if the process ended."""
        fd = self.process.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._unread:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                if not selector.select(timeout=remaining):
                    continue
                data = os.read(fd, 65536)
                if not data:
                    raise EOFError
                self._unread += data
        line, _, rest = bytes(self._unread).partition(b"\n")
        self._unread = bytearray(rest)
        return json.loads(line)

    def kill(self) -> int:
        """Kill the process; its exit status (negative: the signal that ended it)."""
        self.process.kill()
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:
                pass  # a write still buffered for a dead process
        return self.process.wait()


class _WorkerPool:
    """Idle workers, handed to one caller at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._started: set[_Worker] = set()  # every worker not yet killed, idle or in use

    def take(self) -> _Worker:
        """An idle worker, or a new one once it is ready; OSError or RuntimeError if none starts."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        worker = _Worker()
        with self._lock:
            self._started.add(worker)
        try:
            ready = worker.receive(time.monotonic() + STARTUP_SECONDS)
        except (TimeoutError, EOFError, ValueError):
            ready = None
        if ready != {"ready": True}:
            self.discard(worker)
            raise RuntimeError(f"{_WORKER_SCRIPT.name} did not start (exit status {worker.process.returncode})")
        return worker

    def give_back(self, worker: _Worker) -> None:
        with self._lock:
            self._idle.append(worker)

    def discard(self, worker: _Worker) -> int:
        """Kill `worker`; its exit status."""
        with self._lock:
            self._started.discard(worker)
        return worker.kill()

    def close(self) -> None:
        """Kill every worker (at exit: one busy on a pathological answer would otherwise outlive us
        until its CPU limit)."""
        with self._lock:
            workers, self._started, self._idle = list(self._started), set(), []
        for worker in workers:
            worker.kill()

    def forget(self) -> None:
        """In a forked child: the workers and the lock belong to the parent, which goes on using them."""
        self._lock = threading.Lock()
        self._idle, self._started = [], set()


_POOL = _WorkerPool()
atexit.register(_POOL.close)
os.register_at_fork(after_in_child=_POOL.forget)


def _compare(gold: str, answer: str) -> RewardResult:
    """`answer` against `gold` in a worker, killed after TIMEOUT_SECONDS."""
    try:
        worker = _POOL.take()
    except (OSError, RuntimeError) as exc:
        return RewardResult(None, f"math verifier: {exc}")
    gold_parsed = False
    try:
        worker.send({"gold": gold, "answer": answer, "cpu_seconds": TIMEOUT_SECONDS + 1})
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while True:
            reply = worker.receive(deadline)
            if reply.get("gold_parsed"):
                gold_parsed = True
                continue
            result = RewardResult(reply["score"], reply["reason"])
            _POOL.give_back(worker)
            return result
    except TimeoutError:
        _POOL.discard(worker)
        if not gold_parsed:
            return RewardResult(None, f"gold answer {gold!r} not parsed within {TIMEOUT_SECONDS} s")
        # The time ran out on the answer, not the gold one: an expression too costly to compare is the
        # model's doing, so it scores as a wrong answer (0), not as "no reward".
        return RewardResult(0.0, f"answer not verified within {TIMEOUT_SECONDS} s (timed out)")
    except (OSError, EOFError, ValueError, KeyError):
        status = _POOL.discard(worker)
        if not gold_parsed:
            return RewardResult(None, f"math verifier: the worker process failed (exit status {status})")
        # Killed at its CPU limit, or crashed, on the model's answer: the answer's doing, as above.
        return RewardResult(0.0, f"verifying the answer ended the worker process (exit status {status})")


@register("math")
def math_reward(completion: str, answer: str) -> RewardResult:
    """1.0 if the completion's final answer equals `answer` (gold) mathematically, else 0.0."""
    # An empty answer goes to the worker too: a gold answer that does not parse gives no reward first.
    return _compare(str(answer), answer_text(completion))
