"""Writing files so that a reader never sees half of one: write to a temporary name in the same folder,
then rename over the target (`os.replace` is atomic within a file system). A crash leaves the old file
or the new one, never a mix; a failed write removes its temporary file.

Reading one back (`read_json_object`): a file that a run wrote can still be emptied, truncated or edited
by hand; the error names it (`RunFileError`) rather than surfacing as a bare JSON or type error.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(target: str | os.PathLike, write: Callable[[str], None]) -> None:
    """`write(tmp_path)`, then move tmp_path over `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class RunFileError(ValueError):
    """A file that a run wrote (lineage.json, stage.json, metrics.jsonl, ...) is unreadable or malformed;
    the message names the file."""


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in `path`; a RunFileError naming the file when it cannot be read, is not JSON or
    holds something other than an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFileError(f"{path}: unreadable ({' '.join(str(e).split())})") from e
    if not isinstance(value, dict):
        raise RunFileError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented JSON with sorted keys (values JSON cannot hold are written with `str`)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


__all__ = ["RunFileError", "atomic_write", "read_json_object", "write_json_atomic"]
