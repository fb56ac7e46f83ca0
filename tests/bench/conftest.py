"""Benchmarks use every core (the unit tests run on one thread; see tests/conftest.py).

QWEN3REPRO_BENCH_THREADS sets another count. The count used is recorded in each result.
"""
import os

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():  # overrides the unit tests' fixture of the same name
    torch.set_num_threads(int(os.environ.get("QWEN3REPRO_BENCH_THREADS", os.cpu_count() or 1)))
    yield
