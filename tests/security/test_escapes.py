"""Model-written code that tries to escape the sandbox: each script in `escapes/` is one attempt.

A script prints "ESCAPED ..." for every attempt that worked, so each test asserts that no line says so,
that the script ran to its end (its last line is printed: a crash would hide attempts), and, where the
attempt targets the host, that the host is unchanged (no planted file, no reachable listener, no
secret in the output). The constants each script reads (the launcher's pid, a secret in its environment,
a listener's port, ...) are prepended to it.
"""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from qwen3repro.rewards.code import run_sandboxed, run_tests

from .conftest import ESCAPES

PROJECT_SRC = Path(__file__).resolve().parents[2] / "src" / "qwen3repro"


def _run(as_identity, limits, script: str, **constants):
    header = "".join(f"{name} = {value!r}\n" for name, value in constants.items())
    source = header + (ESCAPES / script).read_text() + "\nprint('END OF SCRIPT')\n"
    result = as_identity(run_sandboxed, source, limits=limits)
    assert result.infra_error is None, result.infra_error
    assert "END OF SCRIPT" in result.output, result.output  # every attempt was made
    assert "ESCAPED" not in result.output, result.output
    return result


def test_cannot_read_host_secrets_or_files(as_identity, limits):
    out = _run(as_identity, limits, "read_shadow.py").output
    assert out.count("contained") == 4


@pytest.fixture
def host_secret():
    """A host process that holds a secret in its environment (as a trainer holds API keys)."""
    secret = "qwen3repro-secret-" + secrets.token_hex(8)
    holder = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
                              env={**os.environ, "QWEN3REPRO_TEST_SECRET": secret}, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "ready"  # exec'd: its environment is the one given
    with open(f"/proc/{holder.pid}/environ", "rb") as f:
        assert secret.encode() in f.read()  # the control: the host can read it
    yield secret, holder.pid
    holder.kill()
    holder.wait()


def test_cannot_see_host_environments(as_identity, limits, host_secret):
    secret, holder = host_secret
    out = _run(as_identity, limits, "environ_secret.py", SECRET=secret).output
    assert secret not in out
    visible = out.split("pids visible:")[1].split("]")[0].replace("'", " ").replace(",", " ").split()
    assert str(os.getpid()) not in visible and str(holder) not in visible  # only the sandbox's own


def test_cannot_open_another_process_memory(as_identity, limits):
    _run(as_identity, limits, "proc_mem.py", HOST_PID=os.getpid())


def test_cannot_plant_files_on_the_host(as_identity, limits):
    host_tmp = Path(tempfile.gettempdir()) / f"qwen3repro-planted-{secrets.token_hex(6)}.py"
    site = sysconfig.get_paths()["purelib"]
    _run(as_identity, limits, "write_host_files.py", PROJECT_SRC=str(PROJECT_SRC), HOST_TMP_FILE=str(host_tmp),
         SITE_PACKAGES=site)
    planted = [PROJECT_SRC / "planted.py", host_tmp, Path(site) / "planted.pth",
               Path(sys.base_prefix) / "lib" / "planted.pth", Path("/tmp/pwned")]
    assert [p for p in planted if p.exists()] == []


def test_cannot_leave_the_process_cap_or_raise_limits(as_identity, limits):
    _run(as_identity, limits, "cgroup_escape.py")


@pytest.fixture
def host_listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    socket.create_connection(server.getsockname(), timeout=2).close()  # the host itself can connect
    yield server.getsockname()[1]
    server.close()


def test_cannot_reach_the_host_network(as_identity, limits, host_listener):
    _run(as_identity, limits, "setns_network.py", HOST_PID=os.getpid(), PORT=host_listener)


def test_cannot_reach_host_unix_sockets(as_identity, limits, tmp_path):
    path = str(tmp_path / "host.sock")
    abstract = "qwen3repro-test-" + secrets.token_hex(6)
    listeners = []
    for address in (path, "\0" + abstract):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(address)
        s.listen(1)
        listeners.append(s)
    os.chmod(tmp_path, 0o777)
    os.chmod(path, 0o777)  # even a world-writable socket must be out of reach
    try:
        out = _run(as_identity, limits, "unix_sockets.py", UNIX_PATH=path, ABSTRACT_NAME=abstract).output
    finally:
        for s in listeners:
            s.close()
    assert out.count("contained") == 5


def test_no_privilege_and_no_kernel_surface(as_identity, limits):
    out = _run(as_identity, limits, "kernel_surface.py", HOST_PID=os.getpid()).output
    assert "uid 65534" in out and "NoNewPrivs:\t1" in out and "Seccomp:\t2" in out


def test_cannot_signal_the_host(as_identity, limits):
    _run(as_identity, limits, "kill_host.py", HOST_PID=os.getpid())


def test_escape_attempts_score_zero_as_solutions(as_identity, limits, host_listener):
    """The same attempts as a solution under test: none can turn into a passing score."""
    source = "HOST_PID = %d\nPORT = %d\n" % (os.getpid(), host_listener) + (ESCAPES / "setns_network.py").read_text()
    r = as_identity(run_tests, source + "\ndef f():\n    return 1\n", "assert f() == 2\n", limits)
    assert r.score == 0.0
