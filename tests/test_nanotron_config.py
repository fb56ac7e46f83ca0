"""Generated nanotron configs (every stage x every real model), plans, memory estimates and the `full` command.

* every YAML loads through nanotron 0.4's own `get_config_from_file` with our `Qwen3NTConfig`, and our checks
  hold: heads and KV heads divisible by TP (KV heads >= TP, never replicated), dp*tp*pp = world size, sequence
  length and RoPE base as the stage says (S1/S2 4,096 at 1e4, S3 and SFT 32,768 at 1e6), schedules as the
  recipes say (S1 no decay, S2 decays from the start with S1's LR), each stage starting from its parent's last
  checkpoint, data sources valid `SourceSpec`s;
* every default plan fits in 90% of an 80 GiB GPU;
* the nanotron model's parameter count equals the registry's for every real model (built on the meta device,
  one gloo process: nothing allocated);
* the memory estimate's parameters, weight, gradient and optimizer bytes per GPU are what nanotron's own model
  holds on each GPU (built in bf16 on the meta device in two gloo processes, for a dense tied model and an
  untied MoE, unsharded, TP=2 and PP=2); the whole estimate, activations included, equals a hand computation
  for Qwen3-0.6B (S2) and Qwen3-235B-A22B (S1);
* `full --dry-run` prints a complete plan; a wrong stage or model lists the valid names; without --dry-run on
  a machine without GPUs it says that GPUs are needed.
"""
from __future__ import annotations

import dataclasses
import json
import socket

import pytest
import torch

pytest.importorskip("nanotron")

from qwen3repro.models.registry import REAL_MODELS, count_parameters  # noqa: E402
from qwen3repro.nanotron import config_gen  # noqa: E402
from qwen3repro.nanotron.plan import GIB, Layout, stage_parameters  # noqa: E402

STAGE_LEN = {"s1": (4096, 1e4), "s2": (4096, 1e4), "s3": (32768, 1e6),
             "cold-start": (32768, 1e6), "fusion": (32768, 1e6), "distill": (32768, 1e6)}


def test_every_generated_yaml_loads_with_nanotron_and_passes_our_checks(tmp_path):
    from qwen3repro.data.mixture import SourceSpec
    from qwen3repro.nanotron.model import Qwen3NTConfig

    n = 0
    for model in REAL_MODELS:
        mc0 = REAL_MODELS[model]
        for stage in config_gen.full_stages(config_gen.load_settings()):
            spec = config_gen.build_stage_spec(stage, model, run_dir=tmp_path)
            assert config_gen.validate(spec) == [], (model, stage)
            yaml_path, _ = config_gen.write_stage_config(spec)
            cfg = config_gen.load_with_nanotron(yaml_path)
            mc = cfg.model.model_config
            assert isinstance(mc, Qwen3NTConfig)
            par = cfg.parallelism
            assert par.dp * par.tp * par.pp == spec.layout.world
            assert mc.num_attention_heads % par.tp == 0 and mc.num_key_value_heads % par.tp == 0
            assert mc.num_key_value_heads >= par.tp
            seq, theta = STAGE_LEN[stage]
            assert cfg.tokens.sequence_length == seq == mc.max_position_embeddings
            assert mc.rope_theta == theta
            # the architecture is the registry's
            assert mc.to_model_config().replace(rope_theta=mc0.rope_theta, max_position_embeddings=mc0.max_position_embeddings) == mc0
            # what the memory estimate assumes: bf16 weights, fp32 gradient accumulation, ZeRO-1
            assert str(cfg.model.dtype) == "torch.bfloat16"
            assert cfg.optimizer.accumulate_grad_in_fp32 and cfg.optimizer.zero_stage == 1
            sched = cfg.optimizer.learning_rate_scheduler
            assert cfg.tokens.train_steps % cfg.checkpoints.checkpoint_interval == 0  # the last step is saved
            if stage == "s1":
                assert sched.min_decay_lr == sched.learning_rate  # warmup-stable, no decay in S1 (recipe)
            if stage == "s2":
                s1 = config_gen.build_stage_spec("s1", model, run_dir=tmp_path)
                assert sched.lr_decay_starting_step == 0 and sched.lr_decay_steps == cfg.tokens.train_steps
                assert sched.learning_rate == pytest.approx(s1.lr)  # continues S1's stable LR
                assert sched.min_decay_lr == pytest.approx(0.1 * s1.lr)
            parent = spec.parent
            if parent is None:
                assert cfg.model.init_method.std == mc0.initializer_range
            else:
                p = config_gen.build_stage_spec(parent, model, run_dir=tmp_path)
                assert str(cfg.model.init_method.path) == str(p.checkpoints_path / str(p.schedule.total_steps))
            for s in spec.data["sources"]:
                SourceSpec(**s)
            n += 1
    assert n == 6 * 8


