"""The sandbox for model-written code: bubblewrap, an unprivileged user, a seccomp filter, resource limits.

RL optimises against whatever the reward lets through, so the code reward treats the program as hostile:
it may try to read secrets, write into the project or the interpreter, reach the network, escape its
limits or fake its result. Each run gets, in this order of the launch chain:

* **An unprivileged user.** As root (how CI and most containers run), the launcher first drops to a
  fresh unprivileged uid/gid (`setpriv`), picked per run from a range no account uses, so the program
  owns no file of the host and the per-user process limit counts its processes alone. Because that uid
  cannot reach an interpreter under a private home (pyenv's `/root/.pyenv`), the launcher bind-mounts the
  interpreter's prefix read-only onto an empty world-readable directory first, inside a private mount
  namespace of its own (`unshare --mount`), so the host's mounts never change. Not root: the user's own
  uid, which already has no privilege.
* **Resource limits** (`prlimit`): CPU seconds, address space, file size, open files, no core; the process
  cap is set inside the namespaces (below), where it counts the sandbox's own tasks only.
* **bubblewrap** (Debian's `bwrap`, the sandbox Flatpak runs on): new user, mount, PID, network, IPC, UTS
  and cgroup namespaces; uid 65534 inside with no capabilities and `no_new_privs`; nested user namespaces
  disabled; a root file system holding only `/usr` and the interpreter's prefix, read-only, a private
  `/proc` (only the sandbox's own processes), a minimal `/dev`, and one small tmpfs, `/sandbox`, the
  working directory (`/tmp` links to it), as the only writable place; a new session (no terminal injection); an
  empty environment but `PATH`, `LANG`, `PYTHONHASHSEED`; killed with its launcher. The program is the
  PID namespace's init (`--as-pid-1`): no helper process of bwrap's lives beside it, whose memory it
  could open through `/proc` (same uid) to run code outside the seccomp filter. The program's files are
  copied in read-only (`--ro-bind-data`), so nothing of the host's file system is shared with it.
* **A seccomp filter** (`seccomp_filter`, built with libseccomp through `pyseccomp`): the syscalls that
  reach kernel attack surface or other processes (ptrace, mount, namespaces, keyrings, bpf, io_uring,
  perf, module loading, ...) fail with EPERM, and sockets other than AF_UNIX cannot be created.

Why bubblewrap rather than hand-written namespace code: it is small, audited and maintained (it is the
sandbox of every Flatpak app), does each step in the order the kernel requires (user namespace, uid map,
mounts, pivot_root, capability drop, `no_new_privs`, seccomp, exec), and reports its own outcome on a
separate descriptor (`--json-status-fd`): whether the sandboxed program started at all is read from
there, never from the program's output, so a program cannot fake an infrastructure failure. Where a
piece is missing (no `bwrap`, no libseccomp, the kernel refuses a namespace), the run fails closed:
`SandboxResult.infra_error` names the reason and nothing runs unconfined.

The wall-clock limit is enforced by the caller of the launcher: at the deadline the launcher (bwrap) is
killed with SIGKILL, bwrap's `--die-with-parent` kills the PID namespace's init, and the kernel kills
everything in the namespace with it. At most `max_output_bytes` of output are kept; more kills the run.
No `preexec_fn` is used, so the sandbox may be called from threads.
"""
from __future__ import annotations

import errno
import functools
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

try:  # libseccomp through ctypes: a missing library makes every run fail closed, not the import
    import pyseccomp as seccomp
    _SECCOMP_MISSING: str | None = None
except (ImportError, OSError) as exc:  # pragma: no cover - depends on the machine
    seccomp = None
    _SECCOMP_MISSING = f"libseccomp is not usable ({type(exc).__name__}: {exc}); install pyseccomp and libseccomp2"

__all__ = [
    "SandboxFile",
    "SandboxLimits",
    "SandboxProcess",
    "SandboxResult",
    "SandboxUnavailable",
    "containment",
    "read_until",
    "run_sandboxed",
    "seccomp_filter",
    "start",
]

SANDBOX_UID = 65534  # "nobody": the program's uid inside its user namespace
SANDBOX_DIR = "/sandbox"  # its working directory (tmpfs)
# Root drops to a uid drawn from here for each run: above every account's and every subordinate range
# Debian hands out by default (100000-165535), below the 32-bit overflow uid.
HOST_UID_RANGE = (1_000_000, 2_000_000)
_SAFE_PATH = "/usr/bin:/bin"


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 512 * 2**20          # address space
    max_processes: int = 32
    max_file_bytes: int = 2**20              # the largest file it may write
    max_open_files: int = 64
    max_output_bytes: int = 64 * 2**10       # stdout and stderr together
    disk_bytes: int = 16 * 2**20             # the one writable directory (/sandbox; /tmp links to it)
    python: str | None = None                # None: the host's base interpreter (not a venv's)


