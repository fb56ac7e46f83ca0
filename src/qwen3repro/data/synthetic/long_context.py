"""Long-context documents: filler text of a set length with pass keys planted at chosen depths.

A *needle* states a pass key; the document ends by asking for it. Variants:

* ``passkey`` — one needle at any depth, asked for at the end;
* ``order`` — two needles with identical wording and different values, and the query asks for the
  *first* or the *last*: content matching finds both values, only their order picks the answer;
* ``long`` — filler only, no planted dependency.

Pass-key values are partitioned like problems (:func:`passkey_uid`): held-out values never appear
in training, and evaluation items draw only from them.
"""
from __future__ import annotations

import bisect
import random

from ..tasks import is_heldout
from ..world import World
from .counting import CountTokens
from .prose import pick_language, prose_text
from .records import content_uid, make_doc

# Five digits: a byte-level BPE of 1-2k tokens barely merges digits, so a value is ~5 tokens, and
# exact match on all of them leaves a guess a 1 in 100,000 chance.
PASSKEY_DIGITS = 5
NEEDLE = "The pass key is {value}. Remember it. {value} is the pass key."
PASSKEY_QUERY = "What is the pass key? The pass key is"
ORDER_QUERY = "What was the {which} pass key? The {which} pass key was"
# The order variant's two needles are at least this far apart (fraction of the context).
ORDER_MIN_GAP = 0.1


def passkey_uid(value: str) -> str:
    """Pass-key values are partitioned like problems: held-out values never appear in training."""
    return content_uid("passkey", value)


def _passkey_value(rng: random.Random, heldout: bool) -> str:
    while True:
        v = str(rng.randint(10 ** (PASSKEY_DIGITS - 1), 10**PASSKEY_DIGITS - 1))
        if is_heldout(passkey_uid(v)) == heldout:
            return v


class _Filler:
    """An endless stream of filler sentences in one language, with their token counts."""

    def __init__(self, world: World, rng: random.Random, lang: str, count_tokens: CountTokens):
        self.world, self.rng, self.lang, self.count = world, rng, lang, count_tokens

    def take(self, budget: int) -> list[tuple[str, int]]:
        """Sentences whose counted tokens (each with its joining space) sum to about `budget`."""
        out, total = [], 0
        while total < budget:
            s = prose_text(self.world, self.rng, self.lang, 1)
            n = self.count(" " + s)
            out.append((s, n))
            total += n
        return out


def _needle_slots(counts: list[int], depths: list[float], needle_tokens: list[int]) -> list[int]:
    """Sentence indices before which each needle goes, so that needle k's context depth (tokens
    before it / all context tokens) is as close as possible to ``depths[k]``."""
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    context = cum[-1] + sum(needle_tokens)
    slots = []
    for k, d in enumerate(depths):
        before_needles = sum(t for j, t in enumerate(needle_tokens) if depths[j] < d or (depths[j] == d and j < k))
        want = d * context - before_needles
        i = bisect.bisect_left(cum, want)
        if i > 0 and (i == len(cum) or want - cum[i - 1] < cum[i] - want):
            i -= 1
        slots.append(min(i, len(counts)))
    return slots


def _assemble(sents: list[tuple[str, int]], needles: list[str], depths: list[float], needle_tokens: list[int], tail: str) -> str:
    slots = _needle_slots([n for _, n in sents], depths, needle_tokens)
    pieces: list[str] = []
    order = sorted(range(len(needles)), key=lambda k: (slots[k], depths[k]))
    j = 0
    for i, (sent, _) in enumerate(sents):
        while j < len(order) and slots[order[j]] == i:
            pieces.append(needles[order[j]])
            j += 1
        pieces.append(sent)
    pieces.extend(needles[k] for k in order[j:])
    if tail:
        pieces.append(tail)
    return " ".join(pieces)


def long_context_doc(
    world: World,
    rng: random.Random,
    *,
    variant: str,
    length_range: tuple[int, int],
    count_tokens: CountTokens,
    heldout: bool = False,
    depth: float | None = None,
    which: str | None = None,
) -> dict:
    """One long-context document (or evaluation item) whose token count lies in `length_range`.

    ``variant``: "passkey" (one needle at `depth`), "order" (two needles with the same wording;
    the target one at `depth`, the query asks for the ``which`` = "first"/"last" one), or "long"
    (filler only). The text is ``prompt + " " + target + "."``; ``prompt`` ends with the query.
    Depth is the fraction of the context's tokens (everything before the query) that precede the
    target needle. The length lands in range by trimming or extending filler at the end, and the
    needles are placed afterwards, so trimming never shifts them.
    """
    lo, hi = length_range
    lang = pick_language(world, rng)
    filler = _Filler(world, rng, lang, count_tokens)
    values: list[str] = []
    depths: list[float] = []
    tail, query, target = "", "", ""
    if variant in ("passkey", "order"):
        target = _passkey_value(rng, heldout)
        d = rng.random() if depth is None else depth
        values, depths = [target], [d]
        if variant == "order":
            if which is None:
                options = [w for w, ok in (("first", d <= 1 - ORDER_MIN_GAP), ("last", d >= ORDER_MIN_GAP)) if ok]
                which = rng.choice(options)
            other = _passkey_value(rng, heldout)
            while other == target:
                other = _passkey_value(rng, heldout)
            od = rng.uniform(min(d + ORDER_MIN_GAP, 1.0), 1.0) if which == "first" else rng.uniform(0.0, max(d - ORDER_MIN_GAP, 0.0))
            values.append(other)
            depths.append(od)
            query = ORDER_QUERY.format(which=which)
        else:
            query = PASSKEY_QUERY
        tail = f"{query} {target}."
    elif variant != "long":
        raise ValueError(f"unknown long-context variant {variant!r}; known: passkey, order, long")

    needles = [NEEDLE.format(value=v) for v in values]
    needle_tokens = [count_tokens(" " + n) for n in needles]
    fixed = sum(needle_tokens) + (count_tokens(" " + tail) if tail else 0)
    total = rng.randint(lo, hi) if depth is None else (lo + hi) // 2
    sents = filler.take(max(total - fixed, 1))
    for _ in range(200):
        text = _assemble(sents, needles, depths, needle_tokens, tail)
        n = count_tokens(text)
        if lo <= n <= hi:
            break
        if n > hi:
            excess = n - (lo + hi) // 2
            while len(sents) > 1 and excess > 0:
                excess -= sents.pop()[1]
        else:
            sents.extend(filler.take((lo + hi) // 2 - n))
    else:
        raise RuntimeError(f"could not fit a {variant} document into [{lo}, {hi}] tokens (last: {n})")

    if variant == "long":
        return make_doc(text, "long", lang, n_tokens=n)
    prompt = text[: -len(f" {target}.")]
    uids = [passkey_uid(v) for v in values]
    doc = make_doc(text, variant, lang, item_uids=uids, uid=uids[0], n_tokens=n)
    context = prompt[: -len(query) - 1]
    start = context.index(NEEDLE.format(value=target))
    doc.update(prompt=prompt, target=target, values=values, which=which or "", depth=depths[0],
               measured_depth=count_tokens(context[:start]) / max(count_tokens(context), 1))
    return doc
