"""Document lengths of a long-context corpus: a mix of length ranges, as fractions of the row.

A length mix is a list of rows ``(min_fraction, max_fraction, share)``: `share` of the documents
have between ``min_fraction·seq_len`` and ``max_fraction·seq_len`` tokens (both ends included),
`seq_len` being the training row length of the stage that reads the corpus. Stating lengths as
fractions keeps the report's mix (Qwen3 report §3.2: 75% of S3 documents in [S3/2, S3], 25% in
[S1, S3/2]) at every scale; the recipe states it, the scale states `seq_len`.

Which document gets which range is not drawn at random but scheduled (:func:`mix_rows`), so
every prefix of the corpus holds the shares, not just the whole.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

LengthMix = tuple[tuple[float, float, float], ...]

# Shares must sum to 1 within this (TOML decimals such as 0.1 are not exact in binary).
SHARE_SUM_TOLERANCE = 1e-9


def check_length_mix(mix: Sequence[Sequence[float]]) -> LengthMix:
    """`mix` as a tuple of ``(min_fraction, max_fraction, share)`` rows, or a ValueError naming
    what is wrong: each row three numbers, 0 < min_fraction < max_fraction <= 1, share > 0, and
    the shares summing to 1. An empty mix is returned as is."""
    if not isinstance(mix, (list, tuple)):
        raise ValueError(f"length_mix is a list of [min_fraction, max_fraction, share] rows, got {mix!r}")
    rows = []
    for row in mix:
        if not isinstance(row, (list, tuple)) or len(row) != 3 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in row):
            raise ValueError(f"length_mix rows are [min_fraction, max_fraction, share], got {row!r}")
        lo, hi, share = (float(x) for x in row)
        if not 0 < lo < hi <= 1:
            raise ValueError(f"length_mix row {list(row)}: needs 0 < min_fraction < max_fraction <= 1")
        if share <= 0:
            raise ValueError(f"length_mix row {list(row)}: share must be > 0")
        rows.append((lo, hi, share))
    total = sum(share for *_, share in rows)
    if rows and abs(total - 1) > SHARE_SUM_TOLERANCE:
        raise ValueError(f"length_mix shares must sum to 1, got {total:g} ({[share for *_, share in rows]})")
    return tuple(rows)


def length_ranges(seq_len: int, mix: LengthMix) -> list[tuple[int, int]]:
    """Each row's token range ``[round(min_fraction·seq_len), round(max_fraction·seq_len)]``."""
    ranges = [(round(lo * seq_len), round(hi * seq_len)) for lo, hi, _ in mix]
    for (lo_f, hi_f, _), (lo, hi) in zip(mix, ranges):
        if lo < 1 or lo >= hi:
            raise ValueError(f"length_mix row [{lo_f}, {hi_f}] of seq_len {seq_len} is the empty or zero-length "
                             f"token range [{lo}, {hi}]")
    return ranges


def mix_rows(shares: Sequence[float]) -> Iterator[int]:
    """The mix row of documents 0, 1, 2, ...: document n-1 goes to the first row k (in the mix's
    order, the last excepted) that holds fewer than ``floor(n·shares[k])`` of the first n
    documents, else to the last row.

    The first row therefore holds exactly ``floor(n·share)`` of every n-document prefix; the others
    lag their share by at most a document per row ahead of them. With shares (0.75, 0.25), 3 of
    every 4 consecutive documents fall in the first row.
    """
    counts = [0] * len(shares)
    last = len(shares) - 1
    n = 0
    while True:
        n += 1
        row = next((k for k in range(last) if counts[k] < math.floor(n * shares[k])), last)
        counts[row] += 1
        yield row
