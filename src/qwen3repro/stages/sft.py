"""Supervised fine-tuning on chats: the stage shared by the long-CoT cold start (Qwen3 report
§4.1), thinking-mode fusion (§4.3) and off-policy strong-to-weak distillation (§4.5).

Input: conversations (lists of messages) from a JSONL file ({"messages": [...]} per line: `run`, the
`sft` kind of stage), or handed to `fine_tune` by a stage that builds its own data first (the cold
start, thinking-mode fusion). Each conversation is rendered with the Qwen3 chat template and tokenised by `chat.tokenize_conversation`, whose mask is 1
exactly on what the assistant produces; the loss is next-token cross-entropy on those tokens only
(labels of every other position are -100), averaged over assistant tokens across the whole
optimizer step (`num_tokens` weighting of `train.loop`).

Batching: ``pad`` puts `batch_size` conversations in a batch padded to the longest one (right
padding; causal attention never looks at the pads), ``pack`` concatenates conversations into rows
of `seq_len` tokens with `segment_ids` and restarting `position_ids`, so attention stays inside
each conversation and no compute goes to padding. A conversation longer than `seq_len + 1` tokens
is dropped and counted, never truncated (truncation would cut off the answer it is trained on).

`n_eval` conversations are held out before training; their assistant-token loss is the stage's
eval metric. `fine_tune` resumes a cut run (`train.loop`) and writes the model, tokenizer and
`eval.json`; the stage that called it writes `lineage.json` last, with its own config and the hash
of the training data.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterator, Mapping, Sequence

import torch

from ..chat import tokenize_conversation
from ..config import ConfigError
from ..config_fields import NonNegative, Positive, TableOf, checked_fields
from ..data.packing import IGNORE_INDEX
from ..coldstart.pipeline import read_jsonl
from ..lineage import make_lineage, write_lineage
from ..losses import masked_cross_entropy
from ..models.qwen3 import Qwen3
from ..tokenizer import Tokenizer
from ..train.loop import TrainConfig, TrainTable, train
from ..files import write_json_atomic
from .common import StageContext, copy_tokenizer

BATCHING = ("pad", "pack")


@dataclass(frozen=True)
class SFTConfig:
    name: str
    """Stage name (the output directory's name)."""
    data: str
    """The JSONL file of conversations (a stage that builds its data names the file it wrote)."""
    seq_len: Positive
    """Longest conversation in tokens (longer ones are dropped and counted) and the packed row length."""
    batch_size: Positive
    """Conversations per micro-batch ('pad') or rows of seq_len tokens per micro-batch ('pack')."""
    steps: Positive | None = None
    """Optimizer steps; give this or `epochs`."""
    epochs: float | None = None
    """Passes over the training conversations (steps = ceil(epochs · batches per epoch / grad_accum))."""
    batching: str = "pad"
    """'pad' (pad to the longest in the batch) or 'pack' (rows of seq_len with segment ids)."""
    n_eval: NonNegative = 32
    """Conversations held out for the eval loss (0: none)."""
    enable_thinking: bool = True
    """Passed to the chat template (only matters for a final assistant turn without reasoning)."""
    seed: int = 0
    train: TrainTable = field(default_factory=dict)
    """TrainConfig fields except `steps`."""
    description: str = ""

    def __post_init__(self) -> None:
        if self.batching not in BATCHING:
            raise ConfigError(f"sft.batching must be one of {BATCHING}, got {self.batching!r}")
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError("sft: give exactly one of `steps` and `epochs`")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"sft.epochs must be > 0, got {self.epochs!r}")
        for name in ("seq_len", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"sft.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.n_eval, int) or self.n_eval < 0:
            raise ConfigError(f"sft.n_eval must be an integer >= 0, got {self.n_eval!r}")
        if "steps" in self.train:
            raise ConfigError("sft: set `steps` (or `epochs`) at the stage level, not in train")
        TrainConfig.from_dict({**self.train, "steps": 1})  # validate now, naming unknown keys

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "SFTConfig") -> "SFTConfig":
        return cls(**checked_fields(cls, d, where))

    @classmethod
    def for_stage(cls, name: str, table: Mapping[str, Any], *, data: str, seed: int) -> "SFTConfig":
        """The training config of a stage that builds its own data first: its `[sft]` table, with the
        stage's name, its data file and (unless the table sets one) its seed."""
        table = dict(table)
        for key in ("name", "data"):
            if key in table:
                raise ConfigError(f"{name}: set `{key}` of the stage itself, not in its sft table")
        return cls.from_dict({**table, "name": name, "data": data, "seed": table.get("seed", seed)}, where=f"{name}.sft")

    def train_config(self, batches_per_epoch: int) -> TrainConfig:
        accum = int(self.train.get("grad_accum", 1))
        steps = self.steps if self.steps is not None else max(1, math.ceil(self.epochs * batches_per_epoch / accum))
        return TrainConfig.from_dict({**self.train, "steps": steps, "seed": self.train.get("seed", self.seed)})


