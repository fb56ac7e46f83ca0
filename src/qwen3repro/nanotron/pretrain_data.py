"""A pretraining stage's mixture -> packed token shards for the full-scale stages (S1, S2, S3), and their loader.

    python -m qwen3repro.nanotron.pretrain_data --stage s1 --model qwen3-0.6b --worker-index 3 --num-workers 64
    python -m qwen3repro.nanotron.launch --config-file .../s1.yaml --data runs/full/qwen3-0.6b/s1/token-shards

Writing (`write_token_shards`), one worker's part of a stage's `[data.<stage>]` sources (`full/stages.toml`,
weighted by the recipe's `category_weights` through `config_gen.data_sources`):

1. sources: each `data.mixture.SourceSpec` is loaded by `data.mixture.load_source` (hub ids through
   `datasets.load_dataset`, streamed when the spec says so) and reduced to its text column (`to_text_dataset`).
   Worker i of n takes a disjoint part of every source: `Dataset.shard(n, i, contiguous=True)`, or
   `datasets.distributed.split_dataset_by_node` for a stream (whole files per worker when n divides the
   source's file count, else every n-th document);
2. interleave: documents are drawn source by source with the weights (`sft_data.interleave`, seeded per shard;
   it stops when the first source runs out, as `data.mixture.StageMixture` does, so every prefix keeps the
   weights);
3. tokenise with the model's tokenizer (`transformers.AutoTokenizer`: a hub id or a local folder). Special-token
   strings inside a document ("<|endoftext|>", "<|im_start|>" in scraped text) are encoded as plain text, so the
   only control token in the data is the `<|endoftext|>` this job puts after every document;
4. cut each document (with its `<|endoftext|>`) into segments that fit a row: pieces of at most seq_len tokens
   (only the last ends with the separator), or, for a stage with a length mix (S3), pieces sized by the mix
   (`LengthMixCutter`, below);
5. pack the segments whole into rows of seq_len + 1 tokens (the inputs and, shifted by one, the labels), first
   fit over `MAX_OPEN_ROWS` open rows, the rest padding; a segment never straddles two rows, so its boundaries
   are exact and stored (`segment_lengths`);
6. every `rows_per_shard` rows (checked after each document): close the open rows, write a parquet shard, then
   the worker's manifest, each atomically (temporary name, then rename).

The length mix (S3): `recipes/s3.toml`'s `length_mix`, the report's 75% of S3's data in [S3/2, S3] tokens and
25% in [S1, S3/2] (§3.2), as shares of documents: the recipe's unit, and the tiny S3 corpus's, which generates
each document in the length range `data.synthetic.mix_rows` schedules. Real documents come with their own
lengths, so here the long ones are cut to the schedule instead: the next piece takes the mix row that
`mix_rows`'s rule picks (the first row behind its share) and a length drawn uniformly in that row's token range
(`data.synthetic.length_ranges`, the tiny corpus's ranges); a document whose rest cannot fill the range gives
its rest as one piece, counted in the row its length falls in, and the rule makes up for it with the next
pieces. Every segment written so far then holds the shares, as long as the mixture has enough long text (S3's
`long` category: books); the token shares follow from the ranges (about 88% / 12% at S3's). Documents shorter
than every range (most web, code and maths pages) are outside the mix: they fill the space the long segments
leave in rows. The manifest reports what was written: segments and tokens per range, and the filling.

Resuming: at every shard flush the manifest records, per source, how many documents this worker has consumed
(and, for a stream, `datasets`' own iterator state, so a restart does not re-read what it skips) together with
the length mix's counts; every consumed document is then in a written shard. Draws and cut lengths are seeded
by (seed, worker, shard), so a killed job, rerun with the same arguments, writes exactly the shards an uncut run
writes: none duplicated, none lost. A shard written just before a kill but missing from the manifest is written
again under the same name. A worker stopped by `max_documents` and rerun with a larger limit (or none) goes on
from a new shard: every document still once, the draws from there on those of that shard's seed.

Shard format (parquet, one row per training row):

    input_ids          list<int32>, seq_len + 1 tokens: the row's segments in order, then padding (pad id)
    segment_lengths    list<int32>, tokens of each segment (the rest of the row is padding)
    segment_sources    list<int32>, each segment's source: an index into the manifest's `sources`
    segment_documents  list<int64>, the document's index in this worker's part of that source
    segment_offsets    list<int64>, where the segment starts in its document (in tokens)

Manifest: `pretrain-manifest-w<worker>-of-<workers>.json` per worker (format, settings, the files with their
rows and tokens, the resume state, counts per source and the measured length mix; `done` once the worker has
finished).

Reading (`PackedShardLoader`): see its docstring; `launch.make_loader` should build one for a folder holding
these manifests (`is_packed_shards`).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tokenizers
import torch
from datasets.distributed import split_dataset_by_node

from ..data.mixture import SourceSpec, load_source, to_text_dataset
from ..data.packing import IGNORE_INDEX, DataError
from ..data.synthetic import check_length_mix, length_ranges
from ..files import atomic_write, read_json_object, write_json_atomic
from ..tokenizer import Tokenizer
from .config_gen import TOKEN_SHARDS_DIRNAME, build_stage_spec
from .sft_data import check_parts_agree, interleave

FORMAT = "qwen3repro-packed-tokens"
FORMAT_VERSION = 1
MANIFEST_PREFIX = "pretrain-manifest"
# Tokens per shard when --rows-per-shard is not given: 2**24 (~16.8M) tokens are 64 MiB of int32 ids before
# compression, so a 30T-token stage is ~1.8M files over all workers, and a killed job redoes at most one.
DEFAULT_SHARD_TOKENS = 2**24
# Rows open for first-fit packing. Short documents find a gap in one of them, so rows come out nearly full;
# every open row is closed (padded) at a shard flush, which costs at most this many partly filled rows a shard.
MAX_OPEN_ROWS = 16
# The settings a resumed job must share with the job that wrote the manifest (anything else would change the
# shards already written).
RESUME_KEYS = ("format", "version", "stage", "seq_len", "worker_index", "num_workers", "seed", "rows_per_shard",
               "max_open_rows", "document_masking", "length_mix", "tokenizer_sha256", "sources")
STOPPED_EXHAUSTED, STOPPED_MAX_DOCUMENTS = "exhausted", "max_documents"

SHARD_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("segment_lengths", pa.list_(pa.int32())),
    ("segment_sources", pa.list_(pa.int32())),
    ("segment_documents", pa.list_(pa.int64())),
    ("segment_offsets", pa.list_(pa.int64())),
])


# ----------------------------------------------------------------------------- tokenizer
def load_tokenizer(name_or_path: str) -> Tokenizer:
    """The model's tokenizer through `transformers.AutoTokenizer` (a hub id, or a local folder saved with
    `save_pretrained` / `Tokenizer.save`), checked to hold Qwen3's special tokens."""
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is loaded by name

    return Tokenizer.from_hf(AutoTokenizer.from_pretrained(str(name_or_path)))


