"""Retrieval by (length, needle depth): held-out pass-key items, greedy answers, exact match.

Variant "passkey" plants one needle; "order" plants two and asks for the first or the last (the
share that returned the other needle's value, the distractor, is counted separately). Items of one
length are batched; the model each length runs is the condition's configuration for that length.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, Sequence

from ...config import ConfigError
from ...data import synthetic
from ...progress import Progress
from ...tokenizer import Tokenizer
from .decoding import PUNCTUATION, batches, first_word_complete, greedy_decode
from .models import (
    ConditionModels, ModelSource, config_record, flops_progress, forward_flops, load_tokenizer, model_source,
    report_progress, stderr_log,
)
from .settings import EXTRA_NEW_TOKENS, VARIANTS, LongContextSettings


def build_items(
    tokenizer: Tokenizer, variant: str, lengths: Sequence[int], n_per_length: int,
    depths: Sequence[float] | None, seed: int, world_seed: int,
) -> list[dict]:
    """Held-out retrieval items counted with the evaluated tokenizer (prompt + answer <= length)."""
    return synthetic.passkey_eval_items(
        variant=variant, lengths=tuple(lengths), n_per_length=n_per_length, depths=tuple(depths) if depths else None,
        seed=seed, count_tokens=lambda text: len(tokenizer.encode(text)), world_seed=world_seed,
    )


def settings_items(tokenizer: Tokenizer, variant: str, settings: LongContextSettings) -> list[dict]:
    """The retrieval items `settings` evaluates for one variant."""
    return build_items(tokenizer, variant, settings.eval_lengths, settings.n_per_length, settings.depths,
                       settings.seed, settings.world_seed)


def depth_bin_edges(n_bins: int) -> list[float]:
    return [i / n_bins for i in range(n_bins + 1)]


def depth_bin(depth: float, n_bins: int) -> int:
    """The equal-width bin of [0, 1] a needle depth falls in (depth 1 in the last bin)."""
    return min(int(depth * n_bins), n_bins - 1)


def retrieval_grid(
    model: str | os.PathLike | ModelSource,
    tokenizer: Tokenizer | str | os.PathLike,
    condition: str,
    *,
    settings: LongContextSettings,
    variant: str = "passkey",
    items: Sequence[Mapping[str, Any]] | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = stderr_log,
) -> dict[str, Any]:
    """Greedy retrieval accuracy of `condition` per (length, depth bin).

    `model` is a checkpoint directory (for S2, the S2 checkpoint; otherwise S3) or a `ModelSource`.
    `items` may pass pre-built items (then they define lengths and depths; else `settings` does).
    Returns lengths, depth-bin edges, `accuracy[length][bin]` (None for an empty cell), counts,
    accuracy per length, for "order" the share that returned the distractor, the configuration used
    at each length, and one record per item.
    """
    tok = load_tokenizer(tokenizer)
    source = model_source(model)
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    if items is None:
        items = settings_items(tok, variant, settings)
    lengths = sorted({int(it["length"]) for it in items})
    models = ConditionModels(source, condition, settings)
    prompts = [tok.encode(it["prompt"]) for it in items]
    answer_tokens = [len(tok.encode(f" {it['target']}.")) for it in items]
    if progress is None:
        progress = flops_progress(sum(forward_flops(source.config, len(p)) for p in prompts))

    def stop(ids: list[int]) -> bool:
        return first_word_complete(tok.decode(ids, skip_special_tokens=True)) or tok.pad_token_id in ids

    records: list[dict | None] = [None] * len(items)
    configs: dict[str, Any] = {}
    t0 = time.perf_counter()
    for length in lengths:
        idx = [i for i, it in enumerate(items) if int(it["length"]) == length]
        model_at, config = models.get(length)
        configs[str(length)] = config_record(config)
        local = [prompts[i] for i in idx]
        for batch in batches(local, settings.max_batch_tokens, config.dual_chunk_attention_config is not None):
            rows = [idx[j] for j in batch]
            max_new = max(answer_tokens[i] for i in rows) + EXTRA_NEW_TOKENS
            outs = greedy_decode(model_at, [prompts[i] for i in rows], max_new, pad_id=tok.pad_token_id, stop=stop)
            for i, out in zip(rows, outs):
                records[i] = score_item(items[i], tok.decode(out, skip_special_tokens=True), len(prompts[i]))
            done = sum(1 for i in idx if records[i] is not None)
            progress.advance(sum(forward_flops(source.config, len(prompts[i])) for i in rows))
            report_progress(progress, log, f"{condition} {variant} L={length} ({done}/{len(idx)})",
                            force=done == len(idx))
    return tabulate(condition, variant, lengths, settings.depth_bins, records, configs, time.perf_counter() - t0)


def score_item(item: Mapping[str, Any], completion: str, prompt_tokens: int) -> dict[str, Any]:
    """One item's record: exact match (`synthetic.check_retrieval`) and whether the first word of
    the completion is another planted value (the distractor)."""
    words = completion.strip().split()
    first = words[0].strip(PUNCTUATION) if words else ""
    distractors = [v for v in item["values"] if v != item["target"]]
    return {
        "uid": item["uid"],
        "length": int(item["length"]),
        "depth": float(item["depth"]),
        "measured_depth": float(item["measured_depth"]),
        "which": item.get("which") or "",
        "prompt_tokens": prompt_tokens,
        "target": item["target"],
        "distractor": distractors[0] if distractors else "",
        "completion": completion,
        "correct": synthetic.check_retrieval(item, completion),
        "returned_distractor": bool(first) and first in distractors,
    }


def tabulate(condition: str, variant: str, lengths: Sequence[int], n_bins: int, records: Sequence[Mapping[str, Any]],
             configs: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    """The grid of per-item records: accuracy (and distractor rate) per (length, depth bin) and per length."""
    def cell(rs, key):
        return sum(r[key] for r in rs) / len(rs) if rs else None

    acc, dis, counts = [], [], []
    for length in lengths:
        at = [r for r in records if r["length"] == length]
        bins = [[r for r in at if depth_bin(r["depth"], n_bins) == b] for b in range(n_bins)]
        acc.append([cell(rs, "correct") for rs in bins])
        dis.append([cell(rs, "returned_distractor") for rs in bins])
        counts.append([len(rs) for rs in bins])
    by_length = [[r for r in records if r["length"] == length] for length in lengths]
    grid = {
        "condition": condition,
        "variant": variant,
        "lengths": list(lengths),
        "depth_bin_edges": depth_bin_edges(n_bins),
        "accuracy": acc,
        "n": counts,
        "accuracy_by_length": [cell(rs, "correct") for rs in by_length],
        "n_by_length": [len(rs) for rs in by_length],
        "model_config_by_length": dict(configs),
        "seconds": round(seconds, 2),
        "items": list(records),
    }
    if variant == "order":
        grid["distractor_rate"] = dis
        grid["distractor_rate_by_length"] = [cell(rs, "returned_distractor") for rs in by_length]
    return grid


__all__ = ["build_items", "depth_bin", "depth_bin_edges", "retrieval_grid", "score_item", "settings_items", "tabulate"]