@dataclass
class SandboxResult:
    returncode: int | None  # the program's exit status; 128 + N: killed by signal N (as bwrap reports it)
    output: str  # stdout and stderr together, at most max_output_bytes (decoded leniently)
    timed_out: bool = False
    output_truncated: bool = False
    infra_error: str | None = None  # set when the sandbox itself failed: the program never ran
    elapsed: float = 0.0
    pid: int | None = None  # the launcher's pid (its session id)


@dataclass(frozen=True)
class SandboxFile:
    """A file copied read-only into the sandbox's working directory."""

    name: str
    text: str


# ------------------------------------------------------------------------------------ seccomp
# Denied with EPERM: syscalls that act on other processes, mounts and namespaces, kernel keyrings,
# kernel modules and the machine, or that open large kernel attack surface (bpf, io_uring, perf,
# userfaultfd). None is needed by a Python program computing an answer.
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "name_to_handle_at", "open_by_handle_at",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "syslog", "acct", "quotactl", "iopl", "ioperm", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "fanotify_init", "lookup_dcookie", "personality",
)
# clone3 passes its flags in memory, where seccomp cannot read them: make it fail as "not implemented",
# so that libc falls back to clone, whose flags it can check.
CLONE_NAMESPACE_FLAGS = {
    "CLONE_NEWUSER": 0x10000000, "CLONE_NEWNS": 0x00020000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000, "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWCGROUP": 0x02000000,
}
_AF_UNIX = 1
_TIOCSTI = 0x5412