SFTTable = Annotated[Mapping[str, Any], TableOf(SFTConfig, supplied=("name", "data"))]
"""The annotation of the `sft` table of a stage that builds its own data first: SFTConfig's fields, checked
when the stage's settings are read; the stage supplies its name and data file."""


# ----------------------------------------------------------------------------- examples
@dataclass(frozen=True)
class Example:
    """One tokenised conversation as (inputs, labels): labels[t] is the target of inputs[t], or -100."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def make_example(ids: Sequence[int], mask: Sequence[int]) -> Example:
    """Shift the rendered ids by one: the target of position t is token t+1, counted when the
    chat mask marks token t+1 as produced by the assistant."""
    return Example(tuple(ids[:-1]), tuple(int(t) if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])))


DROP_TOO_LONG, DROP_NO_ASSISTANT = "too_long", "no_assistant_tokens"


def tokenize_example(tokenizer: Tokenizer, messages: Sequence[Mapping], seq_len: int,
                     enable_thinking: bool = True) -> tuple[Example | None, str | None]:
    """(example, None), or (None, why it is dropped): DROP_TOO_LONG when the rendered chat is longer
    than seq_len + 1 tokens, DROP_NO_ASSISTANT when no token after the first is the assistant's."""
    ids, mask = tokenize_conversation(tokenizer, messages, enable_thinking=enable_thinking)
    if len(ids) > seq_len + 1:
        return None, DROP_TOO_LONG
    if not any(mask[1:]):
        return None, DROP_NO_ASSISTANT
    return make_example(ids, mask), None


def tokenize_conversations(tokenizer: Tokenizer, conversations: Sequence[Sequence[Mapping]], seq_len: int,
                           enable_thinking: bool = True) -> tuple[list[Example], int]:
    """(examples, number dropped for being longer than seq_len + 1 tokens or training nothing)."""
    out, dropped = [], 0
    for messages in conversations:
        example, _ = tokenize_example(tokenizer, messages, seq_len, enable_thinking)
        if example is None:
            dropped += 1
            continue
        out.append(example)
    return out, dropped


