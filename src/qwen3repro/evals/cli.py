"""`qwen3repro eval ...`: run an evaluation suite with its pinned settings.

`eval_group` is a click group registered on the top-level command (`qwen3repro.cli.main`).
Heavy imports (torch, the models) happen inside the commands, so `--help` stays fast.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..config import ConfigError
from ..devices import pipeline_device
from . import longcontext as lc
from .claims import spread as sp

_DIR = click.Path(file_okay=False, path_type=Path)


def _int_list(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(x) for x in value.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"expected integers separated by commas, got {value!r}") from None


def _name_list(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(x.strip() for x in value.split(",") if x.strip())


@click.group("eval", context_settings={"help_option_names": ["-h", "--help"]})
def eval_group() -> None:
    """Evaluation suites (settings pinned in the repository's evals/ folder)."""


def _trained_length(s3: Path | None) -> int:
    """The S3 stage's sequence length, from the `stage.json` the pipeline writes into its directory."""
    stage_file = s3 / "stage.json" if s3 is not None else None
    if stage_file is None or not stage_file.is_file():
        raise click.UsageError("the trained (S3) length is unknown: pass --trained-length, or --s3 with the "
                               "S3 stage's directory (its stage.json holds the stage's seq_len)")
    try:
        return int(json.loads(stage_file.read_text())["config"]["seq_len"])
    except (ValueError, KeyError, TypeError) as e:
        raise click.UsageError(f"{stage_file}: no config.seq_len ({e}); pass --trained-length") from None


@eval_group.command("longcontext")
@click.option("--s2", type=_DIR, help="S2 checkpoint directory (condition S2).")
@click.option("--s3", type=_DIR, help="S3 checkpoint directory (conditions S3, S3+YaRN, S3+YaRN+DCA).")
@click.option("--trained-length", type=click.IntRange(min=1),
              help="The S3 stage's sequence length, every length's reference (default: from <s3>/stage.json).")
@click.option("--tokenizer", type=_DIR, help="Tokenizer directory (default: the S3 checkpoint directory).")
@click.option("--out", type=_DIR, help="Output directory for longcontext.json and the plots.")
@click.option("--suite", type=click.Path(dir_okay=False, path_type=Path),
              help="Suite file (default: evals/longcontext.toml).")
@click.option("--lengths", help="Override the lengths in tokens, e.g. 256,2048,8192.")
@click.option("--n-per-length", type=click.IntRange(min=1), help="Override the items per (length, variant).")
@click.option("--variants", help="Override the variants, e.g. passkey,order.")
@click.option("--conditions", help="Override the conditions, e.g. S3,S3+YaRN+DCA.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="torch intra-op threads (0: torch's default).")
@click.option("--device", default="cpu", show_default=True, help="Where the models run: cpu, cuda, cuda:N or auto.")
@click.option("--dry-run", is_flag=True, help="Print the resolved settings as JSON and exit.")
def longcontext(s2, s3, trained_length, tokenizer, out, suite, lengths, n_per_length, variants, conditions, threads,
                device, dry_run) -> None:
    """Retrieval by (length, depth) and loss by position for S2, S3, S3+YaRN, S3+YaRN+DCA."""
    trained = trained_length or _trained_length(s3)
    overrides = {
        "lengths": _int_list(lengths),
        "n_per_length": n_per_length,
        "variants": _name_list(variants),
        "conditions": _name_list(conditions),
    }
    try:
        settings = lc.suite_settings(trained, {k: v for k, v in overrides.items() if v is not None},
                                     suite=suite or lc.DEFAULT_SUITE, where="command-line options")
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    checkpoints = {k: v for k, v in (("S2", s2), ("S3", s3)) if v is not None}
    needed = sorted({lc.CONDITIONS[c].checkpoint for c in settings.conditions})
    if dry_run:
        click.echo(json.dumps({
            "suite": str(suite or lc.DEFAULT_SUITE),
            "checkpoints": {k: str(v) for k, v in checkpoints.items()},
            "tokenizer": str(tokenizer or s3) if (tokenizer or s3) else None,
            "out": str(out) if out else None,
            "items_per_condition": lc.items_per_condition(settings),
            "settings": settings.resolved(),
        }, indent=2))
        return
    missing = [f"--{k.lower()}" for k in needed if k not in checkpoints]
    if missing:
        raise click.UsageError(f"conditions {', '.join(settings.conditions)} need {' and '.join(missing)}")
    if out is None:
        raise click.UsageError("--out is required (except with --dry-run)")
    for k in needed:
        if not checkpoints[k].is_dir():
            raise click.BadParameter(f"{checkpoints[k]} is not a directory", param_hint=f"--{k.lower()}")
    try:
        results = lc.run_longcontext_eval(checkpoints, out, settings, tokenizer=tokenizer, num_threads=threads,
                                          device=pipeline_device(device))
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    for variant, rows in results["summary"].items():
        for cond, s in rows.items():
            cells = ", ".join(f"{k} {v:.2f}" for k, v in s.items() if k.startswith("at_") and v is not None)
            click.echo(f"{variant:8s} {cond:12s} {cells}")
    click.echo(f"wrote {Path(out) / lc.RESULT_FILE}")


@eval_group.command("spread")
@click.argument("runs", nargs=-1, required=True, type=_DIR)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("runs/SPREAD.md"),
              show_default=True, help="The Markdown table to write (the same records go to its .json twin).")
@click.option("--shared", is_flag=True,
              help="Only the rows every run holds (e.g. a full run beside seed runs that measure some of its claims).")
@click.option("--dry-run", is_flag=True, help="Print the runs and the rows each one holds as JSON, and exit.")
def spread(runs, out, shared, dry_run) -> None:
    """The claims of several runs side by side (RUNS: run directories, e.g. runs/tiny runs/tiny-seed1):
    each row's verdict and figure per run, how many runs reproduce it, and for long-context rows each
    retrieval cell's mean and range. Reads each run's claims/claims.json."""
    loaded = sp.load_runs(runs)
    if dry_run:
        click.echo(json.dumps({"runs": [str(r) for r in runs], "out": str(out), "shared": shared,
                               "rows": {label: [r.name for r in rows] for label, rows in loaded.items()},
                               "compared": [rec["name"] for rec in sp.spread(loaded, shared)]}, indent=2))
        return
    records = sp.write_spread(loaded, runs, out, shared)
    for rec in records:
        click.echo(f"{rec['name']}: reproduced in {rec['reproduced_in']} of {rec['measured_in']} "
                   f"({', '.join(rec['verdicts'].values())})")
    click.echo(f"wrote {out}")
