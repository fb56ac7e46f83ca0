"""`qwen3repro full`: write a stage's nanotron config, then launch it or print its plan; or plan a whole chain.

    qwen3repro full --stage s2 --model qwen3-0.6b --dry-run
    make full STAGE=s2 MODEL=qwen3-0.6b DRY_RUN=1
    make full STAGE=cold-start MODEL=qwen3-8b INIT=Qwen/Qwen3-8B-Base     # start from a released model
    make full STAGE=all MODEL=qwen3-32b DRY_RUN=1                         # every stage of the model's chain

Before anything starts on GPUs, launching checks, and refuses with every problem named: a plan that does not fit
in memory (unless --force), a parent stage without a checkpoint, a stage already trained to its last step, and a
machine without what the trainer needs (`launch.preflight`: CUDA GPUs, NCCL, flash-attn, nanotron).

Registered by `qwen3repro.cli` (`main.add_command(full_command)`); nanotron is imported only when it runs.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import click

from ..config import ConfigError
from ..models.registry import REAL_MODELS
from ..pipeline import stage_config
from ..stages import teacher_outputs
from ..stages.common import StageContext
from ..evals.hf_cli import eval_hf_command
from ..recipes import load_stage_graph
from .config_gen import (StageSpec, build_stage_spec, full_stages, latest_checkpoint, load_settings, load_with_nanotron,
                         validate, write_stage_config)
from . import convert
from .convert import MODEL_CONFIG_JSON
from .launch import launch_command, log_dir, preflight, slurm_script
from .plan import GIB, MEMORY_HEADROOM
from .sft_data import is_masked_shards
from ..verl.config_gen import VERL_STAGES, build_verl_spec, is_verl_stage, load_verl_settings
from ..verl.config_gen import run_stage as run_verl_stage

ALL = "all"


@click.command("full", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--stage", required=True, help="a stage that full/stages.toml sizes, e.g. s2 (its recipe says the rest); "
              "an RL stage full/verl.toml sizes (reasoning-rl, general-rl, distill-online: verl); "
              "'all': plan every stage of the model's chain (with --dry-run)")
@click.option("--model", "model_name", required=True, help="a real Qwen3 model, e.g. qwen3-0.6b (`qwen3repro model list`)")
@click.option("--nodes", type=int, default=None, help="number of nodes (default: the model's entry in full/models.toml)")
@click.option("--gpus-per-node", type=int, default=None, help="GPUs per node (default 8)")
@click.option("--dry-run", is_flag=True, help="write and validate the config, print the plan, launch nothing")
@click.option("--data", default=None, help="the stage's shards (default: what its data job writes, "
              "runs/full/<model>/<stage>/token-shards for pretraining, .../sft-shards for the SFT stages)")
@click.option("--init", "init_source", default=None, help="start from a released checkpoint instead of the parent "
              "stage: a hub id (e.g. Qwen/Qwen3-8B-Base) or a local Hugging Face folder, converted into the "
              "stage's first checkpoint (runs/full/<model>/<stage>/init)")
@click.option("--force", is_flag=True, help=f"launch even though the plan does not fit in {MEMORY_HEADROOM:.0%} of GPU memory")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="where to write the config "
              "(default runs/full/<model>/<stage>/)")
def full_command(stage, model_name, nodes, gpus_per_node, dry_run, data, init_source, force, out_dir):
    """Full-scale stage through nanotron (or verl for the RL stages): write the config, then launch (GPUs) or print
    the plan (--dry-run)."""
    if stage == ALL:
        if not dry_run:
            raise click.UsageError("--stage all plans the chain; launch its stages one at a time (add --dry-run)")
        sys.exit(plan_chain(model_name, nodes, gpus_per_node))
    if is_verl_stage(stage):  # RL and on-policy distillation: nanotron has neither (qwen3repro.verl)
        sys.exit(run_verl_stage(stage, model_name, nodes=nodes, gpus_per_node=gpus_per_node, dry_run=dry_run,
                                force=force, out_dir=out_dir))
    try:
        spec = build_stage_spec(stage, model_name, nodes=nodes, gpus_per_node=gpus_per_node)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    graph = load_stage_graph()
    verl_parent = next((a for a in graph.ancestors(stage) if a in VERL_STAGES.values()), None)
    if verl_parent and not init_source and spec.parent in graph.ancestors(verl_parent):
        # The report's parent (e.g. reasoning RL before fusion) trains on verl: start from its merged Hugging Face
        # output, converted, rather than from the nearest nanotron stage before it.
        hf_dir = spec.run_dir / model_name / verl_parent / "hf"
        if not dry_run and not (hf_dir / "config.json").is_file():
            raise click.ClickException(f"{stage} starts from {verl_parent}'s output, trained on verl, and {hf_dir} "
                                       f"does not exist yet: run make full STAGE={verl_parent} MODEL={model_name} "
                                       "first (or start elsewhere with INIT=)")
        init_source = str(hf_dir)
        click.echo(f"  {stage} starts from {verl_parent}'s verl output ({hf_dir}), converted")
    if init_source:
        spec = _with_init(spec, init_source, convert_now=not dry_run)
    problems = validate(spec)
    if problems:
        raise click.ClickException("invalid layout: " + "; ".join(problems))
    yaml_path, side_path = write_stage_config(spec, out_dir)
    cfg = load_with_nanotron(yaml_path)  # nanotron's own loader must accept it
    assert cfg.parallelism.dp * cfg.parallelism.tp * cfg.parallelism.pp == spec.layout.world

    plan = spec.plan()
    click.echo(plan.render())
    click.echo(f"  LR rule     {spec.lr_rule}")
    click.echo(f"  {spec.starts_from}")
    click.echo(f"  resumes     from {spec.checkpoints_path}/latest.txt when a checkpoint exists (else starts fresh)")
    if not spec.in_report_pipeline:
        click.echo(f"  note: the report runs {stage} only for the {' and '.join(spec.facts.roles)} models")
    for line in spec.data_lines():
        click.echo(line)
    click.echo(f"  config      {yaml_path} (nanotron, loads with get_config_from_file)")
    click.echo(f"  sidecar     {side_path} (stage facts, data mixture)")

    if not data and (spec.is_sft or spec.shards_path.is_dir()):
        data = str(spec.shards_path)  # the stage's data job writes its shards into the stage folder
    script = None
    if spec.layout.nodes == 1:
        click.echo("  launch      " + " ".join(launch_command(spec, yaml_path, data or "<tokenised shards>")))
    else:
        script = yaml_path.with_name(f"{stage}.slurm")
        script.write_text(slurm_script(spec, yaml_path, data or "<tokenised shards>"))
        log_dir(spec).mkdir(parents=True, exist_ok=True)  # Slurm opens its output file before the script runs
        click.echo(f"  launch      sbatch {script}")
    if dry_run:
        return

    refusals = launch_refusals(spec, plan, force)
    if refusals:
        click.echo(f"\nerror: {model_name} {stage} cannot launch:\n  " + "\n  ".join(refusals), err=True)
        sys.exit(1)
    if _already_trained(spec):
        click.echo(f"\n{stage} is already trained to its last step ({spec.schedule.total_steps}): nothing to do.")
        return
    missing = preflight(spec.layout.gpus_per_node)
    if missing:
        click.echo(f"\nerror: launching {model_name} {stage} needs GPUs ({spec.layout.world} in the plan) and this "
                   "machine lacks:\n  " + "\n  ".join(missing)
                   + "\n(use --dry-run, DRY_RUN=1, to only write the config and print the plan)", err=True)
        sys.exit(2)
    if not data:
        raise click.UsageError(f"--data (tokenised shards of the stage's mixture) is needed to launch; write them "
                               f"into {spec.shards_path} with: {spec.data_job}")
    if spec.is_sft and not is_masked_shards(data):
        raise click.UsageError(f"{stage} trains on masked conversation shards and {data} has none; write them "
                               f"with: python -m qwen3repro.nanotron.sft_data --stage {stage} --model {model_name}")
    if script is None:
        sys.exit(subprocess.call(launch_command(spec, yaml_path, data)))
    if shutil.which("sbatch") is None:
        raise click.ClickException(f"{spec.layout.nodes} nodes need Slurm (sbatch not found); script: {script}")
    sys.exit(subprocess.call(["sbatch", str(script)]))


def launch_refusals(spec: StageSpec, plan, force: bool) -> list[str]:
    """What stops a launch before any GPU is asked for (empty: go)."""
    out = []
    if not plan.fits and not force:
        mem = plan.memory()
        out.append(f"the plan needs {mem['total'] / GIB:.1f} GiB per GPU, more than {MEMORY_HEADROOM:.0%} of {plan.gpu_memory_gib:g} GiB "
                   "(more nodes, TP/PP or recomputation in full/models.toml; --force / FORCE=1 to launch anyway)")
    if (spec.parent or spec.init) and spec.parent_checkpoint is None:
        out.append(f"{spec.starts_from}")
    return out


def _already_trained(spec: StageSpec) -> bool:
    ckpt = latest_checkpoint(spec.checkpoints_path)
    return ckpt is not None and int(ckpt.name) >= spec.schedule.total_steps


def _with_init(spec: StageSpec, source: str, convert_now: bool) -> StageSpec:
    """The stage started from a released checkpoint, converted into runs/full/<model>/<stage>/init (once)."""
    target = spec.run_dir / spec.model / spec.stage / "init"
    if convert_now and not (target / "model").is_dir():  # `model/` appears only once a conversion completed
        try:
            convert.init_from_hf(source, spec.model, target)
        except (ConfigError, ValueError, OSError) as e:  # OSError: an existing folder, the hub unreachable
            raise click.ClickException(f"--init {source}: {e}") from None
    elif not convert_now:
        click.echo(f"  init        {source} would be converted into {target} (not in a dry run)")
    if (target / MODEL_CONFIG_JSON).is_file():
        # The released weights were trained at their RoPE base; a stage at another base (S1/S2 at 1e4 from a
        # release at 1e6) would silently change what every position means.
        released = float(json.loads((target / MODEL_CONFIG_JSON).read_text())["rope_theta"])
        if released != spec.rope_theta:
            raise click.ClickException(f"--init {source}: the release's RoPE base is {released:g} and stage "
                                       f"{spec.stage} trains at {spec.rope_theta:g}; start a stage at the release's "
                                       "base (S3 or later)")
    return dataclasses.replace(spec, init=target)


# ------------------------------------------------------------------------------------------ the chain
def chain_stages(model: str, settings: dict, graph, verl_settings: dict | None = None) -> list[str]:
    """The stages this scale trains for `model`, in the graph's order: those full/stages.toml (nanotron) and
    full/verl.toml (verl: `make full` names, e.g. distill-online for the onpolicy-distill recipe) size whose recipe's
    roles include the model's role (full/models.toml)."""
    role = settings["models"][model]["role"]
    verl = [s for s in (verl_settings or {}).get("stages", {}) if s in VERL_STAGES]
    stages = [s for s in (*full_stages(settings), *verl) if role in graph[VERL_STAGES.get(s, s)].roles]
    return sorted(stages, key=lambda s: graph.depth(VERL_STAGES.get(s, s)))  # stable: parents first


