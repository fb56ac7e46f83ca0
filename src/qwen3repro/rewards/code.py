"""Code rewards: run the model's solution against test asserts in a sandboxed subprocess.

Design (see the project reference on safe execution of generated code):

* A separate process, `[sys.executable, "-I", main.py]` (isolated mode: no user site, no PYTHON*
  variables), started in a fresh temporary directory as its working directory, with a minimal
  environment (`PATH`, `PYTHONHASHSEED`, `LANG`: no secrets leak through the environment), in a new
  session (`start_new_session=True`), so that it and everything it forks form one process group.
* Resource limits set in the child before exec (`preexec_fn`): RLIMIT_CPU (CPU seconds; SIGXCPU then
  SIGKILL), RLIMIT_AS (address space: a memory bomb gets MemoryError), RLIMIT_NPROC (processes),
  RLIMIT_FSIZE (largest file it may write), RLIMIT_NOFILE (open files), RLIMIT_CORE 0.
* Process count: RLIMIT_NPROC is not enforced for root, so when running as root with a writable
  `pids` cgroup (v1 `/sys/fs/cgroup/pids`, or v2 with the pids controller enabled), every run also
  gets its own cgroup with `pids.max`; the child joins it before exec. A fork bomb then fails to
  fork past the limit. `containment()` says which mechanisms are active.
* No network: the child runs in a new, empty network namespace (`unshare -n`; `unshare -rn`, i.e.
  inside a new user namespace, when not root), and in a new PID namespace whose init is the
  sandboxed interpreter: when it dies, the kernel kills and reaps whatever it forked, so no
  orphan or zombie is left on the host. Only a loopback interface that is down exists there,
  so every connection fails, local ones included. `network_isolation()` says which form is used;
  where neither works (no util-linux `unshare`, no namespaces) it returns "none" and the sandbox
  runs without network isolation (documented fallback: rely on the host's firewall).
* Wall-clock limit: the output is read until EOF or the deadline; then the whole process group is
  killed with SIGKILL (`os.killpg`) — grandchildren included — and, with a cgroup, every process
  left in it. At most `max_output_bytes` of output are kept; a run that writes more is killed and
  fails.
* Success is a sentinel, not an exit status: the harness reads a random token from its stdin
  (never written in any file), runs the solution, then the test asserts, and only then prints the
  token and leaves with `os._exit(0)`. `sys.exit(0)` or `os._exit(0)` inside the solution, an
  exception, a failed assert, a crash or a timeout all leave the token unprinted: score 0.
* An infrastructure failure (the interpreter or the sandbox cannot start) returns score None — "no
  reward", ignored by the trainer — never 0.

Limits are set through `preexec_fn`, which Python documents as unsafe when the calling process runs
other threads (a lock held at fork time can deadlock the child before exec): call the sandbox from
the main thread or from worker processes, not from a thread pool.

This is a defence against accidents and naive exploits (infinite loops, memory and fork bombs,
early exits, output floods, network access), not a security boundary against adversarial code: code
in the same interpreter as the harness could, for instance, read the token from the harness's frame.
"""
from __future__ import annotations

import functools
import os
import re
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

from .registry import RewardResult, answer_text, register

__all__ = [
    "SandboxLimits",
    "SandboxResult",
    "code_reward",
    "containment",
    "extract_code",
    "network_isolation",
    "run_sandboxed",
    "run_tests",
]


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 512 * 2**20
    max_processes: int = 32
    max_file_bytes: int = 2**20
    max_open_files: int = 64
    max_output_bytes: int = 64 * 2**10
    python: str = sys.executable


@dataclass
class SandboxResult:
    returncode: int | None  # negative: killed by that signal
    output: str  # stdout and stderr together, at most max_output_bytes (decoded leniently)
    timed_out: bool = False
    output_truncated: bool = False
    infra_error: str | None = None  # set when the sandbox itself failed
    elapsed: float = 0.0
    pid: int | None = None  # the sandbox process (its session id)


# ------------------------------------------------------------------------------- mechanisms
# The namespaces each run gets: a new network namespace (no network) and a new PID namespace
# (`--fork`: the sandboxed interpreter is its init, so when it dies the kernel kills and reaps every
# process it left behind — no orphan or zombie reaches the host's init). `--kill-child` kills the
# interpreter if `unshare` itself is killed. Non-root: the same inside a new user namespace (-r).
_NAMESPACE_FLAGS = {
    "unshare -n": ["--net", "--pid", "--fork", "--kill-child"],
    "unshare -rn": ["--map-root-user", "--net", "--pid", "--fork", "--kill-child"],
}


