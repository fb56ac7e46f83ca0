"""Stage corpora S1/S2/S3 and held-out evaluation sets over the tiny synthetic world.

The report's three pre-training stages (Qwen3 report §3.2) are rebuilt at tiny scale:

* **S1 general** — prose in five synthetic languages (weights from :mod:`.world`, one rare),
  facts about generated entities, parallel sentences, tiny programs with their output, bare
  arithmetic, and a few worked problems.
* **S2 reasoning** — the same kinds with a much larger share of worked problems (the verifiable
  families of :mod:`.tasks`, with step-by-step traces), code and arithmetic: "a higher share of
  STEM, coding, reasoning and synthetic data".
* **S3 long context** — documents of ``S1_SEQ_LEN``..``S3_SEQ_LEN`` tokens, 75% in
  [S3/2, S3] and 25% in [S1, S3/2] (the report's 16,384-32,768 / 4,096-16,384 split, scaled by
  2048/32768), with long-range dependencies: a pass key planted at any depth and asked for at the
  end, and an *order* variant (two pass keys, ask for the first or the last) that content matching
  alone cannot solve.

Documents are dicts ``{text, kind, lang, uid, item_uids, n_tokens}``; each is a pure function of
(stage, seed, index, world_seed), so corpora are deterministic and prefix-stable (the first n
documents of a larger corpus are the smaller corpus; ``offset`` continues one).

Held-out separation: every problem, pass-key value and prose document has a uid (a hash of its
content); uids in the held-out partition (:func:`.tasks.is_heldout`, 10% of the hash space) are
never generated for training, and evaluation sets draw only from it. :func:`assert_disjoint`
checks it on real datasets.

Evaluation sets (:func:`build_eval_set`, cached like corpora):

* ``s2_problems`` — held-out problems per (family, difficulty), for "reasoning accuracy after S2
  beats the same tokens spent on more S1" (use :func:`generate_documents` with ``offset`` for the
  S1 continuation control) and as the post-training validation pool.
* ``passkey`` — one needle per document by (length, depth); lengths up to ``INFERENCE_LEN``.
  Caveat from the tiny feasibility study: a model trained with ABF at 2,048 often extrapolates
  this task to 4× on its own, so "plain S3 < 30% at 4×" may not reproduce on it.
* ``passkey_order`` — the position-sensitive variant: two needles with identical wording and
  different values, and the query asks for the *first* or the *last*. Content matching finds both
  values; only the order of the two occurrences picks the answer, so relative position is what the
  model must read beyond its trained length (a model that retrieves but confuses order scores
  ~50%; ``values`` holds the distractor so that error can be counted separately).
* ``heldout_text`` — prose per language, never in training, for per-language loss.
* ``translation`` — sentence pairs whose meaning (frame hash) never appears as a parallel pair
  in training.
* ``knowledge`` — multiple-choice fact sentences per language, scored by likelihood (trained
  knowledge by design: facts are the world's truths, so they are not held out).

Score retrieval with :func:`check_retrieval` (first word of the completion == target value).

Lengths are counted by a ``count_tokens(str) -> int`` callable. The real tokenizer is trained
later on this text, so the default is :func:`approx_count_tokens` (documented there); pass the
trained tokenizer's counter in the pipeline.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import random
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import datasets

from . import tasks
from .cache import cached_dataset
from .tasks import TaskItem, is_heldout
from .world import PERSON_ATTRIBUTES, Entity, World, build_world

CountTokens = Callable[[str], int]

# ============================================================================ lengths
# Tiny lengths: the report's 4,096 (S1/S2) and 32,768 (S3) scaled down by 16; inference at 4× S3
# (the report's "four-fold increase ... during inference" with YaRN + DCA).
S1_SEQ_LEN = 256
S3_SEQ_LEN = 2048
INFERENCE_LEN = 4 * S3_SEQ_LEN
# Report §3.2: 75% of S3 text is 16,384-32,768 tokens (= [S3/2, S3]), 25% is 4,096-16,384 (= [S1, S3/2]).
S3_LONG_SHARE = 0.75

# Bumped whenever generation changes, so cached corpora built by older code are not reused.
GENERATOR_VERSION = 4
# The world (languages, entities) is shared by every stage and seed of a run unless changed.
WORLD_SEED = 0


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


# ============================================================================ stage mixtures
# Document kinds. "Reasoning" kinds are the STEM/code/synthetic-reasoning share the report raises in S2.
REASONING_KINDS = frozenset({"problem", "code", "arith"})
GENERAL_KINDS = frozenset({"prose", "knowledge", "parallel"})

# S1 (report §3.2 "general stage": broad web/multilingual knowledge, some code and math).
# Reasoning share 0.25.
S1_KIND_WEIGHTS: Mapping[str, float] = {
    "prose": 0.35,      # multilingual general text: language identity and modelling
    "passkey": 0.15,    # short in-context retrieval (see SHORT_RETRIEVAL_TOKENS): at 5% (75k tokens in
                        # 1.5M) a 1.9M-parameter model learned no retrieval at all, even at 128 tokens
    "knowledge": 0.18,  # entity facts (world knowledge)
    "parallel": 0.07,   # translation pairs, so later translation SFT has something to build on
    "code": 0.10,       # programs with their printed output
    "arith": 0.10,      # bare equations
    "problem": 0.05,    # a few worked problems (synthetic reasoning data exists in S1 too)
}
# S2 (report §3.2 "reasoning stage": "increasing the proportion of STEM, coding, reasoning, and
# synthetic data"). Reasoning share 0.70; the general kinds stay to avoid forgetting.
S2_KIND_WEIGHTS: Mapping[str, float] = {
    "problem": 0.55,
    "code": 0.10,
    "arith": 0.05,
    "prose": 0.13,
    "passkey": 0.05,
    "knowledge": 0.08,
    "parallel": 0.04,
}
# S3 (report §3.2 long-context stage): every document is long; most carry a long-range dependency.
S3_KIND_WEIGHTS: Mapping[str, float] = {
    "passkey": 0.50,  # single needle at a random depth (learnable in ~1M tokens at tiny scale)
    "order": 0.25,    # two needles, ask for the first or the last: needs relative order
    "long": 0.25,     # plain long text in one language, no planted dependency (keeps S3 from being all retrieval)
}
STAGE_KIND_WEIGHTS: Mapping[str, Mapping[str, float]] = {"s1": S1_KIND_WEIGHTS, "s2": S2_KIND_WEIGHTS, "s3": S3_KIND_WEIGHTS}
STAGES = tuple(STAGE_KIND_WEIGHTS)

# Problem families in S2 (and S1's few problems): all post-training families, arithmetic heaviest.
PROBLEM_FAMILY_WEIGHTS: Mapping[str, float] = {"add": 0.2, "mul": 0.2, "expr": 0.25, "code": 0.2, "order": 0.15}


def reasoning_share(kind_weights: Mapping[str, float]) -> float:
    return sum(w for k, w in kind_weights.items() if k in REASONING_KINDS) / sum(kind_weights.values())


# ============================================================================ helpers
def _uid(*parts: Any) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


def _doc_rng(*parts: Any) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha1("|".join(map(str, parts)).encode()).digest()[:8], "big"))


def _pick(rng: random.Random, weights: Mapping[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _doc(text: str, kind: str, lang: str = "", item_uids: Sequence[str] = (), uid: str | None = None, n_tokens: int = -1) -> dict:
    uid = uid or _uid("text", text)
    return {"text": text, "kind": kind, "lang": lang, "uid": uid, "item_uids": list(item_uids) or [uid], "n_tokens": n_tokens}


def _training_item(rng: random.Random, families: Mapping[str, float] | None = None) -> TaskItem:
    """A problem from the training partition of a family drawn by weight."""
    weights = families or PROBLEM_FAMILY_WEIGHTS
    for _ in range(1000):
        fam = tasks.FAMILIES[_pick(rng, weights)]
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


# ============================================================================ S1/S2 document kinds
def prose_text(world: World, rng: random.Random, lang: str, n_sentences: int) -> str:
    """A paragraph in one language: random clauses, with an occasional entity fact."""
    out = []
    for _ in range(n_sentences):
        if rng.random() < 0.1:
            out.append(world.render_fact(lang, rng.choice(world.people), rng.choice(PERSON_ATTRIBUTES)))
        else:
            out.append(world.render(lang, world.random_frame(rng)))
    return " ".join(out)


def _gen_prose(world: World, rng: random.Random) -> dict:
    lang = world.languages[_lang_index(world, rng)].name
    return _doc(prose_text(world, rng, lang, rng.randint(6, 16)), "prose", lang)


def _lang_index(world: World, rng: random.Random) -> int:
    return rng.choices(range(len(world.languages)), weights=world.language_weights)[0]


def _gen_knowledge(world: World, rng: random.Random) -> dict:
    lang = world.languages[_lang_index(world, rng)].name
    sents = []
    for person in rng.sample(world.people, rng.randint(1, 3)):
        attrs = list(PERSON_ATTRIBUTES)
        rng.shuffle(attrs)
        sents.extend(world.render_fact(lang, person, a) for a in attrs[: rng.randint(3, len(attrs))])
    return _doc(" ".join(sents), "knowledge", lang)


def frame_uid(frame) -> str:
    """A sentence's meaning, independent of language: translation items are held out by it."""
    return _uid("frame", repr(frame))


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
    return _doc("\n".join(lines), "parallel", f"{src}+{tgt}", item_uids=uids)


