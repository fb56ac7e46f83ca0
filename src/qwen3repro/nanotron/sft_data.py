"""Conversations -> masked, packed shards for the full-scale SFT stages (cold start, fusion) and off-policy
distillation, and the loader that feeds them to nanotron.

    python -m qwen3repro.nanotron.sft_data --stage cold-start --model qwen3-32b      # writes the stage's shards
    python -m qwen3repro.nanotron.launch --config-file .../cold-start.yaml --data runs/full/qwen3-32b/cold-start/sft-shards

Off-policy distillation is SFT on the teacher's responses, so it takes the same path; only its source differs
(`full/stages.toml` [data.distill]: the JSON lines written by the teacher-generation step).

Writing (`write_sft_shards`), one stage's `[data.<stage>]` sources:

1. read conversations: local JSON lines are read line by line here, so a malformed line is an error naming the
   file and line; parquet files and hub ids go through `data.mixture.load_source` (the same loader as the
   pretraining mixtures) and a bad row is named by its source and row number. A conversation is the source's
   `text_field` column ("messages"): a list of {"role", "content", ...} messages;
2. interleave the sources by weight, seeded, stopping when the first runs out (the default of
   `data.mixture.StageMixture`, so every prefix keeps the weights);
3. fusion only (`FusionFlags`): each source is thinking or non-thinking data (`[data.fusion] thinking_modes`
   in full/stages.toml), and every conversation is flagged by the tiny fusion stage's own builder,
   `stages.fusion.fusion_conversation`, with the fusion recipe's shares: `/think` (or, thinking being the default,
   no flag) for thinking data, `/no_think` and the empty think block for non-thinking data, in the system
   message or the last user turn; seeded per conversation, so the same whichever part writes it. A conversation
   whose final answer does not match its source's mode (reasoning in non-thinking data, none in thinking data)
   is dropped and counted;
4. render with our Qwen3 chat template and tokenise: `stages.sft.tokenize_example`, i.e.
   `chat.tokenize_conversation`, whose mask is 1 exactly on the assistant's tokens. A conversation longer than
   seq_len + 1 tokens is dropped and counted (never truncated: the cut would remove the answer it trains on),
   as is one with nothing to train;
5. pack with the tiny SFT stage's own packing, `stages.sft.SFTLoader(batching="pack")`: first-fit in a seeded
   order into rows of exactly seq_len tokens, `labels` = next token on assistant tokens and -100 elsewhere
   (prompts, headers, padding), `position_ids` restarting at 0 in every conversation, `segment_ids` numbering
   the conversations of a row (-1 on padding). Packing runs on chunks of `chunk_conversations`, so memory stays
   bounded at any data size;
6. write parquet shards of `rows_per_shard` rows (columns input_ids, labels, position_ids, segment_ids; int32)
   and a manifest with the counts (read, kept, dropped by reason and by source) and what the shards assume
   (sequence length, tokenizer, a hash of the chat template).

Large sources can be split over processes: `--part i --parts n` takes conversations i, i+n, i+2n, ... and writes
its own files and manifest; the loader reads every part and checks that all n are there.

Reading (`MaskedShardLoader`): rows in a seeded order per epoch, this data-parallel rank's share, micro-batches
of dicts with input_ids / labels / position_ids / segment_ids. `launch.nanotron_batches` turns labels into the
model's `label_ids` / `label_mask` (mask = labels != -100), so nanotron's loss block averages the cross-entropy
over assistant tokens only; attention stays inside each conversation because the model derives document
boundaries from the restarting position ids.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..chat import CHAT_TEMPLATE, parse
from ..chat_template import REASONING_FIELDS
from ..data.mixture import SourceSpec, data_files, load_source
from ..data.packing import IGNORE_INDEX, DataError
from ..stages.fusion import FusionConfig, fusion_conversation
from ..stages.sft import SFTLoader, tokenize_example
from ..tokenizer import Tokenizer
from .config_gen import build_stage_spec

FORMAT = "qwen3repro-sft-masked"
FORMAT_VERSION = 1
COLUMNS = ("input_ids", "labels", "position_ids", "segment_ids")
THINKING_MODES = ("think", "no_think")


@dataclass(frozen=True)
class FusionFlags:
    """Thinking-mode fusion at full scale: the mode of each source and the shares of the flag placements, the
    fusion recipe's (defaults: `stages.fusion.FusionConfig`'s), so that every conversation is flagged as the tiny
    fusion stage flags its own (`stages.fusion.fusion_conversation`)."""

    modes: Mapping[str, str]
    """Source label -> "think" or "no_think" (full/stages.toml `[data.fusion] thinking_modes`)."""
    unflagged_share: float = FusionConfig.unflagged_share
    system_flag_share: float = FusionConfig.system_flag_share

    def check(self, labels: Sequence[str]) -> None:
        bad = {k: v for k, v in self.modes.items() if v not in THINKING_MODES}
        if bad:
            raise DataError(f"thinking modes must be one of {THINKING_MODES}, got {bad}")
        missing, unknown = sorted(set(labels) - set(self.modes)), sorted(set(self.modes) - set(labels))
        if missing or unknown:
            raise DataError(f"thinking_modes must name every fusion source exactly: sources without a mode "
                            f"{missing}, modes for no source {unknown} (sources: {list(labels)})")


def answer_reasoning(messages: Sequence[Mapping]) -> str:
    """The reasoning of the conversation's last assistant turn ('' when it has none), as the template reads it."""
    for m in reversed(messages):
        if m.get("role") == "assistant":
            for key in REASONING_FIELDS:
                if isinstance(m.get(key), str):
                    return m[key]
            return parse(m.get("content") or "")["reasoning_content"]
    return ""


