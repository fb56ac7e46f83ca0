"""`qwen3repro full`: write a stage's nanotron config, then launch it or print its plan.

    qwen3repro full --stage s2 --model qwen3-0.6b --dry-run
    make full STAGE=s2 MODEL=qwen3-0.6b DRY_RUN=1

Registered by `qwen3repro.cli` (`main.add_command(full_command)`); nanotron is imported only when it runs.
"""
from __future__ import annotations

import shutil
import subprocess
import sys

import click
import torch

from ..config import ConfigError
from .config_gen import build_stage_spec, load_with_nanotron, validate, write_stage_config
from .launch import launch_command, slurm_script
from .sft_data import is_masked_shards


@click.command("full", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--stage", required=True, help="a stage that full/stages.toml sizes, e.g. s2 (its recipe says the rest)")
@click.option("--model", "model_name", required=True, help="a real Qwen3 model, e.g. qwen3-0.6b (`qwen3repro model list`)")
@click.option("--nodes", type=int, default=None, help="number of nodes (default: the model's entry in full/models.toml)")
@click.option("--gpus-per-node", type=int, default=None, help="GPUs per node (default 8)")
@click.option("--dry-run", is_flag=True, help="write and validate the config, print the plan, launch nothing")
@click.option("--data", default=None, help="tokenised shards for the run (needed to launch; SFT stages default to "
              "their masked shards, runs/full/<model>/<stage>/sft-shards)")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="where to write the config "
              "(default runs/full/<model>/<stage>/)")
def full_command(stage, model_name, nodes, gpus_per_node, dry_run, data, out_dir):
    """Full-scale stage through nanotron: write the config, then launch (GPUs) or print the plan (--dry-run)."""
    try:
        spec = build_stage_spec(stage, model_name, nodes=nodes, gpus_per_node=gpus_per_node)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    problems = validate(spec)
    if problems:
        raise click.ClickException("invalid layout: " + "; ".join(problems))
    yaml_path, side_path = write_stage_config(spec, out_dir)
    cfg = load_with_nanotron(yaml_path)  # nanotron's own loader must accept it
    assert cfg.parallelism.dp * cfg.parallelism.tp * cfg.parallelism.pp == spec.layout.world

    plan = spec.plan()
    click.echo(plan.render())
    parent = spec.parent_checkpoint
    click.echo(f"  starts from {parent} ({spec.parent} stage's last checkpoint)" if parent else "  starts from random init")
    if not spec.in_report_pipeline:
        click.echo(f"  note: the report runs {stage} only for the {' and '.join(spec.facts.roles)} models")
    for line in spec.data_lines():
        click.echo(line)
    click.echo(f"  config      {yaml_path} (nanotron, loads with get_config_from_file)")
    click.echo(f"  sidecar     {side_path} (stage facts, data mixture)")

    if spec.is_sft and not data:
        data = str(spec.shards_path)  # SFT stages read their masked shards from the stage folder by default
    if spec.layout.nodes == 1:
        cmd = launch_command(spec, yaml_path, data or "<tokenised shards>")
        click.echo("  launch      " + " ".join(cmd))
    else:
        script = yaml_path.with_name(f"{stage}.slurm")
        script.write_text(slurm_script(spec, yaml_path, data or "<tokenised shards>"))
        click.echo(f"  launch      sbatch {script}")
    if dry_run:
        return
    if not torch.cuda.is_available():
        click.echo(f"\nerror: launching {model_name} {stage} needs GPUs ({spec.layout.world} in the plan) and none "
                   "are visible here; use --dry-run (DRY_RUN=1) to only write the config and print the plan.",
                   err=True)
        sys.exit(2)
    if not data:
        raise click.UsageError("--data (tokenised shards of the stage's mixture) is needed to launch")
    if spec.is_sft:
        if not is_masked_shards(data):
            raise click.UsageError(f"{stage} trains on masked conversation shards and {data} has none; write them "
                                   f"with: python -m qwen3repro.nanotron.sft_data --stage {stage} --model {model_name}")
    if spec.layout.nodes == 1:
        sys.exit(subprocess.call(launch_command(spec, yaml_path, data)))
    if shutil.which("sbatch") is None:
        raise click.ClickException(f"{spec.layout.nodes} nodes need Slurm (sbatch not found); script: {script}")
    sys.exit(subprocess.call(["sbatch", str(script)]))


__all__ = ["full_command"]


if __name__ == "__main__":  # `python -m qwen3repro.nanotron.cli` (what `make full` runs)
    full_command()