def _gen_code(world: World, rng: random.Random) -> dict:
    items = [_training_item(rng, {"code": 1.0}) for _ in range(rng.randint(1, 3))]
    return _doc("\n\n".join(render_program(it) for it in items), "code", item_uids=[it.uid for it in items])


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
    return _doc("\n".join(lines), "arith", item_uids=uids)


def _gen_problem(world: World, rng: random.Random) -> dict:
    item = _training_item(rng)
    return _doc(render_problem(item), "problem", item_uids=[item.uid], uid=item.uid)


# Short retrieval documents (a pass key somewhere in a paragraph, asked for at the end). General web
# text is full of such copy-from-context patterns; at tiny scale they let the short-context stages
# learn *what* retrieval is, so S3 only has to extend it to long range (the tiny long-context study
# trained retrieval from S1 on, with a length curriculum).
SHORT_RETRIEVAL_TOKENS = (48, S1_SEQ_LEN - 16)


def _gen_short_passkey(world: World, rng: random.Random) -> dict:
    doc = long_context_doc(world, rng, variant="passkey", length_range=SHORT_RETRIEVAL_TOKENS,
                           count_tokens=approx_count_tokens)
    return _doc(doc["text"], "passkey", doc["lang"], doc["item_uids"], uid=doc["uid"])


