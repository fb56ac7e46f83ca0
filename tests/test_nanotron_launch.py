"""Launching a full-scale stage: resume, chaining, learning-rate rule, weight decay, launcher and refusals.

* resume: the generated config's `resume_checkpoint_path` is the stage's own checkpoint folder, and nanotron's
  own `parse_ckpt_path` picks the step its `latest.txt` names (none: a fresh start); the parent checkpoint is the
  parent's `latest.txt`, never a step recomputed from today's layout;
* a stage killed mid-run and resumed ends with the same weights as an uncut run: two gloo processes (DP=2,
  ZeRO-1), nanotron's own checkpoint functions as its trainer calls them (`serialize.save`, `latest.txt`,
  `parse_ckpt_path`, `load_weights`, `load_optimizer`, `load_lr_scheduler`, `load_meta`), our loader moved past
  the consumed samples (`launch.skip_consumed`) and our optimizer groups (`optimizer.weight_decay_groups`);
* continued pretraining (S2, S3) takes S1's peak LR and batch, not a from-scratch law at its own compute;
* no weight decay on norms and embeddings: nanotron's optimizer builder under `weight_decay_groups`;
* the launcher is this interpreter's `torch.distributed.run`, the Slurm log folder exists before `sbatch`,
  `preflight` names every missing GPU dependency, and a plan that does not fit refuses to launch unless forced;
* `--stage all` prints every stage of a chain and refuses one with a missing piece.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("nanotron")

from gloo_helpers import free_port  # noqa: E402

from click.testing import CliRunner  # noqa: E402

from qwen3repro.config import ConfigError  # noqa: E402
from qwen3repro.nanotron import config_gen  # noqa: E402
from qwen3repro.nanotron.cli import full_command, launch_refusals  # noqa: E402
from qwen3repro.nanotron.launch import launch_command, preflight, skip_consumed, slurm_script  # noqa: E402




def _checkpoint(folder: Path, step: int) -> Path:
    """What nanotron's trainer leaves after saving `step` (the parts the chaining reads)."""
    (folder / str(step)).mkdir(parents=True)
    (folder / str(step) / "model_config.json").write_text("{}")
    (folder / "latest.txt").write_text(str(step))
    return folder / str(step)


# ------------------------------------------------------------------------------------ resume and chaining
def test_parent_and_resume_come_from_latest_txt(tmp_path):
    spec = config_gen.build_stage_spec("s2", "qwen3-0.6b", run_dir=tmp_path)
    assert spec.parent == "s1" and spec.parent_checkpoint is None
    assert "none yet" in spec.starts_from

    # The parent's step is whatever it saved last (here not its planned step count), read at generation time.
    ckpt = _checkpoint(tmp_path / "qwen3-0.6b" / "s1" / "checkpoints", 1234)
    spec = config_gen.build_stage_spec("s2", "qwen3-0.6b", run_dir=tmp_path)
    assert spec.parent_checkpoint == ckpt
    yaml_path, side = config_gen.write_stage_config(spec)
    cfg = config_gen.load_with_nanotron(yaml_path)
    assert Path(cfg.model.init_method.path) == ckpt
    assert Path(cfg.checkpoints.resume_checkpoint_path) == spec.checkpoints_path

    # (nanotron's own lookup of that folder, `parse_ckpt_path`, runs in the kill-and-resume test below)
    _checkpoint(spec.checkpoints_path, 7)
    assert config_gen.latest_checkpoint(spec.checkpoints_path) == spec.checkpoints_path / "7"
    (spec.checkpoints_path / "latest.txt").write_text("9")  # names a step that is not there
    with pytest.raises(ConfigError, match="does not exist"):
        config_gen.latest_checkpoint(spec.checkpoints_path)


def test_continued_pretraining_takes_s1_peak_lr_and_batch():
    for model in ("qwen3-0.6b", "qwen3-8b", "qwen3-235b-a22b"):
        s1, s2, s3 = (config_gen.build_stage_spec(s, model) for s in ("s1", "s2", "s3"))
        assert s2.lr == s3.lr == s1.lr, model
        # the same batch in tokens (S3's sequences are 8x longer), up to rounding to whole micro-batches
        assert abs(s3.plan().tokens_per_step / s1.plan().tokens_per_step - 1) < 0.5, model
        assert "re-warms" in s3.lr_rule and "decays from it" in s2.lr_rule and "2403.08763" in s3.lr_rule
        assert s3.schedule.warmup_steps > 0 and s2.schedule.warmup_steps == 0


