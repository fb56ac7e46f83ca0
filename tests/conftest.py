"""Shared test settings.

Hypothesis runs derandomized (the same examples on every run, so CI is reproducible) with no
per-example deadline (CI machines are noisy; speed lives in benchmarks, not in unit tests).
"""
import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, os.cpu_count() or 1))