@functools.lru_cache(maxsize=1)
def seccomp_filter() -> bytes:
    """The compiled (cBPF) filter bwrap installs before it runs the program."""
    if seccomp is None:
        raise SandboxUnavailable(_SECCOMP_MISSING)
    flt = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        flt.add_rule(seccomp.ERRNO(errno.EPERM), name)
    flt.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for flag in CLONE_NAMESPACE_FLAGS.values():  # a new namespace of any kind
        flt.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    flt.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.NE, _AF_UNIX))
    flt.add_rule(seccomp.ERRNO(errno.EPERM), "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, _TIOCSTI))
    with tempfile.TemporaryFile() as f:
        flt.export_bpf(f)
        f.seek(0)
        return f.read()


# ------------------------------------------------------------------------------- the launcher
class SandboxUnavailable(RuntimeError):
    """A piece the sandbox needs is missing or refused: nothing may run."""


@dataclass(frozen=True)
class Interpreter:
    executable: str  # resolved, as the sandbox sees it (the same path inside and out)
    prefix: str  # bound read-only into the sandbox


@functools.lru_cache(maxsize=8)
def interpreter(python: str | None) -> Interpreter:
    """`python` (None: the base interpreter of this one, without a virtual environment's packages)."""
    if python is None:
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        candidate = os.path.join(sys.base_prefix, "bin", version)
        python = candidate if os.path.isfile(candidate) else os.path.realpath(sys.executable)
    executable = os.path.realpath(python)
    if not (os.path.isfile(executable) and os.access(executable, os.X_OK)):
        raise SandboxUnavailable(f"interpreter {python!r} is not executable")
    probe = subprocess.run([executable, "-I", "-S", "-c", "import sys; print(sys.base_prefix)"],
                           capture_output=True, text=True, timeout=30, env={"PATH": _SAFE_PATH})
    if probe.returncode != 0:
        raise SandboxUnavailable(f"interpreter {python!r} does not start: {probe.stderr.strip()[:200]}")
    prefix = os.path.realpath(probe.stdout.strip())
    if not executable.startswith(prefix + os.sep) and not executable.startswith("/usr/"):
        raise SandboxUnavailable(f"interpreter {executable} lies outside its prefix {prefix} and /usr")
    return Interpreter(executable, prefix)


def _bwrap() -> str:
    exe = shutil.which("bwrap", path=_SAFE_PATH)
    if exe is None:
        raise SandboxUnavailable("bubblewrap (bwrap) is not installed, and code never runs unconfined; "
                                 "install it (Debian: apt-get install bubblewrap; `make` does this as root)")
    return exe


def _tool(name: str) -> str:
    exe = shutil.which(name, path=_SAFE_PATH)
    if exe is None:
        raise SandboxUnavailable(f"{name} (util-linux) is not installed")
    return exe


def containment() -> dict[str, str]:
    """What confines a run on this machine (raises SandboxUnavailable when something is missing)."""
    root = os.geteuid() == 0
    version = subprocess.run([_bwrap(), "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    seccomp_filter()
    return {
        "launcher": version,
        "user": (f"uid {SANDBOX_UID} in a new user namespace; outside, a fresh unprivileged uid per run "
                 f"(dropped from root)" if root else
                 f"uid {SANDBOX_UID} in a new user namespace; outside, this user's uid {os.geteuid()}"),
        "namespaces": "user, mount, pid, net, ipc, uts, cgroup",
        "filesystem": f"/usr and the interpreter read-only, private /proc, minimal /dev, one tmpfs {SANDBOX_DIR} (/tmp links to it)",
        "privileges": "no capabilities, no_new_privs, no nested user namespaces",
        "seccomp": f"{len(DENIED_SYSCALLS)} syscalls denied, namespace flags of clone, sockets but AF_UNIX, TIOCSTI",
        "limits": "CPU seconds, address space, processes, file size, open files, wall clock, output bytes",
    }


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)  # inheritable: bwrap reads it
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@dataclass
class SandboxProcess:
    """One sandboxed program, started (`start`): the launcher's Popen; `finish` ends it."""

    proc: subprocess.Popen
    status_r: int  # bwrap's --json-status-fd, read end
    staging: str | None  # the root path's bind target (removed after the run)
    status: bytes = b""

    def finish(self) -> None:
        """Kill what is left, reap the launcher, clean up, keep bwrap's status record."""
        try:  # SIGKILL the launcher's group: bwrap's --die-with-parent then takes the PID namespace down
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        # Non-blocking: bwrap wrote its record before it exited; a process of the sandbox that has not
        # died yet may still hold the write end, and must not make us wait.
        os.set_blocking(self.status_r, False)
        try:
            while chunk := os.read(self.status_r, 65536):
                self.status += chunk
        except BlockingIOError:
            pass
        finally:
            os.close(self.status_r)
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)

    @property
    def started(self) -> bool:
        """After `finish`: whether bwrap reported starting the program (read from its own descriptor)."""
        return _started(self.status)


def start(files: list[SandboxFile], argv: list[str], limits: SandboxLimits, *,
          pass_fds: tuple[int, ...] = (), stdin: int | None = subprocess.PIPE) -> SandboxProcess:
    """Start `argv` (relative to the interpreter: `[-I, -S, script, ...]`) in a new sandbox holding `files`.

    Raises SandboxUnavailable or OSError when the launcher cannot start; whether the sandbox came up is
    read from the status descriptor afterwards (`SandboxProcess.started`). `pass_fds` stay open in the
    sandbox under the same numbers."""
    interp = interpreter(limits.python)
    bwrap = _bwrap()
    owned: list[int] = []
    staging = None
    try:
        status_r, status_w = os.pipe()
        owned.append(status_w)
        seccomp_fd = _memfd("seccomp", seccomp_filter())
        owned.append(seccomp_fd)
        file_fds = []
        for f in files:
            fd = _memfd(f.name, f.text.encode())
            owned.append(fd)
            file_fds.append((fd, f.name))
        prefix_source = interp.prefix
        chain: list[str] = []
        if os.geteuid() == 0:
            uid = str(HOST_UID_RANGE[0] + secrets.randbelow(HOST_UID_RANGE[1] - HOST_UID_RANGE[0]))
            if not interp.prefix.startswith("/usr/"):
                staging = tempfile.mkdtemp(prefix="qwen3repro-sandbox-")
                os.chmod(staging, 0o755)
                prefix_source = staging
                chain += [_tool("unshare"), "--mount", "--propagation", "private", "--",
                          "/bin/sh", "-c", 'mount --bind -o ro "$1" "$2" && shift 2 && exec "$@"', "sh",
                          interp.prefix, staging]
            chain += [_tool("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                      "--inh-caps=-all", "--bounding-set=-all", "--"]
        cpu = max(1, int(limits.cpu_seconds))
        chain += [_tool("prlimit"), f"--cpu={cpu}", f"--as={limits.memory_bytes}", f"--fsize={limits.max_file_bytes}",
                  f"--nofile={limits.max_open_files}", "--core=0", "--"]
        chain += [bwrap, "--unshare-all", "--unshare-user", "--disable-userns",
                  "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
                  "--as-pid-1", "--die-with-parent", "--new-session", "--clearenv",
                  "--setenv", "PATH", _SAFE_PATH, "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONHASHSEED", "0",
                  "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
                  "--symlink", "usr/bin", "/bin",
                  "--ro-bind", prefix_source, interp.prefix,
                  "--proc", "/proc", "--dev", "/dev",
                  "--size", str(limits.disk_bytes), "--tmpfs", SANDBOX_DIR, "--symlink", SANDBOX_DIR, "/tmp"]
        for fd, name in file_fds:
            chain += ["--ro-bind-data", str(fd), f"{SANDBOX_DIR}/{name}"]
        chain += ["--chdir", SANDBOX_DIR, "--json-status-fd", str(status_w), "--seccomp", str(seccomp_fd),
                  # The process cap is set inside the namespaces: there it counts the sandbox's own tasks, where
                  # outside it would count every task of the uid (the caller's threads, other sandboxes).
                  "--", _tool("prlimit"), f"--nproc={limits.max_processes}", "--", interp.executable, *argv]
        proc = subprocess.Popen(
            chain, env={"PATH": _SAFE_PATH, "LANG": "C.UTF-8"}, stdin=stdin, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
            pass_fds=(status_w, seccomp_fd, *(fd for fd, _ in file_fds), *pass_fds),
        )
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        for fd in owned:
            os.close(fd)
    return SandboxProcess(proc, status_r, staging)


def _started(status: bytes) -> bool:
    """Whether bwrap reported the program's pid: the sandbox came up and the program was started."""
    decoder, text, i = json.JSONDecoder(), status.decode("utf-8", "replace"), 0
    while i < len(text):
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            break
        try:
            obj, i = decoder.raw_decode(text, i)
        except ValueError:
            return False
        if isinstance(obj, dict) and "child-pid" in obj:
            return True
    return False


def launcher_error(output: str, returncode: int | None) -> str:
    """Why the sandbox did not start, from the launcher's own output (the program never ran)."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    why = lines[-1][:300] if lines else f"the launcher exited with status {returncode}"
    return f"the sandbox did not start: {why}"


@dataclass
class Streams:
    """Output read from several descriptors until each closes, a deadline, or a byte cap."""

    data: dict[int, bytearray]
    timed_out: bool = False
    over_cap: int | None = None  # the descriptor that exceeded its cap


def read_until(fds: dict[int, int], wait_for: set[int], deadline: float) -> Streams:
    """Read `fds` (descriptor -> byte cap) until every descriptor in `wait_for` is at EOF, the deadline
    passes, or one exceeds its cap (its first `cap` bytes are kept)."""
    out = Streams({fd: bytearray() for fd in fds})
    open_fds = set(fds)
    with selectors.DefaultSelector() as sel:
        for fd in fds:
            sel.register(fd, selectors.EVENT_READ)
        while open_fds & wait_for:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                out.timed_out = True
                break
            for key, _ in sel.select(timeout=remaining):
                fd = key.fd
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    open_fds.discard(fd)
                    continue
                buf = out.data[fd]
                room = fds[fd] - len(buf)
                buf += chunk[:room]
                if len(chunk) > room:
                    out.over_cap = fd
                    return out
    return out


def run_sandboxed(source: str, *, stdin_text: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Run Python `source` in the sandbox; `stdin_text` is written to its stdin, which is then closed."""
    limits = limits or SandboxLimits()
    t0 = time.monotonic()
    try:
        launch = start([SandboxFile("main.py", source)], ["-I", "-S", f"{SANDBOX_DIR}/main.py"], limits)
    except SandboxUnavailable as exc:
        return SandboxResult(None, "", infra_error=str(exc))
    except (OSError, subprocess.SubprocessError) as exc:
        return SandboxResult(None, "", infra_error=f"could not start the sandbox: {type(exc).__name__}: {exc}")
    try:
        try:
            launch.proc.stdin.write(stdin_text.encode())
            launch.proc.stdin.close()
        except OSError:
            pass  # the program may end before reading its stdin
        fd = launch.proc.stdout.fileno()
        streams = read_until({fd: limits.max_output_bytes}, {fd}, t0 + limits.wall_seconds)
        timed_out = streams.timed_out
        if not timed_out and streams.over_cap is None:
            try:
                launch.proc.wait(timeout=max(0.0, t0 + limits.wall_seconds - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        launch.finish()
    output = bytes(streams.data[fd]).decode("utf-8", errors="replace")
    result = SandboxResult(launch.proc.returncode, output, timed_out=timed_out,
                           output_truncated=streams.over_cap is not None,
                           elapsed=time.monotonic() - t0, pid=launch.proc.pid)
    if not launch.started:
        result.infra_error = launcher_error(output, launch.proc.returncode)
    return result