SHORT_KIND_GENERATORS: dict[str, Callable[[World, random.Random], dict]] = {
    "prose": _gen_prose,
    "knowledge": _gen_knowledge,
    "parallel": _gen_parallel,
    "code": _gen_code,
    "arith": _gen_arith,
    "problem": _gen_problem,
    "passkey": _gen_short_passkey,
}


def _short_doc(world: World, rng: random.Random, kind: str) -> dict:
    """A training document of `kind`; prose drawn into the held-out partition is redrawn."""
    while True:
        doc = SHORT_KIND_GENERATORS[kind](world, rng)
        if kind not in GENERAL_KINDS or not is_heldout(doc["uid"]):
            return doc


# ============================================================================ S3 long documents
# Five digits: a byte-level BPE of 1-2k tokens barely merges digits, so a value is ~5 tokens, the
# harder of the two value sizes in the tiny long-context study (exact match on all of them).
PASSKEY_DIGITS = 5
NEEDLE = "The pass key is {value}. Remember it. {value} is the pass key."
PASSKEY_QUERY = "What is the pass key? The pass key is"
ORDER_QUERY = "What was the {which} pass key? The {which} pass key was"
# The order variant's two needles are at least this far apart (fraction of the context).
ORDER_MIN_GAP = 0.1


def passkey_uid(value: str) -> str:
    """Pass-key values are partitioned like problems: held-out values never appear in training."""
    return _uid("passkey", value)


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
    """One S3 document (or evaluation item) whose token count lies in `length_range`.

    ``variant``: "passkey" (one needle at `depth`), "order" (two needles with the same wording;
    the target one at `depth`, the query asks for the ``which`` = "first"/"last" one), or "long"
    (filler only). The text is ``prompt + " " + target + "."``; ``prompt`` ends with the query.
    Depth is the fraction of the context's tokens (everything before the query) that precede the
    target needle. The length lands in range by trimming or extending filler at the end, and the
    needles are placed afterwards, so trimming never shifts them.
    """
    lo, hi = length_range
    lang = world.languages[_lang_index(world, rng)].name
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
        return _doc(text, "long", lang, n_tokens=n)
    prompt = text[: -len(f" {target}.")]
    uids = [passkey_uid(v) for v in values]
    doc = _doc(text, variant, lang, item_uids=uids, uid=uids[0], n_tokens=n)
    context = prompt[: -len(query) - 1]
    start = _nth_needle_start(context, target)
    doc.update(prompt=prompt, target=target, values=values, which=which or "", depth=depths[0],
               measured_depth=count_tokens(context[:start]) / max(count_tokens(context), 1))
    return doc