@functools.lru_cache(maxsize=1)
def network_isolation() -> str:
    """How the sandbox cuts the network: "unshare -n", "unshare -rn" or "none" (probed once)."""
    exe = shutil.which("unshare")
    if exe is None:
        return "none"
    for name, flags in _NAMESPACE_FLAGS.items():
        try:
            probe = subprocess.run(
                [exe, *flags, "true"], capture_output=True, timeout=10, env={"PATH": "/usr/bin:/bin"}
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return name
    return "none"


def _cgroup_base() -> str | None:
    """A directory where a per-run pids cgroup can be created, or None."""
    if os.geteuid() != 0:
        return None
    v1 = "/sys/fs/cgroup/pids"
    if os.path.isfile(os.path.join(v1, "cgroup.procs")) and os.access(v1, os.W_OK):
        return v1
    v2 = "/sys/fs/cgroup"
    try:
        with open(os.path.join(v2, "cgroup.subtree_control")) as f:
            if "pids" in f.read().split() and os.access(v2, os.W_OK):
                return v2
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def _cgroups_work() -> bool:
    base = _cgroup_base()
    if base is None:
        return False
    path = _make_cgroup(base, 4)
    if path is None:
        return False
    _remove_cgroup(path)
    return True


def containment() -> dict[str, str]:
    """The active mechanisms: {"network": ..., "processes": ...}."""
    procs = "pids cgroup + RLIMIT_NPROC" if _cgroups_work() else "RLIMIT_NPROC"
    if os.geteuid() == 0 and not _cgroups_work():
        procs += " (not enforced for root: wall timeout + process-group kill only)"
    return {"network": network_isolation(), "processes": procs}


def _make_cgroup(base: str, max_pids: int) -> str | None:
    path = os.path.join(base, f"qwen3repro-sandbox-{uuid.uuid4().hex[:12]}")
    try:
        os.mkdir(path)
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write(str(max_pids))
        return path
    except OSError:
        try:
            os.rmdir(path)
        except OSError:
            pass
        return None


def _cgroup_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _remove_cgroup(path: str) -> None:
    deadline = time.monotonic() + 2.0
    while True:
        for pid in _cgroup_pids(path):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.rmdir(path)
            return
        except OSError:
            if time.monotonic() > deadline:
                return  # left behind empty-ish; harmless, named by uuid
            time.sleep(0.01)


def _preexec(limits: SandboxLimits, cgroup: str | None):
    def setup() -> None:  # runs in the child between fork and exec
        if cgroup is not None:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        cpu = max(1, int(limits.cpu_seconds))
        # soft = hard: SIGKILL at the limit (a PID-namespace init ignores SIGXCPU).
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_bytes, limits.max_file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return setup


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------------------ running
def run_sandboxed(source: str, *, stdin_text: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Run Python `source` in the sandbox; `stdin_text` (small: it must fit the pipe buffer, 64 KiB)
    is written to its stdin, which is then closed."""
    limits = limits or SandboxLimits()
    if not (os.path.isfile(limits.python) and os.access(limits.python, os.X_OK)):
        return SandboxResult(None, "", infra_error=f"interpreter {limits.python!r} is not executable")
    net = network_isolation()
    prefix = [] if net == "none" else [shutil.which("unshare") or "unshare", *_NAMESPACE_FLAGS[net], "--"]
    cgroup = _make_cgroup(_cgroup_base(), limits.max_processes) if _cgroups_work() else None
    try:
        with tempfile.TemporaryDirectory(prefix="qwen3repro-sandbox-") as workdir:
            path = os.path.join(workdir, "main.py")
            with open(path, "w", encoding="utf-8") as f:
                f.write(source)
            return _run(prefix + [limits.python, "-I", path], workdir, stdin_text, limits, cgroup)
    except OSError as exc:
        return SandboxResult(None, "", infra_error=f"{type(exc).__name__}: {exc}")
    finally:
        if cgroup is not None:
            _remove_cgroup(cgroup)


# unshare's own failures (before the interpreter runs). Other "unshare: ..." lines, such as the one it
# prints when the interpreter was killed by a signal, are the sandboxed program's outcome.
_UNSHARE_FAILED = re.compile(r"unshare: (unshare failed|failed to execute|cannot|write failed|setgroups failed)")


def _run(argv, workdir, stdin_text, limits: SandboxLimits, cgroup) -> SandboxResult:
    env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_preexec(limits, cgroup), close_fds=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return SandboxResult(None, "", infra_error=f"could not start the sandbox: {type(exc).__name__}: {exc}")

    chunks: list[bytes] = []
    size, timed_out, truncated = 0, False, False
    try:
        try:
            proc.stdin.write(stdin_text.encode())
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # the child may die before reading its stdin
        deadline = start + limits.wall_seconds
        fd = proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                if not sel.select(timeout=remaining):
                    continue
                data = os.read(fd, 65536)
                if not data:
                    break  # EOF: every holder of the pipe is gone
                room = limits.max_output_bytes - size
                chunks.append(data[:room])
                size += min(len(data), room)
                if len(data) > room:
                    truncated = True
                    break
        if not timed_out and not truncated:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        # Close our end of the pipe first: a writer blocked on a full pipe (the program, or unshare
        # reporting how its child died) gets EPIPE/SIGPIPE instead of waiting for us forever.
        proc.stdout.close()
        if argv[0].endswith("unshare"):
            # Kill the namespace's init (unshare's one child) first: the kernel then kills and reaps
            # everything in the namespace, and unshare reaps its child and exits by itself.
            for pid in _children(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(proc.pid)
        if cgroup is not None:
            for pid in _cgroup_pids(cgroup):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait()
    output = b"".join(chunks).decode("utf-8", errors="replace")
    result = SandboxResult(
        proc.returncode, output, timed_out=timed_out, output_truncated=truncated,
        elapsed=time.monotonic() - start, pid=proc.pid,
    )
    if argv[0].endswith("unshare") and proc.returncode not in (None, 0) and _UNSHARE_FAILED.match(output):
        result.infra_error = output.strip().splitlines()[0]
    return result


_HARNESS = '''import os, sys


def _harness():
    token = sys.stdin.readline().strip()
    sys.stdin.close()
    namespace = {{"__name__": "solution", "__builtins__": __builtins__}}
    exec(compile({solution!r}, "solution.py", "exec"), namespace)
    exec(compile({tests!r}, "tests.py", "exec"), namespace)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, ("\\n" + token + "\\n").encode())
    os._exit(0)


_harness()
'''


def run_tests(solution: str, tests: str, limits: SandboxLimits | None = None) -> RewardResult:
    """1.0 when `solution` runs and every assert of `tests` (run after it, same namespace) passes."""
    limits = limits or SandboxLimits()
    token = "QWEN3REPRO-TESTS-PASSED-" + secrets.token_hex(16)
    source = _HARNESS.format(solution=solution, tests=tests)
    result = run_sandboxed(source, stdin_text=token + "\n", limits=limits)
    if result.infra_error is not None:
        return RewardResult(None, f"sandbox failure: {result.infra_error}")
    if result.output_truncated:
        return RewardResult(0.0, f"output limit ({limits.max_output_bytes} bytes) exceeded")
    passed = token in result.output.splitlines()
    if passed:
        return RewardResult(1.0, "all tests passed")
    if result.timed_out:
        return RewardResult(0.0, f"wall-clock limit ({limits.wall_seconds} s) exceeded")
    rc = result.returncode
    lines = result.output.strip().splitlines()
    program_lines = [line for line in lines if not line.startswith("unshare: ")]
    if (rc is not None and rc < 0) or len(program_lines) < len(lines):
        # Killed by a signal: directly, or (in the namespaces) reported by unshare for its child.
        if rc is not None and rc < 0 and -rc in signal.Signals._value2member_map_:
            name = signal.Signals(-rc).name
        else:
            name = "a signal (CPU limit or SIGKILL)"
        return RewardResult(0.0, f"killed by {name}")
    last = program_lines[-1:] or ["exited before the tests finished"]
    return RewardResult(0.0, f"failed (exit {rc}): {last[0][:200]}")


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
        compile(code, "solution.py", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        return RewardResult(0.0, f"does not compile: {type(exc).__name__}: {str(exc)[:200]}")
    return run_tests(code, tests, limits)
