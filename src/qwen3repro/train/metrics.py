"""Training logs: a one-line progress report for humans and `metrics.jsonl` for machines.

Progress line (printed every `log_every` steps, and at the last step):

    step   120/1000 ( 12.0%) | loss 3.4521 | lr 3.00e-04 | gnorm 0.812 | 51,200 tok/s | elapsed 0:01:02 | eta 0:07:35

`metrics.jsonl` holds one JSON object per logged step, appended and flushed as the run goes, so a
crashed run keeps everything logged before the crash. On resume from step N the file is first cut
back to the records with `step <= N` (rewritten atomically), so a resumed run never has duplicate
steps and the file always reads as one run.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Mapping


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def format_progress(
    step: int,
    total: int,
    *,
    loss: float,
    lr: float,
    grad_norm: float | None,
    tokens_per_s: float | None,
    elapsed_s: float,
    eta_s: float | None,
) -> str:
    width = len(str(total))
    parts = [
        f"step {step:>{width}d}/{total} ({100.0 * step / max(total, 1):5.1f}%)",
        f"loss {loss:.4f}",
        f"lr {lr:.2e}",
    ]
    if grad_norm is not None:
        parts.append(f"gnorm {grad_norm:.3f}")
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s:,.0f} tok/s")
    parts.append(f"elapsed {format_duration(elapsed_s)}")
    parts.append(f"eta {format_duration(eta_s) if eta_s is not None else '?'}")
    return " | ".join(parts)


class ProgressClock:
    """Elapsed time (carried across resumes) and an ETA from this session's mean step time."""

    def __init__(self, start_step: int, total_steps: int, elapsed_before: float = 0.0) -> None:
        self.start_step = start_step
        self.total_steps = total_steps
        self.elapsed_before = elapsed_before
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.t0)

    def eta(self, step: int) -> float | None:
        done = step - self.start_step
        if done <= 0:
            return None
        per_step = (time.perf_counter() - self.t0) / done
        return per_step * (self.total_steps - step)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no NaN/Inf; keep the line valid
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class MetricsLog:
    """Append-only `metrics.jsonl`, one record per logged step, keyed by `step`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        records = []
        with open(self.path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    # A line cut by a crash mid-write: everything after it is unusable.
                    break
        return records

    def truncate_to(self, step: int) -> None:
        """Keep only records with step <= `step` (atomic rewrite; no-op if the file is absent)."""
        if not os.path.exists(self.path):
            return
        kept = [r for r in self.read() if int(r.get("step", 0)) <= step]
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def append(self, record: Mapping[str, Any]) -> None:
        if "step" not in record:
            raise ValueError("a metrics record needs a 'step'")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(_jsonable(dict(record)), sort_keys=True) + "\n")
            f.flush()


def default_printer() -> Callable[[str], None]:
    return lambda line: print(line, flush=True)


__all__ = ["MetricsLog", "ProgressClock", "format_progress", "format_duration", "default_printer"]