# ------------------------------------------------------------------------------------ launcher
def test_launcher_is_this_interpreters_torch_distributed_run(tmp_path):
    spec = config_gen.build_stage_spec("s1", "qwen3-0.6b", run_dir=tmp_path)
    cmd = launch_command(spec, tmp_path / "s1.yaml", "shards")
    i = cmd.index(sys.executable)
    assert cmd[i:i + 3] == [sys.executable, "-m", "torch.distributed.run"] and "torchrun" not in cmd
    script = slurm_script(config_gen.build_stage_spec("s3", "qwen3-32b", nodes=8, run_dir=tmp_path),
                          tmp_path / "s3.yaml", "shards")
    assert f"srun {sys.executable} -m torch.distributed.run" in script and "torchrun" not in script.split("#")[0]


def test_slurm_log_folder_exists_before_sbatch(tmp_path):
    with CliRunner().isolated_filesystem(temp_dir=tmp_path):
        r = CliRunner().invoke(full_command, ["--stage", "s3", "--model", "qwen3-32b", "--nodes", "8", "--dry-run"])
        assert r.exit_code == 0, r.output
        script = Path("runs/full/qwen3-32b/s3/s3.slurm").read_text()
        out_line = next(line for line in script.splitlines() if line.startswith("#SBATCH --output="))
        assert Path(out_line.split("=", 1)[1]).parent.is_dir()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without GPUs lacks")
