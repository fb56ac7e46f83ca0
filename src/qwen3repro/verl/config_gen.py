"""Generate one verl 0.9.1 Hydra override list per (RL stage, real model), print its plan, launch it.

    spec = build_verl_spec("reasoning-rl", "qwen3-32b")
    spec.overrides()          # ["algorithm.adv_estimator=grpo", "actor_rollout_ref.actor.clip_ratio_low=0.2", ...]
    write_verl_config(spec)   # runs/full/<model>/<stage>/<stage>.verl.overrides, .qwen3repro.json, .sh (+ tools.yaml)
    make full STAGE=reasoning-rl MODEL=qwen3-32b DRY_RUN=1

Where each value comes from:

* scale-free settings: the stage's recipe (`recipes/<recipe>.toml`), read through the tiny stage's own config class
  (`GRPOConfig`, `GeneralRLConfig`, `OnPolicyDistillConfig`) so that defaults and checks are the tiny scale's. The
  mapping recipe field -> verl key is `RECIPE_MAP` below and full/README.md's table; what verl cannot express is
  refused (`bnpo`, a JSD other than the reverse KL) or written down (`GAPS`, printed with every plan);
* sizes (batch, lengths, steps, lr) and the layout: `full/verl.toml` (FSDP for the dense models, Megatron TP/PP/EP
  for the MoE models from verl's published Qwen3 MoE scripts; vLLM rollout TP);
* model shapes: the registry (`models.registry.REAL_MODELS`);
* checkpoints: the actor starts from the parent stage's Hugging Face folder (`runs/full/<model>/<parent>/hf`, what
  `qwen3repro full-eval` writes with `nanotron.convert.nanotron_to_hf`, or what the verl model merger writes for a
  verl parent); the distillation teacher is the teacher model's `<teacher_stage>/hf`; verl's checkpoints go to
  `runs/full/<model>/<stage>/checkpoints` and the merger writes `runs/full/<model>/<stage>/hf`, which
  `qwen3repro eval-hf` evaluates and the next stage starts from;
* data: the parquet files `qwen3repro.verl.data` writes (`runs/full/<model>/<stage>/verl-data/{train,val}.parquet`);
  the reward: `qwen3repro.verl.reward.compute_score` (one entry for every data_source).

Refused before verl sees them (`problems`): batches that do not divide (verl's own `validate_config` checks, and
the mini-/micro-batch split of each rank), impossible layouts (TP x PP not dividing the GPUs, TP above the KV
heads for Megatron, experts not dividing over EP, pipeline stages not splitting the layers, vLLM weights above its
memory share), and recipe settings verl cannot express. Launching also refuses a missing parent or teacher
checkpoint, missing data, a missing verl environment (`make verl-env`) and a multi-node run without a Ray cluster.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from ..config import ConfigError, ModelConfig
from ..models.registry import HUB_IDS, REAL_MODELS, get_model_config
from ..nanotron.config_gen import latest_checkpoint, load_settings
from ..nanotron.convert import nanotron_to_hf
from ..recipes import load_recipe, load_toml, repo_root, split_recipe
from ..stages.general_rl import GeneralRLConfig
from ..stages.grpo import GRPOConfig
from ..stages.onpolicy_distill import OnPolicyDistillConfig
from .plan import GIB, MEMORY_HEADROOM, Resources, rollout_memory, step_seconds, train_memory
from .tools import tool_config

VERL_VERSION = "0.9.1"
VERL_VENV = ".venv-verl"  # `make verl-env`: verl pins transformers < 5.11, so it gets its own environment
VERL_ENTRY = "verl.trainer.main_ppo"
REWARD_PATH = "pkg://qwen3repro.verl.reward"  # verl's load_module: "pkg://" imports a module by name
REWARD_NAME = "compute_score"
# The judge server's address: the reward module reads this variable at run time before its judge_base_url keyword;
# the generator writes the same value into the keyword so that the plan shows where the judge is expected.
JUDGE_URL_ENV = "QWEN3REPRO_JUDGE_BASE_URL"
# `make full` stage name -> recipe. These stages are trained through verl, every other full-scale stage through
# nanotron.
VERL_STAGES = {"reasoning-rl": "reasoning-rl", "general-rl": "general-rl", "distill-online": "onpolicy-distill"}
# Our GRPO `loss_type` -> verl's `loss_agg_mode` (verl/trainer/ppo/core_algos.py `agg_loss`):
# * dapo: Σ M·L over the tokens of the whole mini-batch / their count = verl's "token-mean" (normalised by the
#   global batch's token count, `batch_num_tokens`);
# * grpo: the mean over sequences of each sequence's token mean = "seq-mean-token-mean";
# * dr_grpo: Σ M·L / (B · max completion length) = "seq-mean-token-sum-norm" with `loss_scale_factor` = the
#   maximum response length (set explicitly: verl's default is the padded length of each micro-batch).
# bnpo (normalised by the *micro-batch's* tokens) has no verl mode: verl always normalises by the global batch.
LOSS_AGG_MODES = {"dapo": "token-mean", "grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm"}
# verl's dual-clip bound for negative advantages (clip_ratio_c, default 3): our grpo_loss has no dual clip, so it is
# set far beyond any ratio verl can produce (it clamps log-ratios to ±20 before exponentiating, core_algos).
NO_DUAL_CLIP = 1.0e9
KL_LOSS_TYPE = "low_var_kl"  # verl's name for k3 (e^Δ − Δ − 1, clamped to ±10): the KL our beta weighs
# The trainer stops at total_training_steps; epochs only bound it from above, so this is a ceiling, not a size.
TOTAL_EPOCHS_CAP = 1000
PROJECT = "qwen3repro-full"
DATA_DIRNAME = "verl-data"
HF_DIRNAME = "hf"  # a stage's output in Hugging Face layout (nanotron's via full-eval; verl's via its model merger)

# What verl 0.9.1 cannot express of our recipes, printed with every plan and written into the sidecar.
GAPS = {
    "entropy": "entropy_control proportional/adaptive: verl has only a fixed entropy_coeff, so the coefficient is 0 "
               "(clip-higher still counters collapse) and entropy is only logged (calculate_entropy)",
    "scale_rewards": "scale_rewards = batch (advantages / the batch's reward std): verl's GRPO divides by each "
                     "group's std or by nothing; 'none' is used, equal to ours up to one positive factor per step",
    "max_gen_rounds": "max_gen_rounds: verl's V1 trainer refills filtered groups until the batch is full, "
                      "without a cap on generation rounds",
    "kl_bias_correction": "the k3 KL's importance ratio (our kl_bias_correction) has no verl counterpart "
                          "(only used when beta > 0)",
    "kl_logging": "with beta = 0 verl loads no reference model, so the KL to the starting model is not logged",
    "jsd": "the full-vocabulary reverse KL (loss = jsd, beta = 1): a vLLM teacher returns sampled-token log-probs, "
           "so verl uses the per-token k1 estimator as a policy-gradient advantage (loss = pg, same gradient in "
           "expectation)",
    "tool_tokens": "verl caps a tool response in characters, ours in tokens: max_response_tokens x "
                   "tool_response_chars_per_token",
    "reward_model": "general RL's Bradley-Terry reward model (the reward-model stage) is not trained at full scale; "
                    "its tasks are scored by the judge",
}
GAPS_BY_STAGE = {"reasoning-rl": ("entropy", "max_gen_rounds", "kl_logging"),
                 "general-rl": ("entropy", "scale_rewards", "max_gen_rounds", "kl_logging", "tool_tokens",
                                "reward_model"),
                 "distill-online": ("jsd",)}
# =================================================================================================


def load_verl_settings(root: Path | None = None) -> dict:
    """full/verl.toml, with every real model present."""
    settings = load_toml((root or repo_root()) / "full" / "verl.toml")
    missing = sorted(set(REAL_MODELS) - set(settings.get("models", {})))
    if missing:
        raise ConfigError(f"full/verl.toml has no entry for {', '.join(missing)}")
    unknown = sorted(set(settings.get("stages", {})) - set(VERL_STAGES))
    if unknown:
        raise ConfigError(f"full/verl.toml sizes unknown stages {unknown}; verl stages: {', '.join(VERL_STAGES)}")
    return settings


def recipe_config(stage: str, root: Path | None = None):
    """The recipe's scale-free settings through the tiny stage's config class (its defaults and checks)."""

    classes = {"reasoning-rl": GRPOConfig, "general-rl": GeneralRLConfig, "distill-online": OnPolicyDistillConfig}
    graph_keys, own = split_recipe(load_recipe(VERL_STAGES[stage], root))
    cfg = classes[stage].from_dict(own, where=f"recipes/{VERL_STAGES[stage]}.toml")
    return graph_keys, cfg


def _fmt(value: Any) -> str:
    """A value in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    text = str(value)
    # Hydra's unquoted values allow letters, digits and a few symbols; anything else goes in single quotes.
    if text and all(c.isalnum() or c in "_-./:+@~" for c in text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class VerlStageSpec:
    """One verl stage × model: where every value comes from is the module doc; `overrides` is what verl reads."""

    stage: str
    model: str
    recipe: Any
    """The recipe's typed config (GRPOConfig, GeneralRLConfig or OnPolicyDistillConfig)."""
    parent: str
    size: dict
    preset: dict
    defaults: dict
    res: Resources
    run_dir: Path
    teacher: str | None = None
    teacher_stage: str | None = None
    teacher_res: Resources | None = None
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------------------- paths
    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.model / self.stage

    @property
    def parent_hf(self) -> Path:
        return self.run_dir / self.model / self.parent / HF_DIRNAME

    @property
    def teacher_hf(self) -> Path | None:
        return None if self.teacher is None else self.run_dir / self.teacher / self.teacher_stage / HF_DIRNAME

    @property
    def data_dir(self) -> Path:
        return self.stage_dir / DATA_DIRNAME

    @property
    def checkpoints_path(self) -> Path:
        return self.stage_dir / "checkpoints"

    @property
    def tool_config_path(self) -> Path:
        return self.stage_dir / "tools.yaml"

    # ------------------------------------------------------------------------------- sizes
    @property
    def config(self) -> ModelConfig:
        return get_model_config(self.model)

    @property
    def strategy(self) -> str:
        return self.res.strategy

    @property
    def config_name(self) -> str:
        """verl's top-level config: the Megatron one for the Megatron layouts."""
        return "ppo_megatron_trainer" if self.strategy == "megatron" else "ppo_trainer"

    @property
    def rollouts_per_query(self) -> int:
        return int(getattr(self.recipe, "group_size", None) or getattr(self.recipe, "samples_per_query", 1))

    @property
    def train_batch_size(self) -> int:
        return int(self.size["train_batch_size"])

    @property
    def mini_batch_size(self) -> int:
        """Prompts per optimizer step: the batch split into the recipe's `mini_batches` (1 unless it says)."""
        return self.train_batch_size // int(getattr(self.recipe, "mini_batches", 1))

    @property
    def ppo_epochs(self) -> int:
        """Passes over each rollout batch: the recipe's μ; on-policy distillation takes one step per batch."""
        return int(getattr(self.recipe, "mu", 1))

    @property
    def seq_tokens(self) -> int:
        return int(self.size["max_prompt_length"]) + int(self.size["max_response_length"])

    @property
    def micro(self) -> int:
        return int(self.preset["micro_batch_size_per_gpu"])

    @property
    def vllm_utilization(self) -> float:
        return float(self.preset.get("vllm_gpu_memory_utilization", self.defaults["vllm_gpu_memory_utilization"]))

    @property
    def loss_agg_mode(self) -> str:
        return LOSS_AGG_MODES.get(getattr(self.recipe, "loss_type", "dapo"), "")

    @property
    def judge_base_url(self) -> str:
        return os.environ.get(JUDGE_URL_ENV) or str(self.size.get("judge_base_url", ""))

    # ------------------------------------------------------------------------------- the overrides
    def overrides(self) -> list[str]:
        """verl's Hydra overrides, grouped as full/README.md's mapping table."""
        r, s, p = self.recipe, self.size, self.preset
        o: dict[str, Any] = {}
        a, ro = "actor_rollout_ref.actor", "actor_rollout_ref.rollout"
        # ---- data
        o.update({"data.train_files": str(self.data_dir / "train.parquet"),
                  "data.val_files": str(self.data_dir / "val.parquet"),
                  "data.prompt_key": "prompt", "data.reward_fn_key": "data_source",
                  "data.train_batch_size": self.train_batch_size,
                  "data.max_prompt_length": int(s["max_prompt_length"]),
                  "data.max_response_length": int(s["max_response_length"]),
                  "data.filter_overlong_prompts": True, "data.truncation": "error", "data.return_raw_chat": True})
        # ---- the model: the parent stage's Hugging Face folder
        o.update({"actor_rollout_ref.model.path": str(self.parent_hf),
                  "actor_rollout_ref.model.enable_gradient_checkpointing": True,
                  "actor_rollout_ref.model.use_remove_padding": True})
        # ---- algorithm: GRPO advantages, no critic, no KL in the reward
        scale = getattr(r, "scale_rewards", "group")
        o.update({"algorithm.adv_estimator": "grpo", "algorithm.norm_adv_by_std_in_grpo": scale == "group",
                  "algorithm.use_kl_in_reward": False, "critic.enable": False})
        dynamic = bool(getattr(r, "dynamic_sampling", False))
        o.update({"algorithm.filter_groups.enable": dynamic,
                  # Reasoning RL drops equal-*accuracy* groups (compute_score's "acc"); general RL, whose
                  # rewards are graded, drops equal-reward groups.
                  "algorithm.filter_groups.metric": "acc" if self.stage == "reasoning-rl" else "reward",
                  "algorithm.filter_groups.max_num_gen_batches": 0})
        # ---- the policy loss
        beta = float(getattr(r, "beta", 0.0)) if self.stage != "distill-online" else 0.0
        o.update({f"{a}.policy_loss.loss_mode": "vanilla",
                  f"{a}.clip_ratio_low": float(getattr(r, "epsilon_low", 0.2)),
                  f"{a}.clip_ratio_high": float(getattr(r, "epsilon_high", 0.2)),
                  f"{a}.clip_ratio_c": NO_DUAL_CLIP,
                  f"{a}.loss_agg_mode": self.loss_agg_mode or "token-mean",
                  f"{a}.use_kl_loss": beta > 0, f"{a}.kl_loss_coef": beta, f"{a}.kl_loss_type": KL_LOSS_TYPE})
        if self.loss_agg_mode == "seq-mean-token-sum-norm":
            o[f"{a}.loss_scale_factor"] = int(s["max_response_length"])
        control = getattr(r, "entropy_control", "none")
        o.update({f"{a}.entropy_coeff": float(r.entropy_coef) if control == "bonus" else 0.0,
                  f"{a}.calculate_entropy": True})
        # ---- optimisation: AdamW, constant LR after a linear warm-up (PolicyOptimizer), the recipe's betas etc.
        o.update({f"{a}.ppo_epochs": self.ppo_epochs, f"{a}.ppo_mini_batch_size": self.mini_batch_size,
                  f"{a}.ppo_micro_batch_size_per_gpu": self.micro, f"{a}.use_dynamic_bsz": False,
                  f"{a}.shuffle": False,
                  f"{a}.optim.lr": float(s["lr"]), f"{a}.optim.lr_warmup_steps": int(s.get("warmup_steps", 0)),
                  f"{a}.optim.betas": [float(b) for b in r.betas], f"{a}.optim.weight_decay": float(r.weight_decay),
                  f"{a}.optim.clip_grad": float(r.clip_grad_norm)})
        if self.strategy == "megatron":
            m = f"{a}.megatron"
            o.update({f"{a}.optim.lr_decay_style": "constant",
                      f"{m}.tensor_model_parallel_size": self.res.tp,
                      f"{m}.pipeline_model_parallel_size": self.res.pp,
                      f"{m}.expert_model_parallel_size": self.res.ep,
                      f"{m}.expert_tensor_parallel_size": self.res.etp,
                      f"{m}.context_parallel_size": 1, f"{m}.sequence_parallel": self.res.tp > 1,
                      f"{m}.use_mbridge": True,  # loads the Hugging Face folder directly, no dist-ckpt conversion
                      f"{m}.param_offload": bool(p.get("offload", False)),
                      f"{m}.optimizer_offload": bool(p.get("offload", False)),
                      # full recomputation, as verl's 80 GB MoE scripts; the plan counts memory this way
                      f"{m}.override_transformer_config.recompute_granularity": "full",
                      f"{m}.override_transformer_config.recompute_method": "uniform",
                      f"{m}.override_transformer_config.recompute_num_layers": 1})
            if p.get("first_stage_layers"):
                o[f"+{m}.override_transformer_config.num_layers_in_first_pipeline_stage"] = int(p["first_stage_layers"])
                o[f"+{m}.override_transformer_config.num_layers_in_last_pipeline_stage"] = int(p["last_stage_layers"])
        else:
            o.update({f"{a}.strategy": "fsdp", f"{a}.grad_clip": float(r.clip_grad_norm),
                      f"{a}.optim.lr_scheduler_type": "constant",
                      f"{a}.fsdp_config.param_offload": bool(p.get("offload", False)),
                      f"{a}.fsdp_config.optimizer_offload": bool(p.get("offload", False))})
        o["actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu"] = int(p["log_prob_micro_batch_size_per_gpu"])
        # ---- rollout: vLLM, the policy's own distribution (no top-k / top-p), the recipe's rollouts per query
        eval_t = float(getattr(r, "eval_temperature", 1.0))
        o.update({f"{ro}.name": "vllm", f"{ro}.mode": "async", f"{ro}.n": self.rollouts_per_query,
                  f"{ro}.temperature": float(r.temperature), f"{ro}.top_p": 1.0, f"{ro}.top_k": -1,
                  f"{ro}.tensor_model_parallel_size": self.res.rollout_tp,
                  f"{ro}.gpu_memory_utilization": self.vllm_utilization,
                  f"{ro}.max_num_batched_tokens": self.seq_tokens, f"{ro}.enable_chunked_prefill": True,
                  f"{ro}.free_cache_engine": True, f"{ro}.calculate_log_probs": True,
                  f"{ro}.log_prob_micro_batch_size_per_gpu": int(p["log_prob_micro_batch_size_per_gpu"]),
                  f"{ro}.val_kwargs.n": int(getattr(r, "eval_k", 1)),
                  f"{ro}.val_kwargs.temperature": eval_t, f"{ro}.val_kwargs.do_sample": eval_t > 0,
                  f"{ro}.val_kwargs.top_p": float(getattr(r, "eval_top_p", 1.0)),
                  f"{ro}.val_kwargs.top_k": int(getattr(r, "eval_top_k", 0)) or -1})
        # ---- reward: our registry behind one entry point; no reward model inside verl
        o.update({"reward.custom_reward_function.path": REWARD_PATH,
                  "reward.custom_reward_function.name": REWARD_NAME,
                  "reward.reward_manager.name": "naive", "reward.reward_model.enable": False})
        if self.stage == "general-rl":
            o.update(self._general_rl_overrides())
        if self.stage == "distill-online":
            o.update(self._distillation_overrides())
        # ---- trainer
        o.update({"trainer.nnodes": self.res.nodes, "trainer.n_gpus_per_node": self.res.gpus_per_node,
                  "trainer.total_training_steps": int(s["steps"]), "trainer.total_epochs": TOTAL_EPOCHS_CAP,
                  "trainer.save_freq": int(self.defaults["save_freq"]),
                  "trainer.test_freq": int(self.defaults["test_freq"]),
                  "trainer.default_local_dir": str(self.checkpoints_path), "trainer.resume_mode": "auto",
                  "trainer.val_before_train": True, "trainer.project_name": PROJECT,
                  "trainer.experiment_name": f"{self.model}-{self.stage}", "trainer.logger": ["console"]})
        return [f"{k}={_fmt(v)}" for k, v in o.items()]

    def _general_rl_overrides(self) -> dict[str, Any]:
        """The tool agent loop with our tools, and the judge's address for the reward module."""
        r, s = self.recipe, self.size
        mt = "actor_rollout_ref.rollout.multi_turn"
        chars = int(r.max_response_tokens) * int(s["tool_response_chars_per_token"])
        o: dict[str, Any] = {f"{mt}.enable": True, f"{mt}.format": "hermes",
                             f"{mt}.tool_config_path": str(self.tool_config_path.resolve()),
                             f"{mt}.max_assistant_turns": int(r.max_turns), f"{mt}.max_user_turns": int(r.max_turns),
                             # every call of a turn runs; the trajectory's cap is the adapters' (tools.py)
                             f"{mt}.max_parallel_calls": int(r.max_calls),
                             f"{mt}.max_tool_response_length": chars,
                             f"{mt}.tool_response_truncate_side": "middle",  # ours cuts the middle too
                             "actor_rollout_ref.rollout.agent.default_agent_loop": "tool_agent"}
        # compute_score(..., **reward_kwargs): the judge server (served by vLLM on the judge nodes)
        kw = "+reward.custom_reward_function.reward_kwargs"
        o.update({f"{kw}.judge_base_url": self.judge_base_url, f"{kw}.judge_model": str(s["judge_model"])})
        return o

    def _distillation_overrides(self) -> dict[str, Any]:
        """Every `distillation.*` field, explicitly: the YAML's defaults differ from the dataclass's (rewards.md §5)."""
        r, t = self.recipe, self.teacher_res
        d, loss = "distillation", "distillation.distillation_loss"
        tm = "distillation.teacher_models.teacher_model"
        teacher_util = float(self.size["teacher_gpu_memory_utilization"])
        return {
            f"{d}.enabled": True, f"{d}.n_gpus_per_node": t.gpus_per_node, f"{d}.nnodes": t.nodes,
            f"{d}.teacher_key": "data_source",
            # reverse KL on the student's samples as a policy-gradient advantage −(log p_S − log p_T), discount 0
            f"{loss}.loss_mode": "k1", f"{loss}.use_policy_gradient": True, f"{loss}.policy_loss_mode": "vanilla",
            f"{loss}.use_task_rewards": False,  # our on-policy distillation has no task reward
            f"{loss}.distillation_loss_coef": 1.0,
            f"{loss}.loss_max_clamp": None, f"{loss}.log_prob_min_clamp": None,  # our loss is not clamped
            f"{loss}.topk": 32,  # read only by the top-k losses (not k1)
            f"+{loss}.use_chunked_topk": False, f"+{loss}.chunked_topk_chunk_size": 4096,
            # one pass over each batch (on-policy): the ratio is 1 and these clips never bind
            f"{loss}.clip_ratio": 0.2, f"{loss}.clip_ratio_low": 0.2, f"{loss}.clip_ratio_high": 0.2,
            f"{tm}.key": "default", f"{tm}.model_path": str(self.teacher_hf),
            f"{tm}.num_replicas": t.gpus // t.rollout_tp,
            f"{tm}.inference.name": "vllm", f"{tm}.inference.tensor_model_parallel_size": t.rollout_tp,
            f"{tm}.inference.data_parallel_size": 1, f"{tm}.inference.expert_parallel_size": 1,
            f"{tm}.inference.gpu_memory_utilization": teacher_util,
            f"{tm}.inference.max_model_len": self.seq_tokens + 1,
            f"{tm}.inference.temperature": float(r.jsd_temperature),
        }

    # ------------------------------------------------------------------------------- checks
    def problems(self) -> list[str]:
        """What verl would refuse, or could not run, found here first (empty: fine)."""
        out: list[str] = []
        c, res, r = self.config, self.res, self.recipe
        loss_type = getattr(r, "loss_type", "dapo")
        if loss_type not in LOSS_AGG_MODES:
            out.append(f"loss_type {loss_type!r} has no verl loss_agg_mode (verl normalises by the global batch, "
                       f"never by one micro-batch); use one of {', '.join(LOSS_AGG_MODES)}")
        if self.stage == "distill-online" and not (r.loss == "pg" or (r.loss == "jsd" and float(r.beta) == 1.0)):
            out.append(f"on-policy distillation loss {r.loss!r} with beta {r.beta}: verl's vLLM teacher gives "
                       "sampled-token log-probs, so only the reverse KL (jsd with beta 1, or pg) is expressible")
        # ---- layout
        if res.strategy not in ("fsdp", "megatron"):
            out.append(f"strategy {res.strategy!r}: fsdp or megatron")
        if res.strategy == "fsdp" and c.is_moe:
            out.append(f"{self.model} is a MoE model: use strategy megatron with expert parallelism")
        if res.strategy == "megatron":
            if res.gpus % (res.tp * res.pp):
                out.append(f"{res.gpus} GPUs are not divisible by TP x PP = {res.tp * res.pp}")
            if res.tp > res.gpus_per_node:
                out.append(f"TP {res.tp} spans more than one node ({res.gpus_per_node} GPUs)")
            if c.num_key_value_heads % res.tp or c.num_attention_heads % res.tp:
                out.append(f"TP {res.tp} must divide the {c.num_key_value_heads} KV heads and "
                           f"{c.num_attention_heads} query heads (Megatron splits query groups over TP)")
            if c.is_moe and c.num_experts % res.ep:
                out.append(f"EP {res.ep} does not divide the {c.num_experts} experts")
            if (res.gpus // max(1, res.pp)) % (res.ep * res.etp):
                out.append(f"EP x expert-TP = {res.ep * res.etp} does not divide the {res.gpus // res.pp} GPUs "
                           "of a pipeline stage")
            first, last = int(self.preset.get("first_stage_layers", 0)), int(self.preset.get("last_stage_layers", 0))
            layers = c.num_hidden_layers
            if first or last:
                middle = res.pp - 2
                if middle < 1 or (layers - first - last) % middle:
                    out.append(f"{layers} layers do not split into a first stage of {first}, a last of {last} and "
                               f"{middle} equal middle stages")
            elif layers % res.pp:
                out.append(f"PP {res.pp} does not divide the {layers} layers")
        elif res.tp * res.pp * res.ep != 1:
            out.append("tp/pp/ep are Megatron settings; FSDP shards over every GPU")
        if res.gpus % res.rollout_tp or res.rollout_tp > res.gpus_per_node:
            out.append(f"rollout TP {res.rollout_tp} must divide the {res.gpus} GPUs and stay within a node")
        if c.num_attention_heads % res.rollout_tp:
            out.append(f"rollout TP {res.rollout_tp} does not divide the {c.num_attention_heads} attention heads (vLLM)")
        if self.seq_tokens > c.max_position_embeddings:
            out.append(f"prompt + response = {self.seq_tokens} tokens exceeds {self.model}'s context "
                       f"({c.max_position_embeddings})")
        # ---- batches (verl's validate_config and ActorConfig.validate, and each rank's micro-batch split)
        tb, n = self.train_batch_size, self.rollouts_per_query
        mini_batches = int(getattr(r, "mini_batches", 1))
        if tb % mini_batches:
            out.append(f"train_batch_size {tb} does not split into the recipe's {mini_batches} mini-batches")
        minimal = res.dp * self.micro if res.strategy == "megatron" else res.gpus
        if (tb * n) % minimal:
            out.append(f"train_batch_size x rollout.n = {tb} x {n} = {tb * n} is not divisible by "
                       f"{'data-parallel ranks x micro-batch' if res.strategy == 'megatron' else 'the GPUs'} = "
                       f"{minimal} (verl validate_config)")
        per_rank = self.mini_batch_size * n
        if per_rank % (res.dp * self.micro):
            out.append(f"a mini-batch of {self.mini_batch_size} x {n} = {per_rank} sequences does not split into "
                       f"{res.dp} data-parallel ranks x micro-batches of {self.micro}")
        # ---- rollout memory: vLLM's weights must fit its share
        roll = self.rollout_memory()
        if roll["kv_room"] <= 0:
            out.append(f"vLLM weights {roll['weights'] / GIB:.1f} GiB per GPU at rollout TP {res.rollout_tp} exceed its "
                       f"share {roll['budget'] / GIB:.1f} GiB (gpu_memory_utilization {self.vllm_utilization})")
        elif roll["concurrent"] < 1:
            out.append(f"vLLM's KV room {roll['kv_room'] / GIB:.1f} GiB holds no {self.seq_tokens}-token sequence")
        # ---- the distillation teacher
        if self.stage == "distill-online":
            t, tc = self.teacher_res, get_model_config(self.teacher)
            if tc.vocab_size != c.vocab_size:
                out.append(f"teacher {self.teacher} vocabulary {tc.vocab_size} != student {c.vocab_size}")
            if t.gpus % t.rollout_tp or t.rollout_tp > t.gpus_per_node:
                out.append(f"teacher TP {t.rollout_tp} must divide its {t.gpus} GPUs and stay within a node")
            if tc.num_attention_heads % t.rollout_tp:
                out.append(f"teacher TP {t.rollout_tp} does not divide {tc.num_attention_heads} attention heads")
            if self.seq_tokens + 1 > tc.max_position_embeddings:
                out.append(f"the teacher reads prompt + response + 1 = {self.seq_tokens + 1} tokens, more than its "
                           f"context {tc.max_position_embeddings}")
            tm = self.teacher_memory()
            if tm["concurrent"] < 1:
                out.append(f"teacher {self.teacher} at TP {t.rollout_tp}: weights {tm['weights'] / GIB:.1f} GiB leave no "
                           f"room for one sequence in {tm['budget'] / GIB:.1f} GiB")
        return out

    # ------------------------------------------------------------------------------- the plan
    def train_memory(self) -> dict[str, Any]:
        return train_memory(self.config, self.res, self.micro * self.seq_tokens, bool(self.preset.get("offload")))

    def rollout_memory(self) -> dict[str, Any]:
        replicas = self.res.gpus // self.res.rollout_tp
        return rollout_memory(self.config, self.res.rollout_tp, self.vllm_utilization,
                              float(self.defaults["gpu_memory_gib"]), self.seq_tokens,
                              math.ceil(self.train_batch_size * self.rollouts_per_query / max(1, replicas)))

    def teacher_memory(self) -> dict[str, Any]:
        t = self.teacher_res
        return rollout_memory(get_model_config(self.teacher), t.rollout_tp,
                              float(self.size["teacher_gpu_memory_utilization"]),
                              float(self.defaults["gpu_memory_gib"]), self.seq_tokens + 1, 1)

    @property
    def memory_limit(self) -> float:
        return MEMORY_HEADROOM * float(self.defaults["gpu_memory_gib"]) * GIB

    @property
    def rollout_peak(self) -> float:
        """The rollout phase on one GPU: the actor's resident state plus vLLM's share."""
        return self.train_memory()["resident"] + self.rollout_memory()["budget"]

    @property
    def fits(self) -> bool:
        return max(self.train_memory()["total"], self.rollout_peak) <= self.memory_limit

    def time(self) -> dict[str, float]:
        frac = float(self.defaults["mean_length_fraction"])
        teacher = get_model_config(self.teacher) if self.teacher else None
        per_step = step_seconds(
            self.config, self.res, sequences=self.train_batch_size * self.rollouts_per_query,
            prompt_tokens=frac * int(self.size["max_prompt_length"]),
            response_tokens=frac * int(self.size["max_response_length"]), ppo_epochs=self.ppo_epochs,
            with_reference=float(getattr(self.recipe, "beta", 0.0)) > 0 and self.stage != "distill-online",
            tokens_per_s_per_gpu=float(self.preset["rollout_tokens_per_s_per_gpu"]),
            peak_tflops=float(self.defaults["peak_tflops_bf16"]), mfu=float(self.defaults["train_mfu"]),
            teacher=teacher, teacher_gpus=self.teacher_res.gpus if self.teacher_res else 0)
        steps = int(self.size["steps"])
        return {**per_step, "steps": steps, "seconds": steps * per_step["total"]}

    @property
    def extra_gpus(self) -> dict[str, int]:
        """GPUs outside the actor's pool: the judge's and the teacher's."""
        out = {}
        if self.stage == "general-rl":
            out["judge"] = int(self.size["judge_nodes"]) * self.res.gpus_per_node
        if self.teacher_res is not None:
            out["teacher"] = self.teacher_res.gpus
        return out

    def layout_line(self) -> str:
        res = self.res
        if res.strategy == "megatron":
            lay = (f"Megatron TP {res.tp} x PP {res.pp} x EP {res.ep} (expert TP {res.etp}), dp {res.dp}"
                   + (", weights and optimizer offloaded during rollout" if self.preset.get("offload") else ""))
        else:
            lay = f"FSDP over {res.gpus} GPUs" + (" (offloaded)" if self.preset.get("offload") else "")
        return (f"{res.nodes} node(s) x {res.gpus_per_node} GPUs = {res.gpus} GPUs: {lay}; vLLM rollout TP "
                f"{res.rollout_tp} ({res.gpus // res.rollout_tp} replicas), hybrid engine")

    def plan_lines(self) -> list[str]:
        g = lambda b: f"{b / GIB:6.1f} GiB"  # noqa: E731
        tm, rm, t = self.train_memory(), self.rollout_memory(), self.time()
        limit = f"{MEMORY_HEADROOM:.0%} of {float(self.defaults['gpu_memory_gib']):g} GiB"
        n = self.rollouts_per_query
        lines = [
            f"plan: {self.model} · stage {self.stage} (recipe {VERL_STAGES[self.stage]}) on verl {VERL_VERSION}",
            f"  layout      {self.layout_line()}",
        ]
        for role, gpus in self.extra_gpus.items():
            what = (f"{self.size['judge_model']} served by vLLM TP {self.size['judge_tp']}" if role == "judge" else
                    f"{self.teacher} ({self.teacher_stage}) served by vLLM TP {self.teacher_res.rollout_tp}, "
                    f"{self.teacher_res.gpus // self.teacher_res.rollout_tp} replica(s)")
            lines.append(f"  {role:<11} {gpus} more GPUs: {what}")
        lines += [
            f"  batch       {self.train_batch_size} prompts x {n} rollouts = {self.train_batch_size * n} sequences per "
            f"step; {self.train_batch_size // self.mini_batch_size} mini-batch(es), {self.ppo_epochs} pass(es); "
            f"micro-batch {self.micro} per GPU",
            f"  lengths     prompt <= {self.size['max_prompt_length']}, response <= {self.size['max_response_length']} "
            f"tokens; {self.size['steps']} steps, LR {float(self.size['lr']):.3g} after {self.size.get('warmup_steps', 0)} "
            "warm-up steps, then constant",
            f"  training memory/GPU: weights {g(tm['weights'])}, gradients {g(tm['gradients'])}, optimizer "
            f"{g(tm['optimizer'])}, activations {g(tm['activations'])} (recomputed layers), logits {g(tm['logits'])}"
            + (f", gathered layers {g(tm['gathered'])}" if tm["gathered"] else "") + f" = {g(tm['total'])}",
            f"  rollout memory/GPU: vLLM share {g(rm['budget'])} (weights {g(rm['weights'])}, KV room "
            f"{g(rm['kv_room'])}: {rm['concurrent']} sequences of {self.seq_tokens} tokens at once, "
            f"{rm['waves'] or '-'} wave(s) per step) + actor state kept {g(tm['resident'])} = {g(self.rollout_peak)}",
            "  memory      " + (f"fits in {limit}" if self.fits else f"DOES NOT FIT in {limit}"),
            f"  time        {t['total']:.0f} s per step (rollout {t['rollout']:.0f} s at "
            f"{float(self.preset['rollout_tokens_per_s_per_gpu']):,.0f} tokens/s per GPU, "
            + (f"teacher {t['teacher']:.0f} s, " if t["teacher"] else "")
            + f"training {t['training']:.0f} s at MFU {float(self.defaults['train_mfu']):.0%}; mean lengths "
            f"{float(self.defaults['mean_length_fraction']):.0%} of the maxima): {t['seconds'] / 3600:,.1f} h for "
            f"{t['steps']} steps",
        ]
        if self.stage == "distill-online":
            tmem = self.teacher_memory()
            lines.append(f"  teacher mem vLLM share {g(tmem['budget'])}: weights {g(tmem['weights'])}, "
                         f"{tmem['concurrent']} sequences scored at once per replica")
        return lines

    # ------------------------------------------------------------------------------- commands
    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", VERL_ENTRY, f"--config-name={self.config_name}", *self.overrides()]

    def merge_command(self) -> str:
        """verl's model merger: the last checkpoint's actor -> Hugging Face layout in <stage>/hf."""
        last = self.checkpoints_path / f"global_step_{int(self.size['steps'])}" / "actor"
        return (f"{VERL_VENV}/bin/python -m verl.model_merger merge --backend {self.strategy} "
                f"--local_dir {last} --target_dir {self.stage_dir / HF_DIRNAME}")

    def eval_command(self) -> str:
        return f"qwen3repro eval-hf {self.stage_dir / HF_DIRNAME} --out {self.stage_dir / 'eval'} --device cuda"

    def launch_refusals(self, force: bool = False, root: Path | None = None) -> list[str]:
        """What stops a launch before any GPU is asked for (empty: go)."""
        out = []
        if not (self.parent_hf / "config.json").is_file():
            out.append(f"the actor starts from {self.parent}'s Hugging Face folder {self.parent_hf}, which does not "
                       f"exist yet, and {self.parent} has no checkpoint to convert into it (train {self.parent} first)")
        if self.teacher_hf is not None and not (self.teacher_hf / "config.json").is_file():
            out.append(f"the teacher {self.teacher}'s {self.teacher_stage} output {self.teacher_hf} does not exist yet")
        for split in ("train", "val"):
            if not (self.data_dir / f"{split}.parquet").is_file():
                out.append(f"{self.data_dir / f'{split}.parquet'} is missing (write it with: python -m "
                           f"qwen3repro.verl.data --stage {self.stage} --model {self.model})")
        if not ((root or repo_root()) / VERL_VENV / "bin" / "python").is_file():
            out.append(f"the verl environment {VERL_VENV} is missing (make verl-env)")
        if self.res.nodes > 1 and not os.environ.get("RAY_ADDRESS"):
            out.append(f"{self.res.nodes} nodes need a Ray cluster: `ray start --head` on this node, `ray start "
                       "--address <head>:6379` on the others, then RAY_ADDRESS=<head>:6379")
        if not self.fits and not force:
            out.append(f"the plan does not fit in {MEMORY_HEADROOM:.0%} of GPU memory (more nodes, offload or a "
                       "shorter response in full/verl.toml; --force / FORCE=1 to launch anyway)")
        return out

    def sidecar(self) -> dict:
        return {
            "generated_by": "qwen3repro.verl.config_gen (do not edit; regenerate)",
            "verl_version": VERL_VERSION, "stage": self.stage, "recipe": VERL_STAGES[self.stage],
            "recipe_settings": _jsonable(dataclasses.asdict(self.recipe)), "model": self.model,
            "parent_stage": self.parent, "starts_from": str(self.parent_hf),
            "teacher": str(self.teacher_hf) if self.teacher_hf else None,
            "layout": {**dataclasses.asdict(self.res), "gpus": self.res.gpus, "dp": self.res.dp},
            "extra_gpus": self.extra_gpus, "config_name": self.config_name, "overrides": self.overrides(),
            "not_expressible_in_verl": {k: GAPS[k] for k in GAPS_BY_STAGE[self.stage]},
            "after": {"merge": self.merge_command(), "evaluate": self.eval_command()},
        }


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def is_verl_stage(stage: str) -> bool:
    return stage in VERL_STAGES


def build_verl_spec(stage: str, model: str, nodes: int | None = None, gpus_per_node: int | None = None,
                    root: Path | None = None, run_dir: Path | None = None) -> VerlStageSpec:
    """`stage` × `model` from its recipe and full/verl.toml; a wrong name lists the valid ones."""
    if stage not in VERL_STAGES:
        raise ConfigError(f"unknown verl stage {stage!r}; verl stages: {', '.join(VERL_STAGES)}")
    if model not in REAL_MODELS:
        raise ConfigError(f"unknown model {model!r}; valid models: {', '.join(REAL_MODELS)}")
    settings = load_verl_settings(root)
    if stage not in settings.get("stages", {}):
        raise ConfigError(f"full/verl.toml has no [stages.{stage}] table")
    defaults, size, preset = settings["defaults"], dict(settings["stages"][stage]), dict(settings["models"][model])
    graph_keys, recipe = recipe_config(stage, root)
    gpn = int(gpus_per_node or defaults["gpus_per_node"])
    megatron = preset["strategy"] == "megatron"
    res = Resources(nodes=int(nodes or preset["nodes"]), gpus_per_node=gpn, strategy=str(preset["strategy"]),
                    tp=int(preset.get("tp", 1)) if megatron else 1, pp=int(preset.get("pp", 1)) if megatron else 1,
                    ep=int(preset.get("ep", 1)) if megatron else 1, etp=int(preset.get("etp", 1)) if megatron else 1,
                    rollout_tp=int(preset["rollout_tp"]))
    teacher = teacher_stage = teacher_res = None
    if stage == "distill-online":
        teacher = str(preset.get("teacher", size["teacher"]))
        if teacher not in REAL_MODELS:
            raise ConfigError(f"full/verl.toml: teacher {teacher!r} is not a real model")
        teacher_stage = str(size["teacher_stage"])
        teacher_res = Resources(nodes=int(preset["teacher_nodes"]), gpus_per_node=gpn, strategy="vllm",
                                rollout_tp=int(preset["teacher_tp"]))
    return VerlStageSpec(stage=stage, model=model, recipe=recipe, parent=str(graph_keys["parent"]), size=size,
                         preset=preset, defaults=defaults, res=res, run_dir=Path(run_dir or Path("runs") / "full"),
                         teacher=teacher, teacher_stage=teacher_stage, teacher_res=teacher_res)


def write_verl_config(spec: VerlStageSpec, out_dir: Path | None = None) -> dict[str, Path]:
    """Write the override list (one per line), the sidecar JSON, a launch script and, for general RL, the tool
    YAML; return their paths."""

    out = Path(out_dir or spec.stage_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"overrides": out / f"{spec.stage}.verl.overrides", "sidecar": out / f"{spec.stage}.qwen3repro.json",
             "script": out / f"{spec.stage}.verl.sh"}
    header = (f"# Generated by qwen3repro.verl.config_gen for {spec.model}, stage {spec.stage}. Do not edit: change "
              f"recipes/, full/verl.toml or the generator and regenerate (make full ... DRY_RUN=1).\n")
    paths["overrides"].write_text(header + "\n".join(spec.overrides()) + "\n")
    paths["sidecar"].write_text(json.dumps(spec.sidecar(), indent=2) + "\n")
    command = " \\\n    ".join(shlex.quote(a) for a in spec.command(f"{VERL_VENV}/bin/python"))
    paths["script"].write_text("#!/usr/bin/env bash\n" + header + "set -euo pipefail\n" + command + "\n")
    if spec.stage == "general-rl":

        spec.tool_config_path.parent.mkdir(parents=True, exist_ok=True)
        spec.tool_config_path.write_text(header + yaml.safe_dump(
            tool_config(int(spec.size["world_seed"]), int(spec.recipe.max_calls)), sort_keys=False))
        paths["tools"] = spec.tool_config_path
    return paths


def run_stage(stage: str, model: str, *, nodes: int | None, gpus_per_node: int | None, dry_run: bool, force: bool,
              out_dir: str | None) -> int:
    """`make full STAGE=<verl stage>`: write the overrides, print the plan and the command; unless `dry_run`, check
    and launch it in the verl environment. Returns the exit status."""


    try:
        spec = build_verl_spec(stage, model, nodes=nodes, gpus_per_node=gpus_per_node)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    problems = spec.problems()
    if problems:
        raise click.ClickException(f"{model} {stage} cannot run on verl:\n  " + "\n  ".join(problems))
    paths = write_verl_config(spec, Path(out_dir) if out_dir else None)
    for line in spec.plan_lines():
        click.echo(line)
    click.echo(f"  starts from {spec.parent_hf} ({spec.parent}'s output in Hugging Face layout)")
    if spec.teacher_hf is not None:
        click.echo(f"  teacher     {spec.teacher_hf}")
    click.echo(f"  data        {spec.data_dir}/{{train,val}}.parquet (python -m qwen3repro.verl.data --stage {stage} "
               f"--model {model})")
    click.echo(f"  reward      {REWARD_PATH}:{REWARD_NAME}")
    if stage == "general-rl":
        click.echo(f"  judge       vllm serve {spec.size['judge_model']} --tensor-parallel-size {spec.size['judge_tp']} "
                   f"on the judge node(s), at {spec.judge_base_url} ({JUDGE_URL_ENV})")
        click.echo(f"  tools       {spec.tool_config_path} (qwen3repro.verl.tools adapters)")
    role = "flagship" if stage != "distill-online" else "student"

    if load_settings()["models"][model]["role"] != role:
        click.echo(f"  note: the report runs {stage} only for the {role} models")
    for key in GAPS_BY_STAGE[stage]:
        click.echo(f"  not in verl {GAPS[key]}")
    click.echo(f"  overrides   {paths['overrides']} · sidecar {paths['sidecar']}")
    click.echo(f"  launch      {paths['script']}  ({VERL_VENV}/bin/python -m {VERL_ENTRY} --config-name="
               f"{spec.config_name} + {len(spec.overrides())} overrides)")
    click.echo(f"  afterwards  {spec.merge_command()}")
    click.echo(f"              {spec.eval_command()}")
    if dry_run:
        return 0
    parent_ckpt = latest_checkpoint(spec.run_dir / model / spec.parent / "checkpoints")
    if not (spec.parent_hf / "config.json").is_file() and parent_ckpt is not None:
        # The parent trained through nanotron: its latest checkpoint in Hugging Face layout, with the model's
        # tokenizer and chat template, is what verl's actor loads.
        click.echo(f"  converting {parent_ckpt} -> {spec.parent_hf}")
        try:
            nanotron_to_hf(parent_ckpt, spec.parent_hf, tokenizer=HUB_IDS[model])
        except (ValueError, OSError) as e:
            click.echo(f"\nerror: converting {parent_ckpt}: {e}", err=True)
            return 1
    refusals = spec.launch_refusals(force)
    if refusals:
        click.echo(f"\nerror: {model} {stage} cannot launch:\n  " + "\n  ".join(refusals), err=True)
        return 1
    return subprocess.call(spec.command(str(repo_root() / VERL_VENV / "bin" / "python")))


def generate_all(out_root: Path) -> list[VerlStageSpec]:
    """Every verl stage × real model, into out_root/<model>/<stage>/."""
    specs = []
    for model in REAL_MODELS:
        for stage in VERL_STAGES:
            spec = build_verl_spec(stage, model, run_dir=out_root)
            write_verl_config(spec)
            specs.append(spec)
    return specs


__all__ = ["VERL_STAGES", "VERL_VERSION", "VERL_VENV", "LOSS_AGG_MODES", "GAPS", "VerlStageSpec", "build_verl_spec",
           "write_verl_config", "generate_all", "run_stage", "is_verl_stage", "load_verl_settings", "recipe_config"]
