"""Leak checks: no held-out item (problem, pass-key value, document) may occur in training data.

Every problem, pass-key value and prose document has a uid (a hash of its content); uids in the
held-out partition (:func:`.tasks.is_heldout`, 10% of the hash space) are never generated for
training, and evaluation sets draw only from it. :func:`assert_disjoint` checks that on real data.
"""
from __future__ import annotations

from typing import Any, Mapping

import datasets

from ..tasks import TaskItem
from .records import content_uid


class HeldoutLeakError(AssertionError):
    """Training data contains an evaluation item."""


def _uids_of(data: Any) -> set[str]:
    if isinstance(data, datasets.Dataset):
        cols = data.column_names
        if "item_uids" in cols:
            return {u for us in data["item_uids"] for u in us}
        if "uid" in cols:
            return set(data["uid"])
        raise ValueError(f"dataset has neither 'item_uids' nor 'uid' column (columns: {cols})")
    out: set[str] = set()
    for r in data:
        if isinstance(r, TaskItem):
            out.add(r.uid)
        elif isinstance(r, str):
            out.add(r)
        else:
            out.update(r.get("item_uids") or [r["uid"]])
    return out


def _texts_of(data: Any) -> set[str]:
    if isinstance(data, datasets.Dataset):
        return {content_uid("text", t) for t in data["text"]} if "text" in data.column_names else set()
    return {content_uid("text", r["text"]) for r in data if isinstance(r, Mapping) and "text" in r}


def assert_disjoint(train: Any, heldout: Any) -> None:
    """Raise HeldoutLeakError if any held-out item (problem, pass-key value, document) occurs in
    `train`, by uid and by hash of whole-document text. Accepts datasets, record lists, TaskItems."""
    shared = _uids_of(train) & _uids_of(heldout)
    shared |= _texts_of(train) & _texts_of(heldout)
    if shared:
        examples = ", ".join(sorted(shared)[:5])
        raise HeldoutLeakError(f"{len(shared)} held-out item(s) occur in the training data (uids: {examples})")
