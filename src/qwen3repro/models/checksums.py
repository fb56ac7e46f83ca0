"""Per-file SHA-256 checksums of a checkpoint directory, kept in its `checksums.json`.

A checkpoint is written once and read many times, by later stages, by resumed runs and by other
tools; a flipped bit or a truncated copy of `model.safetensors` still loads when its tensors keep
their shapes, and a child stage would train on the damage. So every writer of a checkpoint records,
after its files and before the directory is published, the size and SHA-256 of each file it wrote:

    {"algorithm": "sha256", "files": {"model.safetensors": {"size": 1234, "sha256": "9f86…"},
                                      "state/trainer.json": {...}, ...}}

Paths are relative to the directory, with "/" between parts. Readers check the files they read
against it first: a file that is listed but missing, of another size or another hash, or a file read
from a directory whose `checksums.json` does not list it, is a `CheckpointError` naming the file.

A directory without `checksums.json` (a Hugging Face download, a checkpoint saved by transformers, or
one written before checksums existed) loads unchecked: the checks apply where the hashes are present.
Files are hashed in 1 MiB chunks, so a multi-gigabyte shard is never held in memory for it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from ..files import write_json_atomic
from .errors import CheckpointError

CHECKSUMS = "checksums.json"
ALGORITHM = "sha256"
_CHUNK = 1 << 20
_DELIBERATE = f"if the change is deliberate, delete {CHECKSUMS} to load the directory unchecked"


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checksums(directory: str | os.PathLike) -> dict[str, dict[str, Any]] | None:
    """The recorded files of `directory` ({relative path: {"size", "sha256"}}), or None without a manifest."""
    path = Path(directory) / CHECKSUMS
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("algorithm") != ALGORITHM or not isinstance(files, dict):
            raise ValueError(f"expected algorithm {ALGORITHM!r} and a table of files")
        for name, entry in files.items():
            if not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
                raise ValueError(f"entry {name!r} needs an integer size and a sha256 string")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a readable checksum manifest ({' '.join(str(e).split())})") from None
    return files


def record_checksums(directory: str | os.PathLike, names: Iterable[str]) -> None:
    """Hash the files `names` (relative to `directory`) into its manifest, written atomically.

    Entries of earlier writers stay, except those whose files no longer exist (a save that changed
    the shard layout removes the old shards)."""
    directory = Path(directory)
    files = {name: entry for name, entry in (read_checksums(directory) or {}).items()
             if (directory / name).is_file()}
    for name in names:
        path = directory / name
        files[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    write_json_atomic(directory / CHECKSUMS, {"algorithm": ALGORITHM, "files": dict(sorted(files.items()))})


def verify_checksums(directory: str | os.PathLike, names: Iterable[str] | None = None) -> None:
    """Check `names` (relative paths; None: every listed file) against the manifest of `directory`.

    Nothing is checked when the directory has no manifest. With one, each named file must be listed,
    present, and of the recorded size and SHA-256; the first that is not raises a CheckpointError naming it."""
    directory = Path(directory)
    files = read_checksums(directory)
    if files is None:
        return
    for name in (sorted(files) if names is None else names):
        path = directory / name
        entry = files.get(name)
        if entry is None:
            raise CheckpointError(f"{path}: not listed in {directory / CHECKSUMS}, which every writer of this "
                                  f"checkpoint updates (added afterwards? {_DELIBERATE})")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing, though {CHECKSUMS} lists it")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{path}: {size} bytes where {CHECKSUMS} records {entry['size']}: truncated or "
                                  f"changed after it was saved ({_DELIBERATE})")
        if file_sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: SHA-256 differs from the one in {CHECKSUMS}: corrupt or changed after "
                                  f"it was saved ({_DELIBERATE})")


__all__ = ["ALGORITHM", "CHECKSUMS", "file_sha256", "read_checksums", "record_checksums", "verify_checksums"]
