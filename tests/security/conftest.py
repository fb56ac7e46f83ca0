"""Run each security test as root and as an unprivileged user, where the machine allows.

`as_identity(fn, *args)` calls `fn` in this process when the test runs as its own user, and in a forked child
that has dropped to uid/gid 65534 for the "user" variant under root (the result comes back pickled). An
unprivileged user cannot reach an interpreter under root's private home, so that variant runs the
sandbox on the system's Python (`/usr/bin/python3`), skipping where there is none.
"""
from __future__ import annotations

import os
import pickle
import shutil
import sys
import traceback
from pathlib import Path

import pytest

from qwen3repro.rewards.sandbox import SandboxLimits, SandboxUnavailable, containment

UNPRIVILEGED = 65534
SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
ESCAPES = Path(__file__).parent / "escapes"
HACKS = Path(__file__).parent / "hacks"


def _run_as(uid: int, fn, args, kwargs):
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop every privilege, run, report, leave without running pytest's exit hooks
        os.close(read_fd)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            payload = ("ok", fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            payload = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        with os.fdopen(write_fd, "wb") as f:
            pickle.dump(payload, f)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    status, value = pickle.loads(data)
    if status == "error":
        raise AssertionError(f"as uid {uid}: {value}")
    return value


@pytest.fixture(params=["root", "user"])
def identity(request) -> str:
    """Who launches the sandbox: "root", or "user" (unprivileged)."""
    root = os.geteuid() == 0
    if request.param == "root" and not root:
        pytest.skip("not running as root")
    if request.param == "user" and root and not SYSTEM_PYTHON.is_file():
        pytest.skip(f"no interpreter an unprivileged user can reach ({SYSTEM_PYTHON} is missing)")
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap (bwrap) is not installed: `make` installs it; the sandbox refuses to run without it")
    try:
        containment()
    except SandboxUnavailable as exc:
        pytest.fail(f"the sandbox cannot run here: {exc}")
    return request.param


@pytest.fixture
def limits(identity) -> SandboxLimits:
    python = str(SYSTEM_PYTHON) if identity == "user" and os.geteuid() == 0 else None
    return SandboxLimits(cpu_seconds=2, wall_seconds=5.0, memory_bytes=256 * 2**20, max_processes=16,
                         max_output_bytes=16384, python=python)


@pytest.fixture
def as_identity(identity):
    """Call `fn(*args, **kwargs)` as the test's identity (see the module's docstring)."""
    def call(fn, *args, **kwargs):
        if identity == "user" and os.geteuid() == 0:
            return _run_as(UNPRIVILEGED, fn, args, kwargs)
        return fn(*args, **kwargs)

    return call
