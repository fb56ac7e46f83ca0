"""Write-once, hash-addressed cache of generated datasets.

A generated corpus is stored under ``cache_dir/<name>-<config-hash>/`` as an Arrow dataset
(``Dataset.save_to_disk``) plus a ``manifest.json`` holding the config and the size and SHA-256 of
every file. The directory is written under a temporary name and renamed into place only once
complete, so an interrupted build never looks finished. On reload the manifest is checked first:
a missing or altered file raises :class:`CorruptCacheError` naming the file, rather than
returning silently wrong data (delete the directory to rebuild it).

Derived files. `Dataset.map` on a cached dataset writes its result next to it, as
``cache-<fingerprint>.arrow``, and reuses that file whenever the same function is mapped again.
:func:`verified_map` records the size and SHA-256 of those files in the manifest's ``derived_files``
too, and checks them before each map: a corrupt, truncated or unrecorded one is deleted (with a
message naming it) so that ``map`` computes it again, as it does when the file is missing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import datasets

from ..files import write_json_atomic

MANIFEST = "manifest.json"
DERIVED = "derived_files"


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


def _read_manifest(path: Path) -> dict:
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CorruptCacheError(f"cache directory {path} has no {MANIFEST}: it is incomplete; delete it to rebuild")
    try:
        manifest = json.loads(manifest_file.read_text())
        if not isinstance(manifest["files"], dict) or not isinstance(manifest.get(DERIVED, {}), dict):
            raise ValueError(f"'files' and '{DERIVED}' must be tables")
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCacheError(f"unreadable manifest {manifest_file}: {e}; delete {path} to rebuild") from e
    return manifest


def verify_cache(path: Path) -> dict:
    """Check every file listed in the manifest; return the manifest or raise CorruptCacheError."""
    manifest = _read_manifest(path)
    for rel, meta in manifest["files"].items():
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


def _manifest_dir(ds: datasets.Dataset) -> Path | None:
    """The cache directory `ds` was loaded from (the one holding the manifest), or None."""
    folders = {Path(f["filename"]).parent for f in ds.cache_files}
    if len(folders) != 1:
        return None
    folder = folders.pop()
    return folder if (folder / MANIFEST).is_file() else None


def _drop_unverified_derived(path: Path, say: Callable[[str], None]) -> set[str]:
    """Delete the ``cache-*.arrow`` files of `path` that its manifest does not vouch for; their names."""
    recorded = _read_manifest(path).get(DERIVED, {})
    dropped = set()
    for f in sorted(path.glob("cache-*.arrow")):
        entry = recorded.get(f.name)
        if not isinstance(entry, dict):
            problem = "has no checksum in the manifest"
        elif f.stat().st_size != entry.get("size") or _sha256(f) != entry.get("sha256"):
            problem = "is corrupt (size or checksum differs from the manifest)"
        else:
            continue
        say(f"cached file {f} {problem}; deleted, to be computed again")
        f.unlink()
        dropped.add(f.name)
    return dropped


def _record_derived(path: Path, ds: datasets.Dataset, dropped: set[str]) -> None:
    """Add the ``cache-*.arrow`` files behind `ds` that the manifest lacks (or that were just rebuilt)."""
    manifest = _read_manifest(path)
    recorded = manifest.setdefault(DERIVED, {})
    new = {}
    for f in (Path(c["filename"]) for c in ds.cache_files):
        if f.parent == path and f.name.startswith("cache-") and (f.name not in recorded or f.name in dropped):
            new[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    if new:
        recorded.update(new)
        write_json_atomic(path / MANIFEST, manifest)


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def verified_map(ds: datasets.Dataset, function: Callable, *, say: Callable[[str], None] | None = None,
                 **map_kwargs: Any) -> datasets.Dataset:
    """`ds.map(function, **map_kwargs)`, its cache files under the manifest of the cache `ds` came from.

    Before mapping, every ``cache-*.arrow`` of that directory is checked against the manifest's
    ``derived_files`` and deleted when it does not match (`say` names it), so that `map` computes it
    again instead of reusing damaged data; afterwards the files the result is read from are recorded.
    A dataset that does not come from `cached_dataset` is mapped as it is. Without `say`, a warning.
    """
    path = _manifest_dir(ds)
    if path is None:
        return ds.map(function, **map_kwargs)
    dropped = _drop_unverified_derived(path, say or _warn)
    out = ds.map(function, **map_kwargs)
    _record_derived(path, out, dropped)
    return out
