"""Loss by position: where a condition's language modelling breaks down beyond the trained length.

Mean next-token NLL per bucket of positions over held-out S3-style documents (a pass key planted
in single-language prose, text up to and including the answer).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ...devices import model_device
from ...progress import Progress
from ...tokenizer import Tokenizer
from .models import (
    ConditionModels, ModelSource, config_record, flops_progress, forward_flops, load_tokenizer, model_source,
    report_progress, stderr_log,
)
from .retrieval import build_items
from .settings import LongContextSettings


def loss_documents(tokenizer: Tokenizer, length: int, n_docs: int, seed: int, world_seed: int) -> list[list[int]]:
    """Held-out S3-style documents of about `length` tokens (pass key in single-language prose, with
    the answer), as token ids."""
    items = build_items(tokenizer, "passkey", (length,), n_docs, None, seed, world_seed)
    return [tokenizer.encode(f"{it['prompt']} {it['target']}.") for it in items]


def bucket_mean_nll(nll_per_document: Sequence[torch.Tensor], bucket: int) -> tuple[list[float | None], list[int]]:
    """(mean, count) per bucket of `bucket` positions, over documents' per-token NLLs, where the
    NLL at index i is that of the token at position i + 1 (position 0 is never predicted)."""
    n_buckets = -(-max(len(nll) + 1 for nll in nll_per_document) // bucket)
    total = torch.zeros(n_buckets, dtype=torch.float64)
    count = torch.zeros(n_buckets, dtype=torch.long)
    for nll in nll_per_document:
        which = torch.arange(1, len(nll) + 1) // bucket
        total.index_add_(0, which, nll.double())
        count.index_add_(0, which, torch.ones_like(which))
    return [float(t / c) if c else None for t, c in zip(total.tolist(), count.tolist())], count.tolist()


@torch.inference_mode()
def loss_by_position(
    model: str | os.PathLike | ModelSource,
    tokenizer: Tokenizer | str | os.PathLike,
    condition: str,
    *,
    settings: LongContextSettings,
    length: int | None = None,
    documents: Sequence[Sequence[int]] | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = stderr_log,
) -> dict[str, Any]:
    """Mean next-token NLL (nats) per bucket of `settings.loss_bucket` positions on held-out documents.

    The condition's configuration is the one for inputs of nominal `length` (default: the
    settings' loss length; with `yarn_only_beyond_trained`, a document longer than the trained
    length is scored with YaRN at every position, as static YaRN would run it). Position p is the
    position of the predicted token. `documents` may pass token ids (else `settings` builds them).
    """
    tok = load_tokenizer(tokenizer)
    source = model_source(model)
    length = length or settings.loss_tokens
    if documents is None:
        documents = loss_documents(tok, length, settings.loss_docs, settings.seed, settings.world_seed)
    model_at, config = ConditionModels(source, condition, settings).get(length)
    if progress is None:
        progress = flops_progress(sum(forward_flops(source.config, len(d)) for d in documents))
    t0 = time.perf_counter()
    nlls = []
    device = model_device(model_at)
    for k, doc in enumerate(documents):
        ids = torch.as_tensor(list(doc), dtype=torch.long, device=device)[None]
        logits = model_at(ids).logits[0, :-1].float()
        # Per-token NLLs back on the CPU, where `bucket_mean_nll` sums them (a no-op for a CPU model).
        nlls.append(F.cross_entropy(logits, ids[0, 1:], reduction="none").cpu())
        progress.advance(forward_flops(source.config, len(doc)))
        report_progress(progress, log, f"{condition} loss L={length} ({k + 1}/{len(documents)})",
                        force=k + 1 == len(documents))
    bucket = settings.loss_bucket
    mean, count = bucket_mean_nll(nlls, bucket)
    return {
        "condition": condition,
        "length": length,
        "n_docs": len(documents),
        "bucket_size": bucket,
        "bucket_start": [b * bucket for b in range(len(mean))],
        "mean_nll": mean,
        "count": count,
        "model_config": config_record(config),
        "seconds": round(time.perf_counter() - t0, 2),
    }


__all__ = ["bucket_mean_nll", "loss_by_position", "loss_documents"]
