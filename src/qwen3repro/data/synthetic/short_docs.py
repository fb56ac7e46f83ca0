"""The short document kinds of S1 and S2, one generator per kind.

* ``prose`` — a paragraph in one language;
* ``knowledge`` — facts about a few of the world's people, in one language;
* ``parallel`` — sentence pairs in two languages (held-out meanings are never shown as pairs);
* ``code`` — tiny programs followed by their output;
* ``arith`` — bare equations;
* ``problem`` — a worked problem of a task family, with its step-by-step solution;
* ``passkey`` — short in-context retrieval: a pass key in a paragraph, asked for at the end.

Problems and equations come from the training partition only (:func:`.tasks.is_heldout`); prose
that hashes into the held-out partition is redrawn (:func:`short_doc`).
"""
from __future__ import annotations

import functools
import random
from typing import Callable, Mapping

from .. import tasks
from ..tasks import TaskItem, is_heldout
from ..world import PERSON_ATTRIBUTES, World
from .counting import approx_count_tokens
from .kind_weights import GENERAL_KINDS, PROBLEM_FAMILY_WEIGHTS
from .long_context import NEEDLE, PASSKEY_DIGITS, PASSKEY_QUERY, long_context_doc
from .prose import frame_uid, pick_language, prose_text
from .records import make_doc, pick


def _training_item(rng: random.Random, families: Mapping[str, float] | None = None) -> TaskItem:
    """A problem from the training partition of a family drawn by weight."""
    weights = families or PROBLEM_FAMILY_WEIGHTS
    for _ in range(1000):
        fam = tasks.FAMILIES[pick(rng, weights)]
        item = fam.generate(rng.getrandbits(48), rng.randint(fam.min_difficulty, fam.max_difficulty))
        if not is_heldout(item.uid):
            return item
    raise RuntimeError("could not draw a training item")  # pragma: no cover - 10% rejection rate


def render_problem(item: TaskItem) -> str:
    """A worked problem as pre-training text: question, step-by-step solution, answer."""
    return f"Problem: {item.question}\nSolution:\n" + "\n".join(item.trace_steps) + f"\nAnswer: {item.answer}"


def render_program(item: TaskItem) -> str:
    """A ``code`` item as a program followed by its output (no trace)."""
    return f"Program:\n{tasks.program_of(item)}\nOutput: {item.answer}"


def _gen_prose(world: World, rng: random.Random) -> dict:
    lang = pick_language(world, rng)
    return make_doc(prose_text(world, rng, lang, rng.randint(6, 16)), "prose", lang)


def _gen_knowledge(world: World, rng: random.Random) -> dict:
    lang = pick_language(world, rng)
    sents = []
    for person in rng.sample(world.people, rng.randint(1, 3)):
        attrs = list(PERSON_ATTRIBUTES)
        rng.shuffle(attrs)
        sents.extend(world.render_fact(lang, person, a) for a in attrs[: rng.randint(3, len(attrs))])
    return make_doc(" ".join(sents), "knowledge", lang)


def _gen_parallel(world: World, rng: random.Random) -> dict:
    names = world.language_names
    src, tgt = rng.sample(names, 2)
    lines, uids = [], []
    while len(lines) < 3 + int(rng.random() * 4):
        frame = world.random_frame(rng)
        uid = frame_uid(frame)
        if is_heldout(uid):  # held-out meanings are never shown as translation pairs
            continue
        lines.append(f"{src}: {world.render(src, frame)}\n{tgt}: {world.render(tgt, frame)}")
        uids.append(uid)
    return make_doc("\n".join(lines), "parallel", f"{src}+{tgt}", item_uids=uids)


def _gen_code(world: World, rng: random.Random) -> dict:
    items = [_training_item(rng, {"code": 1.0}) for _ in range(rng.randint(1, 3))]
    return make_doc("\n\n".join(render_program(it) for it in items), "code", item_uids=[it.uid for it in items])