def text_encoder(tokenizer: Tokenizer) -> tokenizers.Tokenizer:
    """A copy of the tokenizer that encodes special-token strings found in a document as ordinary text."""
    encoder = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    encoder.encode_special_tokens = True
    encoder.no_truncation()
    encoder.no_padding()
    return encoder


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of what maps text to ids: the vocabulary, the BPE merges and the added tokens. (The whole serialised
    tokenizer differs with how it was loaded: transformers rebuilds it with other offset settings.)"""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    added = sorted((t["id"], t["content"]) for t in spec.get("added_tokens", []))
    blob = json.dumps([sorted(model.get("vocab", {}).items()), merges, added])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- sources
class _SourceStream:
    """One source's part for this worker, as rows {"text", "source"}, from where the manifest left it."""

    def __init__(self, spec: SourceSpec, worker_index: int, num_workers: int, consumed: int,
                 stream_state: dict | None) -> None:
        self.spec, self.consumed, self.worker = spec, consumed, f"worker {worker_index} of {num_workers}"
        ds = load_source(spec)
        if isinstance(ds, datasets.IterableDataset):
            ds = split_dataset_by_node(ds, rank=worker_index, world_size=num_workers)
        else:
            ds = ds.shard(num_shards=num_workers, index=worker_index, contiguous=True)
        ds = to_text_dataset(ds, spec)
        self.state = stream_state
        if isinstance(ds, datasets.IterableDataset) and stream_state is not None:
            ds.load_state_dict(stream_state)
        elif consumed:
            ds = ds.skip(consumed)
        self.ds = ds
        self.advanced = False  # `datasets` reports its start state until the resumed stream yields once
        self.rows = self._rows()

    def _rows(self) -> Iterator[dict]:
        it = iter(self.ds)
        while True:
            try:
                row = next(it)
            except StopIteration:
                return
            except Exception as e:  # datasets / pyarrow raise many types for an unreadable file or row
                raise DataError(f"source {self.spec.label} ({self.spec.path_or_id}): reading document "
                                f"{self.consumed} of {self.worker}'s part failed: {type(e).__name__}: {e}") from e
            self.advanced = True
            yield row

    def stream_state(self) -> dict | None:
        """`datasets`' iterator state after the documents consumed so far (streams only)."""
        if not isinstance(self.ds, datasets.IterableDataset):
            return None
        return self.ds.state_dict() if self.advanced else self.state