def chain_parent(stage: str, stages: list[str], graph) -> str | None:
    """The chain stage `stage` starts from: its nearest ancestor among `stages` (make names)."""
    recipe_to_stage = {VERL_STAGES.get(s, s): s for s in stages}
    parent = graph.nearest(VERL_STAGES.get(stage, stage), set(recipe_to_stage))
    return None if parent is None else recipe_to_stage[parent]


def chain_gaps(stages: list[str], graph) -> dict[str, str]:
    """Report stages this scale does not train that sit between a chain stage and the parent it starts from, each
    with why it is a missing piece of the chain (none for the report's chains since the RL stages run on verl)."""
    gaps = {}
    names = [VERL_STAGES.get(s, s) for s in stages]
    for stage in names:
        parent = graph.nearest(stage, set(names))
        if parent is None:  # the chain's first stage: before it only the tokenizer, the released one here
            continue
        between = []
        for ancestor in graph.ancestors(stage):
            if ancestor == parent:
                break
            between.append(ancestor)
        for skipped in reversed(between):
            gaps[skipped] = (f"{skipped} (between {parent} and {stage}; recipe kind {graph[skipped].kind}) has no "
                             f"full-scale path yet: {stage} would start from {parent}'s checkpoint instead")
    return gaps


def _plan_verl_stage(stage: str, model: str, nodes: int | None, gpus_per_node: int | None,
                     missing: list[str]) -> float:
    """One verl stage's block of the chain plan; its seconds (0 when it cannot be planned)."""
    try:
        spec = build_verl_spec(stage, model, nodes=nodes, gpus_per_node=gpus_per_node)
    except ConfigError as e:
        missing.append(f"{stage}: {e}")
        click.echo(f"\n[{stage}] cannot be planned: {e}")
        return 0.0
    t = spec.time()
    extra = "".join(f" + {n} GPUs ({role})" for role, n in spec.extra_gpus.items())
    click.echo(f"\n[{stage}] parent {spec.parent} · verl {spec.layout_line()}{extra}")
    click.echo(f"  rollouts {spec.train_batch_size} prompts x {spec.rollouts_per_query} per step, responses <= "
               f"{spec.size['max_response_length']} tokens · {t['steps']:,} steps · LR {float(spec.size['lr']):.3g}")
    mem = max(spec.train_memory()["total"], spec.rollout_peak)
    click.echo(f"  memory   {mem / GIB:.1f} GiB per GPU (training or rollout, the larger) · "
               + ("fits" if spec.fits else "DOES NOT FIT") + f" in {MEMORY_HEADROOM:.0%} of "
               f"{float(spec.defaults['gpu_memory_gib']):g} GiB")
    click.echo(f"  time     {t['seconds'] / 3600:,.1f} h ({t['seconds'] / 86400:,.1f} days) at the stated rollout "
               "throughput and MFU")
    click.echo(f"  data     {spec.data_dir}/{{train,val}}.parquet; output {spec.stage_dir}/hf (verl model merger)")
    problems = spec.problems()
    if problems:
        missing.append(f"{stage}: {'; '.join(problems)}")
    if not spec.fits:
        missing.append(f"{stage}: does not fit ({mem / GIB:.1f} GiB per GPU)")
    return t["seconds"]


