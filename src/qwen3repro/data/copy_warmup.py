"""Copy warm-up: a short phase of repeated random spans before a tiny model's general pretraining.

Why. Retrieval from context (the passkey needle, restating an operand or an answer in a reasoning
trace) runs on induction heads: attend to the token after an earlier occurrence of the current
token, copy it. Large language models form them early, because real corpora repeat themselves at
every scale (Olsson et al. 2022, "In-context learning and induction heads": a phase change within
the first few billion tokens). A tiny model's 1-2M-token synthetic S1 does not get there: the tiny
S3 flagship copies nothing (a repeated held-out span costs 2.21 nats/token the second time vs 2.23
the first, `evals.copying`), so every claim that reads from the context fails. This phase gives S1
copy data first; it is a tiny-scale stand-in for what scale provides, off at full scale.

What it costs (tiny flagship, lr 1e-3, 200 warm-up steps of LR): the loss sits at ln V for a
while, then falls to the copy floor within ~250 steps (the induction phase change). With 8 rows
of 256 tokens the fall came at ~1,100-1,500 steps; with 32 rows of 64 tokens and spans of 16-31,
at ~650-900; 16 rows of 64 had not fallen by 1,500. The span length must vary: rows whose second
half repeats the first at a fixed offset "fall" within ~250 steps, but by a positional head that
copies from a fixed distance, not by induction (with offsets of 8-32 the loss stayed flat).

Rows. Each row of `seq_len` inputs (+1 for the labels; the stage's `copy_warmup_seq_len`) is filled with repeated-span documents:
a span of `span` random ordinary tokens (span uniform in `span_range`), the same span again, then
`<|endoftext|>`, and the next document, until the row is full (the last one is cut). A span is
unpredictable the first time and fully predictable the second time only by copying from the
context, so the loss rewards nothing but induction. The batches have the packing loader's format
(`input_ids`, `labels`, `segment_ids`, `position_ids`), without document masking.

Order. Warm-up batch k is a function of (seed, k) only, so the cursor resumes exactly;
`CopyWarmupLoader` hands out its `steps` warm-up batches, then the wrapped loader's epochs.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from .packing import DataError

# Span lengths (tokens) of the repeated documents: short enough that several fit into one 256-token
# S1 row, long enough that a span is never predictable from its first tokens' bigram statistics.
DEFAULT_SPAN_RANGE = (8, 48)


def copy_row(rng: np.random.Generator, seq_len: int, n_ordinary: int, eot_id: int,
             span_range: tuple[int, int] = DEFAULT_SPAN_RANGE) -> tuple[np.ndarray, np.ndarray]:
    """One row of `seq_len + 1` tokens and each token's document ordinal (see the module doc)."""
    lo, hi = span_range
    tokens: list[np.ndarray] = []
    segments: list[np.ndarray] = []
    total, doc = 0, 0
    while total < seq_len + 1:
        span = rng.integers(0, n_ordinary, size=int(rng.integers(lo, hi + 1)))
        piece = np.concatenate([span, span, [eot_id]])
        tokens.append(piece)
        segments.append(np.full(piece.size, doc))
        total += piece.size
        doc += 1
    return np.concatenate(tokens)[: seq_len + 1], np.concatenate(segments)[: seq_len + 1]


def copy_batch(seed: int, index: int, *, batch_size: int, seq_len: int, n_ordinary: int, eot_id: int,
               span_range: tuple[int, int] = DEFAULT_SPAN_RANGE) -> dict[str, torch.Tensor]:
    """Warm-up batch `index` (a function of `seed` and `index` only)."""
    rng = np.random.default_rng([seed, index])
    rows = [copy_row(rng, seq_len, n_ordinary, eot_id, span_range) for _ in range(batch_size)]
    toks = np.stack([r[0] for r in rows])
    segs = np.stack([r[1] for r in rows])
    return {
        "input_ids": torch.from_numpy(toks[:, :-1].astype(np.int64)),
        "labels": torch.from_numpy(toks[:, 1:].astype(np.int64)),
        "segment_ids": torch.from_numpy(segs[:, :-1].astype(np.int64)),
        "position_ids": torch.arange(seq_len, dtype=torch.int64).expand(batch_size, seq_len).clone(),
    }


class CopyWarmupLoader:
    """`steps` copy warm-up batches, then the epochs of `inner` (a resumable loader)."""

    def __init__(self, inner: Any, *, steps: int, batch_size: int, seq_len: int, n_ordinary: int, eot_id: int,
                 seed: int = 0, span_range: tuple[int, int] = DEFAULT_SPAN_RANGE) -> None:
        lo, hi = span_range
        if steps < 0:
            raise ValueError(f"copy warm-up steps must be >= 0, got {steps}")
        if not 1 <= lo <= hi:
            raise ValueError(f"copy warm-up span_range must satisfy 1 <= lo <= hi, got {span_range}")
        if n_ordinary < 2:
            raise ValueError(f"copy warm-up needs at least 2 ordinary tokens, got {n_ordinary}")
        self.inner = inner
        self.steps = int(steps)
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.n_ordinary, self.eot_id = int(n_ordinary), int(eot_id)
        self.seed = int(seed)
        self.span_range = (int(lo), int(hi))
        self.done = 0  # warm-up batches handed out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.done < self.steps:
            batch = copy_batch(self.seed, self.done, batch_size=self.batch_size, seq_len=self.seq_len,
                               n_ordinary=self.n_ordinary, eot_id=self.eot_id, span_range=self.span_range)
            self.done += 1
            yield batch
        yield from self.inner

    def state_dict(self) -> dict[str, Any]:
        return {"copy_warmup": {"done": self.done, "steps": self.steps, "seed": self.seed,
                                "span_range": list(self.span_range), "n_ordinary": self.n_ordinary,
                                "batch_size": self.batch_size, "seq_len": self.seq_len},
                "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = state.get("copy_warmup")
        if mine is None:
            raise DataError("loader cursor has no copy warm-up state: it was written by a run without the warm-up")
        for key, now in (("steps", self.steps), ("seed", self.seed), ("span_range", list(self.span_range)),
                         ("n_ordinary", self.n_ordinary), ("batch_size", self.batch_size), ("seq_len", self.seq_len)):
            if mine.get(key) != now:
                raise DataError(f"loader cursor was written with copy warm-up {key}={mine.get(key)!r}, this run has {now!r}")
        self.done = int(mine["done"])
        self.inner.load_state_dict(state["inner"])


__all__ = ["CopyWarmupLoader", "DEFAULT_SPAN_RANGE", "copy_batch", "copy_row"]
