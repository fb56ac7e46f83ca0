"""Stage corpora S1/S2/S3 and held-out evaluation sets over the tiny synthetic world.

The report's three pre-training stages (Qwen3 report §3.2) are rebuilt at tiny scale:

* **S1 general** — prose in five synthetic languages (weights from :mod:`..world`, one rare),
  facts about generated entities, parallel sentences, tiny programs with their output, bare
  arithmetic, and a few worked problems.
* **S2 reasoning** — the same kinds with a much larger share of worked problems (the verifiable
  families of :mod:`..tasks`, with step-by-step traces), code and arithmetic: "a higher share of
  STEM, coding, reasoning and synthetic data".
* **S3 long context** — long documents with long-range dependencies: a pass key planted at any
  depth and asked for at the end, and an *order* variant (two pass keys, ask for the first or the
  last) that content matching alone cannot solve. Their lengths follow the stage's length mix
  (the report's: 75% in [S3/2, S3] tokens, 25% in [S1, S3/2]).

Every length comes from the stage config that reads a corpus (its `seq_len`, and S3's
`length_mix`) or from the caller (evaluated lengths); none is a constant here.

The package, one module per part:

* :mod:`.records` — the document record, ids and per-document random streams;
* :mod:`.counting` — token counts before the tokenizer exists;
* :mod:`.kind_weights` — which document kinds each stage holds;
* :mod:`.length_mix` — the length ranges of long-context corpora, as fractions of the row;
* :mod:`.prose` — text in the world's languages;
* :mod:`.short_docs` — the S1/S2 document kinds;
* :mod:`.long_context` — long documents with planted pass keys;
* :mod:`.corpora` — stage corpora, cached as `datasets`, and the tokenizer's sample;
* :mod:`.evalsets` — held-out evaluation item sets;
* :mod:`.leaks` — the check that no held-out item reaches training data.

Every public name is importable from ``qwen3repro.data.synthetic``.
"""
from .corpora import (
    CORPUS_FEATURES,
    build_corpus,
    corpus_config,
    corpus_length_ranges,
    generate_documents,
    tokenizer_training_texts,
)
from .counting import CountTokens, approx_count_tokens, count_fingerprint
from .evalsets import (
    KNOWLEDGE_CHOICES,
    PASSKEY_EVAL_PER_LENGTH,
    S2_EVAL_PER_CELL,
    build_eval_set,
    check_retrieval,
    heldout_text,
    knowledge_probes,
    passkey_eval_items,
    s2_eval_items,
    translation_items,
)
from .kind_weights import (
    GENERAL_KINDS,
    LONG_CONTEXT_STAGES,
    PROBLEM_FAMILY_WEIGHTS,
    REASONING_KINDS,
    S1_KIND_WEIGHTS,
    S2_KIND_WEIGHTS,
    S3_KIND_WEIGHTS,
    STAGE_KIND_WEIGHTS,
    STAGES,
    reasoning_share,
)
from .leaks import HeldoutLeakError, assert_disjoint
from .length_mix import LengthMix, check_length_mix, length_ranges, mix_rows
from .long_context import (
    NEEDLE,
    ORDER_MIN_GAP,
    ORDER_QUERY,
    PASSKEY_DIGITS,
    PASSKEY_QUERY,
    long_context_doc,
    passkey_uid,
)
from .prose import frame_uid, prose_text
from .records import GENERATOR_VERSION, WORLD_SEED
from .short_docs import render_problem, render_program, short_kind_generators, short_retrieval_range

__all__ = [
    "CORPUS_FEATURES", "build_corpus", "corpus_config", "corpus_length_ranges", "generate_documents",
    "tokenizer_training_texts",
    "CountTokens", "approx_count_tokens", "count_fingerprint",
    "KNOWLEDGE_CHOICES", "PASSKEY_EVAL_PER_LENGTH", "S2_EVAL_PER_CELL", "build_eval_set", "check_retrieval",
    "heldout_text", "knowledge_probes", "passkey_eval_items", "s2_eval_items", "translation_items",
    "GENERAL_KINDS", "LONG_CONTEXT_STAGES", "PROBLEM_FAMILY_WEIGHTS", "REASONING_KINDS", "S1_KIND_WEIGHTS", "S2_KIND_WEIGHTS",
    "S3_KIND_WEIGHTS", "STAGE_KIND_WEIGHTS", "STAGES", "reasoning_share",
    "HeldoutLeakError", "assert_disjoint",
    "LengthMix", "check_length_mix", "length_ranges", "mix_rows",
    "NEEDLE", "ORDER_MIN_GAP", "ORDER_QUERY", "PASSKEY_DIGITS", "PASSKEY_QUERY", "long_context_doc", "passkey_uid",
    "frame_uid", "prose_text",
    "GENERATOR_VERSION", "WORLD_SEED",
    "render_problem", "render_program", "short_kind_generators", "short_retrieval_range",
]