# ----------------------------------------------------------------------------- segments
@dataclass(frozen=True)
class Segment:
    """A whole document or a piece of one, with the `<|endoftext|>` when it ends the document."""

    source: int
    document: int
    offset: int
    tokens: np.ndarray


class LengthMixCutter:
    """Cuts documents into pieces whose lengths follow a length mix (module doc); `counts` are the pieces so far
    per mix row, kept in the manifest so a resumed job continues the schedule."""

    def __init__(self, seq_len: int, mix: Sequence[Sequence[float]]) -> None:
        self.mix = check_length_mix(mix)  # the tiny stage's checks: rows in (0, 1], shares summing to 1
        if not self.mix:
            raise ValueError("a LengthMixCutter needs a non-empty length mix")
        self.ranges = length_ranges(seq_len, self.mix)
        self.shares = [share for *_, share in self.mix]
        self.shortest = min(lo for lo, _ in self.ranges)
        self.counts = [0] * len(self.ranges)

    def row_of(self, n_tokens: int) -> int | None:
        """The first mix row whose token range holds `n_tokens` (None: in no range)."""
        return next((k for k, (lo, hi) in enumerate(self.ranges) if lo <= n_tokens <= hi), None)

    def next_row(self) -> int:
        """`data.synthetic.mix_rows`'s rule on the counts kept here: the first row (the last excepted) holding
        fewer than floor(n * share) of the first n pieces, else the last row."""
        n = sum(self.counts) + 1
        last = len(self.shares) - 1
        return next((k for k in range(last) if self.counts[k] < math.floor(n * self.shares[k])), last)

    def cut(self, n_tokens: int, rng: random.Random) -> list[tuple[int, int]]:
        """[start, stop) token spans of a document of `n_tokens` tokens (without its end-of-text)."""
        spans, pos = [], 0
        while n_tokens - pos >= self.shortest:
            lo, hi = self.ranges[self.next_row()]
            rest = n_tokens - pos
            take = rng.randint(lo, hi) if rest > hi else rest
            row = self.row_of(take)
            if row is not None:
                self.counts[row] += 1
            spans.append((pos, pos + take))
            pos += take
        if pos < n_tokens:  # a tail (or a whole document) shorter than every range: filling, outside the mix
            spans.append((pos, n_tokens))
        return spans