# ----------------------------------------------------------------------------- reading conversations
def _check_messages(messages: Any, where: str) -> list[dict]:
    """A conversation must be a non-empty list of message objects with a string role (the template checks the rest)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"{where}: a conversation must be a non-empty list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise DataError(f"{where}: message {i} must be an object with a string 'role', got {m!r:.80}")
    return [dict(m) for m in messages]


def _jsonl_conversations(spec, files: Sequence[str]) -> Iterator[tuple[str, list[dict]]]:
    for path in files:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e})") from None
                if isinstance(row, Mapping):
                    if spec.text_field not in row:
                        raise DataError(f"{where}: no {spec.text_field!r} field (keys: {sorted(row)})")
                    row = row[spec.text_field]
                yield where, _check_messages(row, where)


def read_conversations(spec) -> Iterator[tuple[str, list[dict]]]:
    """(where, messages) for every conversation of one source (`data.mixture.SourceSpec` or its dict)."""
    if isinstance(spec, Mapping):
        spec = SourceSpec(**spec)
    if spec.kind == "synthetic":
        raise DataError(f"source {spec.label}: synthetic corpora are pretraining text, not conversations")
    if spec.kind == "jsonl":
        files = data_files(spec, (".jsonl", ".json"))
        if isinstance(files, str):  # one file, or a glob
            pattern, files = files, sorted(glob.glob(files))
            if not files:
                raise DataError(f"source {spec.label}: no file matches {pattern}")
        yield from _jsonl_conversations(spec, files)
        return
    ds = load_source(spec)  # parquet files or a hub id (datasets.load_dataset; streamed if the spec says so)
    for n, row in enumerate(ds):
        where = f"source {spec.label} row {n}"
        if spec.text_field not in row:
            raise DataError(f"{where}: no {spec.text_field!r} column (columns: {sorted(row)})")
        yield where, _check_messages(row[spec.text_field], where)


def interleave(streams: Sequence[Iterator], weights: Sequence[float], seed: int = 0) -> Iterator[tuple[int, Any]]:
    """(source index, item), drawing the source by weight (seeded); stops when the first source runs out."""
    rng = random.Random(f"sft-mix|{seed}")
    indices = range(len(streams))
    while True:
        i = rng.choices(indices, weights)[0]
        item = next(streams[i], None)
        if item is None:
            return
        yield i, item


# ----------------------------------------------------------------------------- writing shards
def chat_template_hash() -> str:
    return hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()[:16]


def _write_parquet(path: Path, batch: Mapping[str, Any]) -> None:
    cols = {k: pa.array(list(batch[k].numpy().astype(np.int32)), type=pa.list_(pa.int32())) for k in COLUMNS}
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.table(cols), tmp)
    tmp.replace(path)  # a cut run never leaves a half-written shard under the final name


def manifest_name(part: int, parts: int) -> str:
    return "manifest.json" if parts == 1 else f"manifest-part{part:03d}-of-{parts:03d}.json"


def write_sft_shards(sources: Sequence[Any], tokenizer: Any, out_dir: str | Path, *, seq_len: int,
                     rows_per_shard: int = 256, chunk_conversations: int = 20_000, seed: int = 0,
                     enable_thinking: bool = True, limit: int | None = None, part: int = 0, parts: int = 1,
                     tokenizer_name: str | None = None, stage: str | None = None,
                     fusion: FusionFlags | None = None) -> dict:
    """Tokenise, pack and write the conversations of `sources` (module doc); returns the manifest it writes.

    `tokenizer`: a `qwen3repro.tokenizer.Tokenizer` (or a transformers fast tokenizer). `limit` stops after
    that many conversations read (all parts together), e.g. for a smoke run. `fusion`: flag every conversation
    in its source's thinking mode (module doc, step 3); `enable_thinking` then follows each conversation's mode."""
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_hf(tokenizer)
    if not 0 <= part < parts:
        raise ValueError(f"part must be in [0, {parts}), got {part}")
    specs = [s if isinstance(s, SourceSpec) else SourceSpec(**s) for s in sources]
    if not specs:
        raise DataError("no conversation sources given")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [s.label for s in specs]
    if fusion is not None:
        fusion.check(labels)
    streams = [read_conversations(s) for s in specs]
    mixed = interleave(streams, [s.weight for s in specs], seed) if len(specs) > 1 else ((0, x) for x in streams[0])

    counts: Counter = Counter()
    categories: Counter = Counter()  # fusion: kept conversations per flag placement (stages.fusion.CATEGORIES)
    per_source = {label: Counter() for label in labels}
    files: list[dict] = []
    chunk: list = []

    def flush() -> None:
        if not chunk:
            return
        loader = SFTLoader(chunk, batch_size=rows_per_shard, seq_len=seq_len, pad_id=tokenizer.pad_token_id,
                           seed=seed + len(files), batching="pack")
        for batch in loader:  # one pass over the chunk: batches of packed rows
            name = f"part{part:03d}-{len(files):06d}.parquet"
            _write_parquet(out / name, batch)
            n_rows = int(batch["input_ids"].shape[0])
            files.append({"file": name, "rows": n_rows})
            counts["rows"] += n_rows
            counts["tokens"] += int((batch["segment_ids"] >= 0).sum())
            counts["assistant_tokens"] += int((batch["labels"] != IGNORE_INDEX).sum())
        chunk.clear()

    for k, (i, (where, messages)) in enumerate(mixed):
        if limit is not None and k >= limit:
            break
        if k % parts != part:
            continue
        counts["read"] += 1
        per_source[labels[i]]["read"] += 1
        thinking, category = enable_thinking, None
        if fusion is not None:
            mode = fusion.modes[labels[i]]
            if bool(answer_reasoning(messages).strip()) != (mode == "think"):
                counts["dropped_mode_mismatch"] += 1
                per_source[labels[i]]["dropped_mode_mismatch"] += 1
                continue
            # Seeded by the conversation's place in the mixed stream: the same flags whichever part writes it.
            rng = random.Random(f"fusion-flags|{seed}|{k}")
            try:
                messages, category = fusion_conversation(messages, mode, rng, unflagged_share=fusion.unflagged_share,
                                                         system_flag_share=fusion.system_flag_share)
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
            thinking = mode == "think"
        try:
            example, dropped = tokenize_example(tokenizer, messages, seq_len, thinking)
        except ValueError as e:  # the template names the bad message; we name the line or row
            raise DataError(f"{where}: {e}") from None
        if example is None:
            counts[f"dropped_{dropped}"] += 1
            per_source[labels[i]][f"dropped_{dropped}"] += 1
            continue
        counts["kept"] += 1
        per_source[labels[i]]["kept"] += 1
        if category is not None:
            categories[category] += 1
        chunk.append(example)
        if len(chunk) >= chunk_conversations:
            flush()
    flush()
    if not files:
        raise DataError(f"no conversation left to train on: {dict(counts)} (seq_len {seq_len})")

    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "stage": stage, "seq_len": seq_len,
        "part": part, "parts": parts, "seed": seed,
        # fusion: per conversation, by its source's mode (thinking_modes); else one setting for every conversation
        "enable_thinking": None if fusion is not None else enable_thinking,
        "thinking_modes": dict(fusion.modes) if fusion is not None else None,
        "flag_shares": ({"unflagged_share": fusion.unflagged_share, "system_flag_share": fusion.system_flag_share}
                        if fusion is not None else None),
        "tokenizer": tokenizer_name, "vocab_size": tokenizer.vocab_size, "pad_id": tokenizer.pad_token_id,
        "chat_template_sha256": chat_template_hash(),
        "loss": "labels are the next token on assistant tokens only, -100 elsewhere",
        "sources": [dataclasses.asdict(s) for s in specs],
        "counts": {"read": counts["read"], "kept": counts["kept"],
                   "dropped_too_long": counts["dropped_too_long"],
                   "dropped_no_assistant_tokens": counts["dropped_no_assistant_tokens"],
                   "dropped_mode_mismatch": counts["dropped_mode_mismatch"],
                   "rows": counts["rows"], "tokens": counts["tokens"], "assistant_tokens": counts["assistant_tokens"]},
        "per_source": {label: dict(c) for label, c in per_source.items()},
        "categories": dict(categories) if fusion is not None else None,
        "files": files,
    }
    (out / manifest_name(part, parts)).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ----------------------------------------------------------------------------- reading shards
def is_masked_shards(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and any(p.glob("manifest*.json"))


def read_manifests(path: str | Path) -> list[dict]:
    """Every part's manifest under `path`, checked: same format, sequence length, tokenizer and template, all parts."""
    p = Path(path)
    found = sorted(p.glob("manifest*.json")) if p.is_dir() else []
    if not found:
        raise DataError(f"{path}: no SFT shards here (no manifest.json); write them with "
                        "`python -m qwen3repro.nanotron.sft_data --stage <stage> --model <model>`")
    manifests = []
    for f in found:
        try:
            m = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{f}: corrupt manifest ({e})") from None
        if m.get("format") != FORMAT:
            raise DataError(f"{f}: format {m.get('format')!r}, expected {FORMAT!r}")
        manifests.append(m)
    check_parts_agree(path, manifests, ("seq_len", "tokenizer", "chat_template_sha256", "parts", "enable_thinking",
                                        "thinking_modes"), count_key="parts", index_key="part", noun="parts")
    return manifests


