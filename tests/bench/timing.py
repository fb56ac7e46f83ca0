"""Timing two or more implementations against each other on a shared machine.

A shared machine's speed drifts by up to 2x over a few seconds, so timing each implementation in a
block of its own lets that drift into their ratio. Here they take turns instead: round by round, each
runs once, in an order that rotates from round to round, and a ratio is taken within a round.
"""
from __future__ import annotations

import time
from typing import Callable, Mapping


def interleaved(steps: Mapping[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, list[tuple[float, float]]]:
    """{name: [(wall seconds, process-CPU seconds) per round]} after `warmup` untimed runs of each."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return times
