"""Held-out evaluation sets: items drawn only from the held-out partition, never trained on.

Evaluation draws use their own random streams ("eval-..."), so they do not depend on any corpus.

* ``s2_problems`` (:func:`s2_eval_items`) — held-out problems per (family, difficulty), for
  "reasoning accuracy after S2 beats the same tokens spent on more S1" and as the post-training
  validation pool.
* ``passkey`` / ``passkey_order`` (:func:`passkey_eval_items`) — one needle per document by
  (length, depth), or the position-sensitive variant: two needles with identical wording and the
  query asks for the *first* or the *last*. A model that retrieves but confuses order scores ~50%;
  ``values`` holds the distractor so that error can be counted separately. Caveat: a model
  trained with ABF may extrapolate the single-needle task to 4× its trained length on its own, so
  "plain S3 < 30% at 4×" is a measurement, not a given (tiny scale: 0% at 8,192, docs/LOG.md).
* ``heldout_text`` — prose per language, never in training, for per-language loss.
* ``translation`` — sentence pairs whose meaning (frame hash) never appears as a parallel pair
  in training.
* ``knowledge`` — multiple-choice fact sentences per language, scored by likelihood (trained
  knowledge by design: facts are the world's truths, so they are not held out).

Score retrieval with :func:`check_retrieval` (first word of the completion == target value).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import datasets

from .. import tasks
from ..cache import cached_dataset
from ..tasks import TaskItem, is_heldout
from ..world import PERSON_ATTRIBUTES, Entity, build_world
from .counting import CountTokens, approx_count_tokens, count_fingerprint
from .long_context import ORDER_MIN_GAP, long_context_doc
from .prose import frame_uid, prose_text
from .records import GENERATOR_VERSION, WORLD_SEED, content_uid, doc_rng, make_doc, records_to_dataset

S2_EVAL_PER_CELL = 40
# ≥ 40 documents per (length, condition): one item moves a cell by at most 2.5 points.
PASSKEY_EVAL_PER_LENGTH = 40
KNOWLEDGE_CHOICES = 4


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
            rng, seen, tries = doc_rng("eval-s2", seed, name, d), set(), 0
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
    lengths: Sequence[int],
    n_per_length: int = PASSKEY_EVAL_PER_LENGTH,
    depths: Sequence[float] | None = None,
    seed: int = 0,
    count_tokens: CountTokens | None = None,
    world_seed: int = WORLD_SEED,
    slack: float = 0.05,
) -> list[dict]:
    """Retrieval items by (length, depth), from held-out pass-key values.

    `lengths` are the evaluated lengths in tokens (a scale's suite states them, from below its S3
    row length to beyond it). Each length gets `n_per_length` items with target-needle depths spread evenly over [0, 1]
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
            rng = doc_rng("eval-long", variant, seed, world_seed, length, j)
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
        rng = doc_rng("eval-text", seed, world_seed, lang)
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
            doc = make_doc(text, kind, lang)
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
    rng = doc_rng("translation", seed, world_seed, heldout)
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
        rng = doc_rng("eval-knowledge", seed, world_seed, lang)
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
                        "answer": values.index(true), "uid": content_uid("knowledge", lang, person.name, attr)})
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
    return cached_dataset(f"eval-{name}", config, lambda: records_to_dataset(builders[name]()), cache_dir)
