"""One writer per run directory: a pipeline holds an exclusive lock on `<root>/.lock` while it writes there.

Two pipelines writing one run directory interleave their metrics and checkpoints and both finish
"successfully". The second must instead stop before it touches anything, and say who holds the
directory (`RunDirectoryBusyError`, one line naming the holder's pid).

The lock is `flock` on the open `.lock` file: the kernel releases it when the holding process ends,
however it ends, so no lock outlives a crashed or killed run. The file holds the holder's pid, host and
start time, for the message. It stays in place after a run: removing it would let a process that opened
it just before take a lock on a file no longer at that path, beside a newcomer's lock on a new one.

Some network file systems refuse `flock`. There the lock is the file itself: created with `O_EXCL`,
removed on release. A killed run leaves it behind, so a lock file whose holder ran on this host and is
gone is taken over, with a line that says so; a holder on another host cannot be checked, and the message
names the file to remove once that run is known to be over.

`holds(path)` tells code that cleans up after crashed runs (`train.checkpoint.clean_stale`) whether
`path` lies inside a run directory this process holds: nothing there can belong to a live writer.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

LOCK_FILE = ".lock"
HOST = socket.gethostname()
# flock's answers on a file system that does not support it (ENOTSUP is EOPNOTSUPP on Linux).
_FLOCK_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})

_held_roots: set[Path] = set()


class RunDirectoryBusyError(RuntimeError):
    """Another process holds the run directory; the message names it."""


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host and can still run (a zombie, killed and not yet reaped,
    cannot)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: existing is all that can be known
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@dataclass(frozen=True)
class Holder:
    """Who holds a run directory, as its lock file records it."""

    pid: int
    host: str
    started: str

    @classmethod
    def this_process(cls) -> "Holder":
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        return cls(os.getpid(), HOST, now)

    @classmethod
    def parse(cls, text: str) -> "Holder | None":
        """The holder a lock file names; None when it names none (empty, cut or edited)."""
        try:
            d = json.loads(text)
            return cls(int(d["pid"]), str(d["host"]), str(d["started"]))
        except (ValueError, KeyError, TypeError):
            return None

    def to_text(self) -> str:
        return json.dumps(asdict(self), sort_keys=True) + "\n"

    def is_gone(self) -> bool:
        """Provably over: it ran on this host and its process no longer runs."""
        return self.host == HOST and not process_alive(self.pid)

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}"


def holds(path: str | os.PathLike) -> bool:
    """Whether `path` is inside (or is) a run directory whose lock this process holds."""
    path = Path(path).resolve()
    return any(path == root or root in path.parents for root in _held_roots)


class RunLock:
    """An exclusive hold on a run directory: `RunLock.acquire(root)`, given up by `release()` or by leaving
    a `with` block (and by the kernel when the process ends, in the `flock` case)."""

    def __init__(self, root: Path, path: Path, holder: Holder, fd: int | None) -> None:
        self.root, self.path, self.holder = root, path, holder
        self._fd = fd  # the flock'ed file; None when the lock is the file's existence

    @classmethod
    def acquire(cls, root: str | os.PathLike, say: Callable[[str], None] = print) -> "RunLock":
        """Hold `root` (created if absent) or raise RunDirectoryBusyError naming its holder."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        path = root / LOCK_FILE
        me = Holder.this_process()
        fd, created = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Holder.parse(_read(fd))
            os.close(fd)
            raise RunDirectoryBusyError(_busy_message(root, path, holder, checkable=True)) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _FLOCK_UNSUPPORTED:
                raise
            return cls._acquire_by_existence(root, path, me, created, say)
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.to_text().encode(), 0)
        return cls._held(root, path, me, fd)

    @classmethod
    def _acquire_by_existence(cls, root: Path, path: Path, me: Holder, created: bool,
                              say: Callable[[str], None]) -> "RunLock":
        """The lock where flock is refused: the lock file exists, naming its holder. `created`: this process
        has just made it (with O_EXCL), so holds it."""
        if not created:
            text = _read_path(path)
            holder = Holder.parse(text)
            if holder is None or not holder.is_gone():
                raise RunDirectoryBusyError(_busy_message(root, path, holder, checkable=False))
            _take_over(path, text, root)
            say(f"{root}: took over the lock of a run that is gone ({holder}); this file system refuses flock")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:  # another newcomer took it first
                raise RunDirectoryBusyError(_busy_message(root, path, Holder.parse(_read_path(path)),
                                                          checkable=False)) from None
        else:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.write(fd, me.to_text().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls._held(root, path, me, None)

    @classmethod
    def _held(cls, root: Path, path: Path, me: Holder, fd: int | None) -> "RunLock":
        lock = cls(root, path, me, fd)
        _held_roots.add(root.resolve())
        return lock

    def release(self) -> None:
        _held_roots.discard(self.root.resolve())
        if self._fd is not None:
            os.close(self._fd)  # drops the flock; the file stays (module docstring)
            self._fd = None
        elif _read_path(self.path) == self.holder.to_text():
            self.path.unlink()

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _open_lock_file(path: Path) -> tuple[int, bool]:
    """The lock file open for writing, and whether this call created it."""
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644), True
        except FileExistsError:
            pass
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC), False
        except FileNotFoundError:
            continue  # removed between the two opens by a holder releasing it: try again


def _take_over(path: Path, stale_text: str, root: Path) -> None:
    """Remove a gone holder's lock file. It is renamed aside first and checked to be the one judged stale,
    so a newcomer's lock that replaced it in the meantime is put back rather than removed."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another newcomer removed it first
        return
    text = _read_path(aside)
    if text != stale_text:
        os.rename(aside, path)
        raise RunDirectoryBusyError(_busy_message(root, path, Holder.parse(text), checkable=False))
    aside.unlink()


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("utf-8", errors="replace")


def _read_path(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _busy_message(root: Path, path: Path, holder: Holder | None, *, checkable: bool) -> str:
    """One line naming the holder. `checkable`: the lock ends with its holder (flock), so it never needs
    removing by hand; otherwise a holder this host cannot check leaves that to the user."""
    who = str(holder) if holder is not None else f"{path} names no holder"
    message = f"{root} is in use by another pipeline run ({who}); wait for it to end, or write elsewhere with --out"
    if not checkable and (holder is None or holder.host != HOST):
        message += f"; this host cannot tell whether that run is over: once it is, remove {path}"
    return message


__all__ = ["HOST", "LOCK_FILE", "Holder", "RunDirectoryBusyError", "RunLock", "holds", "process_alive"]
