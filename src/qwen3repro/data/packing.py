"""Packing loader for pretraining: documents -> fixed-length sequences, resumable mid-epoch.

Per epoch, the documents are put in a seeded order (a permutation drawn from
`numpy.random.default_rng([seed, epoch])`, or the dataset order with `shuffle=False`) and joined
into one token stream, each document followed by `<|endoftext|>` (`eot_id`):

    stream = d[π0] EOT d[π1] EOT d[π2] EOT ...          (N tokens)

Sequence k of the epoch is the window `stream[k·L : k·L + L + 1]` (L = `seq_len`): its first L
tokens are `input_ids`, its last L tokens are `labels` (inputs shifted by one). Consecutive windows
overlap by one token, so every stream token is an input exactly once and the target of exactly one
prediction (the first token of the epoch is never a target). The last window of an epoch is padded
(input `pad_id`, label -100, segment -1, position 0) unless `drop_last` drops it; labels past the
end of the stream are -100. Epochs are independent (no window spans two epochs).

Batch format (all int64, shape [B, L]; the last batch of an epoch may have fewer rows unless
`drop_last`):

    input_ids     token ids
    labels        next token, or -100 (padding, end of stream, and, with document_masking,
                  every position whose next token belongs to another document)
    segment_ids   which document each token belongs to: the document's ordinal in this epoch's
                  packing order (0, 1, 2, ... increasing along the stream; -1 on padding). The
                  EOT after a document belongs to that document. `epoch_documents(epoch)` maps
                  ordinals back to dataset indices.
    position_ids  with document_masking: restarts at 0 at each new document and at the start of
                  every sequence (RoPE is relative, so a document continued from the previous
                  sequence needs no offset); without: 0..L-1.

Pass `segment_ids` and `position_ids` to the model for document-boundary attention masking.

Long documents: a document longer than `max_doc_len` (counted without its EOT) is an error naming
the dataset index and length (`too_long="error"`), or is split into pieces of at most
`max_doc_len` tokens (`too_long="split"`), each piece its own segment; only the last piece is
followed by EOT.

Cursor: `state_dict()` is `{"epoch", "batch", ...}` (batches already yielded in that epoch) plus
a fingerprint of the data and packing settings; `load_state_dict()` refuses a cursor from other
data or settings, naming the field. Iterating the loader yields the rest of the current epoch
and then moves the cursor to the next epoch, so `for batch in loader` is one epoch and a
checkpoint taken mid-epoch resumes at the exact next batch.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Iterable, Iterator, Mapping, Sequence

import datasets
import numpy as np
import torch

IGNORE_INDEX = -100
TOO_LONG_POLICIES = ("error", "split")


class DataError(ValueError):
    """Bad training data: a missing or corrupt shard, a missing column, a document too long."""


# ----------------------------------------------------------------------------- shards
def load_documents(paths: str | os.PathLike | Sequence[str | os.PathLike], column: str = "input_ids"):
    """Read tokenised document shards into one `datasets.Dataset` with an `input_ids` column.

    Each path is a `.parquet`, `.arrow`, `.jsonl`/`.json` file or a `save_to_disk` directory.
    A missing path, an unreadable/corrupt file or a shard without `column` raises `DataError`
    naming the file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    parts = []
    for p in map(str, paths):
        if not os.path.exists(p):
            raise DataError(f"data shard not found: {p}")
        try:
            if os.path.isdir(p):
                ds = datasets.load_from_disk(p)
            elif p.endswith(".parquet"):
                ds = datasets.Dataset.from_parquet(p)
            elif p.endswith(".arrow"):
                ds = datasets.Dataset.from_file(p)
            elif p.endswith((".jsonl", ".json")):
                ds = datasets.Dataset.from_json(p)
            else:
                raise DataError(f"data shard {p}: unknown format (expected .parquet, .arrow, .jsonl/.json or a dataset directory)")
        except DataError:
            raise
        except Exception as e:  # pyarrow / datasets raise many types for bad files
            raise DataError(f"data shard {p} is corrupt or unreadable: {type(e).__name__}: {e}") from e
        if not isinstance(ds, datasets.Dataset):
            raise DataError(f"data shard {p}: expected a single Dataset, got {type(ds).__name__}")
        if column not in ds.column_names:
            raise DataError(f"data shard {p}: no {column!r} column (columns: {ds.column_names})")
        if column != "input_ids":
            ds = ds.rename_column(column, "input_ids")
        parts.append(ds.select_columns(["input_ids"]))
    if not parts:
        raise DataError("no data shards given")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# ----------------------------------------------------------------------------- documents
