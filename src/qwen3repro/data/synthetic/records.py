"""Document records: their ids, their random streams, and how a list of them becomes a dataset.

Every generated document is a dict ``{text, kind, lang, uid, item_uids, n_tokens}`` and a pure
function of the names that seed its random stream (:func:`doc_rng`), so corpora and evaluation
sets are deterministic and any document can be regenerated on its own.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Iterable, Mapping, Sequence

import datasets

# Bumped whenever generation changes, so cached corpora built by older code are not reused.
GENERATOR_VERSION = 4
# The world (languages, entities) is shared by every stage and seed of a run unless changed.
WORLD_SEED = 0


def content_uid(*parts: Any) -> str:
    """A 16-hex-digit id of `parts` (held-out partitioning hashes these, see `tasks.is_heldout`)."""
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


def doc_rng(*parts: Any) -> random.Random:
    """The random stream of one document, named by `parts` (stream, stage, seed, index, ...)."""
    return random.Random(int.from_bytes(hashlib.sha1("|".join(map(str, parts)).encode()).digest()[:8], "big"))


def pick(rng: random.Random, weights: Mapping[str, float]) -> str:
    """One key of `weights`, drawn with probability proportional to its weight."""
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def make_doc(text: str, kind: str, lang: str = "", item_uids: Sequence[str] = (), uid: str | None = None,
             n_tokens: int = -1) -> dict:
    """A document record; without `uid` the text's hash identifies it (and is its only item)."""
    uid = uid or content_uid("text", text)
    return {"text": text, "kind": kind, "lang": lang, "uid": uid, "item_uids": list(item_uids) or [uid], "n_tokens": n_tokens}


def records_to_dataset(records: Iterable[dict], features: datasets.Features | None = None) -> datasets.Dataset:
    """A `datasets.Dataset` of `records`; with `features`, exactly those columns in that order."""
    records = list(records)
    if features is None:
        return datasets.Dataset.from_list(records)
    cols = {k: [r[k] for r in records] for k in features}
    return datasets.Dataset.from_dict(cols, features=features)