def test_preflight_names_every_missing_gpu_dependency(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    problems = preflight(gpus=8)
    text = "\n".join(problems)
    assert "no CUDA GPU" in text and "flash-attn is not installed" in text and "pip install flash-attn" in text
    assert "NCCL" in text or torch.distributed.is_nccl_available()


def test_a_plan_that_does_not_fit_refuses_to_launch_unless_forced(tmp_path):
    spec = config_gen.build_stage_spec("s1", "qwen3-0.6b", run_dir=tmp_path)
    plan = dataclasses.replace(spec.plan(), gpu_memory_gib=1.0)
    assert not plan.fits
    assert any("more than 90% of 1 GiB" in r for r in launch_refusals(spec, plan, force=False))
    assert launch_refusals(spec, plan, force=True) == []


def test_launch_refuses_a_stage_whose_parent_has_no_checkpoint(tmp_path):
    with CliRunner().isolated_filesystem(temp_dir=tmp_path):
        r = CliRunner().invoke(full_command, ["--stage", "s2", "--model", "qwen3-0.6b"])
        assert r.exit_code == 1 and "none yet" in r.output and "INIT=" in r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without GPUs")
def test_launch_without_gpus_lists_what_is_missing(tmp_path):
    with CliRunner().isolated_filesystem(temp_dir=tmp_path):
        r = CliRunner().invoke(full_command, ["--stage", "s1", "--model", "qwen3-0.6b"])
        assert r.exit_code == 2 and "needs GPUs" in r.output and "no CUDA GPU" in r.output


def test_skip_consumed_continues_with_the_next_micro_batch():
    loader = [torch.tensor([i]) for i in range(5)]  # one epoch of 5 micro-batches of 2 samples
    it = skip_consumed(loader, samples=14, micro_batch_size=2)  # 7 micro-batches: into the second epoch
    assert [int(next(it)) for _ in range(4)] == [2, 3, 4, 0]
    with pytest.raises(ValueError, match="whole number"):
        skip_consumed(loader, samples=3, micro_batch_size=2)


# ------------------------------------------------------------------------------------ the chain
def test_chain_plan_prints_every_stage_and_refuses_missing_pieces(tmp_path):
    with CliRunner().isolated_filesystem(temp_dir=tmp_path):
        student = CliRunner().invoke(full_command, ["--stage", "all", "--model", "qwen3-0.6b", "--dry-run"])
        flagship = CliRunner().invoke(full_command, ["--stage", "all", "--model", "qwen3-32b", "--dry-run"])
    assert student.exit_code == 0, student.output
    for stage in ("[s1]", "[s2]", "[s3]", "[distill]"):
        assert stage in student.output
    assert "[cold-start]" not in student.output  # not the students' pipeline
    assert "GiB per GPU" in student.output and "days" in student.output and "parent s3" in student.output
    # The RL stages are planned on verl: the students' on-policy distillation, the flagship's reasoning and
    # general RL. The flagship's chain then has no gap: fusion starts from reasoning RL's merged output.
    assert "[distill-online] parent distill · verl" in student.output and "(teacher)" in student.output
    assert flagship.exit_code == 0, flagship.output
    for stage in ("[cold-start]", "[reasoning-rl] parent cold-start · verl", "[fusion] parent reasoning-rl",
                  "[general-rl] parent fusion · verl"):
        assert stage in flagship.output
    assert "starts   from reasoning-rl's verl output, converted: runs/full/qwen3-32b/reasoning-rl/hf" in flagship.output
    assert "has no full-scale path" not in flagship.output and "incomplete" not in flagship.output
    r = CliRunner().invoke(full_command, ["--stage", "all", "--model", "qwen3-32b"])
    assert r.exit_code != 0 and "--dry-run" in r.output


# ------------------------------------------------------------------------------------ weight decay
def _tiny_nt_config(cfg_name="micro"):
    from qwen3repro.models.registry import get_model_config
    from qwen3repro.nanotron.model import Qwen3NTConfig

    # bos = <|endoftext|>, the document separator, as in the released Qwen3 configs
    return Qwen3NTConfig.from_model_config(get_model_config(cfg_name).replace(bos_token_id=0), attn_implementation="sdpa")


def _optimizer_args(lr=1e-2, weight_decay=0.1, warmup=1, steps=4):
    from nanotron.config import LRSchedulerArgs, OptimizerArgs

    return OptimizerArgs(
        zero_stage=1, weight_decay=weight_decay, clip_grad=1.0, accumulate_grad_in_fp32=False, adam_eps=1e-8,
        adam_beta1=0.9, adam_beta2=0.95, torch_adam_is_fused=False,
        learning_rate_scheduler=LRSchedulerArgs(learning_rate=lr, lr_warmup_steps=warmup, lr_warmup_style="linear",
                                                lr_decay_style="cosine", lr_decay_steps=steps - warmup,
                                                lr_decay_starting_step=warmup, min_decay_lr=lr / 10))


def _decay_worker(rank, world, port):
    from qwen3repro.nanotron import compat

    torch.set_num_threads(1)
    compat.init_gloo(rank, world, port)
    compat.import_nanotron()
    from nanotron.helpers import init_optimizer_and_grad_accumulator

    from qwen3repro.nanotron.model import build_qwen3
    from qwen3repro.nanotron.optimizer import weight_decay_groups

    pc = compat.cpu_parallel_context()
    model = build_qwen3(_tiny_nt_config(), pc, device=torch.device("cpu"))
    with weight_decay_groups(zero_stage=1):
        optimizer, _ = init_optimizer_and_grad_accumulator(model, _optimizer_args(), pc)
    names = dict(optimizer.optimizer.id_to_name) if hasattr(optimizer.optimizer, "id_to_name") else {}
    decay_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            decay_of[names.get(id(p), id(p))] = group["weight_decay"]
    assert decay_of, "no parameter groups"
    for name, wd in decay_of.items():
        plain = name.endswith(("norm.weight", "token_embedding.weight"))
        assert wd == (0.0 if plain else 0.1), (name, wd)
    assert any(n.endswith("token_embedding.weight") for n in decay_of) and any(n.endswith("q_norm.weight") for n in decay_of)

    # The property itself: with zero gradients, one AdamW step shrinks a matrix by lr*wd and leaves norms alone.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for n, p in model.named_parameters():
        if n.endswith(("norm.weight", "token_embedding.weight")):
            torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)
        elif n.endswith("o_proj.weight"):
            torch.testing.assert_close(p.detach(), before[n] * (1 - 1e-2 * 0.1))
    torch.distributed.destroy_process_group()


def test_no_weight_decay_on_norms_and_embeddings():
    torch.multiprocessing.spawn(_decay_worker, args=(1, free_port()), nprocs=1, join=True)


# ------------------------------------------------------------------------------------ kill and resume
STEPS, CUT, MBS, ACCUM, SEQ = 4, 2, 2, 2, 16