def test_every_default_plan_fits():
    for model in REAL_MODELS:
        for stage in config_gen.full_stages(config_gen.load_settings()):
            mem = config_gen.build_stage_spec(stage, model).plan().memory()
            assert mem["total"] <= 0.9 * 80 * GIB, (model, stage, mem["total"] / GIB)


def test_stage_facts_come_from_the_recipes():
    """Length policy, RoPE base, length mix, parents and roles are the recipes' (the tiny scale reads the same)."""
    from qwen3repro.recipes import load_recipe, load_stage_graph

    settings, graph = config_gen.load_settings(), load_stage_graph()
    s1, s3 = (config_gen.resolve_stage(s, settings, graph) for s in ("s1", "s3"))
    assert s3.seq_len == load_recipe("s3")["seq_len_factor"] * s1.seq_len == 32768
    assert s3.rope_theta == 1e6 and s1.rope_theta == 1e4
    assert s3.length_mix_tokens() == [{"tokens": [16384, 32768], "share": 0.75}, {"tokens": [4096, 16384], "share": 0.25}]
    assert config_gen.resolve_stage("s2", settings, graph).rope_theta == 1e4  # inherited from S1's recipe
    assert config_gen.resolve_stage("cold-start", settings, graph).rope_theta == 1e6  # inherited from S3's
    # Reasoning RL is not trained through nanotron: fusion starts from the nearest ancestor that is.
    assert graph["fusion"].parent == "reasoning-rl"
    assert config_gen.resolve_stage("fusion", settings, graph).parent == "cold-start"
    assert config_gen.resolve_stage("s2", settings, graph).lr_from == "s1"
    with pytest.raises(config_gen.ConfigError, match="not trained through nanotron"):
        config_gen.resolve_stage("reasoning-rl", settings, graph)
    fusion = config_gen.resolve_stage("fusion", settings, graph)
    assert fusion.train["decay_fraction"] == load_recipe("fusion")["sft"]["train"]["decay_fraction"]
    # Who the report trains through a stage: the recipe's roles against full/models.toml's role of each model.
    assert config_gen.build_stage_spec("cold-start", "qwen3-235b-a22b").in_report_pipeline
    assert not config_gen.build_stage_spec("cold-start", "qwen3-8b").in_report_pipeline
    assert config_gen.build_stage_spec("distill", "qwen3-8b").in_report_pipeline


def test_a_derived_size_stated_by_the_scale_is_an_error():
    settings = config_gen.load_settings()
    settings["stages"]["s3"] = {**settings["stages"]["s3"], "seq_len": 16384}
    from qwen3repro.recipes import load_stage_graph

    with pytest.raises(config_gen.ConfigError, match="comes from the parent"):
        config_gen.resolve_stage("s3", settings, load_stage_graph())


# ---------------------------------------------------------------------------------- parameter counts
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _count_worker(rank, port):
    from qwen3repro.nanotron import compat

    compat.init_gloo(rank, 1, port)
    from qwen3repro.nanotron.model import build_qwen3

    pc = compat.cpu_parallel_context()
    for name, cfg in REAL_MODELS.items():
        model = build_qwen3(cfg, pc, device=torch.device("meta"))
        params = {id(p): p for p in model.parameters()}
        assert all(p.is_meta for p in params.values())
        got = sum(p.numel() for p in params.values())
        assert got == count_parameters(cfg)["total"], (name, got)


def test_nanotron_parameter_count_equals_registry():
    torch.multiprocessing.spawn(_count_worker, args=(_free_port(),), nprocs=1, join=True)


# ---------------------------------------------------------------------------------- memory against nanotron
# (tp, pp, dp) layouts of two processes, and the models measured in each: a dense model with tied embeddings
# (the tied LM head is a second copy on another pipeline stage) and an untied MoE (experts split over TP).
MEASURED_LAYOUTS = ((1, 1, 2), (2, 1, 1), (1, 2, 1))
MEASURED_MODELS = ("qwen3-0.6b", "qwen3-30b-a3b")
# Bytes per parameter element, from the dtypes the generated config asks for (checked on the YAML above):
# bf16 weights; fp32 gradients (`accumulate_grad_in_fp32`); fp32 master weights + Adam's two fp32 moments,
# sharded over dp by ZeRO-1.
GRADIENT_BYTES = torch.float32.itemsize
OPTIMIZER_BYTES = 3 * torch.float32.itemsize