def fixed_spans(n_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """Pieces of at most seq_len tokens: with its end-of-text a piece fills at most one row of seq_len + 1."""
    return [(a, min(a + seq_len, n_tokens)) for a in range(0, n_tokens, seq_len)]


class RowPacker:
    """First-fit packing of whole segments into rows of `capacity` tokens, over at most `max_open` open rows."""

    def __init__(self, capacity: int, max_open: int = MAX_OPEN_ROWS) -> None:
        self.capacity, self.max_open = capacity, max_open
        self.open: list[list[Segment]] = []
        self.free: list[int] = []
        self.closed: list[list[Segment]] = []

    def add(self, segment: Segment) -> None:
        n = len(segment.tokens)
        if n > self.capacity:
            raise ValueError(f"a segment of {n} tokens does not fit a row of {self.capacity}")
        for i, free in enumerate(self.free):
            if n <= free:
                self.open[i].append(segment)
                self.free[i] -= n
                if self.free[i] == 0:
                    self._close(i)
                return
        if len(self.open) == self.max_open:
            self._close(int(np.argmin(self.free)))  # the fullest row pads least
        self.open.append([segment])
        self.free.append(self.capacity - n)
        if self.free[-1] == 0:
            self._close(len(self.open) - 1)

    def _close(self, i: int) -> None:
        self.closed.append(self.open.pop(i))
        self.free.pop(i)

    def close_all(self) -> list[list[Segment]]:
        """Close every open row and hand out all closed rows."""
        while self.open:
            self._close(0)
        rows, self.closed = self.closed, []
        return rows


# ----------------------------------------------------------------------------- writing
def _list_array(pieces: Sequence[np.ndarray], dtype) -> pa.ListArray:
    offsets = np.zeros(len(pieces) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(p) for p in pieces])
    values = np.concatenate(pieces).astype(dtype) if pieces else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _write_shard(path: Path, rows: Sequence[Sequence[Segment]], capacity: int, pad_id: int) -> None:
    """Write packed rows as one parquet file, atomically (a killed job never leaves half a shard under its name)."""
    ids = []
    for row in rows:
        filled = np.concatenate([s.tokens for s in row])
        ids.append(np.concatenate([filled, np.full(capacity - len(filled), pad_id, dtype=np.int32)]))
    table = pa.Table.from_arrays([
        _list_array(ids, np.int32),
        _list_array([np.array([len(s.tokens) for s in row]) for row in rows], np.int32),
        _list_array([np.array([s.source for s in row]) for row in rows], np.int32),
        _list_array([np.array([s.document for s in row]) for row in rows], np.int64),
        _list_array([np.array([s.offset for s in row]) for row in rows], np.int64),
    ], schema=SHARD_SCHEMA)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def _write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    write_json_atomic(path, manifest)


def manifest_name(worker_index: int, num_workers: int) -> str:
    return f"{MANIFEST_PREFIX}-w{worker_index:05d}-of-{num_workers:05d}.json"


def shard_name(worker_index: int, shard: int) -> str:
    return f"w{worker_index:05d}-{shard:06d}.parquet"


def _plain(value: Any) -> Any:
    """`value` as JSON gives it back (tuples become lists), for comparing settings with a manifest."""
    return json.loads(json.dumps(value))


def _resume(path: Path, settings: Mapping[str, Any]) -> dict | None:
    if not path.is_file():
        return None
    manifest = read_json_object(path)
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    diffs = [f"{k}: manifest {manifest.get(k)!r}, now {settings[k]!r}" for k in RESUME_KEYS
             if _plain(manifest.get(k)) != _plain(settings[k])]
    if diffs:
        raise DataError(f"{path} was written with other settings, so its shards cannot be continued: "
                        + "; ".join(diffs) + ". Write to another folder, or delete this worker's files to restart it")
    return manifest


