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


@pytest.fixture
def cut_at_call(monkeypatch):
    """A run cut part-way: `with cut_at_call(module, "name", n): ...` makes the n-th call of
    `module.name` inside the block raise KeyboardInterrupt (expected by the block), as a crash or a
    Ctrl-C there would; the attribute is restored when the block ends, ready for the resumed run."""
    import contextlib

    @contextlib.contextmanager
    def cut(module, name: str, n: int):
        real, calls = getattr(module, name), {"n": 0}

        def cutting(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt("simulated crash")
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, cutting)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(module, name, real)

    return cut


@pytest.fixture(scope="session")
def make_plan():
    """A factory of pipeline `Plan`s over hand-made stage directories, for code that reads a plan
    (the claims): `make_plan(root, {"flagship/s3": config, ...}, evals={...})`. Each key's parent is
    the previous key of the same role; configs may be any object (a SimpleNamespace of the fields read)."""
    from types import SimpleNamespace

    from qwen3repro.pipeline import Plan, StageNode

    def make(root, stages, *, evals=None, experiments=None, roles=None, threads=1):
        nodes, last = [], {}
        for key, config in stages.items():
            role = key.split("/")[0]
            node = StageNode(key, "stage", config, root / key, last.get(role))
            nodes.append(node)
            last[role] = node
        roles = tuple(roles or dict.fromkeys(k.split("/")[0] for k in stages))
        # Only what the plan's readers use of the scale's [pipeline] table.
        settings = SimpleNamespace(roles=roles, threads=threads, reuse="", claims=())
        return Plan("test", root, settings, nodes, {"evals": evals or {}, "experiments": experiments or {}})

    return make
