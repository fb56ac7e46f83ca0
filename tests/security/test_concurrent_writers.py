"""One writer per run directory: a second pipeline on the same output stops at once naming the first's pid
and touches nothing; a killed holder's lock never blocks the next run; crash clean-up leaves a live
writer's temporary files alone."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen3repro import run_lock
from qwen3repro.lineage import read_lineage
from qwen3repro.run_lock import HOST, Holder, RunDirectoryBusyError, RunLock
from qwen3repro.train import checkpoint

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "faulty_pipeline.py"
# Only the tokenizer and one pretraining stage: enough for a run that is paused mid-stage.
PIPELINE = ["pipeline", "micro", "--only", "tokenizer", "--only", "flagship/s1", "--no-claims",
            "--set", "pipeline.threads=1"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def _wait_for(path: Path, process: subprocess.Popen, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"{what}: the process ended ({process.returncode}) first:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under `root`: (size, modification time in ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_second_pipeline_on_the_same_output_stops_naming_the_first_and_touches_nothing(tmp_path):
    out = tmp_path / "runs"
    ready, release = tmp_path / "ready", tmp_path / "release"
    first = subprocess.Popen(
        [sys.executable, str(DRIVER), "--root", str(out / "micro"), "--pause-at", "flagship/s1/checkpoints/step_000020",
         "--ready", str(ready), "--release", str(release), "--", *PIPELINE, "--out", str(out)],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(ready, first, "the first run reaching its first S1 checkpoint")
        before = _tree(out)
        second = subprocess.run([sys.executable, "-m", "qwen3repro.cli", *PIPELINE, "--out", str(out)],
                                cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert _tree(out) == before  # the second run wrote, moved and removed nothing
        release.touch()
        first_output, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), second.stderr
    assert f"pid {first.pid} on host {HOST}" in lines[0] and str(out / "micro") in lines[0]

    assert first.returncode == 0, first_output
    s1 = out / "micro" / "flagship" / "s1"
    assert read_lineage(s1).complete
    steps = [json.loads(line)["step"] for line in (s1 / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 42  # one run's log: every step once, in order


_HOLD_LOCK = """
import sys, time
from qwen3repro.run_lock import RunLock
RunLock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_holders_lock_does_not_block_the_next_run(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], env=_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryBusyError, match=f"pid {holder.pid} on host"):
            RunLock.acquire(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert Holder.parse((tmp_path / run_lock.LOCK_FILE).read_text()).pid == holder.pid  # left behind by the kill
    with RunLock.acquire(tmp_path) as lock:
        assert Holder.parse((tmp_path / run_lock.LOCK_FILE).read_text()) == lock.holder
        assert run_lock.holds(tmp_path / "flagship" / "s1")
    assert not run_lock.holds(tmp_path / "flagship" / "s1")
    with RunLock.acquire(tmp_path):  # released on leaving the block
        pass


@pytest.fixture
def no_flock(monkeypatch):
    """A file system that refuses flock, as some network file systems do."""
    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", refuse)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_without_flock_the_lock_file_itself_is_the_lock(tmp_path, no_flock):
    lines: list[str] = []
    with RunLock.acquire(tmp_path, lines.append):
        with pytest.raises(RunDirectoryBusyError, match=f"pid {os.getpid()} on host {HOST}"):
            RunLock.acquire(tmp_path, lines.append)
    assert not (tmp_path / run_lock.LOCK_FILE).exists()  # removed on release
    assert lines == []


def test_without_flock_a_gone_holders_lock_is_taken_over_and_said(tmp_path, no_flock):
    lock_file = tmp_path / run_lock.LOCK_FILE
    gone = Holder(_dead_pid(), HOST, "2025-01-01T00:00:00+00:00")
    lock_file.write_text(gone.to_text())
    lines: list[str] = []
    with RunLock.acquire(tmp_path, lines.append) as lock:
        assert Holder.parse(lock_file.read_text()) == lock.holder
    assert len(lines) == 1 and f"took over the lock of a run that is gone (pid {gone.pid}" in lines[0]


def test_without_flock_a_holder_on_another_host_is_reported_with_the_file_to_remove(tmp_path, no_flock):
    lock_file = tmp_path / run_lock.LOCK_FILE
    lock_file.write_text(Holder(os.getpid(), "another-host", "2025-01-01T00:00:00+00:00").to_text())
    with pytest.raises(RunDirectoryBusyError, match=f"pid {os.getpid()} on host another-host.*remove {lock_file}"):
        RunLock.acquire(tmp_path)
    lock_file.write_text("")  # cut before its holder wrote its name: nothing proves it stale
    with pytest.raises(RunDirectoryBusyError, match="names no holder"):
        RunLock.acquire(tmp_path)


# A writer caught in the middle of a step checkpoint: its temporary directory exists, its rename has not
# happened. It prints that directory and waits for its standard input to close.
_WRITER_MID_CHECKPOINT = """
import sys
import torch
from qwen3repro.train import checkpoint

def save_and_wait(model, path):
    print(path, flush=True)
    sys.stdin.read()

checkpoint.save_model = save_and_wait
model = torch.nn.Linear(2, 2)
checkpoint.write_checkpoint_dir(checkpoint.step_dir(sys.argv[1], 1), model=model, optimizer=None,
                                trainer_state={"step": 1}, loader_state=None)
"""


def test_clean_stale_leaves_a_live_writers_temporary_directory_alone(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", _WRITER_MID_CHECKPOINT, str(tmp_path)], env=_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        temporary = Path(writer.stdout.readline().strip())
        assert temporary.parent == tmp_path / checkpoint.CHECKPOINTS_DIR and temporary.is_dir()
        checkpoint.clean_stale(str(tmp_path))
        assert temporary.is_dir()  # its writer is alive
        with RunLock.acquire(tmp_path):
            checkpoint.clean_stale(str(tmp_path))
            assert temporary.is_dir()  # even under the lock: a live process on this host made it
        writer.stdin.close()  # the writer finishes its checkpoint
        assert writer.wait(timeout=60) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert not temporary.exists() and checkpoint.is_complete(checkpoint.step_dir(str(tmp_path), 1))


def test_clean_stale_removes_what_a_killed_writer_left(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", _WRITER_MID_CHECKPOINT, str(tmp_path)], env=_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    temporary = Path(writer.stdout.readline().strip())
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert temporary.is_dir()
    checkpoint.clean_stale(str(tmp_path))
    assert not temporary.exists()


def test_clean_stale_removes_unmarked_temporaries_only_under_the_lock(tmp_path):
    """A temporary without a readable mark (another host's, or an older name) may belong to a live writer,
    unless it lies in a run directory this process holds."""
    unmarked = [tmp_path / checkpoint.CHECKPOINTS_DIR / ".tmp-step_000001-1a2b3c4d",
                tmp_path / ".old-state-1a2b3c4d.4242@another-host"]
    for path in unmarked:
        path.mkdir(parents=True)
    checkpoint.clean_stale(str(tmp_path))
    assert all(path.is_dir() for path in unmarked)
    with RunLock.acquire(tmp_path):
        checkpoint.clean_stale(str(tmp_path))
    assert not any(path.exists() for path in unmarked)
