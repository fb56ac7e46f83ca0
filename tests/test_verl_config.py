"""The verl 0.9.1 configs of the full-scale RL stages (`qwen3repro.verl.config_gen`).

* every stage × real model composes with Hydra against verl's own config tree (verl installed without its
  dependencies and located without importing it), and our scale-free settings land where verl reads them;
* on-policy distillation sets every `distillation.*` field verl's YAML has (its defaults differ from the
  dataclass's);
* our checks refuse an indivisible batch, an impossible layout and what verl cannot express, before verl sees it;
  launching refuses a missing parent checkpoint and a missing verl environment;
* in the verl environment (`make verl-env`, skipped without it): verl's own `validate_config` and config
  dataclasses accept every composed config.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwen3repro.models.registry import REAL_MODELS, get_model_config
from qwen3repro.nanotron.cli import full_command
from qwen3repro.verl.config_gen import LOSS_AGG_MODES, NO_DUAL_CLIP, REWARD_PATH, VERL_STAGES, build_verl_spec
from qwen3repro.recipes import repo_root

hydra = pytest.importorskip("hydra")
from hydra import compose, initialize_config_dir  # noqa: E402

CASES = [(stage, model) for stage in VERL_STAGES for model in REAL_MODELS]
VERL_PYTHON = repo_root() / ".venv-verl" / "bin" / "python"


def verl_config_dir() -> str:
    spec = importlib.util.find_spec("verl")  # finds the package without running its __init__ (torch, ray, ...)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("verl is not installed (make venv installs it without dependencies)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "trainer" / "config")


@pytest.fixture(scope="module")
def specs():
    return {case: build_verl_spec(*case) for case in CASES}


@pytest.fixture(scope="module")
def composed(specs):
    with initialize_config_dir(config_dir=verl_config_dir(), version_base=None):
        return {case: compose(config_name=spec.config_name, overrides=spec.overrides()) for case, spec in specs.items()}


def test_every_config_composes_and_passes_our_checks(specs, composed):
    for case, spec in specs.items():
        assert spec.problems() == [], case
        assert spec.fits, case
        assert composed[case].actor_rollout_ref.actor.strategy == spec.strategy


def test_scale_free_settings_land_where_verl_reads_them(specs, composed):
    for (stage, model), cfg in composed.items():
        r, actor, rollout = specs[stage, model].recipe, cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
        assert cfg.algorithm.adv_estimator == "grpo" and cfg.critic.enable is False
        assert rollout.name == "vllm" and rollout.tensor_model_parallel_size == specs[stage, model].res.rollout_tp
        assert rollout.temperature == r.temperature and rollout.top_k == -1 and rollout.top_p == 1.0
        assert actor.optim.betas == list(r.betas) and actor.optim.weight_decay == r.weight_decay
        assert actor.optim.clip_grad == r.clip_grad_norm
        assert cfg.reward.custom_reward_function.path == REWARD_PATH
        assert cfg.reward.custom_reward_function.name == "compute_score"
        assert cfg.data.train_files.endswith(f"{model}/{stage}/verl-data/train.parquet")
        parent = {"reasoning-rl": "cold-start", "general-rl": "fusion", "distill-online": "distill"}[stage]
        assert cfg.actor_rollout_ref.model.path.endswith(f"{model}/{parent}/hf")
        if stage == "distill-online":
            assert rollout.n == r.samples_per_query and actor.ppo_epochs == 1
            continue
        assert rollout.n == r.group_size and actor.ppo_epochs == r.mu
        assert actor.clip_ratio_low == r.epsilon_low == 0.2 and actor.clip_ratio_high == r.epsilon_high == 0.28
        assert actor.clip_ratio_c == NO_DUAL_CLIP
        assert actor.loss_agg_mode == LOSS_AGG_MODES[r.loss_type] == "token-mean"  # dapo
        assert actor.use_kl_loss is (r.beta > 0) and actor.kl_loss_coef == r.beta
        assert actor.kl_loss_type == "low_var_kl"  # k3
        assert actor.entropy_coeff == 0.0 and actor.calculate_entropy is True  # proportional control: logged only
        assert cfg.algorithm.norm_adv_by_std_in_grpo is (r.scale_rewards == "group")
        assert cfg.algorithm.filter_groups.enable is r.dynamic_sampling
        assert actor.ppo_mini_batch_size * r.mini_batches == cfg.data.train_batch_size if stage == "reasoning-rl" \
            else actor.ppo_mini_batch_size == cfg.data.train_batch_size


def test_layouts_fsdp_dense_megatron_moe(specs, composed):
    for (stage, model), cfg in composed.items():
        actor = cfg.actor_rollout_ref.actor
        if get_model_config(model).is_moe:
            m = actor.megatron
            assert actor.strategy == "megatron" and m.expert_model_parallel_size > 1
            assert get_model_config(model).num_key_value_heads % m.tensor_model_parallel_size == 0
            assert cfg.actor_rollout_ref.ref.megatron.tensor_model_parallel_size == m.tensor_model_parallel_size
        else:
            assert actor.strategy == "fsdp"
    big = composed["reasoning-rl", "qwen3-235b-a22b"].actor_rollout_ref.actor.megatron
    assert (big.tensor_model_parallel_size, big.pipeline_model_parallel_size, big.expert_model_parallel_size) == (4, 8, 4)
    assert big.override_transformer_config.num_layers_in_first_pipeline_stage == 5


def test_distillation_sets_every_field_of_verl_yaml(specs, composed):
    for model in REAL_MODELS:
        spec, cfg = specs["distill-online", model], composed["distill-online", model]
        keys = {o.split("=", 1)[0].lstrip("+") for o in spec.overrides()}
        loss = cfg.distillation.distillation_loss
        for name in loss:
            if name != "_target_":
                assert f"distillation.distillation_loss.{name}" in keys, name
        teacher = cfg.distillation.teacher_models.teacher_model
        for name in ("key", "model_path", "num_replicas"):
            assert f"distillation.teacher_models.teacher_model.{name}" in keys
        assert cfg.distillation.enabled is True and loss.loss_mode == "k1" and loss.use_policy_gradient is True
        assert loss.use_task_rewards is False and loss.loss_max_clamp is None and loss.log_prob_min_clamp is None
        assert teacher.model_path.endswith("qwen3-235b-a22b/general-rl/hf")
        pool = cfg.distillation.n_gpus_per_node * cfg.distillation.nnodes
        assert teacher.num_replicas * teacher.inference.tensor_model_parallel_size == pool


def test_general_rl_runs_the_tool_agent_loop_with_our_tools(specs, composed, tmp_path):
    import yaml

    from qwen3repro.verl.config_gen import write_verl_config

    spec = dataclasses.replace(specs["general-rl", "qwen3-32b"], run_dir=tmp_path)
    cfg = composed["general-rl", "qwen3-32b"]
    mt = cfg.actor_rollout_ref.rollout.multi_turn
    assert mt.enable is True and mt.format == "hermes" and mt.max_assistant_turns == spec.recipe.max_turns
    assert cfg.actor_rollout_ref.rollout.agent.default_agent_loop == "tool_agent"
    assert cfg.reward.custom_reward_function.reward_kwargs.judge_model == "Qwen/Qwen2.5-72B-Instruct"
    write_verl_config(spec)
    tools = yaml.safe_load(spec.tool_config_path.read_text())["tools"]
    assert [t["tool_schema"]["function"]["name"] for t in tools] == ["calculator", "lookup", "search"]
    assert all(t["class_name"].startswith("qwen3repro.verl.tools.") and t["config"]["type"] == "native"
               for t in tools)


# ------------------------------------------------------------------------------------------ refusals
def _with(spec, **changes):
    spec = dataclasses.replace(spec, **{k: v for k, v in changes.items() if k in ("res", "recipe")})
    spec.size = {**spec.size, **changes.get("size", {})}
    spec.preset = {**spec.preset, **changes.get("preset", {})}
    return spec


def test_refuses_indivisible_batches_and_impossible_layouts(specs):
    dense, moe, big = (specs["reasoning-rl", m] for m in ("qwen3-8b", "qwen3-30b-a3b", "qwen3-235b-a22b"))
    cases = [
        (_with(dense, size={"train_batch_size": 3}), "is not divisible by"),
        (_with(dense, recipe=dataclasses.replace(dense.recipe, mini_batches=5)), "mini-batches"),
        (_with(dense, preset={"micro_batch_size_per_gpu": 3}), "does not split into"),
        (_with(moe, res=dataclasses.replace(moe.res, tp=8)), "KV heads"),
        (_with(moe, res=dataclasses.replace(moe.res, tp=3)), "not divisible by TP x PP"),
        (_with(moe, res=dataclasses.replace(moe.res, pp=5)), "does not divide the 48 layers"),
        (_with(moe, res=dataclasses.replace(moe.res, ep=3)), "experts"),
        (_with(big, preset={"first_stage_layers": 6}), "do not split"),
        (_with(big, res=dataclasses.replace(big.res, rollout_tp=1)), "exceed its share"),
        (_with(moe, res=dataclasses.replace(moe.res, strategy="fsdp", tp=1, pp=1, ep=1)), "MoE model"),
        (_with(dense, res=dataclasses.replace(dense.res, rollout_tp=3)), "rollout TP 3"),
        (_with(dense, recipe=dataclasses.replace(dense.recipe, loss_type="bnpo")), "no verl loss_agg_mode"),
        (_with(dense, size={"max_response_length": 100_000}), "exceeds"),
    ]
    for spec, message in cases:
        problems = spec.problems()
        assert any(message in p for p in problems), (message, problems)
    distill = specs["distill-online", "qwen3-8b"]
    jsd = _with(distill, recipe=dataclasses.replace(distill.recipe, beta=0.5))
    assert any("only the reverse KL" in p for p in jsd.problems())
    odd_teacher = _with(distill, preset={"teacher_tp": 3})
    odd_teacher.teacher_res = dataclasses.replace(distill.teacher_res, rollout_tp=3)
    assert any("teacher TP 3" in p for p in odd_teacher.problems())


def test_loss_aggregation_mapping_follows_our_loss_types(specs):
    spec = specs["reasoning-rl", "qwen3-8b"]
    for loss_type, mode in (("grpo", "seq-mean-token-mean"), ("dr_grpo", "seq-mean-token-sum-norm")):
        s = _with(spec, recipe=dataclasses.replace(spec.recipe, loss_type=loss_type))
        overrides = s.overrides()
        assert f"actor_rollout_ref.actor.loss_agg_mode={mode}" in overrides
        if loss_type == "dr_grpo":  # Σ / (B · max completion length): a constant, not the padded length
            assert f"actor_rollout_ref.actor.loss_scale_factor={s.size['max_response_length']}" in overrides


def test_launch_refuses_missing_parent_and_environment(specs, tmp_path):
    spec = dataclasses.replace(specs["reasoning-rl", "qwen3-8b"], run_dir=tmp_path)
    refusals = " ".join(spec.launch_refusals(root=tmp_path))
    assert "cold-start's Hugging Face folder" in refusals and "no checkpoint to convert" in refusals
    assert "make verl-env" in refusals and "train.parquet is missing" in refusals
    (spec.parent_hf).mkdir(parents=True)
    (spec.parent_hf / "config.json").write_text("{}")
    assert "Hugging Face folder" not in " ".join(spec.launch_refusals(root=tmp_path))


def test_launch_converts_the_parents_latest_nanotron_checkpoint(tmp_path, monkeypatch):
    """The actor loads the parent's latest nanotron checkpoint in Hugging Face layout, converted at launch with
    the model's tokenizer (`nanotron_to_hf`, tested in test_nanotron_convert.py; replaced here)."""
    from qwen3repro.verl import config_gen as verl_gen

    converted = []

    def fake_to_hf(ckpt, out, tokenizer=None):
        converted.append((Path(ckpt), Path(out), tokenizer))
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text("{}")

    monkeypatch.setattr(verl_gen, "nanotron_to_hf", fake_to_hf)
    with CliRunner().isolated_filesystem(temp_dir=tmp_path):
        ckpts = Path("runs/full/qwen3-8b/cold-start/checkpoints")
        (ckpts / "250").mkdir(parents=True)
        (ckpts / "latest.txt").write_text("250")
        r = CliRunner().invoke(full_command, ["--stage", "reasoning-rl", "--model", "qwen3-8b"])
        assert converted == [(ckpts / "250", Path("runs/full/qwen3-8b/cold-start/hf"), "Qwen/Qwen3-8B")]
        assert r.exit_code != 0 and "Hugging Face folder" not in r.output  # refused for other reasons here


