"""Generated nanotron configs (every stage x every real model), plans, memory estimates and the `full` command.

* every YAML loads through nanotron 0.4's own `get_config_from_file` with our `Qwen3NTConfig`, and our checks
  hold: heads and KV heads divisible by TP (KV heads >= TP, never replicated), dp*tp*pp = world size, sequence
  length and RoPE base as the stage says (S1/S2 4,096 at 1e4, S3 and SFT 32,768 at 1e6), schedules as the
  recipes say (S1 no decay, S2 decays from the start with S1's LR), each stage starting from its parent's latest
  checkpoint and resuming from its own, data sources valid `SourceSpec`s;
* every default plan fits in 90% of an 80 GiB GPU (`RunPlan.fits`), and the layouts the corrected memory model
  replaced do not;
* the nanotron model's parameter count equals the registry's for every real model (built on the meta device,
  one gloo process: nothing allocated);
* the memory estimate's parameters, weight, gradient (fp32 buffers and bf16 `.grad`) and optimizer bytes per GPU
  are what nanotron's own model holds on each GPU (built in bf16 on the meta device in two gloo processes, for a
  dense tied model and an untied MoE, unsharded, TP=2 and PP=2); the whole estimate, activations included, equals
  a hand computation for Qwen3-0.6B (S2) and Qwen3-235B-A22B (S1, and S3: the tightest plan). The activation
  formula itself is checked against what autograd saves in tests/test_nanotron_memory.py;
* `full --dry-run` prints a complete plan; a wrong stage or model lists the valid names (launching without GPUs:
  test_nanotron_launch.py).
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("nanotron")

from gloo_helpers import free_port  # noqa: E402

from qwen3repro.models.registry import REAL_MODELS, count_parameters  # noqa: E402
from qwen3repro.nanotron import config_gen  # noqa: E402
from qwen3repro.nanotron.plan import GIB, MEMORY_HEADROOM, Layout, stage_parameters  # noqa: E402

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
                # no parent checkpoint yet: the parent's checkpoint folder (launching refuses until latest.txt)
                p = config_gen.build_stage_spec(parent, model, run_dir=tmp_path)
                assert str(cfg.model.init_method.path) == str(p.checkpoints_path)
            assert str(cfg.checkpoints.resume_checkpoint_path) == str(spec.checkpoints_path)
            for s in spec.data["sources"]:
                SourceSpec(**s)
            n += 1
    assert n == 6 * 8


def test_every_default_plan_fits():
    assert MEMORY_HEADROOM == 0.9
    for model in REAL_MODELS:
        for stage in config_gen.full_stages(config_gen.load_settings()):
            plan = config_gen.build_stage_spec(stage, model).plan()
            mem = plan.memory()
            assert plan.gpu_memory_gib == 80 and plan.fits, (model, stage, mem["total"] / GIB)
            assert mem["total"] <= 0.9 * 80 * GIB, (model, stage, mem["total"] / GIB)
            assert "fits in 90% of 80 GiB" in plan.render()


def test_a_plan_over_90_percent_does_not_fit():
    """The corrected memory model's verdict on the layouts it replaced: Qwen3-1.7B at 32k on TP 2 without
    recomputation needs ~93 GiB; 235B-A22B's S3 on PP 16 ~79 GiB, over 72 GiB though under 80."""
    plan = config_gen.build_stage_spec("s3", "qwen3-1.7b").plan()
    old = dataclasses.replace(plan, recompute=False)
    assert not old.fits and 92 * GIB < old.memory()["total"] < 94 * GIB
    assert "DOES NOT FIT in 90% of 80 GiB" in old.render()
    big = config_gen.build_stage_spec("s3", "qwen3-235b-a22b").plan()
    old = dataclasses.replace(big, layout=Layout(nodes=64, gpus_per_node=8, tp=4, pp=16))
    assert 0.9 * 80 * GIB < old.memory()["total"] < 80 * GIB and not old.fits


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
    torch.multiprocessing.spawn(_count_worker, args=(free_port(),), nprocs=1, join=True)