class _Documents:
    """Random access to token documents held in a list, array or `datasets.Dataset`."""

    def __init__(self, documents: Any, cache_size: int = 64) -> None:
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        if isinstance(documents, datasets.Dataset):
            if "input_ids" not in documents.column_names:
                raise DataError(f"dataset has no 'input_ids' column (columns: {documents.column_names})")
            self._ds = documents.select_columns(["input_ids"]).with_format("numpy")
            self._list = None
            self.lengths = np.fromiter(
                (len(row) for batch in self._ds.iter(batch_size=1024) for row in batch["input_ids"]),
                dtype=np.int64,
                count=len(self._ds),
            )
        else:
            # lists of token lists / arrays / {"input_ids": ...} rows, or any one-shot iterable of them
            self._ds = None
            self._list = [np.asarray(d["input_ids"] if isinstance(d, Mapping) else d, dtype=np.int64) for d in documents]
            documents = self._list
            self.lengths = np.array([len(d) for d in documents], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, i: int) -> np.ndarray:
        if self._list is not None:
            return self._list[i]
        hit = self._cache.get(i)
        if hit is not None:
            self._cache.move_to_end(i)
            return hit
        doc = np.asarray(self._ds[int(i)]["input_ids"], dtype=np.int64)
        self._cache[i] = doc
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return doc


class _EpochLayout:
    """The epoch's stream as a list of segments: (doc index, start, stop, ends_with_eot)."""

    def __init__(self, order: np.ndarray, lengths: np.ndarray, max_doc_len: int | None) -> None:
        docs, starts, stops, eot = [], [], [], []
        for d in order.tolist():
            n = int(lengths[d])
            if max_doc_len is None or n <= max_doc_len:
                docs.append(d), starts.append(0), stops.append(n), eot.append(True)
                continue
            for a in range(0, n, max_doc_len):
                b = min(a + max_doc_len, n)
                docs.append(d), starts.append(a), stops.append(b), eot.append(b == n)
        self.doc = np.asarray(docs, dtype=np.int64)
        self.start = np.asarray(starts, dtype=np.int64)
        self.stop = np.asarray(stops, dtype=np.int64)
        self.eot = np.asarray(eot, dtype=bool)
        sizes = self.stop - self.start + self.eot
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # segment s = [off[s], off[s+1])

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