def check_parts_agree(path, manifests: Sequence[Mapping[str, Any]], keys: Sequence[str], *, count_key: str,
                      index_key: str, noun: str) -> None:
    """The manifests of a shard folder written in parts (SFT `--part`, pretraining `--worker-index`) must agree
    on every setting in `keys` and number exactly 0 .. n-1 (`count_key` says n, `index_key` each one's number)."""
    for key in keys:
        values = {json.dumps(m.get(key), sort_keys=True) for m in manifests}
        if len(values) > 1:
            raise DataError(f"{path}: {noun} disagree on {key}: {sorted(values)}")
    n = manifests[0][count_key]
    have = sorted(m[index_key] for m in manifests)
    if have != list(range(n)):
        raise DataError(f"{path}: written in {n} {noun} but found {noun} {have}")


class MaskedShardLoader:
    """Micro-batches of packed rows for one data-parallel rank; re-iterable, a new seeded order each epoch.

    Every epoch uses the same number of rows on every rank (the row count rounded down to a multiple of
    dp_size × micro_batch_size), so ranks never wait on each other at an epoch's end."""

    def __init__(self, path: str | Path, *, seq_len: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, vocab_size: int | None = None) -> None:
        manifests = read_manifests(path)
        if manifests[0]["seq_len"] != seq_len:
            raise DataError(f"{path}: shards were packed to {manifests[0]['seq_len']} tokens, the stage trains at "
                            f"{seq_len}; rewrite them for this stage")
        if vocab_size is not None and manifests[0]["vocab_size"] > vocab_size:
            raise DataError(f"{path}: tokenizer has {manifests[0]['vocab_size']} ids, the model only {vocab_size}")
        files = [str(Path(path) / f["file"]) for m in manifests for f in m["files"]]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise DataError(f"{path}: shard files listed in the manifest are missing: {missing[:3]}")
        self.manifests = manifests
        self.ds = datasets.Dataset.from_parquet(files).with_format("numpy")
        self.micro_batch_size, self.dp_rank, self.dp_size, self.seed = micro_batch_size, dp_rank, dp_size, seed
        per_epoch = len(self.ds) // (dp_size * micro_batch_size) * micro_batch_size  # rows per rank
        if per_epoch == 0:
            raise DataError(f"{path}: {len(self.ds)} rows cannot fill one micro-batch of {micro_batch_size} "
                            f"on each of {dp_size} data-parallel ranks")
        self.rows_per_rank = per_epoch
        self.epoch = 0

    def rows(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.ds))
        return order[self.dp_rank::self.dp_size][: self.rows_per_rank]

    def __len__(self) -> int:
        return self.rows_per_rank // self.micro_batch_size

    def __iter__(self):
        rows = self.rows(self.epoch)
        self.epoch += 1
        for a in range(0, len(rows), self.micro_batch_size):
            picked = self.ds[np.sort(rows[a:a + self.micro_batch_size]).tolist()]
            yield {k: torch.as_tensor(np.stack(picked[k])).long() for k in COLUMNS}


