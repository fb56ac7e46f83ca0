"""The one progress line with an ETA, for every long job: training steps, RL steps, evaluation sweeps.

    progress = Progress(total=1000, done=step, elapsed_before=state["elapsed_s"])
    ...
    progress.update(step)
    say(progress.line(f"loss {loss:.4f}", f"lr {lr:.2e}"))
    # step  120/1000 ( 12.0%) | loss 3.4521 | lr 3.00e-04 | elapsed 0:01:02 | eta 0:07:35

Work is counted in any unit: optimizer steps (the counter shows `step i/N`), or an estimate of cost
such as FLOPs when items differ in price (`count=False`: the line shows the share done), so the ETA
stays honest when long items cost more than short ones. Elapsed time carries across a resume; the
ETA extrapolates this process's own rate, so time spent before a restart does not distort it.
"""
from __future__ import annotations

import math
import time


def format_duration(seconds: float | None) -> str:
    """`h:mm:ss`, or `?` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """Share done, elapsed time and ETA of one job of `total` units of work."""

    def __init__(self, total: float, *, done: float = 0.0, elapsed_before: float = 0.0, name: str = "",
                 count: bool = True) -> None:
        self.total, self.done, self.name, self.count = total, done, name, count
        self.elapsed_before = elapsed_before
        self._start_done = done
        self._t0 = self._last_line = time.perf_counter()

    def add_total(self, work: float) -> None:
        """More work than first estimated (a sweep that discovers its items as it goes)."""
        self.total += work

    def advance(self, work: float = 1.0) -> None:
        self.done += work

    def update(self, done: float) -> None:
        self.done = done

    def elapsed(self) -> float:
        """Seconds spent on the job, runs before a resume included."""
        return self.elapsed_before + (time.perf_counter() - self._t0)

    def eta(self) -> float | None:
        """Seconds left at this process's mean rate; None before any work is done here."""
        done_here = self.done - self._start_done
        if done_here <= 0:
            return None
        return (time.perf_counter() - self._t0) / done_here * max(self.total - self.done, 0.0)

    def due(self, every_s: float) -> bool:
        """True at most once every `every_s` seconds: for jobs whose units are too small to report each."""
        now = time.perf_counter()
        if now - self._last_line < every_s:
            return False
        self._last_line = now
        return True

    def counter(self) -> str:
        share = 100.0 * self.done / self.total if self.total else 100.0
        if self.count:
            total = int(self.total)
            return f"step {int(self.done):>{len(str(total))}d}/{total} ({share:5.1f}%)"
        return f"{share:5.1f}%"

    def line(self, *fields: str) -> str:
        """`[name ]counter | field | ... | elapsed h:mm:ss | eta h:mm:ss`."""
        head = f"{self.name} {self.counter()}" if self.name else self.counter()
        return " | ".join([head, *fields, f"elapsed {format_duration(self.elapsed())}",
                           f"eta {format_duration(self.eta())}"])


__all__ = ["Progress", "format_duration"]
