"""Run the `qwen3repro` command line with a fault planted at a named file event (for tests that cut runs).

    python tests/security/faulty_pipeline.py --root DIR [--record FILE] [--kill-at EVENT]
                                    [--pause-at EVENT --ready FILE --release FILE] -- pipeline micro --out ...

An event is a rename (`os.rename` / `os.replace`) whose destination lies under --root: every step
checkpoint, published model file, metrics rewrite and JSON file that a run commits goes through one.
Its name is the destination relative to --root, with the random and per-process parts of temporary
names masked (`*`), so that one run's events can be named in another run.

--record FILE   append each event's name to FILE, one a line, as it happens.
--kill-at EVENT SIGKILL this process just before the first rename with that name: the file is written but
                not committed, the moment a crash would hurt most.
--pause-at EVENT  at the first rename with that name, create --ready and wait until --release exists.

Everything after `--` is the command line of `qwen3repro`.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from pathlib import Path

from qwen3repro.cli import main

_MASKS = (
    re.compile(r"-[0-9a-f]{8}\.\d+@[^/]+"),  # checkpoint temporaries: -<random>.<pid>@<host>
    re.compile(r"-[0-9a-f]{8}(?=/|$)"),  # hashes and unmarked random suffixes
    re.compile(r"\.tmp-\d+$"),  # metrics.jsonl's rewrite
)


def event_name(dst: str | os.PathLike, root: Path) -> str | None:
    """The event name of a rename onto `dst`; None when `dst` is outside `root`."""
    path = Path(os.path.realpath(os.fspath(dst)))  # as `root`, which is resolved
    if root not in path.parents:
        return None
    name = path.relative_to(root).as_posix()
    for mask in _MASKS:
        name = mask.sub("-*", name)
    return name


def plant(root: Path, record: Path | None, kill_at: str | None, pause_at: str | None,
          ready: Path | None, release: Path | None) -> None:
    fired: set[str] = set()

    def on_event(dst) -> None:
        name = event_name(dst, root)
        if name is None:
            return
        if record is not None:
            with open(record, "a") as f:
                f.write(name + "\n")
        if name in fired:
            return
        if name == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if name == pause_at:
            fired.add(name)
            ready.write_text(str(os.getpid()))
            while not release.exists():
                time.sleep(0.05)

    def hooked(real):
        def rename(src, dst, *args, **kwargs):
            on_event(dst)
            return real(src, dst, *args, **kwargs)
        return rename

    os.rename = hooked(os.rename)
    os.replace = hooked(os.replace)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--record", type=Path)
    parser.add_argument("--kill-at")
    parser.add_argument("--pause-at")
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--release", type=Path)
    return parser.parse_args(argv[:split]), argv[split + 1:]


if __name__ == "__main__":
    args, command = parse_args(sys.argv[1:])
    plant(args.root.resolve(), args.record, args.kill_at, args.pause_at, args.ready, args.release)
    main(args=command, prog_name="qwen3repro")
