"""`metrics.jsonl`: the machine log every stage writes (the human one is `progress.Progress`).

`metrics.jsonl` holds one JSON object per logged step, appended and flushed as the run goes, so a
crashed run keeps everything logged before the crash. On resume from step N the file is first cut
back to the records with `step <= N` (rewritten atomically), so a resumed run never has duplicate
steps and the file always reads as one run. A damaged line costs only itself (`MetricsLog`).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
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


class CorruptLinesWarning(UserWarning):
    """metrics.jsonl holds lines that are not JSON; they were skipped (and kept in the file where they sit)."""


@dataclass(frozen=True)
class _Line:
    number: int
    """1-based line number in the file."""
    raw: bytes
    """The line's bytes, without its newline."""
    record: dict[str, Any] | None
    """The parsed record; None for a corrupt line."""


class MetricsLog:
    """Append-only `metrics.jsonl`, one record per logged step, keyed by `step`.

    Damage. A crash mid-append leaves a cut last line, and a disk or a hand can garble one in the
    middle; neither may cost the records around it. A line that is not JSON (or not UTF-8) is a
    *corrupt line*: `read` skips it, keeps every valid record after it, warns (`CorruptLinesWarning`)
    and lists its number in `corrupt_lines`. A line that is valid JSON but not an object, or an object
    whose `step` is not an integer, was written by something other than this log: the file is not a
    metrics log, and reading it is a RunFileError naming file:line.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.corrupt_lines: list[int] = []
        """Line numbers of the corrupt lines the last `read` or `truncate_to` met."""

    def _lines(self) -> list[_Line]:
        self.corrupt_lines = []
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as f:
            data = f.read()
        lines = []
        for number, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                lines.append(_Line(number, raw, None))
                continue
            if not isinstance(record, dict):
                raise RunFileError(f"{self.path}:{number}: expected a JSON object per line, got "
                                   f"{type(record).__name__}")
            step = record.get("step", 0)
            if not isinstance(step, int) or isinstance(step, bool):
                raise RunFileError(f"{self.path}:{number}: 'step' must be an integer, got {step!r}")
            lines.append(_Line(number, raw, record))
        self.corrupt_lines = [line.number for line in lines if line.record is None]
        return lines

    def _warn(self, what: str) -> None:
        numbers = ", ".join(map(str, self.corrupt_lines))
        warnings.warn(f"{self.path}: {len(self.corrupt_lines)} line(s) not JSON (line {numbers}): {what}",
                      CorruptLinesWarning, stacklevel=3)

    def read(self) -> list[dict[str, Any]]:
        """Every valid record in file order; corrupt lines are skipped with a warning (class docstring)."""
        records = [line.record for line in self._lines() if line.record is not None]
        if self.corrupt_lines:
            self._warn("skipped")
        return records

    def truncate_to(self, step: int) -> None:
        """Keep only records with step <= `step` (atomic rewrite; no-op if the file is absent).

        The cut falls right after the last record kept. Corrupt lines before it stay where they are, byte
        for byte (what they held is unknown, so it is not this method's to delete); those after it belong
        to the steps being dropped and go with them. Either way the warning says so."""
        if not os.path.exists(self.path):
            return
        lines = self._lines()
        kept = [i for i, line in enumerate(lines) if line.record is not None and line.record.get("step", 0) <= step]
        cut = kept[-1] + 1 if kept else 0
        kept_lines = [line for line in lines[:cut] if line.record is None or line.record.get("step", 0) <= step]
        if self.corrupt_lines:
            after = [line.number for line in lines[cut:] if line.record is None]
            self._warn(f"those before the cut at step {step} kept as they are"
                       + (f", line {', '.join(map(str, after))} dropped with the later steps" if after else ""))
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            for line in kept_lines:
                f.write(line.raw + b"\n")
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


__all__ = ["CorruptLinesWarning", "MetricsLog", "default_printer"]
