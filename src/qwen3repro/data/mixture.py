"""Real-data adapters: weighted, deterministic mixtures of `datasets` sources per stage.

At full scale each pre-training stage reads a mixture of corpora (hub datasets, local parquet or
JSON-lines shards, optionally streamed); at tiny scale a mixture may also hold the synthetic
corpora. Both go through one interface:

* :class:`SourceSpec` names one source: its kind ("hub", "parquet", "jsonl", "disk", "synthetic"), where
  it is, the split, which field holds the text, its weight and whether to stream it.
* :class:`StageMixture` loads every source, reduces each to ``{"text", "source"}`` and interleaves
  them with ``datasets.interleave_datasets`` (probabilities = normalised weights, a seed, a
  stopping strategy), so the same seed gives the same sequence of documents.

A pretraining stage's recipe gives the report's qualitative mix as category weights
(`category_weights`; §3.2: S1 broad general and multilingual text; S2 a higher share of STEM, code,
reasoning and synthetic data; S3 long documents); :func:`stage_mixture` turns a category → sources
table into a mixture with those weights. Hub datasets are loaded with ``datasets.load_dataset(id)`` and
are never touched by the tests, which use local stand-ins.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import datasets

from .synthetic import STAGES, build_corpus

SOURCE_KINDS = ("hub", "parquet", "jsonl", "disk", "synthetic")
STOPPING_STRATEGIES = ("first_exhausted", "all_exhausted", "all_exhausted_without_replacement")


class MixtureError(ValueError):
    """A source or mixture is misconfigured (unknown kind, missing text field, bad weight...)."""


@dataclass(frozen=True)
class SourceSpec:
    """One corpus in a stage mixture.

    ``path_or_id``: a hub id ("hub"), a file, directory or glob of files ("parquet", "jsonl"), a directory
    written by `Dataset.save_to_disk` ("disk": e.g. a teacher-outputs stage's `data/`), or a stage name
    "s1"/"s2"/"s3" ("synthetic": built with :func:`.synthetic.build_corpus`).
    ``config_name`` is the hub dataset's configuration (e.g. a language subset).
    """

    kind: str
    path_or_id: str
    split: str = "train"
    text_field: str = "text"
    weight: float = 1.0
    streaming: bool = False
    name: str | None = None
    config_name: str | None = None
    # Synthetic sources only: how many documents to generate, and the lengths of the stage that
    # reads them (its row length and, for the long-context corpus, its length mix; see
    # `synthetic.build_corpus`).
    n_docs: int | None = None
    seq_len: int | None = None
    length_mix: Sequence[Sequence[float]] = ()

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise MixtureError(f"unknown source kind {self.kind!r} for {self.path_or_id!r}; known kinds: {', '.join(SOURCE_KINDS)}")
        if not (isinstance(self.weight, (int, float)) and self.weight > 0):
            raise MixtureError(f"source {self.label}: weight must be > 0, got {self.weight!r}")
        if self.kind == "synthetic" and self.streaming:
            raise MixtureError(f"source {self.label}: synthetic corpora are built locally; stream the mixture instead")

    @property
    def label(self) -> str:
        return self.name or f"{self.kind}:{self.path_or_id}"


def data_files(spec: SourceSpec, ext: tuple[str, ...]) -> list[str] | str:
    path = spec.path_or_id
    if os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, fs in os.walk(path) for f in fs if f.endswith(ext))
        if not files:
            raise MixtureError(f"source {spec.label}: no {'/'.join(ext)} files under {path}")
        return files
    if not any(ch in path for ch in "*?[") and not os.path.exists(path):
        raise MixtureError(f"source {spec.label}: file {path} does not exist")
    return path


def load_source(spec: SourceSpec, *, seed: int = 0, cache_dir: str | os.PathLike | None = None, count_tokens=None):
    """The raw dataset of one source (a `Dataset`, or an `IterableDataset` when streaming).

    With a `cache_dir`, `datasets`' own Arrow cache for hub/local files goes to
    ``cache_dir/hf`` (else to its default, ``HF_DATASETS_CACHE``)."""
    hf_cache = str(Path(cache_dir) / "hf") if cache_dir is not None else None
    if spec.kind == "hub":
        return datasets.load_dataset(spec.path_or_id, spec.config_name, split=spec.split, streaming=spec.streaming, cache_dir=hf_cache)
    if spec.kind in ("parquet", "jsonl"):
        builder = "parquet" if spec.kind == "parquet" else "json"
        ext = (".parquet",) if spec.kind == "parquet" else (".jsonl", ".json", ".jsonl.gz", ".json.gz")
        files = data_files(spec, ext)
        return datasets.load_dataset(builder, data_files={spec.split: files}, split=spec.split, streaming=spec.streaming, cache_dir=hf_cache)
    if spec.kind == "disk":
        if not os.path.isdir(spec.path_or_id):
            raise MixtureError(f"source {spec.label}: {spec.path_or_id} is not a directory written by save_to_disk")
        ds = datasets.load_from_disk(spec.path_or_id)
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise MixtureError(f"source {spec.label}: no split {spec.split!r}; splits: {list(ds)}")
            ds = ds[spec.split]
        return ds.to_iterable_dataset() if spec.streaming else ds
    # synthetic
    if spec.path_or_id not in STAGES:
        raise MixtureError(f"source {spec.label}: synthetic path_or_id must be a stage ({', '.join(STAGES)}), got {spec.path_or_id!r}")
    if cache_dir is None or spec.n_docs is None or spec.seq_len is None:
        raise MixtureError(f"source {spec.label}: synthetic sources need n_docs and seq_len in the spec and a cache_dir")
    try:
        return build_corpus(spec.path_or_id, seed=seed, n_docs=spec.n_docs, seq_len=spec.seq_len,
                            length_mix=spec.length_mix, cache_dir=cache_dir, count_tokens=count_tokens)
    except ValueError as e:
        raise MixtureError(f"source {spec.label}: {e}") from None


def _column_names(ds) -> list[str] | None:
    names = getattr(ds, "column_names", None)
    if names is None and getattr(ds, "features", None) is not None:
        names = list(ds.features)
    return names


def to_text_dataset(ds, spec: SourceSpec):
    """Reduce a source to the two columns every mixture member has: text and source."""
    names = _column_names(ds)
    if names is None:  # streaming without known features: look at the first row
        first = next(iter(ds), None)
        names = list(first) if first is not None else []
    if spec.text_field not in names:
        raise MixtureError(f"source {spec.label}: text field {spec.text_field!r} not found; columns are {names}")
    ds = ds.select_columns([spec.text_field])
    if spec.text_field != "text":
        ds = ds.rename_column(spec.text_field, "text")
    label = spec.label
    if isinstance(ds, datasets.Dataset):
        ds = ds.add_column("source", [label] * len(ds))
    else:
        ds = ds.map(lambda ex: {"source": label})
    return ds.cast(datasets.Features({"text": datasets.Value("string"), "source": datasets.Value("string")}))


@dataclass
class StageMixture:
    """Sources interleaved by weight, deterministic in `seed`.

    ``stopping_strategy`` is passed to ``datasets.interleave_datasets``: "first_exhausted" (stop
    when the first source runs out: every prefix keeps the weights, the default), "all_exhausted"
    (oversample until all have run out) or "all_exhausted_without_replacement".

    Note: `datasets` sleeps 5 s when an interleaved iterator over *streamed parquet* is closed
    (its workaround for apache/arrow#45214); it is a fixed cost per pass, not per row.
    """

    stage: str
    sources: Sequence[SourceSpec]
    seed: int = 0
    stopping_strategy: str = "first_exhausted"
    cache_dir: str | os.PathLike | None = None
    count_tokens: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.sources:
            raise MixtureError(f"stage {self.stage!r}: a mixture needs at least one source")
        if self.stopping_strategy not in STOPPING_STRATEGIES:
            raise MixtureError(f"unknown stopping_strategy {self.stopping_strategy!r}; known: {', '.join(STOPPING_STRATEGIES)}")
        labels = [s.label for s in self.sources]
        dup = {l for l in labels if labels.count(l) > 1}
        if dup:
            raise MixtureError(f"stage {self.stage!r}: duplicate source names {sorted(dup)}; set SourceSpec.name")

    @property
    def streaming(self) -> bool:
        return any(s.streaming for s in self.sources)

    @property
    def probabilities(self) -> list[float]:
        total = sum(s.weight for s in self.sources)
        return [s.weight / total for s in self.sources]

    def load(self):
        """The interleaved dataset: a `Dataset`, or an `IterableDataset` if any source streams
        (the others are then converted with ``to_iterable_dataset``)."""
        parts = [
            to_text_dataset(load_source(s, seed=self.seed, cache_dir=self.cache_dir, count_tokens=self.count_tokens), s)
            for s in self.sources
        ]
        if self.streaming:
            parts = [p.to_iterable_dataset() if isinstance(p, datasets.Dataset) else p for p in parts]
        if len(parts) == 1:
            return parts[0]
        return datasets.interleave_datasets(
            parts, probabilities=self.probabilities, seed=self.seed, stopping_strategy=self.stopping_strategy
        )


# ---------------------------------------------------------------------------- per-stage weights
# A pretraining stage's category weights are in its recipe (`category_weights`); categories the code knows
# as reasoning-dense, for checks that S2 raises their share (report §3.2).
REASONING_CATEGORIES = frozenset({"code", "math", "stem", "synthetic"})


def stage_mixture(
    stage: str,
    sources_by_category: Mapping[str, Sequence[SourceSpec]],
    *,
    category_weights: Mapping[str, float],
    seed: int = 0,
    stopping_strategy: str = "first_exhausted",
    **kwargs: Any,
) -> StageMixture:
    """A stage's mixture: each category gets its weight (the stage recipe's `category_weights`), split
    among its sources by their own weights. Categories without sources are dropped (their weight is
    redistributed)."""
    weights = category_weights
    unknown = set(sources_by_category) - set(weights)
    if unknown:
        raise MixtureError(f"stage {stage!r}: unknown categories {sorted(unknown)}; known: {', '.join(weights)}")
    specs: list[SourceSpec] = []
    for cat, srcs in sources_by_category.items():
        inner = sum(s.weight for s in srcs)
        for s in srcs:
            specs.append(dataclasses.replace(s, weight=weights[cat] * s.weight / inner, name=s.name or f"{cat}:{s.path_or_id}"))
    return StageMixture(stage, specs, seed=seed, stopping_strategy=stopping_strategy, **kwargs)
