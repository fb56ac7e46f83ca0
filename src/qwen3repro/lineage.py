"""Run lineage: which stage made a checkpoint directory, from what config and which parent.

Every stage writes `lineage.json` into its output directory *last*, after the model, tokenizer and
metrics are in place, so its presence with `"complete": true` means the directory is whole. The
lineage hash chains the stage's own config hash with its parent's lineage hash: changing S1's
recipe changes S1's hash and therefore S2's and S3's, so the pipeline reruns exactly what depends
on the change and skips the rest.

A stage that reads other stages' outputs besides its parent's (general RL reads the reward model's)
names them as `uses`: their lineage hashes are folded into the parent hash (`parent_with_uses`), so a
changed reward model reruns the RL stage that scored with it.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import config_hash
from .files import RunFileError, read_json_object, write_json_atomic

LINEAGE_FILE = "lineage.json"


@dataclass(frozen=True)
class Lineage:
    stage: str
    config_hash: str
    parent: str | None = None
    parent_hash: str | None = None
    data_hashes: dict[str, str] = field(default_factory=dict)
    complete: bool = True
    uses: dict[str, str] = field(default_factory=dict)
    """Lineage hashes of the other stage outputs this one read (name -> hash), folded into parent_hash."""
    created: str = ""

    @property
    def hash(self) -> str:
        """The lineage hash: this stage's config chained with its parent's lineage."""
        return chain_hash(self.config_hash, self.parent_hash)


def chain_hash(stage_config_hash: str, parent_hash: str | None) -> str:
    return hashlib.sha256(f"{stage_config_hash}:{parent_hash or ''}".encode()).hexdigest()[:16]


def parent_with_uses(parent_hash: str | None, uses: dict[str, str]) -> str | None:
    """The parent hash with the lineage hashes of the used stages folded in (unchanged without uses)."""
    if not uses:
        return parent_hash
    folded = ",".join(f"{name}={h}" for name, h in sorted(uses.items()))
    return hashlib.sha256(f"{parent_hash or ''}|{folded}".encode()).hexdigest()[:16]


def _complete_hash(directory: str | os.PathLike, what: str) -> str:
    lineage = read_lineage(directory)
    if lineage is None or not lineage.complete:
        raise FileNotFoundError(f"{what} checkpoint {directory} has no complete {LINEAGE_FILE}")
    return lineage.hash


def make_lineage(stage: str, config: Any, parent_dir: str | os.PathLike | None = None,
                 data_hashes: dict[str, str] | None = None,
                 uses: dict[str, str | os.PathLike] | None = None) -> Lineage:
    """The lineage of a finished stage: its config, its parent's lineage and those of the stage outputs
    it `uses` (name -> directory)."""
    parent_hash = _complete_hash(parent_dir, "parent") if parent_dir is not None else None
    used = {name: _complete_hash(path, name) for name, path in (uses or {}).items()}
    parent_hash = parent_with_uses(parent_hash, used)
    return Lineage(
        stage=stage,
        config_hash=config_hash(config),
        parent=str(parent_dir) if parent_dir is not None else None,
        parent_hash=parent_hash,
        data_hashes=dict(data_hashes or {}),
        uses=used,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def write_lineage(directory: str | os.PathLike, lineage: Lineage) -> None:
    """Atomically write lineage.json (with the derived lineage hash for readers)."""
    write_json_atomic(Path(directory) / LINEAGE_FILE, {**asdict(lineage), "lineage_hash": lineage.hash})


def read_lineage(directory: str | os.PathLike) -> Lineage | None:
    path = Path(directory) / LINEAGE_FILE
    if not path.exists():
        return None
    d = read_json_object(path)
    d.pop("lineage_hash", None)
    try:
        return Lineage(**d)
    except TypeError as e:  # a missing or unknown field
        raise RunFileError(f"{path}: not a lineage file ({e})") from None
