"""Long-CoT cold start (Qwen3 report §4.1): query pool, candidate generators, filters, pipeline."""
from .filters import (BoundedMentalSolver, FilterThresholds, ResponseFilter, detector_metrics, filter_queries,
                      score_response)
from .pipeline import ColdStartConfig, build_coldstart_dataset, evaluate_outputs, heldout_queries
from .pool import Pool, build_pool, query_kind
from .reasoner import (DEFECTS, Candidate, CandidateGenerator, DefectRates, ModelGenerator, OpenAICompatibleGenerator,
                       SyntheticReasoner)

__all__ = [
    "BoundedMentalSolver", "Candidate", "CandidateGenerator", "ColdStartConfig", "DEFECTS", "DefectRates",
    "FilterThresholds", "ModelGenerator", "OpenAICompatibleGenerator", "Pool", "ResponseFilter",
    "SyntheticReasoner", "build_coldstart_dataset", "build_pool", "detector_metrics", "evaluate_outputs",
    "filter_queries", "heldout_queries", "query_kind", "score_response",
]