def _held_by_each_gpu_worker(rank, port, out_dir):
    from qwen3repro.nanotron import compat

    compat.init_gloo(rank, 2, port)
    import nanotron.distributed as dist

    from qwen3repro.nanotron.model import build_qwen3

    held = {}
    for tp, pp, dp in MEASURED_LAYOUTS:
        pc = compat.cpu_parallel_context(tp=tp, pp=pp, dp=dp)
        for name in MEASURED_MODELS:
            model = build_qwen3(REAL_MODELS[name], pc, dtype=torch.bfloat16, device=torch.device("meta"))
            params = {id(p): p for p in model.parameters()}  # a parameter tied within one GPU is held once
            held[f"{name} tp={tp} pp={pp}"] = dict(
                pp_rank=dist.get_rank(pc.pp_pg),
                elements=sum(p.numel() for p in params.values()),
                bytes=sum(p.numel() * p.element_size() for p in params.values()),
            )
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(held, f)


def test_memory_estimate_counts_what_nanotron_holds_on_each_gpu(tmp_path):
    torch.multiprocessing.spawn(_held_by_each_gpu_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name in MEASURED_MODELS:
        base = config_gen.build_stage_spec("s2", name).plan()
        for tp, pp, _ in MEASURED_LAYOUTS:
            key = f"{name} tp={tp} pp={pp}"
            per_stage = {}
            for r in ranks:  # both TP shards (or both data-parallel replicas) hold the same amount
                per_stage.setdefault(r[key]["pp_rank"], r[key])
                assert r[key] == per_stage[r[key]["pp_rank"]], key
            assert sorted(per_stage) == list(range(pp)), key
            assert [st["params"] for st in stage_parameters(REAL_MODELS[name], tp, pp)] == [
                per_stage[r]["elements"] for r in range(pp)], key
            plan = dataclasses.replace(base, layout=Layout(nodes=1, gpus_per_node=8, tp=tp, pp=pp))
            mem = plan.memory()
            held = per_stage[mem["stage"]]
            assert mem["params"] == held["elements"], key
            assert mem["weights"] == held["bytes"], key
            assert mem["gradients"] == GRADIENT_BYTES * held["elements"], key
            assert mem["optimizer"] == OPTIMIZER_BYTES * held["elements"] / plan.layout.dp, key


def test_nanotron_model_config_is_model_config_plus_nanotron_settings():
    """`Qwen3NTConfig` is generated from `ModelConfig`: the same fields and defaults (but the inference-only
    ones) plus nanotron's settings, mutable (nanotron's trainer pads the vocabulary in place), and every
    registry model survives the round trip."""
    import dataclasses

    from qwen3repro.config import ModelConfig
    from qwen3repro.nanotron.model import INFERENCE_ONLY_FIELDS, NANOTRON_FIELDS, Qwen3NTConfig

    ours = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in INFERENCE_ONLY_FIELDS]
    settings = [name for name, _, _ in NANOTRON_FIELDS]
    theirs = [f.name for f in dataclasses.fields(Qwen3NTConfig)]
    assert sorted(theirs) == sorted(ours + settings)
    assert [n for n in theirs if n in ours] == ours  # the YAML lists the model's fields in ModelConfig's order
    required = {f.name: 8 for f in dataclasses.fields(ModelConfig) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}
    nt = Qwen3NTConfig(**required)
    assert nt.to_model_config() == ModelConfig(**required)  # same defaults
    assert {name: getattr(nt, name) for name in settings} == {name: default for name, _, default in NANOTRON_FIELDS}
    nt.vocab_size = 16
    assert nt.to_model_config().vocab_size == 16
    for name, mc in REAL_MODELS.items():
        assert Qwen3NTConfig.from_model_config(mc).to_model_config() == mc, name
    with pytest.raises(ValueError, match="attn_implementation"):
        Qwen3NTConfig(**required, attn_implementation="eager")


# ---------------------------------------------------------------------------------- memory by hand
def test_memory_estimate_by_hand_qwen3_0_6b():
    spec = config_gen.build_stage_spec("s2", "qwen3-0.6b")
    lay = spec.layout
    assert (lay.nodes, lay.gpus_per_node, lay.tp, lay.pp, lay.dp) == (1, 8, 1, 1, 8)
    assert spec.micro_batch_size == 4 and not spec.recompute
    mem = spec.plan().memory()
    # Qwen3-0.6B: vocab 151,936, hidden 1,024, 16 query heads and 8 KV heads of 128, MLP 3,072, 28 layers, tied.
    #   embedding (= LM head)  151,936 x 1,024                                    = 155,582,464
    #   one layer: q 1,024 x 2,048 + k, v 2 x 1,024 x 1,024 + o 2,048 x 1,024       =   6,291,456
    #              gate, up, down 3 x 1,024 x 3,072                                 =   9,437,184
    #              q_norm, k_norm 2 x 128 + two layer norms 2 x 1,024               =       2,304
    #              together                                                         =  15,730,944
    #   28 layers                                                                   = 440,466,432
    #   final norm                                                                  =       1,024
    #   total: the whole model on one GPU                                           = 596,049,920
    P = 596_049_920
    assert mem["params"] == P
    # bf16 weights 2 B, fp32 gradients 4 B, fp32 master + m + v 12 B over dp = 8 (ZeRO-1), per parameter
    assert mem["weights"] == 1_192_099_840
    assert mem["gradients"] == 2_384_199_680
    assert mem["optimizer"] == 894_074_880
    tokens = 4 * 4096
    per_layer = 8 * 1024 + 6 * (16 + 8) * 128 + 8 * 3072  # 51,200 bytes per token
    act = 28 * per_layer * tokens + 2 * 1024 * tokens + 8 * 151936 * tokens
    assert mem["activations"] == act == 43_436_212_224
    assert mem["total"] == 1_192_099_840 + 2_384_199_680 + 894_074_880 + act