def plan_chain(model: str, nodes: int | None, gpus_per_node: int | None) -> int:
    """Print every stage of `model`'s chain (parent, layout, memory, steps, time, data), the nanotron stages and
    the verl ones; 0 when the chain is complete and every plan fits, else 1 after listing each missing piece."""
    try:
        settings = load_settings()
        graph = load_stage_graph()
        if model not in settings["models"]:
            build_stage_spec(full_stages(settings)[0], model)  # raises with the valid names
        stages = chain_stages(model, settings, graph, load_verl_settings())
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    missing: list[str] = []
    total_seconds = 0.0
    click.echo(f"chain: {model} ({settings['models'][model]['role']}): {' -> '.join(stages)}")
    for stage in stages:
        if is_verl_stage(stage):
            total_seconds += _plan_verl_stage(stage, model, nodes, gpus_per_node, missing)
            continue
        try:
            spec = build_stage_spec(stage, model, nodes=nodes, gpus_per_node=gpus_per_node)
        except ConfigError as e:
            missing.append(f"{stage}: {e}")
            click.echo(f"\n[{stage}] cannot be planned: {e}")
            continue
        plan = spec.plan()
        mem = plan.memory()
        lay = spec.layout
        total_seconds += plan.seconds
        parent = chain_parent(stage, stages, graph) or spec.parent
        click.echo(f"\n[{stage}] parent {parent or '(random init)'} · {lay.nodes} node(s) x {lay.gpus_per_node} GPUs "
                   f"dp={lay.dp} tp={lay.tp} pp={lay.pp}{' · recompute' if spec.recompute else ''}")
        if parent is not None and is_verl_stage(parent):
            # nanotron starts a stage from a nanotron checkpoint or a converted Hugging Face folder: a verl
            # parent's merged output is converted at launch (`full_command`)
            click.echo(f"  starts   from {parent}'s verl output, converted: {spec.run_dir / model / parent / 'hf'}")
        click.echo(f"  sequence {spec.seq_len} · RoPE base {spec.rope_theta:g} · {plan.steps:,} steps of "
                   f"{plan.tokens_per_step:,} tokens · peak LR {spec.lr:.3g} ({spec.lr_rule})")
        click.echo(f"  memory   {mem['total'] / GIB:.1f} GiB per GPU (worst pipeline stage) · "
                   + ("fits" if plan.fits else "DOES NOT FIT") + f" in {MEMORY_HEADROOM:.0%} of {plan.gpu_memory_gib:g} GiB")
        click.echo(f"  time     {plan.seconds / 3600:,.1f} h ({plan.seconds / 86400:,.1f} days) at MFU {plan.mfu:.0%}")
        for line in spec.data_lines()[:1 + len(spec.data["sources"])]:
            click.echo(line)
        problems = validate(spec)
        if problems:
            missing.append(f"{stage}: invalid layout: {'; '.join(problems)}")
        if not plan.fits:
            missing.append(f"{stage}: does not fit ({mem['total'] / GIB:.1f} GiB per GPU)")
        for source in spec.data["sources"]:
            if source["kind"] == "disk" and not Path(source["path_or_id"]).exists():
                click.echo(f"  note     {source['path_or_id']} is written by an earlier job of the chain "
                           "(not there yet)")
    gaps = chain_gaps(stages, graph)
    missing += gaps.values()
    role = settings["models"][model]["role"]
    # the report's stages that continue this chain (the tiny scale's control arms branch off earlier)
    last = VERL_STAGES.get(stages[-1], stages[-1]) if stages else None
    after = [s for s in graph.facts if role in graph[s].roles and last and last in graph.ancestors(s)]
    click.echo(f"\ntotal: {total_seconds / 86400:,.1f} days of training, one stage after another, each on its "
               "planned GPUs")
    jobs = {TEACHER_JOB: "qwen3repro full-teacher"}  # generation jobs the full scale runs outside the trainers
    if after:
        click.echo("after this chain: " + ", ".join(f"{s} ({jobs[s]})" if s in jobs else f"{s} (not at full scale)"
                                                   for s in after))
    if missing:
        click.echo("\nthe chain is incomplete:\n  " + "\n  ".join(missing), err=True)
        return 1
    return 0