def _gen_arith(world: World, rng: random.Random) -> dict:
    """Bare equations (add, mul as in the task families, plus subtraction), no working shown.

    Drawn directly rather than through the family generators (5× faster); the uid of an add/mul
    line is the family uid of the same question, so held-out problems stay out of S1/S2."""
    r = rng.random
    lines, uids = [], []
    while len(lines) < 6 + int(r() * 9):
        k = 1 + int(r() * 6)
        a = rng.randint(10 ** (k - 1) if k > 1 else 0, 10**k - 1)
        u = r()
        if u < 0.45:
            b = rng.randint(10 ** (k - 1) if k > 1 else 0, 10**k - 1)
            fam, q, ans = "add", f"{a}+{b}=", a + b
        elif u < 0.8:
            b = 2 + int(r() * 8)
            fam, q, ans = "mul", f"{a}*{b}=", a * b
        else:
            b = rng.randint(0, a)
            fam, q, ans = "sub", f"{a}-{b}=", a - b
        uid = tasks.item_uid(fam, q)
        if not is_heldout(uid):
            lines.append(f"{q}{ans}")
            uids.append(uid)
    return make_doc("\n".join(lines), "arith", item_uids=uids)


def _gen_problem(world: World, rng: random.Random) -> dict:
    item = _training_item(rng)
    return make_doc(render_problem(item), "problem", item_uids=[item.uid], uid=item.uid)


# Short retrieval documents (a pass key somewhere in a paragraph, asked for at the end). General web
# text is full of such copy-from-context patterns; at tiny scale they let the short-context stages
# learn *what* retrieval is, so S3 only has to extend it to long range. Their length scales with the
# stage's row: 48-240 tokens in tiny's rows of 256, i.e. from 3/16 to 15/16 of the row, as counted
# by `approx_count_tokens` (these corpora are built before the tokenizer exists). That count runs
# below the tiny tokenizer's in most languages (by 5-85% at the median on these documents), so some
# of them are longer than a row in real tokens and the packer carries them into the next.
SHORT_RETRIEVAL_MIN_SIXTEENTHS = 3
SHORT_RETRIEVAL_MAX_SIXTEENTHS = 15


def short_retrieval_range(seq_len: int) -> tuple[int, int]:
    """The token range of short retrieval documents in a corpus read in rows of `seq_len` tokens,
    or a ValueError when the range cannot hold a needle and its query."""
    lo, hi = seq_len * SHORT_RETRIEVAL_MIN_SIXTEENTHS // 16, seq_len * SHORT_RETRIEVAL_MAX_SIXTEENTHS // 16
    value = "9" * PASSKEY_DIGITS
    fixed = approx_count_tokens(" " + NEEDLE.format(value=value)) + approx_count_tokens(f" {PASSKEY_QUERY} {value}.")
    if hi <= fixed:
        raise ValueError(f"rows of {seq_len} tokens are too short for short retrieval documents: a needle and its "
                         f"query take {fixed} tokens, the documents may have at most {hi}")
    return lo, hi


def short_passkey_doc(world: World, rng: random.Random, *, length_range: tuple[int, int]) -> dict:
    """A short retrieval document of `length_range` tokens (approximately counted)."""
    doc = long_context_doc(world, rng, variant="passkey", length_range=length_range, count_tokens=approx_count_tokens)
    return make_doc(doc["text"], "passkey", doc["lang"], doc["item_uids"], uid=doc["uid"])


ShortKindGenerator = Callable[[World, random.Random], dict]


def short_kind_generators(seq_len: int) -> dict[str, ShortKindGenerator]:
    """The generator of each S1/S2 document kind, for a corpus read in rows of `seq_len` tokens
    (only retrieval documents are sized by the row; the others have their own lengths)."""
    return {
        "prose": _gen_prose,
        "knowledge": _gen_knowledge,
        "parallel": _gen_parallel,
        "code": _gen_code,
        "arith": _gen_arith,
        "problem": _gen_problem,
        "passkey": functools.partial(short_passkey_doc, length_range=short_retrieval_range(seq_len)),
    }


def short_doc(world: World, rng: random.Random, generate: ShortKindGenerator, kind: str) -> dict:
    """A training document of `kind` made by `generate`; general text drawn into the held-out
    partition is redrawn."""
    while True:
        doc = generate(world, rng)
        if kind not in GENERAL_KINDS or not is_heldout(doc["uid"]):
            return doc