class PackingLoader:
    """Seeded, resumable packing of tokenised documents into `seq_len` windows (see module doc)."""

    def __init__(
        self,
        documents: Any,
        *,
        seq_len: int,
        batch_size: int,
        eot_id: int,
        pad_id: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        document_masking: bool = False,
        max_doc_len: int | None = None,
        too_long: str = "error",
        drop_last: bool = False,
    ) -> None:
        if seq_len <= 0 or batch_size <= 0:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
        if too_long not in TOO_LONG_POLICIES:
            raise ValueError(f"too_long must be one of {TOO_LONG_POLICIES}, got {too_long!r}")
        if max_doc_len is not None and max_doc_len <= 0:
            raise ValueError(f"max_doc_len must be positive, got {max_doc_len}")
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.eot_id = int(eot_id)
        self.pad_id = self.eot_id if pad_id is None else int(pad_id)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.document_masking = bool(document_masking)
        self.max_doc_len = max_doc_len
        self.too_long = too_long
        self.drop_last = bool(drop_last)
        self.docs = _Documents(documents)
        if len(self.docs) == 0:
            raise DataError("no documents to pack")
        if max_doc_len is not None and too_long == "error":
            over = np.flatnonzero(self.docs.lengths > max_doc_len)
            if over.size:
                i = int(over[0])
                raise DataError(
                    f"document {i} has {int(self.docs.lengths[i])} tokens, more than max_doc_len={max_doc_len}"
                    + (f" ({over.size} documents are too long)" if over.size > 1 else "")
                    + "; use too_long='split' to cut long documents into pieces"
                )
        self.epoch = 0
        self.batch = 0
        self._layout_cache: tuple[int, _EpochLayout] | None = None

    # ------------------------------------------------------------------ epoch structure
    def epoch_documents(self, epoch: int) -> np.ndarray:
        """Dataset indices in this epoch's packing order."""
        n = len(self.docs)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(n).astype(np.int64)

    def _layout(self, epoch: int) -> _EpochLayout:
        if self._layout_cache is None or self._layout_cache[0] != epoch:
            self._layout_cache = (epoch, _EpochLayout(self.epoch_documents(epoch), self.docs.lengths, self.max_doc_len))
        return self._layout_cache[1]

    def segment_documents(self, epoch: int) -> np.ndarray:
        """Dataset index of each segment ordinal (= `segment_ids` value) of an epoch."""
        return self._layout(epoch).doc.copy()

    @property
    def tokens_per_epoch(self) -> int:
        return self._layout(self.epoch).num_tokens

    def sequences_per_epoch(self, epoch: int | None = None) -> int:
        n = self._layout(self.epoch if epoch is None else epoch).num_tokens
        return n // self.seq_len if self.drop_last else -(-n // self.seq_len)

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        s = self.sequences_per_epoch(epoch)
        return s // self.batch_size if self.drop_last else -(-s // self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch()

    # ------------------------------------------------------------------ token access
    def _span(self, layout: _EpochLayout, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stream tokens [a, b) of an epoch (clipped to the stream): tokens, segment ordinal, offset in segment."""
        b = min(b, layout.num_tokens)
        if a >= b:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        toks, segs, offs = [], [], []
        s = int(np.searchsorted(layout.offsets, a, side="right")) - 1
        pos = a
        while pos < b:
            seg_start, seg_end = int(layout.offsets[s]), int(layout.offsets[s + 1])
            lo, hi = pos - seg_start, min(b, seg_end) - seg_start
            doc_lo, doc_hi = int(layout.start[s]), int(layout.stop[s])
            body = self.docs.get(int(layout.doc[s]))[doc_lo:doc_hi]
            if layout.eot[s]:
                body = np.concatenate([body, np.asarray([self.eot_id], dtype=np.int64)])
            piece = body[lo:hi]
            toks.append(piece)
            segs.append(np.full(hi - lo, s, dtype=np.int64))
            offs.append(np.arange(lo, hi, dtype=np.int64))
            pos = seg_start + hi
            s += 1
        return np.concatenate(toks), np.concatenate(segs), np.concatenate(offs)

    def _sequence(self, layout: _EpochLayout, k: int) -> dict[str, np.ndarray]:
        L = self.seq_len
        toks, segs, _ = self._span(layout, k * L, k * L + L + 1)
        n_in = min(L, len(toks))
        input_ids = np.full(L, self.pad_id, dtype=np.int64)
        labels = np.full(L, IGNORE_INDEX, dtype=np.int64)
        segment_ids = np.full(L, -1, dtype=np.int64)
        position_ids = np.zeros(L, dtype=np.int64)
        input_ids[:n_in] = toks[:n_in]
        segment_ids[:n_in] = segs[:n_in]
        n_lab = len(toks) - 1  # targets available inside this window
        labels[:n_lab] = toks[1 : n_lab + 1]
        if self.document_masking:
            cross = segs[1 : n_lab + 1] != segs[:n_lab]
            labels[:n_lab][cross] = IGNORE_INDEX
            # position restarts at each new segment and at the start of the sequence
            seg = segs[:n_in]
            starts = np.flatnonzero(np.concatenate([[True], seg[1:] != seg[:-1]])) if n_in else np.zeros(0, np.int64)
            run_start = np.zeros(n_in, dtype=np.int64)
            run_start[starts] = starts
            run_start = np.maximum.accumulate(run_start) if n_in else run_start
            position_ids[:n_in] = np.arange(n_in) - run_start
        else:
            position_ids[:] = np.arange(L)
        return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids, "position_ids": position_ids}

    def _batch(self, epoch: int, b: int) -> dict[str, torch.Tensor]:
        layout = self._layout(epoch)
        n_seq = self.sequences_per_epoch(epoch)
        first = b * self.batch_size
        rows = [self._sequence(layout, k) for k in range(first, min(first + self.batch_size, n_seq))]
        return {key: torch.from_numpy(np.stack([r[key] for r in rows])) for key in rows[0]}

    # ------------------------------------------------------------------ iteration + cursor
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            epoch, b = self.epoch, self.batch
            if b >= self.batches_per_epoch(epoch):
                self.epoch, self.batch = epoch + 1, 0
                return
            batch = self._batch(epoch, b)
            self.batch = b + 1  # the cursor counts batches handed out
            yield batch

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "num_documents": int(len(self.docs)),
            "num_tokens": int(self.docs.lengths.sum()),
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "document_masking": self.document_masking,
            "max_doc_len": self.max_doc_len,
            "too_long": self.too_long,
            "drop_last": self.drop_last,
            "eot_id": self.eot_id,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("fingerprint", {})
        now = self._fingerprint()
        diffs = [f"{k}: cursor {saved.get(k)!r}, loader {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
        if diffs:
            raise DataError("loader cursor was written for other data or settings: " + "; ".join(diffs))
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def iter_documents(dataset: Iterable[Any]) -> Iterator[np.ndarray]:
    """Token arrays of an iterable of rows (`{"input_ids": ...}`) or of plain token lists."""
    for row in dataset:
        yield np.asarray(row["input_ids"] if isinstance(row, dict) else row, dtype=np.int64)


__all__ = ["DataError", "IGNORE_INDEX", "PackingLoader", "iter_documents", "load_documents"]
