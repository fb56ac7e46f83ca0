"""The claims of several runs side by side: a verdict that flips between training seeds (or between
machines) is no verdict, so a row is read with its spread.

Each run directory holds `claims/claims.json` (the pipeline writes it with REPORT.md); rows are matched
by name. For every row: the verdict and the measured figure of each run, and how many runs reproduce it.
Rows that carry a long-context `summary` (retrieval accuracy per condition and length: the suite's first
row, S3 with ABF, carries the cells of every condition) also get one line per cell: its value in each run,
the mean and the range.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...files import RunFileError, atomic_write, write_json_atomic
from .row import ClaimRow

CLAIMS_FILE = Path("claims") / "claims.json"


def load_runs(run_dirs: Sequence[str | Path]) -> dict[str, list[ClaimRow]]:
    """{run label (the directory's name): its claim rows}; a run without claims.json is an error naming it."""
    runs: dict[str, list[ClaimRow]] = {}
    for d in map(Path, run_dirs):
        path = d / CLAIMS_FILE
        if not path.is_file():
            raise RunFileError(f"{path}: no claims in this run directory (run its pipeline first)")
        label = d.name if d.name not in runs else str(d)
        try:
            runs[label] = [ClaimRow(**row) for row in json.loads(path.read_text(encoding="utf-8"))]
        except (ValueError, TypeError) as e:
            raise RunFileError(f"{path}: not a claims file ({e})") from e
    return runs


def _verdict(row: ClaimRow | None) -> str:
    if row is None:
        return "absent"
    return {True: "yes", False: "no", None: "not measured"}[row.reproduced]


def _cells(row: ClaimRow) -> dict[str, float]:
    """'condition@length' -> retrieval accuracy, from a long-context row's summary (else empty); by
    condition in the summary's order, then by length."""
    summary = row.details.get("summary")
    if not isinstance(summary, Mapping):
        return {}
    cells = {}
    for condition, values in summary.items():
        if not isinstance(values, Mapping):
            continue
        at = {int(k[3:]): v for k, v in values.items() if k.startswith("at_") and k[3:].isdigit()}
        for length in sorted(at):
            if isinstance(at[length], (int, float)):
                cells[f"{condition}@{length}"] = float(at[length])
    return cells


def spread(runs: Mapping[str, Sequence[ClaimRow]], shared: bool = False) -> list[dict[str, Any]]:
    """One record per row name (in the first run's order, then any others): verdicts, measured figures
    and, for long-context rows, each cell's values, mean and range over the runs. `shared`: only the
    rows every run holds (seed runs that measure some of a full run's claims, beside that run)."""
    labels = list(runs)
    names: list[str] = []
    for rows in runs.values():
        names += [r.name for r in rows if r.name not in names]
    by_run = {label: {r.name: r for r in rows} for label, rows in runs.items()}
    if shared:
        names = [n for n in names if all(n in by_run[label] for label in labels)]
    out = []
    for name in names:
        rows = {label: by_run[label].get(name) for label in labels}
        first = next(r for r in rows.values() if r is not None)
        verdicts = {label: _verdict(r) for label, r in rows.items()}
        measured_runs = [v for v in verdicts.values() if v in ("yes", "no")]
        record: dict[str, Any] = {
            "name": name, "claim": first.claim, "verdicts": verdicts,
            "reproduced_in": sum(v == "yes" for v in measured_runs), "measured_in": len(measured_runs),
            "measured": {label: (r.measured if r is not None else None) for label, r in rows.items()},
        }
        cells: dict[str, dict[str, float]] = {}
        for label, r in rows.items():
            for cell, value in (_cells(r) if r is not None else {}).items():
                cells.setdefault(cell, {})[label] = value
        record["cells"] = {
            cell: {"values": values, "mean": statistics.fmean(values.values()),
                   "min": min(values.values()), "max": max(values.values())}
            for cell, values in cells.items()
        }
        out.append(record)
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def to_markdown(records: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> str:
    """SPREAD.md: a verdict table (one column per run), then each row's figures per run."""
    lines = [f"# Claims over {len(labels)} runs: {', '.join(labels)}", "",
             "| claim | " + " | ".join(labels) + " | reproduced in |",
             "|---|" + "---|" * len(labels) + "---|"]
    for rec in records:
        lines.append(f"| {rec['claim']} | " + " | ".join(rec["verdicts"][lb] for lb in labels)
                     + f" | {rec['reproduced_in']} of {rec['measured_in']} |")
    for rec in records:
        lines += ["", f"## {rec['name']}", "", rec["claim"], ""]
        lines += [f"- {lb}: {rec['measured'][lb] or 'absent'}" for lb in labels]
        if rec["cells"]:
            lines += ["", "| cell | " + " | ".join(labels) + " | mean | range |",
                      "|---|" + "---|" * len(labels) + "---|---|"]
            for cell, c in rec["cells"].items():
                lines.append(f"| {cell} | " + " | ".join(_pct(c["values"].get(lb)) for lb in labels)
                             + f" | {_pct(c['mean'])} | {_pct(c['min'])}-{_pct(c['max'])} |")
    return "\n".join(lines) + "\n"


def write_spread(runs: Mapping[str, Sequence[ClaimRow]], run_dirs: Sequence[str | Path],
                 out: str | Path, shared: bool = False) -> list[dict[str, Any]]:
    """Write the spread of `runs` (`load_runs(run_dirs)`; `shared` as `spread`) to `out` (Markdown) and
    the same records as JSON next to it (`.json`); returns the records."""
    records = spread(runs, shared)
    if not records:
        raise RunFileError(f"no claim row is held by every run of {', '.join(runs)}: nothing to compare")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = to_markdown(records, list(runs))
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    write_json_atomic(out.with_suffix(".json"), {"runs": [str(d) for d in run_dirs], "rows": records})
    return records


__all__ = ["CLAIMS_FILE", "load_runs", "spread", "to_markdown", "write_spread"]
