"""The training data: S1 documents split by kind (the routing domains), packed per kind, and
optimizer steps of domain-pure micro-batches whose kinds follow the corpus mixture."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ...config import ConfigError
from ...data.packing import PackingLoader
from ...data.synthetic import build_corpus
from ...tokenizer import Tokenizer
from .settings import MoEExperimentSettings


def training_domains(s: MoEExperimentSettings, tokenizer: Tokenizer, cache_dir: Path) -> tuple[list[str], list[Any], list[float]]:
    """The training documents split by kind: (kinds, tokenised documents per kind, token share per kind)."""
    ds = build_corpus(s.corpus, seed=s.seed, n_docs=s.n_docs, offset=0, seq_len=s.seq_len, cache_dir=cache_dir)
    kinds = list(ds["kind"])
    backend = tokenizer.backend
    encoded = [enc.ids for enc in backend.encode_batch(list(ds["text"]), add_special_tokens=False)]
    names = sorted(set(kinds))
    per_kind = [[np.asarray(ids, dtype=np.int64) for ids, kd in zip(encoded, kinds) if kd == name] for name in names]
    tokens = np.array([sum(len(x) + 1 for x in docs) for docs in per_kind], dtype=np.float64)
    keep = [i for i, t in enumerate(tokens) if t >= s.seq_len * s.micro_batch_size + 1]
    names = [names[i] for i in keep]
    per_kind = [per_kind[i] for i in keep]
    tokens = tokens[keep]
    return names, per_kind, (tokens / tokens.sum()).tolist()


class DomainBatchLoader:
    """Optimizer-step batches of `micro_batches_per_step` domain-pure micro-batches.

    `domain_docs[d]` is the tokenised documents of domain d (anything `PackingLoader` takes). Each
    domain is packed by its own seeded `PackingLoader` (looping over its documents). Step t draws
    its micro-batches' domains by systematic sampling with weights `shares` (rng seeded by
    (seed, t)): each domain gets floor or ceil of M·share micro-batches, in a shuffled order.

    Yields {"input_ids", "labels": [M·b, L], "domain": [M]}: micro-batch j is rows j·b..(j+1)·b.
    Re-iterable and deterministic: every `iter()` starts from step 0 and yields `steps` batches.
    """

    def __init__(self, domain_docs: Sequence[Any], shares: Sequence[float], *, seq_len: int, micro_batch_size: int,
                 micro_batches_per_step: int, steps: int, eot_id: int, pad_id: int | None, seed: int) -> None:
        if len(domain_docs) != len(shares) or not domain_docs:
            raise ValueError("one share per domain, and at least one domain")
        shares = np.asarray(shares, dtype=np.float64)
        if (shares < 0).any() or shares.sum() <= 0:
            raise ValueError(f"domain shares must be >= 0 with a positive sum, got {shares.tolist()}")
        self.shares = shares / shares.sum()
        self.domain_docs = list(domain_docs)
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)
        self.micro_batches_per_step, self.steps = int(micro_batches_per_step), int(steps)
        self.eot_id, self.pad_id, self.seed = eot_id, pad_id, int(seed)

    def step_domains(self, step: int) -> np.ndarray:
        """The domains of step `step`'s micro-batches (systematic sampling by share)."""
        rng = np.random.default_rng([self.seed, step])
        m = self.micro_batches_per_step
        points = (np.arange(m) + rng.random()) / m
        cum = np.cumsum(self.shares)
        cum[-1] = 1.0
        return rng.permutation(np.searchsorted(cum, points, side="right"))

    def _stream(self, d: int) -> Iterator[dict[str, torch.Tensor]]:
        loader = PackingLoader(self.domain_docs[d], seq_len=self.seq_len, batch_size=self.micro_batch_size,
                               eot_id=self.eot_id, pad_id=self.pad_id, seed=self.seed * 1000 + d, drop_last=True)
        if loader.batches_per_epoch(0) < 1:
            raise ConfigError(f"domain {d}: fewer tokens than one micro-batch ({self.micro_batch_size} x {self.seq_len})")
        while True:
            yield from loader

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        streams: dict[int, Iterator[dict[str, torch.Tensor]]] = {}
        for step in range(self.steps):
            doms = self.step_domains(step)
            parts = []
            for d in doms:
                if int(d) not in streams:
                    streams[int(d)] = self._stream(int(d))
                parts.append(next(streams[int(d)]))
            yield {"input_ids": torch.cat([p["input_ids"] for p in parts]),
                   "labels": torch.cat([p["labels"] for p in parts]),
                   "domain": torch.as_tensor(doms, dtype=torch.long)}


__all__ = ["DomainBatchLoader", "training_domains"]
