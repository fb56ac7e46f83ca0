"""Greedy decoding of retrieval answers, in batches that need no padding mask where DCA runs."""
from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from ...generate import GREEDY, generate

PUNCTUATION = ".,:;!?"


def first_word_complete(text: str) -> bool:
    """True once the completion's first word is followed by a space or ends in punctuation."""
    t = text.lstrip()
    return bool(t) and (any(c.isspace() for c in t) or t[-1] in PUNCTUATION)


def greedy_decode(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    pad_id: int = 0,
    stop: Callable[[list[int]], bool] | None = None,
) -> list[list[int]]:
    """Greedy continuation of a batch of prompts through the shared engine (`qwen3repro.generate`).

    Prompts of equal length are decoded without a padding mask (the only form DCA accepts), which
    the engine does by itself; different lengths are left-padded. Each row is cut just after the
    first point where `stop(generated_ids)` holds.
    """
    outs = generate(model, prompts, GREEDY, max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    generated = []
    for out in outs:
        ids = list(out.token_ids)
        if stop is not None:
            for n in range(1, len(ids) + 1):
                if stop(ids[:n]):
                    ids = ids[:n]
                    break
        generated.append(ids)
    return generated


def batches(prompts: Sequence[Sequence[int]], max_tokens: int, equal_lengths: bool) -> list[list[int]]:
    """Indices of items per batch: by prompt length, at most `max_tokens` (padded) prompt tokens each;
    with `equal_lengths` (DCA: no padding) only prompts of the same token count share a batch."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    out: list[list[int]] = []
    current: list[int] = []
    for i in order:
        n = len(prompts[i])
        fits = current and (len(current) + 1) * n <= max_tokens  # sorted: n is the batch's longest
        same = current and len(prompts[current[0]]) == n
        if current and not (fits and (same or not equal_lengths)):
            out.append(current)
            current = []
        current.append(i)
    if current:
        out.append(current)
    return out


__all__ = ["PUNCTUATION", "batches", "first_word_complete", "greedy_decode"]