# ------------------------------------------------------------------------------------------ evaluation
@click.command("full-eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--stage", required=True, help="the trained stage, e.g. fusion")
@click.option("--model", "model_name", required=True, help="the real model, e.g. qwen3-8b")
@click.option("--checkpoint", default=None, help="a checkpoint folder (default: the stage's latest, latest.txt)")
@click.option("--tokenizer", default=None, help="the tokenizer to ship with it (default: the model's hub id)")
@click.option("--suites", default=None, help="eval-hf's suites (default: all)")
@click.option("--backend", type=click.Choice(["auto", "ours", "transformers", "vllm"]), default="auto", show_default=True)
@click.option("--n", "n", type=click.IntRange(min=1), default=None, help="items per suite (default: eval-hf's)")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cuda", show_default=True)
@click.option("--dry-run", is_flag=True, help="convert nothing; print what would be evaluated")
@click.pass_context
def full_eval_command(ctx, stage, model_name, checkpoint, tokenizer, suites, backend, n, device, dry_run):
    """Evaluate a full-scale stage: its checkpoint converted to Hugging Face layout (runs/full/<model>/<stage>/hf,
    with the model's tokenizer and chat template), then `qwen3repro eval-hf` on it (runs/full/<model>/<stage>/eval)."""
    try:
        spec = build_stage_spec(stage, model_name)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    source = Path(checkpoint) if checkpoint else latest_checkpoint(spec.checkpoints_path)
    if source is None:
        raise click.ClickException(f"{stage} has no checkpoint yet in {spec.checkpoints_path} (no latest.txt)")
    stage_dir = spec.run_dir / spec.model / spec.stage
    hf_dir, out = stage_dir / "hf", stage_dir / "eval"
    tokenizer = tokenizer or spec.tokenizer
    click.echo(f"evaluate {source} -> {hf_dir} (tokenizer {tokenizer}) -> {out}")
    if dry_run:
        return
    try:
        convert.nanotron_to_hf(source, hf_dir, tokenizer=tokenizer)
    except (ValueError, OSError) as e:
        raise click.ClickException(f"converting {source}: {e}") from None
    extra = {"suites": suites} if suites else {}
    if n:
        extra["n"] = n
    ctx.invoke(eval_hf_command, checkpoint=str(hf_dir), backend=backend, device=device, out=out, **extra)