class SFTLoader:
    """Re-iterable batches of examples, reshuffled each epoch (a function of seed and epoch), with a
    checkpointable cursor (`state_dict`) so a resumed run sees exactly the batches it would have."""

    def __init__(self, examples: Sequence[Example], *, batch_size: int, seq_len: int, pad_id: int, seed: int = 0,
                 batching: str = "pad") -> None:
        if not examples:
            raise ValueError("no training conversations (all dropped or none given)")
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}")
        self.examples, self.batch_size, self.seq_len = list(examples), batch_size, seq_len
        self.pad_id, self.seed, self.batching = pad_id, seed, batching
        self.epoch = self.batch = 0
        self._layout: tuple[int, list[list[list[int]]]] | None = None

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(f"sft|{self.seed}|{epoch}").shuffle(order)
        return order

    def _batches(self, epoch: int) -> list[list[list[int]]]:
        """Per batch, per row, the example indices it holds (one per row when padding)."""
        if self._layout is not None and self._layout[0] == epoch:
            return self._layout[1]
        order = self._order(epoch)
        if self.batching == "pad":
            rows = [[i] for i in order]
        else:  # greedy first-fit in shuffled order
            rows, fill = [], []
            for i in order:
                n = len(self.examples[i].input_ids)
                for r, used in enumerate(fill):
                    if used + n <= self.seq_len:
                        rows[r].append(i)
                        fill[r] += n
                        break
                else:
                    rows.append([i])
                    fill.append(n)
        batches = [rows[k:k + self.batch_size] for k in range(0, len(rows), self.batch_size)]
        self._layout = (epoch, batches)
        return batches

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return len(self._batches(epoch))

    def tokens_per_epoch(self, epoch: int = 0) -> int:
        """Token positions the model computes over one epoch's batches (padding included), as `collate` lays
        them out: what a FLOP count of the training multiplies by."""
        total = 0
        for rows in self._batches(epoch):
            width = self.seq_len if self.batching == "pack" else max(
                sum(len(self.examples[i].input_ids) for i in row) for row in rows)
            total += len(rows) * width
        return total

    def collate(self, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        width = self.seq_len if self.batching == "pack" else max(
            sum(len(self.examples[i].input_ids) for i in row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        segments = torch.full((len(rows), width), -1, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for s, i in enumerate(row):
                ex = self.examples[i]
                n = len(ex.input_ids)
                ids[r, at:at + n] = torch.tensor(ex.input_ids)
                labels[r, at:at + n] = torch.tensor(ex.labels)
                segments[r, at:at + n] = s
                positions[r, at:at + n] = torch.arange(n)
                at += n
        batch = {"input_ids": ids, "labels": labels}
        if self.batching == "pack":
            batch.update(segment_ids=segments, position_ids=positions)
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            epoch, b = self.epoch, self.batch
            batches = self._batches(epoch)
            if b >= len(batches):
                self.epoch, self.batch = epoch + 1, 0
                return
            self.batch = b + 1
            yield self.collate(batches[b])

    def _fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha256(json.dumps([e.input_ids for e in self.examples]).encode()).hexdigest()[:16]
        return {"examples": digest, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "batching": self.batching, "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("fingerprint") not in (None, self._fingerprint()):
            raise ValueError("SFT loader cursor was written for other data or settings")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


# ----------------------------------------------------------------------------- loss and eval
def sft_loss(model: Qwen3, batch: Mapping[str, torch.Tensor]):
    """Assistant-token cross-entropy (labels are -100 elsewhere), weighted by assistant tokens."""
    kwargs = {k: batch[k] for k in ("segment_ids", "position_ids") if k in batch}
    logits = model(batch["input_ids"], **kwargs).logits
    labels = batch["labels"]
    return masked_cross_entropy(logits, labels), {"num_tokens": int((labels != IGNORE_INDEX).sum())}


def heldout_loss_fn(examples: Sequence[Example], pad_id: int, batch_size: int = 16):
    """eval_fn: mean assistant-token loss on held-out conversations."""
    loader = SFTLoader(examples, batch_size=batch_size, seq_len=max(len(e.input_ids) for e in examples),
                       pad_id=pad_id, batching="pad")
    batches = [loader.collate(rows) for rows in loader._batches(0)]

    def eval_fn(model: Qwen3) -> dict[str, float]:
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for batch in batches:
            logits = model(batch["input_ids"].to(device)).logits
            labels = batch["labels"].to(device)
            n = int((labels != IGNORE_INDEX).sum())
            total += float(masked_cross_entropy(logits, labels)) * n
            count += n
        return {"heldout_assistant_loss": total / max(count, 1)}

    return eval_fn


# ----------------------------------------------------------------------------- the stage
def conversations_hash(conversations: Sequence[Sequence[Mapping]]) -> str:
    return hashlib.sha256(json.dumps(conversations, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Prepared:
    """Conversations made ready for training: split, tokenised and batched as `fine_tune` trains on them."""

    loader: SFTLoader
    examples: list[Example]
    eval_examples: list[Example]
    dropped: int
    """Conversations dropped as longer than seq_len (training and held-out together)."""
    data_hash: str


def prepare(cfg: SFTConfig, tokenizer: Tokenizer, conversations: Sequence[Sequence[Mapping]]) -> Prepared:
    """Hold out `n_eval` conversations (at most half), tokenise the rest and batch them (`SFTLoader`)."""
    convs = [list(c) for c in conversations]
    data_hash = conversations_hash(convs)
    random.Random(f"sft-split|{cfg.seed}").shuffle(convs)
    n_eval = min(cfg.n_eval, len(convs) // 2)
    eval_examples, dropped_eval = tokenize_conversations(tokenizer, convs[:n_eval], cfg.seq_len, cfg.enable_thinking)
    examples, dropped = tokenize_conversations(tokenizer, convs[n_eval:], cfg.seq_len, cfg.enable_thinking)
    loader = SFTLoader(examples, batch_size=cfg.batch_size, seq_len=cfg.seq_len, pad_id=tokenizer.pad_token_id,
                       seed=cfg.seed, batching=cfg.batching)
    return Prepared(loader, examples, eval_examples, dropped + dropped_eval, data_hash)


def fine_tune(cfg: SFTConfig, parent: Path, ctx: StageContext, conversations: Sequence[Sequence[Mapping]]) -> str:
    """Fine-tune the parent checkpoint on `conversations` into `ctx.out_dir` (model, tokenizer, eval.json);
    resumes a cut run of the same config and data. Returns the conversations' hash for the caller's lineage."""
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if parent is None or not (Path(parent) / "config.json").exists():
        raise ConfigError(f"sft stage {cfg.name}: needs a parent checkpoint with a model, got {parent}")
    tokenizer = Tokenizer.load(parent)
    model = Qwen3.from_pretrained(parent)
    if model.config.max_position_embeddings < cfg.seq_len:
        longer = Qwen3(model.config.replace(max_position_embeddings=cfg.seq_len))
        longer.load_state_dict(model.state_dict())
        model = longer
    data = prepare(cfg, tokenizer, conversations)
    loader, examples, eval_examples, data_hash = data.loader, data.examples, data.eval_examples, data.data_hash
    tcfg = ctx.on_device(cfg.train_config(loader.batches_per_epoch(0)))
    n_assistant = sum(sum(t != IGNORE_INDEX for t in e.labels) for e in examples)
    n_tokens = sum(len(e.input_ids) for e in examples)
    ctx.say(f"{cfg.name}: {len(examples):,} conversations ({data.dropped} dropped as longer than {cfg.seq_len} tokens),"
            f" {n_assistant:,} of {n_tokens:,} tokens trained (assistant), {tcfg.steps} steps x {cfg.batch_size}"
            f" ({cfg.batching}, {loader.batches_per_epoch(0)} batches/epoch), {len(eval_examples)} held out")
    eval_fn = heldout_loss_fn(eval_examples, tokenizer.pad_token_id) if eval_examples else None
    summary = train(model, loader, sft_loss, tcfg, out, resume="auto", eval_fn=eval_fn,
                    eval_every=max(1, tcfg.steps // 4), printer=ctx.printer,
                    run_extra={"stage": cfg.name, "data_hash": data_hash, "seq_len": cfg.seq_len,
                               "batch_size": cfg.batch_size, "batching": cfg.batching})
    copy_tokenizer(parent, out)
    final_eval = {k.removeprefix("eval/"): v for k, v in summary["eval"].items()}
    write_json_atomic(out / "eval.json", {
        "stage": cfg.name, "final_loss": summary["loss"], **final_eval, "n_train": len(examples),
        "n_eval": len(eval_examples), "dropped_too_long": data.dropped,
        "assistant_token_share": n_assistant / max(n_tokens, 1), "tokens_seen": summary["tokens_seen"],
        "elapsed_s": summary["elapsed_s"]})
    return data_hash


def run(cfg: SFTConfig, parent: Path, ctx: StageContext) -> Path:
    """The `sft` stage: fine-tune the parent checkpoint on the conversations of the JSONL file `cfg.data`."""
    path = Path(cfg.data)
    if not path.is_file():
        raise ConfigError(f"sft stage {cfg.name}: data file {path} does not exist")
    data_hash = fine_tune(cfg, parent, ctx, read_jsonl(path))
    write_lineage(ctx.out_dir, make_lineage(cfg.name, cfg, parent, data_hashes={"conversations": data_hash}))
    return Path(ctx.out_dir)


__all__ = ["BATCHING", "DROP_NO_ASSISTANT", "DROP_TOO_LONG", "Example", "Prepared", "SFTConfig", "SFTLoader", "SFTTable",
           "conversations_hash", "fine_tune", "prepare", "heldout_loss_fn", "make_example", "run", "sft_loss", "tokenize_conversations",
           "tokenize_example"]
