"""The `qwen3repro` command line: one click group, `--help` on every command.

An error whose message names the file, key or value at fault (a bad setting, checkpoint or run file) is
printed as one line, `error: <message>`, with exit status 2, whichever command raised it; `--debug`
prints its traceback first. Any other exception is a bug and keeps Python's traceback.
"""
from __future__ import annotations

import json
import traceback

import click

from .chat_cli import chat_command
from .config import ConfigError
from .data.cache import CorruptCacheError
from .evals.cli import eval_group
from .evals.hf_cli import eval_hf_command
from .experiments.cli import scaling_laws_command
from .files import RunFileError
from .models.hf import CheckpointError
from .models.registry import MODELS, count_parameters, get_model_config
from .nanotron.cli import full_command, full_eval_command, full_teacher_command
from .pipeline import build_plan, describe, run_pipeline
from .run_lock import RunDirectoryBusyError
from .serve import serve_command
from .train.loop import TrainingDivergedError

REPORTED_ERRORS = (ConfigError, CheckpointError, RunFileError, CorruptCacheError, TrainingDivergedError,
                   RunDirectoryBusyError, OSError)
"""Errors that say what is wrong in their message: the command line shows that message alone."""
ERROR_EXIT_STATUS = 2


class ReportingGroup(click.Group):
    """A click group that turns a `REPORTED_ERRORS` error of any of its commands into one line on stderr."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except REPORTED_ERRORS as e:
            if ctx.params.get("debug"):
                click.echo(traceback.format_exc(), err=True, nl=False)
            message = " ".join(str(e).split()) or type(e).__name__
            click.echo(f"error: {message}", err=True)
            ctx.exit(ERROR_EXIT_STATUS)


@click.group(cls=ReportingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qwen3repro")
@click.option("--debug", is_flag=True, help="On an error, print its full traceback before the one-line message.")
def main(debug: bool) -> None:
    """qwen3repro: the Qwen3 training pipeline at tiny and full scale."""


# ----------------------------------------------------------------------------- model
@main.group()
def model() -> None:
    """Named model sizes: the 8 released Qwen3 models and the tiny proxies."""


@model.command("list")
def model_list() -> None:
    """List the registered model names with their parameter counts."""
    for name, cfg in MODELS.items():
        n = count_parameters(cfg)
        kind = f"MoE {cfg.num_experts}x top-{cfg.num_experts_per_tok}" if cfg.is_moe else "dense"
        click.echo(f"{name:18s} {kind:16s} total {n['total']:>15,}  active {n['active']:>15,}")


@model.command("info")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print only the parameter counts as JSON.")
def model_info(name: str, as_json: bool) -> None:
    """Parameter counts of NAME (computed from its config, no weights allocated)."""
    try:
        cfg = get_model_config(name)
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint="NAME") from None
    counts = count_parameters(cfg)
    if as_json:
        click.echo(json.dumps(counts))
        return
    click.echo(f"{name}")
    for key, value in counts.items():
        click.echo(f"  {key:14s} {value:>16,}")
    click.echo("  config:")
    for key, value in cfg.to_dict().items():
        click.echo(f"    {key}: {value}")


# ----------------------------------------------------------------------------- pipeline
@main.command()
@click.argument("scale", default="tiny")
@click.option("--out", "out_root", default="runs", show_default=True, type=click.Path(), help="Root of run directories.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a scale value, e.g. --set stages.s1.tokens=200000 (TOML value syntax).")
@click.option("--only", multiple=True, metavar="STAGE", help="Run only these stages (e.g. tokenizer, s1, flagship/s2).")
@click.option("--no-claims", is_flag=True, help="Train the stages but skip the claims and the report.")
@click.option("--device", default="cpu", show_default=True,
              help="Where every stage, evaluation and claim computes: cpu, cuda, cuda:N or auto (a GPU when there "
                   "is one). Not part of any lineage hash.")
@click.option("--dry-run", is_flag=True, help="Print the resolved device and every resolved stage config, and exit.")
def pipeline(scale: str, out_root: str, overrides: tuple[str, ...], only: tuple[str, ...], no_claims: bool,
             device: str, dry_run: bool) -> None:
    """Run the SCALE pipeline (tiny, small, micro: tiny/SCALE.toml): every stage the scale lists, for the roles
    its recipe names, in the order of the stage graph (recipes/), then the claims and REPORT.md.

    Up-to-date stages are skipped and cut stages resume; see runs/SCALE/REPORT.md afterwards. One run at a time
    per output directory: a second one stops at once with an error naming the first one's pid. A --device this
    machine does not have stops the run before any stage starts.
    """
    if dry_run:
        click.echo(describe(build_plan(scale, out_root=out_root, overrides=list(overrides), device=device)))
        return
    run_pipeline(scale, out_root=out_root, overrides=list(overrides), only=set(only) or None, claims=not no_claims,
                 device=device)


# Command groups that live next to their code.
main.add_command(eval_group)
main.add_command(full_command)
main.add_command(full_eval_command)
main.add_command(full_teacher_command)
main.add_command(chat_command)
main.add_command(serve_command)
main.add_command(scaling_laws_command)
main.add_command(eval_hf_command)

if __name__ == "__main__":
    main()