def _nth_needle_start(context: str, value: str) -> int:
    return context.index(NEEDLE.format(value=value))


def _s3_doc(world: World, rng: random.Random, index: int, count_tokens: CountTokens, weights: Mapping[str, float] = S3_KIND_WEIGHTS) -> dict:
    kind = _pick(rng, weights)
    # Document i is long when floor((i+1)·share) steps up: with share 0.75, exactly 3 of every 4
    # consecutive documents are long, so the 75/25 split holds in every prefix, not just on average.
    long_doc = math.floor((index + 1) * S3_LONG_SHARE) > math.floor(index * S3_LONG_SHARE)
    length_range = (S3_SEQ_LEN // 2, S3_SEQ_LEN) if long_doc else (S1_SEQ_LEN, S3_SEQ_LEN // 2)
    doc = long_context_doc(world, rng, variant=kind, length_range=length_range, count_tokens=count_tokens)
    return {k: doc[k] for k in ("text", "kind", "lang", "uid", "item_uids", "n_tokens")}


# ============================================================================ stage corpora
def generate_documents(
    stage: str,
    *,
    seed: int,
    n_docs: int,
    offset: int = 0,
    count_tokens: CountTokens | None = None,
    world_seed: int = WORLD_SEED,
    kind_weights: Mapping[str, float] | None = None,
) -> Iterator[dict]:
    """Documents ``offset .. offset+n_docs-1`` of a stage's training corpus (no caching)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    count = count_tokens or approx_count_tokens
    world = build_world(world_seed)
    weights = kind_weights or STAGE_KIND_WEIGHTS[stage]
    for i in range(offset, offset + n_docs):
        rng = _doc_rng("doc", stage, seed, world_seed, i)
        if stage == "s3":
            yield _s3_doc(world, rng, i, count, weights)
        else:
            doc = _short_doc(world, rng, _pick(rng, weights))
            doc["n_tokens"] = count(doc["text"])
            yield doc


CORPUS_FEATURES = datasets.Features(
    {
        "text": datasets.Value("string"),
        "kind": datasets.Value("string"),
        "lang": datasets.Value("string"),
        "uid": datasets.Value("string"),
        "item_uids": datasets.List(datasets.Value("string")),
        "n_tokens": datasets.Value("int32"),
    }
)

# Fixed probe strings: their token counts fingerprint a `count_tokens` function for the cache key.
_PROBES = (
    "Résmaá söm öe vo. Tuzrkod hkozhu gagzhozuz bud.",
    "Problem: 4821+9375=\nSolution:\n1+5+0=6, write 6 carry 0",
    "The pass key is 48213. Remember it. 48213 is the pass key.",
    "for i in range(3):\n    s = s + i\nprint(s + t)",
)


def count_fingerprint(count_tokens: CountTokens | None) -> list[int]:
    count = count_tokens or approx_count_tokens
    return [int(count(p)) for p in _PROBES]


def _records_to_dataset(records: Iterable[dict], features: datasets.Features | None = None) -> datasets.Dataset:
    records = list(records)
    if features is None:
        return datasets.Dataset.from_list(records)
    cols = {k: [r[k] for r in records] for k in features}
    return datasets.Dataset.from_dict(cols, features=features)


def corpus_config(stage: str, *, seed: int, n_docs: int, offset: int = 0, count_tokens: CountTokens | None = None,
                  world_seed: int = WORLD_SEED, kind_weights: Mapping[str, float] | None = None) -> dict:
    """What identifies a corpus: its cache key (hashed into the directory name)."""
    if kind_weights is not None:
        unknown = set(kind_weights) - set(STAGE_KIND_WEIGHTS[stage])
        if unknown:
            raise ValueError(f"unknown document kinds for {stage}: {sorted(unknown)}; known: {', '.join(STAGE_KIND_WEIGHTS[stage])}")
    return {
        "stage": stage,
        "seed": seed,
        "n_docs": n_docs,
        "offset": offset,
        "world_seed": world_seed,
        "version": GENERATOR_VERSION,
        "kind_weights": dict(kind_weights or STAGE_KIND_WEIGHTS[stage]),
        "count_tokens": count_fingerprint(count_tokens),
    }


def build_corpus(
    stage: str,
    *,
    seed: int,
    n_docs: int,
    cache_dir,
    count_tokens: CountTokens | None = None,
    offset: int = 0,
    world_seed: int = WORLD_SEED,
    kind_weights: Mapping[str, float] | None = None,
) -> datasets.Dataset:
    """The training corpus of `stage` ("s1", "s2", "s3") as a `datasets.Dataset`.

    Written once to ``cache_dir/<stage>-<config-hash>/`` and reloaded when the hash matches; the
    hash covers stage, seed, n_docs, offset, world seed, generator version, mixture weights and a
    fingerprint of `count_tokens`. Columns: text, kind, lang, uid, item_uids, n_tokens.
    `kind_weights` overrides the stage's document-kind mix (e.g. more "order" documents in S3).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    config = corpus_config(stage, seed=seed, n_docs=n_docs, offset=offset, count_tokens=count_tokens,
                           world_seed=world_seed, kind_weights=kind_weights)

    def build() -> datasets.Dataset:
        docs = generate_documents(stage, seed=seed, n_docs=n_docs, offset=offset, count_tokens=count_tokens,
                                  world_seed=world_seed, kind_weights=kind_weights)
        return _records_to_dataset(docs, CORPUS_FEATURES)

    return cached_dataset(stage, config, build, cache_dir)


