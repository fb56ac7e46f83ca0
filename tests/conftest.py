"""Shared test settings.

Hypothesis runs derandomized (the same examples on every run, so CI is reproducible) with no
per-example deadline (CI machines are noisy; speed lives in benchmarks, not in unit tests).
"""
import os

import pytest
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

# The tests run tiny models: one intra-op thread is both faster and steadier than two on a shared
# 2-core machine (multi-threaded tiny ops wait on the busiest core). Code that sets its own thread
# count (the pipeline) restores it; this fixture re-asserts it for every test regardless.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)
    yield
