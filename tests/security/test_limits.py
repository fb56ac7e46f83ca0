"""The sandbox's limits and its verdicts: time, memory, processes, output, early exits, the environment,
and infrastructure failures (None only when the sandbox itself did not start)."""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

from qwen3repro.rewards import sandbox
from qwen3repro.rewards.code import SandboxLimits, code_reward, run_sandboxed, run_tests

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def test_correct_and_wrong_solutions(as_identity, limits):
    assert as_identity(run_tests, ADD, ADD_TESTS, limits).score == 1.0
    r = as_identity(run_tests, "def add(a, b):\n    return a - b\n", ADD_TESTS, limits)
    assert r.score == 0.0 and "assertion failed" in r.reason


def test_infinite_loops_are_killed(as_identity, limits):
    t0 = time.monotonic()
    assert as_identity(run_tests, "while True:\n    pass\n", "assert True", limits).score == 0.0
    r = as_identity(run_tests, ADD + "import time\n", "import time\nassert add(1, 2) == 3\n"
                    "while True:\n    time.sleep(1)\n", limits)  # the tests themselves hang: the wall clock
    assert r.score == 0.0 and "wall-clock" in r.reason
    res = as_identity(run_sandboxed, "import time\nwhile True:\n    time.sleep(1)\n", limits=limits)
    assert res.timed_out and res.infra_error is None
    assert time.monotonic() - t0 < 3 * limits.wall_seconds + 10  # liveness, not speed: nothing waits forever


def test_memory_bomb_fails(as_identity, limits):
    res = as_identity(run_sandboxed, "x = bytearray(2**30)\n", limits=limits)
    assert "MemoryError" in res.output
    assert as_identity(run_tests, "x = []\nwhile True:\n    x.append(bytearray(10**7))\n", "assert True",
                       limits).score == 0.0


def test_disk_is_bounded(as_identity, limits):
    res = as_identity(run_sandboxed, "with open('big', 'wb') as f:\n    f.write(b'x' * (64 * 2**20))\n", limits=limits)
    assert res.returncode != 0 and ("File too large" in res.output or "No space" in res.output
                                    or res.returncode == 128 + 25)  # SIGXFSZ


FORK_BOMB = "import os\nn = 0\nwhile n < 10000:\n    try:\n        os.fork()\n        n += 1\n    except OSError:\n        break\nprint('forks stopped')\n"


def _alive(session: int) -> list[int]:
    """Live (non-zombie) processes of a session."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[3]) == session and fields[0] != "Z":
                    pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def test_fork_bomb_is_contained_and_leaves_nothing(as_identity, limits):
    res = as_identity(run_sandboxed, FORK_BOMB, limits=limits)
    assert res.infra_error is None and "forks stopped" in res.output  # the process cap stopped it
    assert _alive(res.pid) == []
    assert as_identity(run_tests, FORK_BOMB + ADD, ADD_TESTS, limits).score in (0.0, 1.0)


def test_output_flood_is_cut(as_identity, limits):
    res = as_identity(run_sandboxed, "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", limits=limits)
    assert res.output_truncated and len(res.output.encode()) <= limits.max_output_bytes
    r = as_identity(run_tests, ADD + "print('y' * 10**6)\n", ADD_TESTS, limits)
    assert r.score == 0.0 and "output" in r.reason


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"])
def test_exit_before_the_asserts_scores_zero(exit_call, as_identity, limits):
    assert as_identity(run_tests, ADD + exit_call + "\n", "assert add(1, 2) == 3\n", limits).score == 0.0


def test_clean_environment(as_identity, limits, monkeypatch):
    monkeypatch.setenv("QWEN3REPRO_SECRET_FOR_TEST", "s3cret")
    res = as_identity(run_sandboxed, "import os\nprint(sorted(os.environ))\nprint(os.getcwd())\n", limits=limits)
    assert "QWEN3REPRO_SECRET_FOR_TEST" not in res.output and "/sandbox" in res.output
    assert "['LANG', 'PATH', 'PWD', 'PYTHONHASHSEED']" in res.output  # PWD: set by bwrap's --chdir


def test_missing_pieces_fail_closed(monkeypatch):
    """No interpreter, no bubblewrap, no libseccomp: no reward (None) with the reason, and nothing runs."""
    r = run_tests(ADD, ADD_TESTS, SandboxLimits(python="/nonexistent/python"))
    assert r.score is None and "not executable" in r.reason
    monkeypatch.setattr(sandbox.shutil, "which", lambda name, path=None: None)
    r = code_reward("```python\n" + ADD + "```", ADD_TESTS)
    assert r.score is None and "bubblewrap" in r.reason
    res = run_sandboxed("print('ran')")
    assert res.infra_error and "bubblewrap" in res.infra_error and "ran" not in res.output


def test_a_refused_namespace_fails_closed(monkeypatch):
    """When the kernel refuses a namespace, bwrap exits before the program: an infrastructure failure
    (None, with bwrap's reason), read from bwrap's status descriptor; and a program that prints the same
    words and exits 1 is a 0, not a failure of the sandbox."""
    refusal = "bwrap: Creating new namespace failed: Operation not permitted"
    folder = tempfile.mkdtemp(prefix="qwen3repro-test-")
    os.chmod(folder, 0o755)  # reachable by the unprivileged uid the launcher drops to
    fake = os.path.join(folder, "bwrap")
    with open(fake, "w") as f:
        f.write(f"#!/bin/sh\necho '{refusal}' >&2\nexit 1\n")
    os.chmod(fake, 0o755)
    try:
        monkeypatch.setattr(sandbox, "_bwrap", lambda: fake)
        res = run_sandboxed("print('ran')")
        assert res.infra_error is not None and refusal in res.infra_error and "ran" not in res.output
        r = run_tests(ADD, ADD_TESTS)
        assert r.score is None and refusal in r.reason
    finally:
        shutil.rmtree(folder)
    monkeypatch.undo()
    r = run_tests(f"import sys\nprint({refusal!r}, file=sys.stderr)\nsys.exit(1)\n", ADD_TESTS)
    assert r.score == 0.0