# ------------------------------------------------------------------------------------------ teacher outputs
TEACHER_JOB = "teacher-outputs"


@click.command("full-teacher", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--teacher", default=None, help="the teacher model (default: full/stages.toml [jobs.teacher-outputs])")
@click.option("--checkpoint", default=None, help="the teacher's Hugging Face folder (default: "
              "runs/full/<teacher>/general-rl/hf, the flagship after general RL, merged from verl)")
@click.option("--out", "out_dir", default=None, help="where the dataset goes (default: the job's `out`, which "
              "[data.distill] reads)")
@click.option("--backend", type=click.Choice(["auto", "vllm", "engine"]), default=None,
              help="vllm (the job's default), our engine, or auto (vLLM when installed)")
@click.option("--device", default="cuda", show_default=True, help="where our engine runs (vLLM picks its GPUs)")
@click.option("--dry-run", is_flag=True, help="print the resolved job, generate nothing")
def full_teacher_command(teacher, checkpoint, out_dir, backend, device, dry_run):
    """The teacher-outputs job at full scale: the flagship after general RL answers the task mix in both modes
    (`recipes/teacher-outputs.toml`, sizes in full/stages.toml [jobs.teacher-outputs]); the kept responses are the
    off-policy distillation data that `sft_data --stage distill` packs."""
    try:
        job = dict(load_settings().get("jobs", {}).get(TEACHER_JOB, {}))
        teacher = teacher or job.pop("teacher")
        out = Path(out_dir or job.pop("out"))
        job.pop("teacher", None), job.pop("out", None)
        if backend:
            job["backend"] = backend
        cfg = stage_config(TEACHER_JOB, job, f"full/stages.toml [jobs.{TEACHER_JOB}]")
    except (ConfigError, KeyError) as e:
        raise click.UsageError(f"full/stages.toml [jobs.{TEACHER_JOB}]: {e}") from None
    if teacher not in REAL_MODELS:
        raise click.UsageError(f"unknown teacher {teacher!r}; valid models: {', '.join(REAL_MODELS)}")
    source = Path(checkpoint) if checkpoint else Path("runs/full") / teacher / "general-rl" / "hf"
    click.echo(f"teacher outputs: {teacher} ({source}) -> {out}/data")
    click.echo("  " + json.dumps(dataclasses.asdict(cfg), default=str))
    if dry_run:
        return
    if not (source / "config.json").is_file():
        raise click.ClickException(f"{source} is not a Hugging Face checkpoint (no config.json): train and merge the "
                                   f"teacher's general RL first (make full STAGE=general-rl MODEL={teacher}), or "
                                   "pass --checkpoint")
    ctx = StageContext(out_dir=out, cache_dir=out.parent / "cache", device=device)
    try:
        teacher_outputs.run(cfg, source, ctx)
    except (ConfigError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {out / teacher_outputs.DATA_DIR} ({out / teacher_outputs.REPORT_FILE})")


__all__ = ["full_command", "full_eval_command", "full_teacher_command", "chain_stages", "chain_parent", "chain_gaps", "plan_chain",
           "launch_refusals"]


if __name__ == "__main__":  # `python -m qwen3repro.nanotron.cli` (what `make full` runs)
    full_command()