# ----------------------------------------------------------------------------- command line
def fusion_flags(spec) -> FusionFlags | None:
    """The fusion stage's flags (its sources' modes from full/stages.toml, the shares from its recipe); None for
    the other SFT stages, whose conversations are used as they are."""
    if spec.facts.recipe_kind != "fusion":
        return None
    modes = spec.settings.get("data", {}).get(spec.stage, {}).get("thinking_modes")
    if not modes:
        raise DataError(f"full/stages.toml [data.{spec.stage}] needs thinking_modes (source name -> \"think\" or "
                        "\"no_think\"): fusion flags every conversation by its source's mode")
    recipe = spec.facts.recipe
    return FusionFlags(dict(modes), unflagged_share=float(recipe.get("unflagged_share", FusionConfig.unflagged_share)),
                       system_flag_share=float(recipe.get("system_flag_share", FusionConfig.system_flag_share)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a full-scale SFT / distillation stage's masked shards.")
    parser.add_argument("--stage", required=True, help="cold-start | fusion | distill")
    parser.add_argument("--model", required=True, help="the real model the stage trains (its tokenizer is used)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/full/<model>/<stage>/sft-shards)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the model's)")
    parser.add_argument("--rows-per-shard", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="stop after this many conversations")
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--parts", type=int, default=1)
    args = parser.parse_args(argv)

    spec = build_stage_spec(args.stage, args.model)
    if not spec.is_sft:
        parser.error(f"stage {args.stage} is pretraining: it reads token shards, not conversations")
    name = args.tokenizer or spec.tokenizer
    manifest = write_sft_shards(spec.data["sources"], Tokenizer.load(name), args.out or spec.shards_path,
                                seq_len=spec.seq_len, rows_per_shard=args.rows_per_shard, limit=args.limit,
                                part=args.part, parts=args.parts, tokenizer_name=name, stage=args.stage,
                                fusion=fusion_flags(spec))
    print(json.dumps(manifest["counts"]))


if __name__ == "__main__":
    main()
