"""Write-once, hash-addressed cache of generated datasets.

A generated corpus is stored under ``cache_dir/<name>-<config-hash>/`` as an Arrow dataset
(``Dataset.save_to_disk``) plus a ``manifest.json`` holding the config and the size and SHA-256 of
every file. The directory is written under a temporary name and renamed into place only once
complete, so an interrupted build never looks finished. On reload the manifest is checked first:
a missing or altered file raises :class:`CorruptCacheError` naming the file, rather than
returning silently wrong data (delete the directory to rebuild it).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import datasets

MANIFEST = "manifest.json"


class CorruptCacheError(RuntimeError):
    """A cached dataset is incomplete or its files do not match the manifest."""


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-serialisable config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_path(cache_dir: str | os.PathLike, name: str, config: dict[str, Any]) -> Path:
    return Path(cache_dir) / f"{name}-{config_hash(config)}"


def verify_cache(path: Path) -> dict:
    """Check every file listed in the manifest; return the manifest or raise CorruptCacheError."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CorruptCacheError(f"cache directory {path} has no {MANIFEST}: it is incomplete; delete it to rebuild")
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise CorruptCacheError(f"unreadable manifest {manifest_file}: {e}; delete {path} to rebuild") from e
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            raise CorruptCacheError(f"cached file {f} is missing; delete {path} to rebuild")
        if f.stat().st_size != meta["size"] or _sha256(f) != meta["sha256"]:
            raise CorruptCacheError(f"cached file {f} is corrupt (size or checksum differs from the manifest); delete {path} to rebuild")
    return manifest


def load_cached(path: Path) -> datasets.Dataset:
    verify_cache(path)
    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - re-raised with the path named
        raise CorruptCacheError(f"cannot load cached dataset {path}: {e}; delete it to rebuild") from e


def cached_dataset(
    name: str,
    config: dict[str, Any],
    build: Callable[[], datasets.Dataset],
    cache_dir: str | os.PathLike,
) -> datasets.Dataset:
    """Load ``cache_dir/<name>-<hash(config)>`` if present, else build, write once and load it.

    The returned dataset is always the one read back from disk (memory-mapped Arrow), so the
    first call and later calls see identical data.
    """
    path = cache_path(cache_dir, name, config)
    if path.exists():
        return load_cached(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = build()
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        ds.save_to_disk(str(tmp))
        files = {
            str(f.relative_to(tmp)): {"size": f.stat().st_size, "sha256": _sha256(f)}
            for f in sorted(tmp.rglob("*"))
            if f.is_file()
        }
        (tmp / MANIFEST).write_text(json.dumps({"name": name, "config": config, "num_rows": len(ds), "files": files}, indent=1, default=str))
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():  # another process finished first otherwise
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_cached(path)
