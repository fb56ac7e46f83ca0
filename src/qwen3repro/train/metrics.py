"""`metrics.jsonl`: the machine log every stage writes (the human one is `progress.Progress`).

`metrics.jsonl` holds one JSON object per logged step, appended and flushed as the run goes, so a
crashed run keeps everything logged before the crash. On resume from step N the file is first cut
back to the records with `step <= N` (rewritten atomically), so a resumed run never has duplicate
steps and the file always reads as one run.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Mapping

from ..files import RunFileError


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
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    # A line cut by a crash mid-write: everything after it is unusable.
                    break
                if not isinstance(record, dict):
                    raise RunFileError(f"{self.path}:{number}: expected a JSON object per line, got "
                                       f"{type(record).__name__}")
                records.append(record)
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


__all__ = ["MetricsLog", "default_printer"]