# ---------------------------------------------------------------------------------- memory against nanotron
# (tp, pp, dp) layouts of two processes, and the models measured in each: a dense model with tied embeddings
# (the tied LM head is a second copy on another pipeline stage) and an untied MoE (experts split over TP).
MEASURED_LAYOUTS = ((1, 1, 2), (2, 1, 1), (1, 2, 1))
MEASURED_MODELS = ("qwen3-0.6b", "qwen3-30b-a3b")
# Bytes per parameter element, from the dtypes the generated config asks for (checked on the YAML above):
# bf16 weights; fp32 gradient buffers (`accumulate_grad_in_fp32`) plus autograd's bf16 `.grad` (the parameter's
# dtype) until the accumulator folds it in; fp32 master weights + Adam's two fp32 moments, sharded over dp by ZeRO-1.
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
    torch.multiprocessing.spawn(_held_by_each_gpu_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
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
            assert mem["gradients_bf16"] == held["bytes"], key  # a .grad has its parameter's dtype and shape
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
    # per parameter: bf16 weights 2 B, fp32 gradient buffers 4 B, bf16 .grad 2 B, fp32 master + m + v 12 B over
    # dp = 8 (ZeRO-1)
    assert mem["weights"] == 1_192_099_840
    assert mem["gradients"] == 2_384_199_680
    assert mem["gradients_bf16"] == 1_192_099_840
    assert mem["optimizer"] == 894_074_880
    # activations per token of one layer (plan.py's module doc, term by term; tp = 1):
    #   two norms 2 x (4h + 4 + 2h + 2h) = 16 x 1,024 + 8                               = 16,392
    #   RoPE cos, sin 2 x 2 x 128                                                      =    512
    #   attention 12 (16 + 8) 128 + 8 x 16 + 4 x 8                                     = 37,024
    #   MLP 8 x 3,072                                                                  = 24,576
    per_layer = 16_392 + 512 + 37_024 + 24_576
    assert per_layer == 78_504  # what tests/test_nanotron_memory.py measures for this layer
    tokens = 4 * 4096  # micro-batch 4 of 4,096; one micro-batch in flight (pp = 1), no recomputation
    # + token ids 8 B; last stage: final norm 8 x 1,024 + 4, fp32 logits and their shifted copy 8 x 151,936
    act = 28 * per_layer * tokens + 8 * tokens + (8 * 1024 + 4 + 8 * 151_936) * tokens
    assert mem["activations"] == act == 56_062_836_736
    assert mem["workspace"] == 0  # dense
    # optimizer step: the ZeRO all-gather's flat bf16 buffers 2P (1 + 1/8), less than the backward's 2P + act
    assert mem["step_buffers"] == 1_341_112_320 and mem["peak"] == "backward"
    assert mem["total"] == 1_192_099_840 + 2_384_199_680 + 894_074_880 + 1_192_099_840 + act == 61_725_310_976
    assert spec.plan().fits  # 57.5 GiB of 72 GiB


# Qwen3-235B-A22B: hidden 4,096, 64 query heads and 4 KV heads of 128, 128 experts of 1,536, top-8, vocab 151,936,
# untied, 94 layers; TP 4. Per layer: TP-sharded and replicated parameters, and the activation bytes per token.
_235B_SHARDED_LAYER = 4096 * (64 + 2 * 4) * 128 + 64 * 128 * 4096 + 128 * 3 * 4096 * 1536  # 2,487,222,272
_235B_REPLICATED_LAYER = 2 * 128 + 2 * 4096 + 128 * 4096  # norms + router: 532,736
# replicated: norms 16 x 4,096 + 8 = 65,544, RoPE 512, router 8 x 128 + 8 x 8 + 4 x 8 + 4 = 1,124,
#             dispatch 16 x 8 + 2 x 8 + 6 x 8 x 4,096 = 196,752;
# over TP 4:  attention (12 (64 + 4) 128 + 8 x 64 + 4 x 4) / 4 = 26,244, experts 8 x 8 x 1,536 / 4 = 24,576
_235B_LAYER_BYTES = 65_544 + 512 + 1_124 + 196_752 + 26_244 + 24_576  # 314,752
# backward of one MoE layer: per-expert bf16 gradient pieces before stacking, 2 x 128 x 3 x 4,096 x 1,536 / 4
_235B_WORKSPACE = 1_207_959_552


def test_memory_estimate_by_hand_qwen3_235b_a22b():
    spec = config_gen.build_stage_spec("s1", "qwen3-235b-a22b")
    lay = spec.layout
    assert (lay.nodes, lay.tp, lay.pp, lay.dp) == (64, 4, 16, 8) and spec.recompute
    mem = spec.plan().memory()
    # layer costs c = attention 71,303,168 + active MLP 3*4096*8*1536 = 222,298,112; LM head = 2.8c; 94 layers:
    # thresholds 96.8c/16 = 6.05c per stage, so stage 0 takes the embedding and layers 0..6 (7 layers).
    assert mem["stage"] == 0 and mem["layers"] == 7
    P = (7 * _235B_SHARDED_LAYER + 151936 * 4096) // 4 + 7 * _235B_REPLICATED_LAYER
    assert mem["params"] == P == 4_511_950_592
    assert mem["weights"] == 2 * P and mem["gradients"] == 4 * P and mem["gradients_bf16"] == 2 * P
    assert mem["optimizer"] == 12 * P / 8
    assert _235B_LAYER_BYTES == 314_752
    tokens, in_flight = 4096, 16  # micro-batch 1; 1F1B keeps pp micro-batches in flight on stage 0
    # recomputation: each layer keeps its bf16 input (2 x 4,096) per micro-batch in flight, plus the stage's int64
    # position ids (8) and the embedding's token ids (8); one recomputed layer's activations in backward
    act = (2 * 4096 * 7 + 8 + 8) * tokens * in_flight + _235B_LAYER_BYTES * tokens
    assert mem["activations"] == act == 5_048_369_152
    assert mem["workspace"] == _235B_WORKSPACE
    assert mem["step_buffers"] == 2 * P * (1 + 1 / 8) < 2 * P + act + _235B_WORKSPACE
    assert mem["total"] == 2 * P + 4 * P + 12 * P / 8 + 2 * P + act + _235B_WORKSPACE  # 45.7 GiB
    assert spec.plan().fits


def test_memory_estimate_by_hand_qwen3_235b_a22b_long():
    """The tightest default plan: S3 at 32,768 tokens on TP 4 x PP 32, 64 nodes (dp 4)."""
    spec = config_gen.build_stage_spec("s3", "qwen3-235b-a22b")
    lay = spec.layout
    assert (lay.nodes, lay.tp, lay.pp, lay.dp) == (64, 4, 32, 4) and spec.recompute and spec.micro_batch_size == 1
    mem = spec.plan().memory()
    # thresholds 96.8c/32 = 3.025c: stage 0 takes the embedding and layers 0..3 (the 4th crosses 3.025c)
    assert mem["stage"] == 0 and mem["layers"] == 4
    P = (4 * _235B_SHARDED_LAYER + 151936 * 4096) // 4 + 4 * _235B_REPLICATED_LAYER
    assert mem["params"] == P == 2_644_935_680
    tokens, in_flight = 32768, 32
    act = (2 * 4096 * 4 + 8 + 8) * tokens * in_flight + _235B_LAYER_BYTES * tokens
    assert mem["activations"] == act == 44_690_309_120
    total = 2 * P + 4 * P + 12 * P / 4 + 2 * P + act + _235B_WORKSPACE
    assert mem["total"] == total and 69.8 * GIB < total <= 0.9 * 80 * GIB


# ---------------------------------------------------------------------------------- the command
def test_full_dry_run_prints_a_complete_plan(tmp_path):
    from click.testing import CliRunner

    from qwen3repro.nanotron.cli import full_command

    r = CliRunner().invoke(full_command, ["--stage", "s2", "--model", "qwen3-0.6b", "--dry-run", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    for needle in ("dp=8 tp=1 pp=1", "4096 tokens, RoPE base 10000", "tokens per step", "steps", "weights (bf16)",
                   "gradients", "optimizer (ZeRO-1", "activations", "fits", "MFU 40%", "days",
                   "runs/full/qwen3-0.6b/s1/checkpoints", "torch.distributed.run --nproc_per_node=8", "LR rule"):
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


def test_multi_node_writes_a_slurm_script(tmp_path):
    from click.testing import CliRunner

    from qwen3repro.nanotron.cli import full_command

    r = CliRunner().invoke(full_command, ["--stage", "s3", "--model", "qwen3-32b", "--nodes", "8", "--dry-run",
                                          "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    script = (tmp_path / "s3.slurm").read_text()
    assert "--nnodes=8" in script and "-m qwen3repro.nanotron.launch --config-file" in script and "{{" not in script
