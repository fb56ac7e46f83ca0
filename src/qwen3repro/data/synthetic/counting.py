"""Token counts of generated text before (and after) the tokenizer exists.

Lengths are counted by a ``count_tokens(str) -> int`` callable. The real tokenizer is trained on
this text, so corpora built before it exists use :func:`approx_count_tokens`; the pipeline passes
the trained tokenizer's counter where lengths must be exact (the long-context corpus, evaluation
items).
"""
from __future__ import annotations

import math
import re
from typing import Callable

CountTokens = Callable[[str], int]


def approx_count_tokens(text: str) -> int:
    """Default length measure, for building corpora before the tokenizer exists.

    ``words + 0.1·letters + digits + punctuation/newlines`` (rounded up): a least-squares fit of
    the token counts of byte-level BPEs with 1,024-2,048 tokens trained on 6,000 S1+S2 documents
    of this world (median error 4% at 1,536 tokens, 6-7% at 1,024 and 2,048, on held-out S1/S2/S3
    text; digits are about one token each,
    lexicon words about one token plus a little per letter). Pass the real tokenizer's counter
    in the pipeline.
    """
    words = _LETTER_RUNS.findall(text)
    letters = sum(map(len, words))
    digits = len(text) - len(text.translate(_DELETE_DIGITS))
    other = len(text) - letters - digits - text.count(" ")  # punctuation and newlines
    return math.ceil(len(words) + 0.1 * letters + digits + other)


_LETTER_RUNS = re.compile(r"[^\W\d_]+")
_DELETE_DIGITS = str.maketrans("", "", "0123456789")

# Fixed probe strings: their token counts fingerprint a `count_tokens` function for the cache key.
_PROBES = (
    "Résmaá söm öe vo. Tuzrkod hkozhu gagzhozuz bud.",
    "Problem: 4821+9375=\nSolution:\n1+5+0=6, write 6 carry 0",
    "The pass key is 48213. Remember it. 48213 is the pass key.",
    "for i in range(3):\n    s = s + i\nprint(s + t)",
)


def count_fingerprint(count_tokens: CountTokens | None) -> list[int]:
    """What a cache key records of a counter: its counts of a few fixed probe strings."""
    count = count_tokens or approx_count_tokens
    return [int(count(p)) for p in _PROBES]
