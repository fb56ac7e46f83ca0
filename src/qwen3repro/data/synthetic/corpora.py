"""Stage corpora: documents in order, built once as `datasets` and cached by their config.

Document ``i`` of a stage's corpus is a pure function of (stage, seed, i, world_seed), so corpora
are prefix-stable: the first n documents of a larger corpus are the smaller corpus, and
``offset`` continues one (the S1 control run reads fresh S1 documents that way).
"""
from __future__ import annotations

import math
import random
from typing import Iterator, Mapping

import datasets

from ..cache import cached_dataset
from ..world import World, build_world
from .counting import CountTokens, approx_count_tokens, count_fingerprint
from .kind_weights import S3_KIND_WEIGHTS, STAGE_KIND_WEIGHTS, STAGES
from .lengths import S1_SEQ_LEN, S3_LONG_SHARE, S3_SEQ_LEN
from .long_context import NEEDLE, ORDER_QUERY, PASSKEY_QUERY, long_context_doc
from .records import GENERATOR_VERSION, WORLD_SEED, doc_rng, pick, records_to_dataset
from .short_docs import short_doc

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


def _s3_doc(world: World, rng: random.Random, index: int, count_tokens: CountTokens, weights: Mapping[str, float] = S3_KIND_WEIGHTS) -> dict:
    kind = pick(rng, weights)
    # Document i is long when floor((i+1)·share) steps up: with share 0.75, exactly 3 of every 4
    # consecutive documents are long, so the 75/25 split holds in every prefix, not just on average.
    long_doc = math.floor((index + 1) * S3_LONG_SHARE) > math.floor(index * S3_LONG_SHARE)
    length_range = (S3_SEQ_LEN // 2, S3_SEQ_LEN) if long_doc else (S1_SEQ_LEN, S3_SEQ_LEN // 2)
    doc = long_context_doc(world, rng, variant=kind, length_range=length_range, count_tokens=count_tokens)
    return {k: doc[k] for k in CORPUS_FEATURES}


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
        rng = doc_rng("doc", stage, seed, world_seed, i)
        if stage == "s3":
            yield _s3_doc(world, rng, i, count, weights)
        else:
            doc = short_doc(world, rng, pick(rng, weights))
            doc["n_tokens"] = count(doc["text"])
            yield doc


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
        return records_to_dataset(docs, CORPUS_FEATURES)

    return cached_dataset(stage, config, build, cache_dir)


def tokenizer_training_texts(*, seed: int = 0, n_docs: int = 6000, world_seed: int = WORLD_SEED) -> Iterator[str]:
    """A sample of S1 and S2 text (half each) plus the long-context marker phrases, for training
    the tiny tokenizer; held-out content is excluded like in any training corpus."""
    yield from (d["text"] for d in generate_documents("s1", seed=seed, n_docs=n_docs // 2, world_seed=world_seed))
    yield from (d["text"] for d in generate_documents("s2", seed=seed, n_docs=n_docs - n_docs // 2, world_seed=world_seed))
    for which in ("first", "last"):
        yield f"{NEEDLE.format(value='12345')} {PASSKEY_QUERY} 12345. {ORDER_QUERY.format(which=which)} 12345."
