"""Stage corpora: documents in order, built once as `datasets` and cached by their config.

Document ``i`` of a stage's corpus is a pure function of (stage, seed, i, world_seed) and the
length settings of the stage that reads it, so corpora are prefix-stable: the first n documents of
a larger corpus are the smaller corpus, and ``offset`` continues one (the S1 control run reads
fresh S1 documents that way).

Lengths come from the reading stage's config, never from here: its row length `seq_len` sizes the
short retrieval documents of S1/S2 (:func:`.short_docs.short_retrieval_range`), and S3's documents
follow its `length_mix`, fractions of `seq_len` (:mod:`.length_mix`).
"""
from __future__ import annotations

import itertools
from typing import Iterator, Mapping, Sequence

import datasets

from ..cache import cached_dataset
from ..world import build_world
from .counting import CountTokens, approx_count_tokens, count_fingerprint
from .kind_weights import LONG_CONTEXT_STAGES, STAGE_KIND_WEIGHTS, STAGES
from .length_mix import check_length_mix, length_ranges, mix_rows
from .long_context import NEEDLE, ORDER_QUERY, PASSKEY_QUERY, long_context_doc
from .records import GENERATOR_VERSION, WORLD_SEED, doc_rng, pick, records_to_dataset
from .short_docs import short_doc, short_kind_generators, short_retrieval_range

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


def corpus_length_ranges(stage: str, seq_len: int, length_mix: Sequence[Sequence[float]] = ()) -> list[tuple[int, int]]:
    """The token ranges a stage's documents are generated in, for rows of `seq_len` tokens, or a
    ValueError naming what is wrong: a long-context stage (S3) takes one range per row of its
    `length_mix` (:mod:`.length_mix`), the others one range, of their short retrieval documents,
    and no length mix (their other documents have the lengths of their kind)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive number of tokens, got {seq_len!r}")
    mix = check_length_mix(length_mix)
    if stage in LONG_CONTEXT_STAGES:
        if not mix:
            raise ValueError(f"corpus {stage!r} (long-context documents) needs a length_mix "
                             "([[min_fraction, max_fraction, share], ...] of seq_len)")
        return length_ranges(seq_len, mix)
    if mix:
        raise ValueError(f"length_mix applies only to the long-context corpus ({', '.join(sorted(LONG_CONTEXT_STAGES))}); "
                         f"corpus {stage!r} has documents of their kinds' own lengths, got {list(map(list, mix))}")
    return [short_retrieval_range(seq_len)]


def generate_documents(
    stage: str,
    *,
    seed: int,
    n_docs: int,
    seq_len: int,
    length_mix: Sequence[Sequence[float]] = (),
    offset: int = 0,
    count_tokens: CountTokens | None = None,
    world_seed: int = WORLD_SEED,
    kind_weights: Mapping[str, float] | None = None,
) -> Iterator[dict]:
    """Documents ``offset .. offset+n_docs-1`` of a stage's training corpus (no caching), for a
    stage that reads it in rows of `seq_len` tokens; a long-context stage (S3) sizes its documents
    by `length_mix` (:func:`corpus_length_ranges`)."""
    ranges = corpus_length_ranges(stage, seq_len, length_mix)
    count = count_tokens or approx_count_tokens
    world = build_world(world_seed)
    weights = kind_weights or STAGE_KIND_WEIGHTS[stage]
    if stage in LONG_CONTEXT_STAGES:
        rows = itertools.islice(mix_rows([share for *_, share in check_length_mix(length_mix)]), offset, None)
        for i, row in zip(range(offset, offset + n_docs), rows):
            rng = doc_rng("doc", stage, seed, world_seed, i)
            kind = pick(rng, weights)
            doc = long_context_doc(world, rng, variant=kind, length_range=ranges[row], count_tokens=count)
            yield {k: doc[k] for k in CORPUS_FEATURES}
    else:
        generators = short_kind_generators(seq_len)
        for i in range(offset, offset + n_docs):
            rng = doc_rng("doc", stage, seed, world_seed, i)
            kind = pick(rng, weights)
            doc = short_doc(world, rng, generators[kind], kind)
            doc["n_tokens"] = count(doc["text"])
            yield doc


def corpus_config(stage: str, *, seed: int, n_docs: int, seq_len: int, length_mix: Sequence[Sequence[float]] = (),
                  offset: int = 0, count_tokens: CountTokens | None = None, world_seed: int = WORLD_SEED,
                  kind_weights: Mapping[str, float] | None = None) -> dict:
    """What identifies a corpus: its cache key (hashed into the directory name). Every length
    setting is in it, so corpora for two row lengths never share a directory."""
    ranges = corpus_length_ranges(stage, seq_len, length_mix)
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
        "seq_len": seq_len,
        "length_mix": [list(row) for row in check_length_mix(length_mix)],
        "length_ranges": [list(r) for r in ranges],
    }


def build_corpus(
    stage: str,
    *,
    seed: int,
    n_docs: int,
    seq_len: int,
    cache_dir,
    length_mix: Sequence[Sequence[float]] = (),
    count_tokens: CountTokens | None = None,
    offset: int = 0,
    world_seed: int = WORLD_SEED,
    kind_weights: Mapping[str, float] | None = None,
) -> datasets.Dataset:
    """The training corpus of `stage` ("s1", "s2", "s3") as a `datasets.Dataset`, for a stage that
    reads it in rows of `seq_len` tokens (S3: sized by `length_mix`, see :func:`generate_documents`).

    Written once to ``cache_dir/<stage>-<config-hash>/`` and reloaded when the hash matches; the
    hash covers stage, seed, n_docs, offset, world seed, generator version, mixture weights, the
    length settings and a fingerprint of `count_tokens`. Columns: text, kind, lang, uid,
    item_uids, n_tokens. `kind_weights` overrides the stage's document-kind mix (e.g. more "order"
    documents in S3).
    """
    config = corpus_config(stage, seed=seed, n_docs=n_docs, seq_len=seq_len, length_mix=length_mix, offset=offset,
                           count_tokens=count_tokens, world_seed=world_seed, kind_weights=kind_weights)

    def build() -> datasets.Dataset:
        docs = generate_documents(stage, seed=seed, n_docs=n_docs, seq_len=seq_len, length_mix=length_mix,
                                  offset=offset, count_tokens=count_tokens, world_seed=world_seed,
                                  kind_weights=kind_weights)
        return records_to_dataset(docs, CORPUS_FEATURES)

    return cached_dataset(stage, config, build, cache_dir)


def tokenizer_training_texts(*, seq_len: int, seed: int = 0, n_docs: int = 6000, world_seed: int = WORLD_SEED) -> Iterator[str]:
    """A sample of S1 and S2 text (half each) plus the long-context marker phrases, for training
    the tiny tokenizer; held-out content is excluded like in any training corpus. `seq_len` is the
    S1/S2 row length, so the sample's documents are those the S1 and S2 corpora hold."""
    yield from (d["text"] for d in generate_documents("s1", seed=seed, n_docs=n_docs // 2, seq_len=seq_len, world_seed=world_seed))
    yield from (d["text"] for d in generate_documents("s2", seed=seed, n_docs=n_docs - n_docs // 2, seq_len=seq_len,
                                                      world_seed=world_seed))
    for which in ("first", "last"):
        yield f"{NEEDLE.format(value='12345')} {PASSKEY_QUERY} 12345. {ORDER_QUERY.format(which=which)} 12345."