def write_token_shards(sources: Sequence[Any], tokenizer: Any, out_dir: str | Path, *, seq_len: int,
                       length_mix: Sequence[Sequence[float]] = (), document_masking: bool = False, seed: int = 0,
                       worker_index: int = 0, num_workers: int = 1, rows_per_shard: int | None = None,
                       max_documents: int | None = None, max_open_rows: int = MAX_OPEN_ROWS,
                       tokenizer_name: str | None = None, stage: str | None = None) -> dict:
    """Tokenise, cut, pack and write this worker's part of `sources` (module doc); returns its manifest.

    `tokenizer`: a `qwen3repro.tokenizer.Tokenizer`, a transformers fast tokenizer, or a hub id / folder for
    `load_tokenizer`. `max_documents` stops this worker after that many documents (a smoke run); rerunning with
    a larger one, or none, continues. A rerun after a kill resumes from the last shard the manifest lists."""
    if isinstance(tokenizer, (str, Path)):
        tokenizer_name = tokenizer_name or str(tokenizer)
        tokenizer = load_tokenizer(str(tokenizer))
    elif not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_hf(tokenizer)
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index must be in [0, {num_workers}), got {worker_index}")
    if seq_len < 1 or max_open_rows < 1:
        raise ValueError(f"seq_len and max_open_rows must be positive, got {seq_len} and {max_open_rows}")
    specs = [s if isinstance(s, SourceSpec) else SourceSpec(**s) for s in sources]
    if not specs:
        raise DataError("no pretraining sources given")
    labels = [s.label for s in specs]
    dup = sorted({label for label in labels if labels.count(label) > 1})
    if dup:
        raise DataError(f"duplicate source names {dup}; set SourceSpec.name")
    capacity = seq_len + 1  # inputs are the first seq_len tokens, labels the last seq_len
    rows_per_shard = rows_per_shard or max(1, DEFAULT_SHARD_TOKENS // capacity)
    cutter = LengthMixCutter(seq_len, length_mix) if length_mix else None
    eot, pad = tokenizer.endoftext_id, tokenizer.pad_token_id

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / manifest_name(worker_index, num_workers)
    settings = {
        "format": FORMAT, "version": FORMAT_VERSION, "stage": stage, "seq_len": seq_len, "row_tokens": capacity,
        "worker_index": worker_index, "num_workers": num_workers, "seed": seed, "rows_per_shard": rows_per_shard,
        "max_open_rows": max_open_rows, "document_masking": bool(document_masking),
        "length_mix": [list(row) for row in cutter.mix] if cutter else None,
        "tokenizer": tokenizer_name, "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "vocab_size": tokenizer.vocab_size, "eot_id": eot, "pad_id": pad,
        "sources": [dataclasses.asdict(s) for s in specs],
    }
    previous = _resume(manifest_path, settings)
    if previous is not None and previous["done"] and (
            previous["stopped_by"] == STOPPED_EXHAUSTED
            or (max_documents is not None and previous["counts"]["documents"] >= max_documents)):
        return previous  # nothing left to do

    state = previous["state"] if previous else {"consumed": dict.fromkeys(labels, 0),
                                                "stream_states": dict.fromkeys(labels)}
    files: list[dict] = list(previous["files"]) if previous else []
    counts = dict(previous["counts"]) if previous else dict.fromkeys(
        ("documents", "empty_documents", "segments", "tokens", "padding", "rows"), 0)
    per_source = {k: dict(v) for k, v in previous["per_source"].items()} if previous else {
        label: {"documents": 0, "empty_documents": 0, "tokens": 0} for label in labels}
    # The length mix as written so far: segments and tokens per mix row (the segment counts are the cutter's
    # schedule, continued on resume) and the filling outside the mix.
    measured = previous["length_mix_measured"] if previous else None
    if cutter is not None:
        measured = measured or {"ranges": [list(r) for r in cutter.ranges], "shares": cutter.shares,
                                "segments": [0] * len(cutter.ranges), "tokens": [0] * len(cutter.ranges),
                                "filling_segments": 0, "filling_tokens": 0}
        cutter.counts = list(measured["segments"])

    streams = [_SourceStream(s, worker_index, num_workers, state["consumed"][s.label],
                             state["stream_states"].get(s.label)) for s in specs]
    weights = [s.weight for s in specs]
    packer = RowPacker(capacity, max_open_rows)

    def add_document(i: int, tokens: list[int], rng: random.Random) -> None:
        label, n = labels[i], len(tokens)
        spans = cutter.cut(n, rng) if cutter else fixed_spans(n, seq_len)
        ids = np.asarray(tokens, dtype=np.int32)
        for a, b in spans:
            piece = np.append(ids[a:b], np.int32(eot)) if b == n else ids[a:b]
            packer.add(Segment(i, streams[i].consumed - 1, a, piece))
            counts["segments"] += 1
            counts["tokens"] += len(piece)
            per_source[label]["tokens"] += len(piece)
            if cutter is not None:
                row = cutter.row_of(b - a) if b - a >= cutter.shortest else None
                if row is None:
                    measured["filling_segments"] += 1
                    measured["filling_tokens"] += b - a
                else:
                    measured["tokens"][row] += b - a
        if cutter is not None:
            measured["segments"] = list(cutter.counts)

    encoder = text_encoder(tokenizer)
    stopped_by = None
    while stopped_by is None:
        shard = len(files)
        # Seeded by the shard, not carried over from the previous one: a resumed job draws what an uncut one does.
        mixed = interleave([s.rows for s in streams], weights, seed=f"{seed}|worker{worker_index}|shard{shard}")
        cut_rng = random.Random(f"pretrain-cut|{seed}|worker{worker_index}|shard{shard}")
        shard_documents = 0
        while len(packer.closed) < rows_per_shard:
            if max_documents is not None and counts["documents"] >= max_documents:
                stopped_by = STOPPED_MAX_DOCUMENTS
                break
            drawn = next(mixed, None)
            if drawn is None:
                stopped_by = STOPPED_EXHAUSTED
                break
            i, row = drawn
            stream = streams[i]
            where = f"source {labels[i]} ({specs[i].path_or_id}) document {stream.consumed} of {stream.worker}'s part"
            stream.consumed += 1
            counts["documents"] += 1
            per_source[labels[i]]["documents"] += 1
            shard_documents += 1
            text = row["text"]
            if not isinstance(text, str):
                raise DataError(f"{where}: the text is {type(text).__name__}, not a string")
            tokens = encoder.encode(text, add_special_tokens=False).ids
            if not tokens:  # nothing to learn from; counted, so the manifest accounts for every document
                counts["empty_documents"] += 1
                per_source[labels[i]]["empty_documents"] += 1
                continue
            add_document(i, tokens, cut_rng)
        rows = packer.close_all()
        if rows:
            name = shard_name(worker_index, shard)
            _write_shard(out / name, rows, capacity, pad)
            n_tokens = sum(len(s.tokens) for row in rows for s in row)
            files.append({"file": name, "rows": len(rows), "tokens": n_tokens, "documents": shard_documents})
            counts["rows"] += len(rows)
            counts["padding"] += len(rows) * capacity - n_tokens
        manifest = {
            **settings, "max_documents": max_documents,
            "state": {"consumed": {s.spec.label: s.consumed for s in streams},
                      "stream_states": {s.spec.label: s.stream_state() for s in streams}},
            "counts": counts, "per_source": per_source, "length_mix_measured": measured,
            "files": files, "done": stopped_by is not None, "stopped_by": stopped_by,
        }
        _write_manifest(manifest_path, manifest)
    return read_json_object(manifest_path)  # as a resumed or finished job returns it


# ----------------------------------------------------------------------------- reading
def is_packed_shards(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and any(p.glob(f"{MANIFEST_PREFIX}-*.json"))


def read_token_manifests(path: str | Path) -> list[dict]:
    """Every worker's manifest under `path`, checked: same format and settings, every worker present and done."""
    p = Path(path)
    found = sorted(p.glob(f"{MANIFEST_PREFIX}-*.json")) if p.is_dir() else []
    if not found:
        raise DataError(f"{path}: no pretraining token shards here (no {MANIFEST_PREFIX}-*.json); write them with "
                        "`python -m qwen3repro.nanotron.pretrain_data --stage <stage> --model <model>`")
    manifests = []
    for f in found:
        m = read_json_object(f)
        if m.get("format") != FORMAT or m.get("version") != FORMAT_VERSION:
            raise DataError(f"{f}: format {m.get('format')!r} version {m.get('version')!r}, expected {FORMAT!r} "
                            f"version {FORMAT_VERSION}")
        manifests.append(m)
    check_parts_agree(path, manifests, ("stage", "seq_len", "tokenizer_sha256", "num_workers", "document_masking",
                                        "length_mix", "sources", "seed"),
                      count_key="num_workers", index_key="worker_index", noun="workers")
    unfinished = [m["worker_index"] for m in manifests if not m.get("done")]
    if unfinished:
        raise DataError(f"{path}: workers {unfinished} have not finished (killed or still running); rerun them "
                        "with the same arguments to resume")
    return sorted(manifests, key=lambda m: m["worker_index"])


class PackedShardLoader:
    """Micro-batches of packed rows for one data-parallel rank; re-iterable, a new seeded order every epoch.

    Order: each epoch permutes the shard files (seeded by seed and epoch) and deals them to the ranks in turn
    (rank r reads files r, r + dp_size, ...), then reads each file's rows in a seeded order; a rank thus reads
    only its own files. Every rank takes the same number of rows per epoch (the smallest rank's, rounded down to
    whole micro-batches), so ranks never wait on each other at an epoch's end.

    Resume: samples are counted per rank, as the launcher counts them (nanotron's `consumed_train_samples`, which
    counts all data-parallel ranks, divided by dp_size). `start_sample=n` (or `skip(n)`) starts this rank after
    its first n samples (whole micro-batches; across epochs when n is larger than one), reading no skipped data
    but the rest of the file it resumes in; `consumed_samples` counts the samples handed out so far. The order
    resumed is the order an uncut run would have had only with the same shards, seed, dp_size and
    micro_batch_size.

    Batches: dicts of int64 tensors [micro_batch_size, seq_len]: `input_ids` (the row's first seq_len tokens),
    `labels` (the next token; -100 on padding and, with document masking, where the next token belongs to another
    segment), `position_ids` (with document masking restarting at 0 in every segment, 0 on padding; without,
    0..seq_len-1) and `segment_ids` (the segment's ordinal in its row, -1 on padding). `document_masking` defaults
    to the stage's (the manifest's)."""

    def __init__(self, path: str | Path, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 *, seq_len: int | None = None, start_sample: int = 0, document_masking: bool | None = None,
                 vocab_size: int | None = None) -> None:
        if micro_batch_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need micro_batch_size >= 1 and 0 <= dp_rank < dp_size, got {micro_batch_size}, "
                             f"{dp_rank}, {dp_size}")
        manifests = read_token_manifests(path)
        first = manifests[0]
        if seq_len is not None and first["seq_len"] != seq_len:
            raise DataError(f"{path}: rows were packed for {first['seq_len']} tokens, the stage trains at {seq_len}; "
                            "write the shards for this stage")
        if vocab_size is not None and first["vocab_size"] > vocab_size:
            raise DataError(f"{path}: the tokenizer has {first['vocab_size']} ids, the model only {vocab_size}")
        self.files = [Path(path) / f["file"] for m in manifests for f in m["files"]]
        self.file_rows = np.array([f["rows"] for m in manifests for f in m["files"]], dtype=np.int64)
        missing = [str(f) for f in self.files if not f.is_file()]
        if missing:
            raise DataError(f"{path}: shard files listed in the manifests are missing: {missing[:3]}")
        if len(self.files) < dp_size:
            raise DataError(f"{path}: {len(self.files)} shard files cannot feed {dp_size} data-parallel ranks "
                            "(each reads its own files); write smaller shards (--rows-per-shard)")
        self.manifests = manifests
        self.seq_len = int(first["seq_len"])
        self.document_masking = bool(first["document_masking"] if document_masking is None else document_masking)
        self.micro_batch_size, self.dp_rank, self.dp_size, self.seed = micro_batch_size, dp_rank, dp_size, seed
        self.path = path
        self._plans: dict[int, tuple[np.ndarray, int]] = {}
        self._plan(0)  # fails now if the shards cannot feed every rank
        self.consumed_samples = 0
        self.skip(start_sample)

    # ------------------------------------------------------------------ order
    def _plan(self, epoch: int) -> tuple[np.ndarray, int]:
        """(this rank's files in order, rows every rank takes) for an epoch."""
        if epoch not in self._plans:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.files))
            per_rank = min(int(self.file_rows[order[r::self.dp_size]].sum()) for r in range(self.dp_size))
            rows = per_rank // self.micro_batch_size * self.micro_batch_size
            if rows == 0:
                raise DataError(f"{self.path}: epoch {epoch} deals a rank {per_rank} rows, less than one "
                                f"micro-batch of {self.micro_batch_size}; write smaller shards (--rows-per-shard)")
            self._plans = {epoch: (order[self.dp_rank::self.dp_size], rows)}  # one epoch at a time is enough
        return self._plans[epoch]

    def _locate(self, sample: int) -> tuple[int, int]:
        """(epoch, rows this rank has taken in it) after `sample` samples of this rank."""
        epoch, local = 0, sample
        while local >= self._plan(epoch)[1]:
            local -= self._plan(epoch)[1]
            epoch += 1
        return epoch, local

    def skip(self, n_samples: int) -> None:
        """Move this rank's start on by `n_samples` of its samples (whole micro-batches)."""
        if n_samples < 0 or n_samples % self.micro_batch_size:
            raise DataError(f"cannot skip {n_samples} samples: a rank consumes whole micro-batches of "
                            f"{self.micro_batch_size}")
        self.consumed_samples += n_samples

    @property
    def epoch(self) -> int:
        return self._locate(self.consumed_samples)[0]

    def __len__(self) -> int:
        """Micro-batches of the current epoch on this rank."""
        return self._plan(self.epoch)[1] // self.micro_batch_size

    # ------------------------------------------------------------------ rows
    def _file_rows(self, epoch: int, file_index: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """A shard's (input_ids [rows, seq_len + 1], segment lengths per row) in this epoch's row order."""
        path = self.files[file_index]
        try:
            table = pq.read_table(path, columns=["input_ids", "segment_lengths"])
        except Exception as e:  # pyarrow raises many types for a damaged file
            raise DataError(f"shard {path} is corrupt or unreadable: {type(e).__name__}: {e}") from e
        width = self.seq_len + 1
        ids_col = table.column("input_ids").combine_chunks()
        ids = ids_col.flatten().to_numpy()
        if len(ids) != len(table) * width:
            raise DataError(f"shard {path}: rows are not all {width} tokens long")
        ids = ids.reshape(len(table), width)
        seg_col = table.column("segment_lengths").combine_chunks()
        offsets, values = seg_col.offsets.to_numpy(), seg_col.flatten().to_numpy()
        lengths = [values[offsets[r]:offsets[r + 1]] for r in range(len(table))]
        order = np.random.default_rng([self.seed, epoch, file_index]).permutation(len(table))
        return ids[order], [lengths[r] for r in order]

    def _rows(self, epoch: int, start: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This rank's rows of an epoch from its `start`-th on, up to the epoch's row count."""
        files, n_rows = self._plan(epoch)
        skipped = 0
        for f in files:
            if skipped + self.file_rows[f] <= start:  # whole file before the start: not read
                skipped += int(self.file_rows[f])
                continue
            ids, lengths = self._file_rows(epoch, int(f))
            for r in range(len(ids)):
                if skipped >= n_rows:
                    return
                if skipped >= start:
                    yield ids[r], lengths[r]
                skipped += 1

    def _row_batch(self, ids: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
        width = len(ids)
        n = int(lengths.sum())
        segment = np.full(width, -1, dtype=np.int64)
        segment[:n] = np.repeat(np.arange(len(lengths)), lengths)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        position = np.zeros(width, dtype=np.int64)
        position[:n] = np.arange(n) - np.repeat(starts, lengths)
        labels = ids[1:].astype(np.int64)
        trained = (segment[:-1] >= 0) & (segment[1:] >= 0)
        if self.document_masking:
            trained &= segment[:-1] == segment[1:]
        labels[~trained] = IGNORE_INDEX
        positions = position[:-1] if self.document_masking else np.arange(width - 1, dtype=np.int64)
        return {"input_ids": ids[:-1].astype(np.int64), "labels": labels, "position_ids": positions,
                "segment_ids": segment[:-1]}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of the current epoch; the next iteration starts the next epoch."""
        epoch, start = self._locate(self.consumed_samples)
        batch = []
        for ids, lengths in self._rows(epoch, start):
            batch.append(self._row_batch(ids, lengths))
            if len(batch) == self.micro_batch_size:
                self.consumed_samples += self.micro_batch_size
                yield {k: torch.from_numpy(np.stack([b[k] for b in batch])) for k in batch[0]}
                batch = []


# ----------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write a full-scale pretraining stage's packed token shards (one worker's part of its mixture). "
                    "Rerun the same command to resume a killed job.")
    parser.add_argument("--stage", required=True, help="s1 | s2 | s3")
    parser.add_argument("--model", required=True, help="the real model the stage trains (its tokenizer is used)")
    parser.add_argument("--out", default=None,
                        help=f"output folder (default: runs/full/<model>/<stage>/{TOKEN_SHARDS_DIRNAME})")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the model's hub id)")
    parser.add_argument("--worker-index", type=int, default=0, help="this worker's part of every source (0-based)")
    parser.add_argument("--num-workers", type=int, default=1, help="how many workers share the sources")
    parser.add_argument("--max-documents", type=int, default=None, help="stop this worker after this many documents")
    parser.add_argument("--rows-per-shard", type=int, default=None,
                        help=f"rows per parquet file (default: about {DEFAULT_SHARD_TOKENS:,} tokens)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    spec = build_stage_spec(args.stage, args.model)
    if spec.is_sft:
        parser.error(f"stage {args.stage} trains on conversations: write its shards with "
                     "`python -m qwen3repro.nanotron.sft_data`")
    name = args.tokenizer or spec.tokenizer
    out = args.out or spec.shards_path
    manifest = write_token_shards(
        spec.data["sources"], name, out, seq_len=spec.seq_len, length_mix=spec.facts.length_mix or (),
        document_masking=spec.facts.document_masking, seed=args.seed, worker_index=args.worker_index,
        num_workers=args.num_workers, rows_per_shard=args.rows_per_shard, max_documents=args.max_documents,
        tokenizer_name=name, stage=args.stage)
    print(json.dumps({"out": str(out), "done": manifest["done"], "stopped_by": manifest["stopped_by"],
                      **manifest["counts"]}))


if __name__ == "__main__":
    main()