def tokenizer_training_texts(*, seed: int = 0, n_docs: int = 6000, world_seed: int = WORLD_SEED) -> Iterator[str]:
    """A sample of S1 and S2 text (half each) plus the long-context marker phrases, for training
    the tiny tokenizer; held-out content is excluded like in any training corpus."""
    yield from (d["text"] for d in generate_documents("s1", seed=seed, n_docs=n_docs // 2, world_seed=world_seed))
    yield from (d["text"] for d in generate_documents("s2", seed=seed, n_docs=n_docs - n_docs // 2, world_seed=world_seed))
    for which in ("first", "last"):
        yield f"{NEEDLE.format(value='12345')} {PASSKEY_QUERY} 12345. {ORDER_QUERY.format(which=which)} 12345."


# ============================================================================ evaluation sets
# Evaluation draws use their own stream ("eval"), and only held-out-partition content.
S2_EVAL_PER_CELL = 40
PASSKEY_EVAL_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
# ≥ 40 documents per (length, condition): the feasibility study's minimum for a claim.
PASSKEY_EVAL_PER_LENGTH = 40


def s2_eval_items(
    *,
    seed: int = 0,
    n_per_cell: int = S2_EVAL_PER_CELL,
    families: Sequence[str] | None = None,
    extra_difficulty: int = 0,
) -> list[TaskItem]:
    """Held-out problems, `n_per_cell` per (family, difficulty) over each family's training range
    (plus `extra_difficulty` harder levels to test generalisation). Unique questions."""
    out: list[TaskItem] = []
    for name in families or tasks.FAMILIES:
        fam = tasks.FAMILIES[name]
        for d in range(fam.min_difficulty, fam.max_difficulty + 1 + extra_difficulty):
            rng, seen, tries = _doc_rng("eval-s2", seed, name, d), set(), 0
            while len(seen) < n_per_cell:
                tries += 1
                if tries > 200 * n_per_cell:
                    raise RuntimeError(f"held-out partition of {name} at difficulty {d} has fewer than {n_per_cell} items")
                item = fam.generate(rng.getrandbits(48), d)
                if is_heldout(item.uid) and item.uid not in seen:
                    seen.add(item.uid)
                    out.append(item)
    return out


def passkey_eval_items(
    *,
    variant: str = "passkey",
    lengths: Sequence[int] = PASSKEY_EVAL_LENGTHS,
    n_per_length: int = PASSKEY_EVAL_PER_LENGTH,
    depths: Sequence[float] | None = None,
    seed: int = 0,
    count_tokens: CountTokens | None = None,
    world_seed: int = WORLD_SEED,
    slack: float = 0.05,
) -> list[dict]:
    """Retrieval items by (length, depth), from held-out pass-key values.

    Each length gets `n_per_length` items with target-needle depths spread evenly over [0, 1]
    (or the given `depths`, cycled). An item's full text (prompt + " " + target + ".") has between
    ``(1-slack)·length`` and ``length`` tokens. Fields: variant, length, depth, measured_depth,
    prompt, target (the exact value string), values (all planted values; for "order" the other
    one is the distractor), which ("first"/"last" for order), lang, uid.
    """
    count = count_tokens or approx_count_tokens
    world = build_world(world_seed)
    out = []
    for length in lengths:
        for j in range(n_per_length):
            d = depths[j % len(depths)] if depths else (j + 0.5) / n_per_length
            rng = _doc_rng("eval-long", variant, seed, world_seed, length, j)
            which = None
            if variant == "order":
                which = "first" if j % 2 == 0 else "last"
                if which == "first" and d > 1 - ORDER_MIN_GAP:
                    which = "last"
                if which == "last" and d < ORDER_MIN_GAP:
                    which = "first"
            doc = long_context_doc(world, rng, variant=variant, length_range=(int(length * (1 - slack)), length),
                                   count_tokens=count, heldout=True, depth=d, which=which)
            out.append({"variant": variant, "length": length, "depth": d, "measured_depth": doc["measured_depth"],
                        "prompt": doc["prompt"], "target": doc["target"], "values": doc["values"], "which": doc["which"],
                        "lang": doc["lang"], "uid": doc["uid"], "item_uids": doc["item_uids"], "n_tokens": doc["n_tokens"]})
    return out


def check_retrieval(item: Mapping[str, Any], completion: str) -> bool:
    """Exact match: the completion's first word (punctuation stripped) is the target value."""
    words = completion.strip().split()
    return bool(words) and words[0].strip(".,:;!?") == item["target"]


def heldout_text(
    *,
    seed: int = 0,
    n_per_language: int = 50,
    kinds: Sequence[str] = ("prose",),
    world_seed: int = WORLD_SEED,
) -> list[dict]:
    """Held-out general documents per language (for per-language loss); never in training."""
    world = build_world(world_seed)
    out = []
    for lang in world.language_names:
        rng = _doc_rng("eval-text", seed, world_seed, lang)
        n = 0
        while n < n_per_language:
            kind = kinds[n % len(kinds)]
            if kind == "prose":
                text = prose_text(world, rng, lang, rng.randint(6, 16))
            elif kind == "knowledge":
                person = rng.choice(world.people)
                text = " ".join(world.render_fact(lang, person, a) for a in PERSON_ATTRIBUTES)
            else:
                raise ValueError(f"unknown held-out text kind {kind!r}; known: prose, knowledge")
            doc = _doc(text, kind, lang)
            if is_heldout(doc["uid"]):
                out.append(doc)
                n += 1
    return out


def translation_items(
    *,
    seed: int = 0,
    n: int = 200,
    heldout: bool = True,
    lang_weights: Mapping[str, float] | None = None,
    world_seed: int = WORLD_SEED,
) -> list[dict]:
    """Sentence translation pairs between two different languages, drawn by `lang_weights`
    (default: the world's language weights; post-training up-weights the rare one here).

    ``heldout=True`` gives evaluation items (meanings never shown as S1/S2 parallel pairs);
    ``heldout=False`` gives training items for translation SFT. Fields: src_lang, tgt_lang,
    source, target, uid (the meaning's :func:`frame_uid`)."""
    world = build_world(world_seed)
    names = list(world.language_names)
    weights = [(lang_weights or dict(zip(names, world.language_weights))).get(l, 0.0) for l in names]
    rng = _doc_rng("translation", seed, world_seed, heldout)
    out = []
    while len(out) < n:
        src = rng.choices(names, weights=weights)[0]
        tgt = rng.choices([l for l in names if l != src], weights=[w for l, w in zip(names, weights) if l != src])[0]
        frame = world.random_frame(rng)
        uid = frame_uid(frame)
        if is_heldout(uid) == heldout:
            out.append({"src_lang": src, "tgt_lang": tgt, "source": world.render(src, frame),
                        "target": world.render(tgt, frame), "uid": uid})
    return out


KNOWLEDGE_CHOICES = 4


def knowledge_probes(*, seed: int = 0, n_per_language: int = 50, world_seed: int = WORLD_SEED) -> list[dict]:
    """Multiple-choice fact probes, scored by likelihood: the true fact sentence and
    ``KNOWLEDGE_CHOICES - 1`` copies with another value of the same attribute (another city, job,
    pet, colour or age), in every language. Likelihood ranking works for every word order (a
    cloze cut before the value would not: in VOS languages the value precedes the name).

    Facts are world truths that training states on purpose, so these measure knowledge (and its
    transfer across languages), not generalisation to unseen text. Fields: lang, person,
    attribute, choices (sentences), answer (index of the true one), uid."""
    world = build_world(world_seed)
    pools = {
        "home": [c.name for c in world.cities],
        "job": sorted({p.attr("job") for p in world.people}),
        "pet": sorted({p.attr("pet") for p in world.people}),
        "color": sorted({p.attr("color") for p in world.people}),
        "age": [str(a) for a in range(18, 91)],
    }
    out = []
    for lang in world.language_names:
        rng = _doc_rng("eval-knowledge", seed, world_seed, lang)
        for _ in range(n_per_language):
            person = rng.choice(world.people)
            attr = rng.choice(PERSON_ATTRIBUTES)
            true = person.attr(attr)
            values = [true] + rng.sample([v for v in pools[attr] if v != true], KNOWLEDGE_CHOICES - 1)
            rng.shuffle(values)
            choices = []
            for v in values:
                alt = Entity(person.name, person.kind, tuple((k, v if k == attr else x) for k, x in person.attributes))
                choices.append(world.render_fact(lang, alt, attr))
            out.append({"lang": lang, "person": person.name, "attribute": attr, "choices": choices,
                        "answer": values.index(true), "uid": _uid("knowledge", lang, person.name, attr)})
    return out


def build_eval_set(name: str, *, cache_dir, seed: int = 0, count_tokens: CountTokens | None = None,
                   world_seed: int = WORLD_SEED, **kwargs) -> datasets.Dataset:
    """A cached evaluation set: "s2_problems", "passkey", "passkey_order", "heldout_text",
    "knowledge" or "translation"; `kwargs` go to the set's builder function."""
    builders: dict[str, Callable[[], list[dict]]] = {
        "s2_problems": lambda: [it.to_dict() for it in s2_eval_items(seed=seed, **kwargs)],
        "passkey": lambda: passkey_eval_items(variant="passkey", seed=seed, count_tokens=count_tokens, world_seed=world_seed, **kwargs),
        "passkey_order": lambda: passkey_eval_items(variant="order", seed=seed, count_tokens=count_tokens, world_seed=world_seed, **kwargs),
        "heldout_text": lambda: heldout_text(seed=seed, world_seed=world_seed, **kwargs),
        "knowledge": lambda: knowledge_probes(seed=seed, world_seed=world_seed, **kwargs),
        "translation": lambda: translation_items(seed=seed, world_seed=world_seed, **kwargs),
    }
    if name not in builders:
        raise ValueError(f"unknown evaluation set {name!r}; known: {', '.join(builders)}")
    config = {"eval": name, "seed": seed, "world_seed": world_seed, "version": GENERATOR_VERSION,
              "count_tokens": count_fingerprint(count_tokens), "kwargs": {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in kwargs.items()}}
    return cached_dataset(f"eval-{name}", config, lambda: _records_to_dataset(builders[name]()), cache_dir)


# ============================================================================ disjointness
class HeldoutLeakError(AssertionError):
    """Training data contains an evaluation item."""


def _uids_of(data: Any) -> set[str]:
    if isinstance(data, datasets.Dataset):
        cols = data.column_names
        if "item_uids" in cols:
            return {u for us in data["item_uids"] for u in us}
        if "uid" in cols:
            return set(data["uid"])
        raise ValueError(f"dataset has neither 'item_uids' nor 'uid' column (columns: {cols})")
    out: set[str] = set()
    for r in data:
        if isinstance(r, TaskItem):
            out.add(r.uid)
        elif isinstance(r, str):
            out.add(r)
        else:
            out.update(r.get("item_uids") or [r["uid"]])
    return out


def _texts_of(data: Any) -> set[str]:
    if isinstance(data, datasets.Dataset):
        return {_uid("text", t) for t in data["text"]} if "text" in data.column_names else set()
    return {_uid("text", r["text"]) for r in data if isinstance(r, Mapping) and "text" in r}


def assert_disjoint(train: Any, heldout: Any) -> None:
    """Raise HeldoutLeakError if any held-out item (problem, pass-key value, document) occurs in
    `train`, by uid and by hash of whole-document text. Accepts datasets, record lists, TaskItems."""
    shared = _uids_of(train) & _uids_of(heldout)
    shared |= _texts_of(train) & _texts_of(heldout)
    if shared:
        examples = ", ".join(sorted(shared)[:5])
        raise HeldoutLeakError(f"{len(shared)} held-out item(s) occur in the training data (uids: {examples})")