def test_make_full_dispatches_verl_stages(tmp_path):
    with CliRunner().isolated_filesystem(temp_dir=tmp_path):
        r = CliRunner().invoke(full_command, ["--stage", "distill-online", "--model", "qwen3-8b", "--dry-run",
                                              "--out", "out"])
        assert r.exit_code == 0, r.output
        assert "-m verl.trainer.main_ppo --config-name=ppo_trainer" in r.output and "teacher" in r.output
        assert "verl.model_merger merge --backend fsdp" in r.output and "qwen3repro eval-hf" in r.output
        assert Path("out/distill-online.verl.overrides").is_file()
        launched = CliRunner().invoke(full_command, ["--stage", "reasoning-rl", "--model", "qwen3-8b", "--out", "out"])
    assert launched.exit_code == 1 and "cannot launch" in launched.output and "cold-start" in launched.output


# ------------------------------------------------------------------------------------------ verl's own checks
VALIDATE = r"""
import json, sys
from hydra import compose, initialize_config_dir
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import omega_conf_to_dataclass, validate_config
config_dir, cases = sys.argv[1], json.load(open(sys.argv[2]))
with initialize_config_dir(config_dir=config_dir, version_base=None):
    for name, overrides in cases:
        cfg = compose(config_name=name, overrides=overrides)
        validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
        omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
        if cfg.distillation.enabled:
            omega_conf_to_dataclass(cfg.distillation)   # the teacher pool and context checks
print("validated", len(cases))
"""


