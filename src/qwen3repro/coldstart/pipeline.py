"""The long-CoT cold-start data pipeline (Qwen3 report §4.1), with counts at every step.

    filtered, unfiltered, report = build_coldstart_dataset(ColdStartConfig.from_dict(table))

1. **Pool** (`pool.build_pool`): reserve the validation items first, then draw queries (task-family
   items plus unverifiable distractors).
2. **Query filter** (`filters.filter_queries`): drop queries without a verifier, with several
   sub-questions, overlapping a validation item, or answered correctly without CoT by the
   reference (`filters.BoundedMentalSolver` at tiny scale, or any callable ``query -> completion``).
3. **Candidates**: N per kept query from a `CandidateGenerator` (default `SyntheticReasoner`).
4. **Pass@N**: queries none of whose candidates is correct go to review (the report has humans
   assess them) and are not trained on; they are counted.
5. **Response filter** (`filters.ResponseFilter`): the six detectors; a candidate with any flag is
   removed. Per-detector precision/recall against the generator's injected labels.
6. **Minimal subset**: at most `keep_per_query` clean responses per query ("few samples", §4.1).

`unfiltered` is the control for the Filtering claim: `keep_per_query` candidates per query that
passed the query filter, drawn without looking at any detector. Both sets are chats
``[user: question, assistant: "<think>\\n{thinking}\\n</think>\\n\\n{summary}"]`` ready for
`stages.sft` (`chat.tokenize_conversation` renders them with the Qwen3 template).
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, Sequence

from ..config import ConfigError
from ..config_fields import NonNegative, Positive, TableOf, checked_fields
from ..data import tasks
from ..data.queries import Query
from ..data.synthetic import s2_eval_items
from ..data.world import build_world
from ..files import write_json_atomic
from .filters import (BoundedMentalSolver, FilterThresholds, ResponseFilter, detector_metrics, filter_queries,
                      score_response)
from .pool import build_pool
from .reasoner import DEFECTS, SUMMARY_STYLES, WRONG_ANSWER, CandidateGenerator, DefectRates, SyntheticReasoner

REPORT_FILE = "coldstart_report.json"
FILTERED_FILE = "coldstart_filtered.jsonl"
UNFILTERED_FILE = "coldstart_unfiltered.jsonl"
REFERENCES = ("mental", "none")


@dataclass(frozen=True)
class ColdStartConfig:
    """Scale-dependent sizes (tiny/*.toml `[coldstart]`) and the recipe's rates and thresholds."""

    n_queries: Positive = 600
    """Queries drawn into the pool after the validation set."""
    n_validation: NonNegative = 100
    """Validation items reserved first."""
    distractor_rate: float = 0.1
    """Expected share of unverifiable queries in the pool."""
    n_candidates: Positive = 4
    """N responses per query (§4.1: 'N candidate responses')."""
    keep_per_query: Positive = 1
    """Clean responses kept per query (the report's minimal subset)."""
    reference: str = "mental"
    """No-CoT reference of the query filter: 'mental' (BoundedMentalSolver) or 'none'."""
    mental_max_steps: NonNegative = 3
    summary_style: str = "restate"
    """What follows ``</think>``: 'restate' (result line + ``Answer: X``) or 'answer' (bare answer)."""
    families: tuple[str, ...] = ()
    """Task families of the pool (empty: all)."""
    defect_rates: Annotated[Mapping[str, float], TableOf(DefectRates)] = field(default_factory=dict)
    """`reasoner.DefectRates` fields."""
    thresholds: Annotated[Mapping[str, Any], TableOf(FilterThresholds)] = field(default_factory=dict)
    """`filters.FilterThresholds` fields."""
    seed: int = 0
    world_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "families", tuple(self.families))
        for name in ("n_queries", "n_candidates", "keep_per_query"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"coldstart.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.n_validation, int) or self.n_validation < 0:
            raise ConfigError(f"coldstart.n_validation must be an integer >= 0, got {self.n_validation!r}")
        if self.summary_style not in SUMMARY_STYLES:
            raise ConfigError(f"coldstart.summary_style must be one of {SUMMARY_STYLES}, got {self.summary_style!r}")
        if self.reference not in REFERENCES:
            raise ConfigError(f"coldstart.reference must be one of {REFERENCES}, got {self.reference!r}")
        unknown = set(self.families) - set(tasks.FAMILIES)
        if unknown:
            raise ConfigError(f"coldstart.families: unknown {sorted(unknown)}; known: {list(tasks.FAMILIES)}")
        self.rates()  # validate now, naming unknown keys
        self.filter_thresholds()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "coldstart") -> "ColdStartConfig":
        return cls(**checked_fields(cls, d, where))

    def rates(self) -> DefectRates:
        return DefectRates.from_dict(self.defect_rates)

    def filter_thresholds(self) -> FilterThresholds:
        return FilterThresholds.from_dict(self.thresholds)


def to_messages(question: str, response: str) -> list[dict[str, str]]:
    """The SFT chat of one response: the template splits the reasoning out at ``</think>``."""
    return [{"role": "user", "content": question}, {"role": "assistant", "content": response}]


def build_coldstart_dataset(
    cfg: ColdStartConfig,
    *,
    generator: CandidateGenerator | None = None,
    reference: Callable[[Query], str] | None = None,
    out_dir: str | Path | None = None,
) -> tuple[list[list[dict]], list[list[dict]], dict[str, Any]]:
    """Run the pipeline; returns (filtered chats, unfiltered chats, report). With `out_dir`, writes
    the report as coldstart_report.json and both sets as JSONL ({"messages": [...]} per line)."""
    thresholds = cfg.filter_thresholds()
    world = build_world(cfg.world_seed)
    pool = build_pool(n_queries=cfg.n_queries, n_validation=cfg.n_validation, distractor_rate=cfg.distractor_rate,
                      seed=cfg.seed, families=cfg.families or None, world_seed=cfg.world_seed)
    if reference is None and cfg.reference == "mental":
        reference = BoundedMentalSolver(cfg.mental_max_steps)
    detectors = ResponseFilter(thresholds, validation=pool.validation, world=world)
    kept_queries, rejected = filter_queries(pool.queries, reference, thresholds, detectors)

    generator = generator or SyntheticReasoner(cfg.rates(), validation=pool.validation, world=world,
                                               summary_style=cfg.summary_style)
    candidates = generator.generate(kept_queries, cfg.n_candidates, cfg.seed)

    rng = random.Random(f"coldstart-select|{cfg.seed}")
    filtered: list[list[dict]] = []
    unfiltered: list[list[dict]] = []
    used: dict[str, list[str]] = {"filtered": [], "unfiltered": []}  # query uids each set trains on
    all_flags, all_labels = [], []
    kept_labels: list[frozenset] = []
    unfiltered_labels: list[frozenset] = []
    removed_by = {d: 0 for d in DEFECTS}
    n_cands = n_zero_pass = n_zero_pass_cands = n_filter_input = n_removed = n_clean = 0
    n_queries_without_clean = 0
    for query, cands in zip(kept_queries, candidates):
        n_cands += len(cands)
        flags = [detectors.detect(c.text, query) for c in cands]
        for c, f in zip(cands, flags):
            if c.labels is not None:
                all_flags.append(f)
                all_labels.append(c.labels)
        for c in rng.sample(cands, min(cfg.keep_per_query, len(cands))):
            unfiltered.append(to_messages(query.question, c.text))
            used["unfiltered"].append(query.uid)
            unfiltered_labels.append(c.labels or frozenset())
        if all(f[WRONG_ANSWER] for f in flags):  # Pass@N = 0: to review, not trained
            n_zero_pass += 1
            n_zero_pass_cands += len(cands)
            continue
        n_filter_input += len(cands)
        clean = []
        for c, f in zip(cands, flags):
            for d in DEFECTS:
                removed_by[d] += f[d]
            if any(f.values()):
                n_removed += 1
            else:
                clean.append(c)
        n_clean += len(clean)
        if not clean:
            n_queries_without_clean += 1
        for c in clean[: cfg.keep_per_query]:
            filtered.append(to_messages(query.question, c.text))
            used["filtered"].append(query.uid)
            kept_labels.append(c.labels or frozenset())

    def label_rates(label_sets: Sequence[frozenset]) -> dict[str, float | None]:
        n = len(label_sets)
        return {d: (sum(d in s for s in label_sets) / n if n else None) for d in DEFECTS}

    report: dict[str, Any] = {
        "section": "Qwen3 report §4.1 long-CoT cold start",
        "config": asdict(cfg),
        "pool": pool.counts(),
        "query_filter": {"input": len(pool.queries), "rejected": rejected, "kept": len(kept_queries)},
        "generation": {"queries": len(kept_queries), "n_per_query": cfg.n_candidates, "candidates": n_cands},
        "pass_at_n": {"positive": len(kept_queries) - n_zero_pass, "zero_to_review": n_zero_pass,
                      "candidates_of_zero_pass_queries": n_zero_pass_cands},
        "response_filter": {"input": n_filter_input, "flagged_by": removed_by, "removed": n_removed,
                            "clean": n_clean, "queries_without_clean_response": n_queries_without_clean},
        "selection": {"keep_per_query": cfg.keep_per_query, "filtered": len(filtered), "unfiltered": len(unfiltered)},
        "injected_defect_rates": {"candidates": label_rates(all_labels), "filtered": label_rates(kept_labels),
                                  "unfiltered": label_rates(unfiltered_labels)},
        "detectors": detector_metrics(all_flags, all_labels) if all_labels else {},
        "labelled_candidates": len(all_labels),
        "used_uids": {k: sorted(set(v)) for k, v in used.items()},
    }
    report["counts_add_up"] = counts_add_up(report)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / FILTERED_FILE, filtered)
        write_jsonl(out / UNFILTERED_FILE, unfiltered)
        write_json_atomic(out / REPORT_FILE, report)
    return filtered, unfiltered, report


def counts_add_up(report: Mapping[str, Any]) -> bool:
    """Every step's input equals its outputs (the invariants the report's counts must satisfy)."""
    qf, gen, pn, rf = report["query_filter"], report["generation"], report["pass_at_n"], report["response_filter"]
    return (
        qf["input"] == report["pool"]["queries"] == qf["kept"] + sum(qf["rejected"].values())
        and gen["queries"] == qf["kept"] == pn["positive"] + pn["zero_to_review"]
        and gen["candidates"] == rf["input"] + pn["candidates_of_zero_pass_queries"]
        and rf["input"] == rf["removed"] + rf["clean"]
        and report["selection"]["filtered"] <= rf["clean"]
        and all(v <= rf["removed"] for v in rf["flagged_by"].values())
    )


def write_jsonl(path: str | Path, conversations: Sequence[Sequence[Mapping]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": list(messages)}, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[list[dict]]:
    """Conversations from a JSONL file of {"messages": [...]} lines (or bare message lists)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out.append(row["messages"] if isinstance(row, dict) else row)
    return out


# ============================================================================ scoring a model's outputs
def heldout_queries(*, n_per_cell: int = 4, seed: int = 0, families: Sequence[str] | None = None) -> list[Query]:
    """Held-out evaluation queries (the task families' evaluation partition, never in the pool)."""
    return [Query.from_task(item) for item in s2_eval_items(seed=seed, n_per_cell=n_per_cell, families=families)]


def evaluate_outputs(texts: Sequence[str], queries: Sequence[Query], detectors: ResponseFilter) -> dict[str, Any]:
    """Accuracy and per-defect rates of a model's outputs (the Filtering claim's measurements).

    Accuracy counts malformed outputs as wrong; `defect_rates[k]` is the share of outputs flagged
    by detector k (for `wrong_answer` it is 1 - accuracy)."""
    if len(texts) != len(queries):
        raise ValueError(f"{len(texts)} outputs for {len(queries)} queries")
    n = len(texts)
    correct = sum(score_response(t, q).score == 1.0 for t, q in zip(texts, queries))
    flags = [detectors.detect(t, q) for t, q in zip(texts, queries)]
    return {"n": n, "accuracy": correct / n if n else None,
            "defect_rates": {d: (sum(f[d] for f in flags) / n if n else None) for d in DEFECTS},
            "any_defect_rate": sum(any(f.values()) for f in flags) / n if n else None}


__all__ = ["ColdStartConfig", "FILTERED_FILE", "REPORT_FILE", "UNFILTERED_FILE", "build_coldstart_dataset",
           "counts_add_up", "evaluate_outputs", "heldout_queries", "read_jsonl", "to_messages", "write_jsonl"]