def test_memory_estimate_by_hand_qwen3_235b_a22b():
    spec = config_gen.build_stage_spec("s1", "qwen3-235b-a22b")
    lay = spec.layout
    assert (lay.nodes, lay.tp, lay.pp, lay.dp) == (64, 4, 16, 8) and spec.recompute
    mem = spec.plan().memory()
    # layer costs c = attention 71,303,168 + active MLP 3*4096*8*1536 = 222,298,112; LM head = 2.8c; 94 layers:
    # thresholds 96.8c/16 = 6.05c per stage, so stage 0 takes the embedding and layers 0..6 (7 layers).
    assert mem["stage"] == 0 and mem["layers"] == 7
    sharded_layer = 4096 * (64 + 2 * 4) * 128 + 64 * 128 * 4096 + 128 * 3 * 4096 * 1536  # 2,487,222,272
    replicated_layer = 2 * 128 + 2 * 4096 + 128 * 4096  # norms + router: 532,736
    P = (7 * sharded_layer + 151936 * 4096) // 4 + 7 * replicated_layer
    assert mem["params"] == P == 4_511_950_592
    assert mem["weights"] == 2 * P and mem["gradients"] == 4 * P and mem["optimizer"] == 12 * P / 8
    tokens, in_flight = 4096, 16  # micro-batch 1; 1F1B keeps pp micro-batches in flight on stage 0
    full_layer = 8 * 4096 + (6 * (64 + 4) * 128 + 8 * 8 * 1536) / 4 + 8 * 128 + 2 * 8 * 4096  # 136,960 bytes/token
    act = (2 * 4096 * 7 * in_flight + full_layer) * tokens + 2 * 4096 * tokens * in_flight
    assert mem["activations"] == act == 4_855_955_456
    assert mem["total"] <= 0.9 * 80 * GIB


# ---------------------------------------------------------------------------------- the command
def test_full_dry_run_prints_a_complete_plan(tmp_path):
    from click.testing import CliRunner

    from qwen3repro.nanotron.cli import full_command

    r = CliRunner().invoke(full_command, ["--stage", "s2", "--model", "qwen3-0.6b", "--dry-run", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    for needle in ("dp=8 tp=1 pp=1", "4096 tokens, RoPE base 10000", "tokens per step", "steps", "weights (bf16)",
                   "gradients", "optimizer (ZeRO-1", "activations", "fits", "MFU 40%", "days",
                   "runs/full/qwen3-0.6b/s1/checkpoints/", "torchrun --nproc_per_node=8"):
        assert needle in r.output, needle
    assert (tmp_path / "s2.yaml").is_file() and (tmp_path / "s2.qwen3repro.json").is_file()


@pytest.mark.parametrize("args, valid", [
    (["--stage", "s4", "--model", "qwen3-0.6b"], "s1, s2, s3, cold-start, fusion, distill"),
    (["--stage", "s2", "--model", "qwen3-7b"], ", ".join(REAL_MODELS)),
])
def test_wrong_names_list_the_valid_ones(args, valid):
    from click.testing import CliRunner

    from qwen3repro.nanotron.cli import full_command

    r = CliRunner().invoke(full_command, args + ["--dry-run"])
    assert r.exit_code != 0 and valid in r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without GPUs")
def test_launch_without_gpus_says_so(tmp_path):
    from click.testing import CliRunner

    from qwen3repro.nanotron.cli import full_command

    r = CliRunner().invoke(full_command, ["--stage", "s1", "--model", "qwen3-0.6b", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "needs GPUs" in r.output


def test_multi_node_writes_a_slurm_script(tmp_path):
    from click.testing import CliRunner

    from qwen3repro.nanotron.cli import full_command

    r = CliRunner().invoke(full_command, ["--stage", "s3", "--model", "qwen3-32b", "--nodes", "8", "--dry-run",
                                          "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    script = (tmp_path / "s3.slurm").read_text()
    assert "--nnodes=8" in script and "-m qwen3repro.nanotron.launch --config-file" in script and "{{" not in script
