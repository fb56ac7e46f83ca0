"""`qwen3repro eval-hf CHECKPOINT`: our evaluation suites on any Hugging Face checkpoint.

The logic is in `evals.hf_checkpoint`; this module holds only the command line. transformers and vLLM
load only when a run chooses their backend.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from .hf_checkpoint import SUITES, HFEvalSettings, plan, run_hf_eval


def _names(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(x.strip() for x in value.split(",") if x.strip())


def _ints(value: str | None, option: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(x) for x in value.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"expected integers separated by commas, got {value!r}", param_hint=option) from None


@click.command("eval-hf", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint")
@click.option("--suites", default=",".join(SUITES), show_default=True,
              help="Comma-separated suites: thinkfollow (the report's ThinkFollow), modes (thinking vs non-thinking "
                   "accuracy), budget (accuracy vs thinking budget), pass-at-k, longcontext (retrieval with YaRN, "
                   "and DCA on our backend).")
@click.option("--backend", type=click.Choice(["auto", "ours", "transformers", "vllm"]), default="auto",
              show_default=True,
              help="ours: our Qwen3 class and engine (when it loads the checkpoint and the checkpoint's chat template "
                   "renders as ours); transformers; vllm (if installed); auto: ours where it applies, else vllm on "
                   "a GPU when installed, else transformers.")
@click.option("--n", "n", type=click.IntRange(min=1), default=40, show_default=True,
              help="Suite size: ThinkFollow chats (rounded up to a multiple of 8), task items of modes / budget / "
                   "pass@k, retrieval items per (length, variant).")
@click.option("--k", "k", type=click.IntRange(min=1), default=8, show_default=True, help="Samples per item for pass@k.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Token limit of a thinking-mode reply.")
@click.option("--answer-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Token limit of a non-thinking reply, and the answer's room after a budget's forced text.")
@click.option("--budgets", help="Thinking budgets in tokens, e.g. 0,256,1024 (default: 0,128,256,512,1024,2048).")
@click.option("--families", help="Task families of modes / budget / pass@k, e.g. add,mul,code (default: all).")
@click.option("--instruction", help="Text appended to every question (default: Qwen's \\boxed{} math instruction; "
                                    "'' for the tiny models' bare questions).")
@click.option("--presence-penalty", type=float, default=0.0, show_default=True,
              help="Non-thinking sampling's presence penalty (the report uses 1.5).")
@click.option("--trained-length", type=click.IntRange(min=1),
              help="Long context: the checkpoint's trained length (default: config.json's YaRN original length, else "
                   "max_position_embeddings; pass 32768 for the released Qwen3 models, whose 40,960 includes room "
                   "to generate).")
@click.option("--lengths", help="Long context: lengths in tokens, e.g. 8192,32768,131072 (default: 1/8 to 4x the "
                                "trained length).")
@click.option("--variants", help="Long context: passkey,order (default: both).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Rows per generation batch.")
@click.option("--seed", type=int, default=0, show_default=True, help="Item and sampling seed.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (metrics.json, summary.md, plots); required except with --dry-run.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="auto: float32 on a CPU, bfloat16 on a GPU.")
@click.option("--dry-run", is_flag=True,
              help="Print the plan (backend, suites, sizes) as JSON and exit; loads no model.")
def eval_hf_command(checkpoint, suites, backend, n, k, max_new_tokens, answer_tokens, budgets, families, instruction,
                    presence_penalty, trained_length, lengths, variants, batch_size, seed, out, device, dtype,
                    dry_run) -> None:
    """Evaluate CHECKPOINT (a Hugging Face checkpoint directory or a hub id such as Qwen/Qwen3-0.6B) with the
    project's suites; writes OUT/metrics.json, OUT/summary.md and plots."""
    given = {
        "suites": _names(suites), "n": n, "k": k, "max_new_tokens": max_new_tokens, "answer_tokens": answer_tokens,
        "budgets": _ints(budgets, "--budgets"), "families": _names(families), "instruction": instruction,
        "presence_penalty": presence_penalty, "trained_length": trained_length, "lengths": _ints(lengths, "--lengths"),
        "variants": _names(variants), "batch_size": batch_size, "seed": seed,
    }
    settings = HFEvalSettings(**{key: value for key, value in given.items() if value is not None})
    if dry_run:
        click.echo(json.dumps(plan(checkpoint, settings, backend=backend, device=device, dtype=dtype, out=out),
                              indent=2))
        return
    if out is None:
        raise click.UsageError("--out is required (except with --dry-run)")
    try:
        metrics = run_hf_eval(checkpoint, out, settings, backend=backend, device=device, dtype=dtype)
    except ImportError as e:  # an optional backend's package is missing: say which and how to install it
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {out / 'metrics.json'} and {out / 'summary.md'} ({len(metrics['suites'])} suites)")