@pytest.mark.skipif(not VERL_PYTHON.is_file(), reason="the verl environment is absent (make verl-env)")
def test_verl_validate_config_accepts_every_config(specs, tmp_path):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([[spec.config_name, spec.overrides()] for spec in specs.values()]))
    config_dir = subprocess.run([str(VERL_PYTHON), "-c", "import importlib.util, pathlib; s = importlib.util."
                                 "find_spec('verl'); print(pathlib.Path(list(s.submodule_search_locations)[0]) / "
                                 "'trainer' / 'config')"], capture_output=True, text=True, check=True).stdout.strip()
    r = subprocess.run([str(VERL_PYTHON), "-c", VALIDATE, config_dir, str(cases)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"validated {len(specs)}" in r.stdout


TOOLS = r"""
import asyncio, json, sys, types
from verl.tools.tool_registry import initialize_tools_from_config
tools = {t.name: t for t in initialize_tools_from_config(sys.argv[1])}
agent = types.SimpleNamespace(extra_fields={})   # verl's per-trajectory scratch space
async def call(name, args):
    iid, _ = await tools[name].create(create_kwargs={"world_seed": 0})
    response, _, metrics = await tools[name].execute(iid, args, agent_data=agent)
    await tools[name].release(iid)
    return response.text, metrics["outcome"]
async def main():
    return [await call("calculator", {"expression": "(17 + 5) * 3"}), await call("lookup", {"name": "x", "attribute": "pet"}),
            await call("search", {"query": "pet"}), await call("calculator", {"expression": "1 + 1"})]
print(json.dumps(asyncio.run(main())))
"""


@pytest.mark.skipif(not VERL_PYTHON.is_file(), reason="the verl environment is absent (make verl-env)")
def test_tool_adapters_answer_as_our_environment_inside_verl(specs, tmp_path):
    from qwen3repro.verl.config_gen import write_verl_config

    spec = dataclasses.replace(specs["general-rl", "qwen3-8b"], run_dir=tmp_path)
    write_verl_config(spec)
    r = subprocess.run([str(VERL_PYTHON), "-c", TOOLS, str(spec.tool_config_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert results[0] == ["66", "ok"] and results[1][1] == "tool_error"
    assert results[3][1] == "call_cap"  # the recipe's max_calls = 3 per trajectory
