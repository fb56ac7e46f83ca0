"""Command-line entry points of the experiments (added to the main `qwen3repro` group)."""
from __future__ import annotations

from pathlib import Path

import click
import torch

from .scaling_laws import SweepSettings, plan_lines, run_sweep


@click.command("scaling-laws")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/scaling_laws"),
              show_default=True, help="Result directory (the sweep resumes the runs already finished there).")
@click.option("--quick", is_flag=True, help="Smoke run: two toy sizes, a start point and its neighbours each, seconds per run.")
@click.option("--dry-run", is_flag=True, help="Print the sweep plan (sizes, lattice, steps) and exit without training.")
# One thread by default: the models are small enough that a second thread buys little, and the
# sweep's wall time (~30 min) is measured on one, leaving the other core to other work.
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads.")
def scaling_laws_command(out_dir: Path, quick: bool, dry_run: bool, threads: int) -> None:
    """Sweep LR x batch size x model size and fit power laws for the optimal LR and batch size.

    Writes scaling_laws.json (fitted coefficients, optima per size, predictions for tiny-student
    and tiny-flagship) and plots (loss_vs_lr_and_batch.png, power_law_fits.png) into OUT.
    tiny/tiny.toml's S1 learning rate and batch come from the copy committed as
    tiny/scaling_laws.json.
    """
    settings = SweepSettings.quick_settings() if quick else SweepSettings()
    if dry_run:
        for line in plan_lines(settings):
            click.echo(line)
        return
    torch.set_num_threads(threads)
    result = run_sweep(out_dir, settings, printer=click.echo)
    fits = result["fits"]
    click.echo(f"lr_opt = {fits['lr_opt']['a']:.4g} * N^{fits['lr_opt']['b']:.3f} (R2 {fits['lr_opt']['r2']:.2f}); "
               f"B_opt = {fits['batch_opt_tokens']['a']:.4g} * N^{fits['batch_opt_tokens']['b']:.3f} tokens "
               f"(R2 {fits['batch_opt_tokens']['r2']:.2f})")


if __name__ == "__main__":  # `python -m qwen3repro.experiments.cli` = `qwen3repro scaling-laws`
    scaling_laws_command()