def _resume_config(tmp: Path, run: str) -> Path:
    """A generated stage config with the tiny model, DP=2 and a few steps: the config `make full` writes,
    shrunk. Its `resume_checkpoint_path` is the run's checkpoint folder, as for every stage."""
    import yaml

    spec = config_gen.build_stage_spec("s1", "qwen3-0.6b", run_dir=tmp / run)
    d = spec.nanotron_dict()
    d["model"]["model_config"] = dataclasses.asdict(_tiny_nt_config())
    d["model"]["dtype"] = "float32"
    d["model"]["init_method"] = {"std": 0.02}
    d["parallelism"].update(dp=2, tp=1, pp=1)
    d["tokens"].update(sequence_length=SEQ, train_steps=STEPS, micro_batch_size=MBS, batch_accumulation_per_replica=ACCUM)
    d["checkpoints"]["checkpoint_interval"] = CUT
    opt = dataclasses.asdict(_optimizer_args(steps=STEPS))
    d["optimizer"].update({k: v for k, v in opt.items() if k != "learning_rate_scheduler"},
                          learning_rate_scheduler=opt["learning_rate_scheduler"])
    path = tmp / run / "s1.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def _documents(tmp: Path) -> Path:
    import datasets

    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 250, (int(n),), generator=g).tolist() for n in torch.randint(5, 40, (64,), generator=g)]
    path = tmp / "docs"
    datasets.Dataset.from_dict({"input_ids": docs}).save_to_disk(str(path))
    return path


def _train(yaml_path: Path, data: Path, stop_after: int | None, init_seed: int) -> int:
    """nanotron's trainer, step for step as `DistributedTrainer` runs it, minus its CUDA calls: build, resume
    from `parse_ckpt_path` when there is a checkpoint, train, save (`serialize.save` + latest.txt) every
    `checkpoint_interval`; `stop_after` steps of this process, then it dies without any cleanup. Returns the
    number of steps this process trained."""
    import nanotron.distributed as dist
    from nanotron.helpers import init_optimizer_and_grad_accumulator, lr_scheduler_builder
    from nanotron.serialize import load_lr_scheduler, load_meta, load_optimizer, load_weights, save
    from nanotron.serialize.main import parse_ckpt_path

    from qwen3repro.nanotron import compat
    from qwen3repro.nanotron.launch import make_loader, nanotron_batches
    from qwen3repro.nanotron.model import build_qwen3
    from qwen3repro.nanotron.optimizer import weight_decay_groups

    cfg = config_gen.load_with_nanotron(yaml_path)
    pc = compat.cpu_parallel_context(dp=2)
    dp, dp_rank = pc.dp_pg.size(), dist.get_rank(pc.dp_pg)
    model = build_qwen3(cfg.model.model_config, pc, device=torch.device("cpu"))
    model.init_model_randomly(seed=init_seed)  # a resumed run's own initialisation must not matter
    with weight_decay_groups(zero_stage=1):
        optimizer, _ = init_optimizer_and_grad_accumulator(model, cfg.optimizer, pc)
    scheduler = lr_scheduler_builder(optimizer, cfg.optimizer.learning_rate_scheduler, cfg.tokens.train_steps)
    step, consumed = 0, 0
    ckpt = parse_ckpt_path(cfg)
    if ckpt is not None:
        load_weights(model, pc, ckpt)
        load_optimizer(optimizer=optimizer, parallel_context=pc, root_folder=ckpt, model=model)
        load_lr_scheduler(lr_scheduler=scheduler, root_folder=ckpt)
        meta = load_meta(parallel_context=pc, root_folder=ckpt)
        step, consumed = meta.metas["last_train_step"], meta.metas["consumed_train_samples"]
    mc = cfg.model.model_config
    loader = make_loader("pretrain", str(data), seq_len=SEQ, micro_batch_size=MBS, seed=0, dp_rank=dp_rank,
                         dp_size=dp, eot_id=mc.bos_token_id)
    batches = nanotron_batches(loader, model, torch.device("cpu"), consumed // dp, MBS)
    done = 0
    while step < cfg.tokens.train_steps:
        for _ in range(ACCUM):
            (model(**next(batches))["loss"] / ACCUM).backward()
        for p in model.parameters():  # what DDP does: the mean gradient over DP
            dist.all_reduce(p.grad, group=pc.dp_pg)
            p.grad /= dp
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        step, consumed, done = step + 1, consumed + MBS * ACCUM * dp, done + 1
        if step % cfg.checkpoints.checkpoint_interval == 0:
            folder = cfg.checkpoints.checkpoints_path / str(step)
            if dist.get_rank(pc.world_pg) == 0:
                folder.mkdir(parents=True, exist_ok=True)
            dist.barrier(pc.world_pg)
            save(config=cfg, model=model, optimizer=optimizer, lr_scheduler=scheduler, parallel_context=pc,
                 root_folder=folder, should_save_model=dp_rank == 0, should_save_optimizer=True,
                 should_save_lr_scheduler=dist.get_rank(pc.world_pg) == 0,
                 should_save_config=dist.get_rank(pc.world_pg) == 0,
                 checkpoint_metadata={"last_train_step": step, "consumed_train_samples": consumed},
                 sanity_checks=False)
            if dist.get_rank(pc.world_pg) == 0:
                (cfg.checkpoints.checkpoints_path / "latest.txt").write_text(str(step))
            dist.barrier(pc.world_pg)
        if stop_after is not None and done == stop_after:
            return done
    if dp_rank == 0:
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, yaml_path.with_name("final.pt"))
    dist.barrier(pc.world_pg)
    return done


