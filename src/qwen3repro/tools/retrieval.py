"""Okapi BM25 over a small list of passages, in the standard library, for the `search` tool.

The corpus is a few hundred short passages (`builtin.world_corpus`), so a plain inverted index in
dicts is instant and keeps the tool free of dependencies. Terms are lower-cased runs of letters and
digits. Scores use the BM25 formula with Lucene's non-negative idf, log(1 + (N - n + 0.5) / (n + 0.5)),
so a term found in most passages still counts a little and never subtracts.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

__all__ = ["BM25_B", "BM25_K1", "Bm25Index", "terms"]

# The usual BM25 settings (Robertson & Zaragoza, "The Probabilistic Relevance Framework: BM25 and
# Beyond", 2009): k1 in [1.2, 2.0] saturates repeated terms, b = 0.75 normalises for length.
BM25_K1 = 1.5
BM25_B = 0.75

_TERM = re.compile(r"[^\W_]+")


def terms(text: str) -> list[str]:
    """The lower-cased letter/digit runs of `text`."""
    return _TERM.findall(text.lower())


class Bm25Index:
    """`search(query, k)` returns the indices of the k best passages (ties: the earlier passage)."""

    def __init__(self, passages: Sequence[str], k1: float = BM25_K1, b: float = BM25_B) -> None:
        self.passages = list(passages)
        self.k1, self.b = k1, b
        self._counts = [Counter(terms(p)) for p in self.passages]
        self._lengths = [sum(c.values()) for c in self._counts]
        self._average = (sum(self._lengths) / len(self._lengths)) if self._lengths else 0.0
        frequency: Counter = Counter()
        for counts in self._counts:
            frequency.update(counts.keys())
        n = len(self.passages)
        self._idf = {term: math.log(1 + (n - df + 0.5) / (df + 0.5)) for term, df in frequency.items()}
        self._postings: dict[str, list[int]] = {}
        for index, counts in enumerate(self._counts):
            for term in counts:
                self._postings.setdefault(term, []).append(index)

    def scores(self, query: str) -> dict[int, float]:
        """BM25 score of every passage sharing a term with `query` (the others score 0)."""
        out: dict[int, float] = {}
        for term in set(terms(query)):
            idf = self._idf.get(term)
            if idf is None:
                continue
            for index in self._postings[term]:
                tf = self._counts[index][term]
                norm = self.k1 * (1 - self.b + self.b * self._lengths[index] / self._average)
                out[index] = out.get(index, 0.0) + idf * tf * (self.k1 + 1) / (tf + norm)
        return out

    def search(self, query: str, k: int = 3) -> list[int]:
        scores = self.scores(query)
        return sorted(scores, key=lambda index: (-scores[index], index))[:k]