def _resume_worker(rank, world, port, tmp):
    from qwen3repro.nanotron import compat

    torch.set_num_threads(1)
    compat.init_gloo(rank, world, port)
    compat.import_nanotron()
    tmp = Path(tmp)
    data = tmp / "docs"
    _train(tmp / "uncut" / "s1.yaml", data, stop_after=None, init_seed=0)
    cut = tmp / "cut" / "s1.yaml"
    _train(cut, data, stop_after=CUT, init_seed=0)  # killed right after its checkpoint at step CUT
    resumed = _train(cut, data, stop_after=None, init_seed=1)  # restarted: resumes from latest.txt
    if rank == 0:
        cut.with_name("resumed_steps.txt").write_text(str(resumed))
    torch.distributed.destroy_process_group()


def test_a_killed_stage_resumes_to_the_weights_of_an_uncut_run(tmp_path):
    _documents(tmp_path)
    _resume_config(tmp_path, "uncut")
    _resume_config(tmp_path, "cut")
    torch.multiprocessing.spawn(_resume_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    uncut, cut = torch.load(tmp_path / "uncut" / "final.pt"), torch.load(tmp_path / "cut" / "final.pt")
    assert uncut.keys() == cut.keys() and len(uncut) > 5
    for name in uncut:
        torch.testing.assert_close(cut[name], uncut[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    assert (tmp_path / "cut" / "resumed_steps.txt").read_text() == str(STEPS - CUT)


# ------------------------------------------------------------------------------------ INIT=
def test_init_from_a_release_becomes_the_stage_start(tmp_path, monkeypatch):
    """`--init SOURCE` converts once into runs/full/<model>/<stage>/init (`convert.init_from_hf`, tested on real
    shapes in test_nanotron_convert.py; replaced here by a fake that writes what it writes) and the stage starts
    from it instead of its parent; a release at another RoPE base than the stage's is refused."""
    import json

    from qwen3repro.nanotron import convert

    calls = []

    def fake_init(source, model, out):
        calls.append((source, model, Path(out)))
        (Path(out) / "model").mkdir(parents=True)
        (Path(out) / "model_config.json").write_text(json.dumps({"rope_theta": 1e6}))
        return Path(out)

    monkeypatch.setattr(convert, "init_from_hf", fake_init)
    with CliRunner().isolated_filesystem(temp_dir=tmp_path):
        r = CliRunner().invoke(full_command, ["--stage", "cold-start", "--model", "qwen3-8b", "--dry-run",
                                              "--init", "Qwen/Qwen3-8B-Base"])
        assert r.exit_code == 0 and "would be converted" in r.output and not calls
        # launching converts (then stops here: no GPUs), and the config starts from the converted folder
        r = CliRunner().invoke(full_command, ["--stage", "cold-start", "--model", "qwen3-8b", "--init", "Qwen/Qwen3-8B-Base"])
        assert calls == [("Qwen/Qwen3-8B-Base", "qwen3-8b", Path("runs/full/qwen3-8b/cold-start/init"))]
        assert "a Hugging Face checkpoint, converted" in r.output
        cfg = config_gen.load_with_nanotron(Path("runs/full/qwen3-8b/cold-start/cold-start.yaml"))
        assert Path(cfg.model.init_method.path) == Path("runs/full/qwen3-8b/cold-start/init")
        # S2 trains at base 1e4; the release was trained at 1e6
        (Path("runs/full/qwen3-8b/s2/init/model")).mkdir(parents=True)
        Path("runs/full/qwen3-8b/s2/init/model_config.json").write_text(json.dumps({"rope_theta": 1e6}))
        r = CliRunner().invoke(full_command, ["--stage", "s2", "--model", "qwen3-8b", "--init", "Qwen/Qwen3-8B-Base"])
        assert r.exit_code != 0 and "RoPE base is 1e+06" in r.output


def test_a_stage_after_a_verl_stage_starts_from_its_output(tmp_path, monkeypatch):
    """Fusion's parent in the report is reasoning RL, which trains on verl: fusion starts from reasoning RL's
    merged Hugging Face output (converted at launch), not from the cold start, and refuses while it is missing."""
    import json

    from qwen3repro.nanotron import convert

    def fake_init(source, model, out):
        (Path(out) / "model").mkdir(parents=True)
        (Path(out) / "model_config.json").write_text(json.dumps({"rope_theta": 1e6}))
        return Path(out)

    monkeypatch.setattr(convert, "init_from_hf", fake_init)
    with CliRunner().isolated_filesystem(temp_dir=tmp_path):
        r = CliRunner().invoke(full_command, ["--stage", "fusion", "--model", "qwen3-32b"])
        assert r.exit_code != 0 and "reasoning-rl's output" in r.output and "does not exist yet" in r.output
        Path("runs/full/qwen3-32b/reasoning-rl/hf").mkdir(parents=True)
        Path("runs/full/qwen3-32b/reasoning-rl/hf/config.json").write_text("{}")
        r = CliRunner().invoke(full_command, ["--stage", "fusion", "--model", "qwen3-32b"])
        assert "starts from runs/full/qwen3-32b/fusion/init" in r.output
        cfg = config_gen.load_with_nanotron(Path("runs/full/qwen3-32b/fusion/fusion.yaml"))
        assert Path(cfg.model.init_method.path) == Path("runs/full/qwen3-32b/fusion/init")


# ------------------------------------------------------------------------------------ teacher outputs
def test_full_teacher_runs_the_stage_on_the_merged_flagship(tmp_path, monkeypatch):
    """`qwen3repro full-teacher`: the teacher-outputs stage (tested itself in test_distill_stages.py, replaced
    here) on the flagship's merged general-RL checkpoint, with the recipe plus full/stages.toml's job sizes,
    writing where [data.distill] reads; no checkpoint, no generation."""
    from qwen3repro.nanotron import cli
    from qwen3repro.stages import teacher_outputs

    calls = []
    monkeypatch.setattr(teacher_outputs, "run", lambda cfg, parent, ctx: calls.append((cfg, parent, ctx)))
    with CliRunner().isolated_filesystem(temp_dir=tmp_path):
        r = CliRunner().invoke(cli.full_teacher_command, [])
        assert r.exit_code != 0 and "no config.json" in r.output and not calls
        hf = Path("runs/full/qwen3-235b-a22b/general-rl/hf")
        hf.mkdir(parents=True)
        (hf / "config.json").write_text("{}")
        r = CliRunner().invoke(cli.full_teacher_command, ["--device", "cpu"])
        assert r.exit_code == 0, r.output
    (cfg, parent, ctx), = calls
    assert parent == hf and ctx.out_dir == Path("runs/full/flagship/teacher-outputs") and ctx.device == "cpu"
    assert (cfg.backend, cfg.max_new_tokens_think, cfg.n_task_queries) == ("vllm", 32768, 200_000)
    assert cfg.modes == ("think", "no_think") and cfg.verified_only  # the recipe's
    distill = config_gen.build_stage_spec("distill", "qwen3-0.6b").data["sources"][0]["path_or_id"]
    assert distill == str(ctx.out_dir / teacher_outputs.DATA_DIR)
